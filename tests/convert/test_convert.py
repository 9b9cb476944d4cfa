"""Checkpoint conversion on tiny random models of every family: bit-exact round trips, bad input refused.

The trainer side (a converted checkpoint loaded at TP2 x PP2, a mid-run TP2 x PP2 checkpoint
converted back) is in tests/actor/test_actor_parallel.py, which has the process group for it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megatron_dapo.convert.dcp_io import CheckpointFormatError, CheckpointReader
from megatron_dapo.convert.hf_to_mcore import hf_to_mcore
from megatron_dapo.convert.main import parse_size
from megatron_dapo.convert.mcore_to_hf import mcore_to_hf
from megatron_dapo.convert.output import ConversionError
from megatron_dapo.models.arch import ModelError
from tests.tiny_models import FAMILIES, make_tiny_model, tiny_hf_model

REPO = Path(__file__).resolve().parents[2]


def _sharded_model(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny model saved as several safetensors shards with their index."""
    tiny_hf_model(family, seed=seed).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(tmp_path, family):
    source = _sharded_model(family, tmp_path / "hf")
    hf_to_mcore(source, tmp_path / "mcore", progress=False)
    summary = mcore_to_hf(tmp_path / "mcore", tmp_path / "back", dtype=torch.float32, hf_template=source,
                          shard_size_bytes=50_000, progress=False)
    before, after = _tensors(source), _tensors(tmp_path / "back")
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], before[name]) for name in before)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert summary["shards"] > 1 and set(index["weight_map"]) == set(before)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in before.values())
    # What transformers loads is the source model.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    reference = tiny_hf_model(family).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    assert (tmp_path / "back" / "generation_config.json").is_file()
    # Nothing is left over from the writing.
    assert not list(tmp_path.glob("*.partial"))


def test_an_untied_qwen2_with_biases_converts_and_verifies(tmp_path):
    """Qwen2.5-32B's shape (q/k/v biases, an output layer of its own), which the tiny qwen2 (tied) is not: --verify
    builds the Megatron actor from the checkpoint and compares its log-probs with transformers' both ways."""
    tiny_hf_model("qwen2", seed=3, tie=False).save_pretrained(tmp_path / "hf")
    assert "lm_head.weight" in _tensors(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", verify_tolerance=1e-4, progress=False)
    assert CheckpointReader(tmp_path / "mcore").shape("output_layer.weight") == (211, 64)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", dtype=torch.float32, hf_template=tmp_path / "hf",
                verify_tolerance=1e-4, progress=False)
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(after) == sorted(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_bf16_round_trip_and_the_stored_layout(tmp_path, capsys):
    source = make_tiny_model("qwen3", tmp_path / "hf")
    hf_to_mcore(source, tmp_path / "mcore", dtype=torch.bfloat16, progress=False)
    reader = CheckpointReader(tmp_path / "mcore")
    # Layers stacked on a leading axis, q/k/v fused at TP=1, norms under Transformer Engine's names.
    assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (2, (4 + 2 + 2) * 24, 64)
    assert reader.shape("decoder.layers.mlp.linear_fc1.weight") == (2, 2 * 96, 64)
    assert reader.dtype("decoder.layers.self_attention.linear_qkv.layer_norm_weight") == torch.bfloat16
    assert reader.shape("embedding.word_embeddings.weight") == (211, 64)
    marker = json.loads((tmp_path / "mcore" / "COMPLETE.json").read_text())
    assert marker["weights_only"] and marker["hf_config"]["architectures"] == ["Qwen3ForCausalLM"]
    # --verify compares both sides with the weights rounded to bf16, so the rounding is not what it measures.
    summary = mcore_to_hf(tmp_path / "mcore", tmp_path / "back", dtype=torch.bfloat16, verify_tolerance=1e-4,
                          progress=False)
    assert summary["logp_max_diff"] <= 1e-4
    before, after = _tensors(source), _tensors(tmp_path / "back")
    assert all(torch.equal(after[name], before[name].to(torch.bfloat16)) for name in before)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    # An fp32 copy of bf16 weights says it holds no more than their bf16 values.
    from megatron_dapo.convert.main import main

    assert main(["mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "fp32"), "--dtype", "fp32",
                 "--quiet"]) == 0
    assert "note: the checkpoint's model weights are bfloat16, so the fp32 copy holds their values exactly" in \
        capsys.readouterr().out
    # An fp16 copy of them rounds them, and overflows beyond fp16's range.
    assert main(["mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "fp16"), "--dtype", "fp16",
                 "--quiet"]) == 0
    assert "the fp16 copy rounds them and turns any beyond fp16's range (65504) into inf (pass --dtype bf16 to " \
        "keep them exact)" in capsys.readouterr().out
    # hf-to-mcore says so too: fp32 source weights written as fp16 (before: no word, unless --verify caught it).
    assert main(["hf-to-mcore", "--hf", str(source), "--out", str(tmp_path / "half"), "--dtype", "fp16",
                 "--quiet"]) == 0
    assert "note: the checkpoint's model weights are float32; the fp16 copy rounds them and turns any beyond " \
        "fp16's range (65504) into inf (pass --dtype fp32 to keep them exact)" in capsys.readouterr().out
    assert main(["hf-to-mcore", "--hf", str(source), "--out", str(tmp_path / "same"), "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().out  # as stored


def test_cli_converts_both_ways_verified_with_progress(tmp_path):
    source = make_tiny_model("llama", tmp_path / "hf")
    (source / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    to_mcore = subprocess.run(tool + ["hf-to-mcore", "--hf", str(source), "--out", str(tmp_path / "mcore"), "--verify"],
                              capture_output=True, text=True, timeout=300)
    assert to_mcore.returncode == 0, to_mcore.stderr
    assert "verified: max |log-prob difference|" in to_mcore.stdout
    assert "15/15 tensors" in to_mcore.stderr and "GB/s" in to_mcore.stderr
    to_hf = subprocess.run([sys.executable, "-m", "megatron_dapo", "convert", "mcore-to-hf", "--mcore",
                            str(tmp_path / "mcore"), "--out", str(tmp_path / "back"), "--dtype", "fp32",
                            "--hf-template", str(source), "--verify", "--tolerance", "1e-4"],
                           capture_output=True, text=True, timeout=300)
    assert to_hf.returncode == 0, to_hf.stderr
    assert "verified" in to_hf.stdout and "note:" not in to_hf.stdout  # fp32 weights to fp32
    assert (tmp_path / "back" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    # A second conversion into the same folder is refused, and the folder is left as it was.
    again = subprocess.run([sys.executable, "-m", "megatron_dapo", "convert", "mcore-to-hf", "--mcore",
                            str(tmp_path / "mcore"), "--out", str(tmp_path / "back"), "--quiet"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "--overwrite" in again.stderr and "config.json" in again.stderr
    assert _tensors(tmp_path / "back").keys() == _tensors(source).keys()
    # The default bf16 copy of fp32 weights rounds them, and says so.
    rounded = subprocess.run([sys.executable, "-m", "megatron_dapo", "convert", "mcore-to-hf", "--mcore",
                              str(tmp_path / "mcore"), "--out", str(tmp_path / "bf16"), "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert rounded.returncode == 0, rounded.stderr
    assert "note: the checkpoint's model weights are float32; the bf16 copy rounds them" in rounded.stdout


def test_a_copy_without_tokenizer_files_says_so_and_tokenizer_gives_them(tmp_path, capsys):
    from megatron_dapo.convert.main import main

    source = make_tiny_model("qwen2", tmp_path / "hf")
    (source / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    hf_to_mcore(source, tmp_path / "mcore", progress=False)
    convert = ["mcore-to-hf", "--mcore", str(tmp_path / "mcore"), "--quiet"]
    assert main(convert + ["--out", str(tmp_path / "bare")]) == 0
    assert f"note: {tmp_path / 'bare'} has no tokenizer files" in capsys.readouterr().out
    assert main(convert + ["--out", str(tmp_path / "whole"), "--tokenizer", str(source)]) == 0
    assert "has no tokenizer files" not in capsys.readouterr().out
    assert (tmp_path / "whole" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    # --tokenizer without a template is the model's folder: its generation config (stop ids, sampling defaults) is
    # kept, not made again from config.json; with a template, the template's is.
    generation = '{"eos_token_id": [1, 2], "temperature": 0.6}'
    (source / "generation_config.json").write_text(generation)
    assert main(convert + ["--out", str(tmp_path / "kept"), "--tokenizer", str(source)]) == 0
    assert (tmp_path / "kept" / "generation_config.json").read_text() == generation
    template = tmp_path / "template"
    template.mkdir()
    (template / "config.json").write_text((source / "config.json").read_text())
    (template / "generation_config.json").write_text('{"temperature": 0.9}')
    assert main(convert + ["--out", str(tmp_path / "templated"), "--tokenizer", str(source), "--hf-template",
                           str(template)]) == 0
    assert (tmp_path / "templated" / "generation_config.json").read_text() == '{"temperature": 0.9}'
    # The template's tokenizer files are not mixed with --tokenizer's: a slow tokenizer's vocabulary or a special-
    # tokens map the tokenizer folder lacks is not copied beside it; the template's other files are.
    for name in ("tokenizer.model", "special_tokens_map.json", "tokenizer_config.json", "chat_template.jinja"):
        (template / name).write_text("template's")
    (template / "README.md").write_text("template's")
    assert main(convert + ["--out", str(tmp_path / "mixed"), "--tokenizer", str(source), "--hf-template",
                           str(template), "--overwrite"]) == 0
    written = {p.name for p in (tmp_path / "mixed").iterdir()}
    assert not written & {"tokenizer.model", "special_tokens_map.json", "chat_template.jinja"}, written
    assert (tmp_path / "mixed" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert (tmp_path / "mixed" / "README.md").read_text() == "template's"
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16", config  # read by old and new loaders alike
    capsys.readouterr()
    for folder, why in [(tmp_path / "nowhere", "no such folder"),
                        (tmp_path / "mcore", "holds none of tokenizer.json, tokenizer_config.json")]:
        assert main(convert + ["--out", str(tmp_path / "refused"), "--tokenizer", str(folder)]) == 1
        assert f"--tokenizer {folder}: {why}" in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


def test_verification_fails_when_the_weights_differ(tmp_path):
    from megatron_dapo.convert.verify import check_logprobs

    hf_to_mcore(make_tiny_model("qwen2", tmp_path / "a", seed=0), tmp_path / "mcore", progress=False)
    other = make_tiny_model("qwen2", tmp_path / "b", seed=1)
    with pytest.raises(ConversionError, match=r"verification failed: .* differ by up to"):
        check_logprobs(other, tmp_path / "mcore", tolerance=1e-3)
    # Rounded to bf16 on both sides (the bf16 copy's check), other weights still fail it.
    with pytest.raises(ConversionError, match=r"verification failed: .* differ by up to"):
        check_logprobs(other, tmp_path / "mcore", tolerance=1e-3, round_to=torch.bfloat16)


# ---- bad input: an error naming the file or tensor, and no output that looks complete -----------

def _no_output(tmp_path: Path, name: str = "out") -> bool:
    return not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()


def test_missing_shard_is_named(tmp_path):
    source = _sharded_model("qwen2", tmp_path / "hf")
    shard = sorted(source.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelError, match=f"lists shard\\(s\\) that are missing: {shard.name}"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    assert _no_output(tmp_path)


def test_a_shard_or_index_that_does_not_read_is_named_wherever_it_is_read(tmp_path):
    """A shard cut short after the index was written (an interrupted download): the reader that loads the actor
    and the engine (get, iter_shards) names it as the converter's header check does; so with a damaged index."""
    from megatron_dapo.models.hf_io import HFCheckpointReader

    source = _sharded_model("qwen2", tmp_path / "hf")
    reader = HFCheckpointReader(source)
    shard = sorted(source.glob("*.safetensors"))[1]
    name = next(n for n, s in reader.weight_map.items() if s == shard.name)
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ModelError, match=f"{shard}: not a readable safetensors file"):
        reader.get(name)
    with pytest.raises(ModelError, match=f"{shard}: not a readable safetensors file"):
        list(reader.iter_shards())
    index = source / "model.safetensors.index.json"
    entries = json.loads(index.read_text())
    index.write_text(json.dumps({**entries, "weight_map": {**entries["weight_map"], name: None}}))
    with pytest.raises(ModelError, match=f"{index}: weight_map gives tensor '{name}' the file None, not a file name"):
        HFCheckpointReader(source)
    index.write_text(index.read_text()[:40])
    with pytest.raises(ModelError, match=f"{index}: not a readable JSON file"):
        HFCheckpointReader(source)
    (source / "config.json").write_text("[1]")
    with pytest.raises(ModelError, match="config.json: holds a JSON list, not an object"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    assert _no_output(tmp_path)


def test_quantized_weights_are_refused_by_the_reader(tmp_path):
    """fp8 weights read as plain numbers are their codes, not the model's weights (no scale applied)."""
    from megatron_dapo.models.hf_io import HFCheckpointReader

    save_file({"w": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    reader = HFCheckpointReader(tmp_path)
    for read in (lambda: reader.get("w"), lambda: list(reader.iter_shards())):
        with pytest.raises(ModelError, match="tensor 'w' has dtype torch.float8_e4m3fn, expected one of F32"):
            read()


def test_an_unreadable_or_ambiguous_shard_is_named(tmp_path):
    """Without an index every *.safetensors file is read: one that is not safetensors is named (safetensors' own
    error names no file), and a tensor in two of them (a leftover of another save) is refused, not read from
    whichever came last."""
    source = _sharded_model("qwen2", tmp_path / "hf")
    (source / "model.safetensors.index.json").unlink()
    shards = sorted(source.glob("*.safetensors"))
    save_file(load_file(shards[0]), source / "leftover.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"tensor '.*' is in both .*safetensors and .*safetensors, and no "
                                         r"model.safetensors.index.json says which to read"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    (source / "leftover.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match=f"{source / 'leftover.safetensors'}: not a readable safetensors file"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    assert _no_output(tmp_path)


def test_a_project_error_inside_torch_checkpoint_wrapper_comes_out_as_itself():
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_dapo.convert.dcp_io import _unwrapped

    named = ModelError("model-00002.safetensors: cannot read tensor 'lm_head.weight'")
    assert _unwrapped(CheckpointException("save failed", {0: (named, None)}), "writing") is named
    other = _unwrapped(CheckpointException("save failed", {0: (OSError(28, "No space left on device"), None)}),
                       "out: writing the checkpoint failed")
    assert isinstance(other, CheckpointFormatError)
    assert str(other) == "out: writing the checkpoint failed: OSError: [Errno 28] No space left on device"


@pytest.mark.parametrize("family, name, change, message", [
    ("llama", "model.layers.1.mlp.up_proj.weight", lambda t: t[:90],
     r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape \(90, 64\), expected \(96, 64\) "
     r"from config.json"),
    ("qwen3", "model.layers.0.self_attn.o_proj.bias", lambda t: torch.zeros(64),
     r"tensor 'model.layers.0.self_attn.o_proj.bias' \(in model.safetensors\) is not in the qwen3 table"),
    ("qwen2", "model.norm.weight", lambda t: None, r"tensor\(s\) 'model.norm.weight' are missing"),
], ids=["wrong_shape", "unknown_name", "missing"])
def test_bad_tensor_is_named(tmp_path, family, name, change, message):
    source = make_tiny_model(family, tmp_path / "hf")
    tensors = load_file(source / "model.safetensors")
    tensors[name] = change(tensors.get(name))
    if tensors[name] is None:
        del tensors[name]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=message):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    assert _no_output(tmp_path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    source = make_tiny_model("llama", tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"MistralForCausalLM is not supported; supported: Qwen2ForCausalLM .*"
                                         r"LlamaForCausalLM .*Qwen3ForCausalLM"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    assert _no_output(tmp_path)


def test_output_holding_a_checkpoint_is_refused_unless_overwrite(tmp_path):
    source = make_tiny_model("qwen2", tmp_path / "hf")
    hf_to_mcore(source, tmp_path / "out", progress=False)
    stamp = (tmp_path / "out" / "COMPLETE.json").read_text()
    with pytest.raises(ConversionError, match=r"output folder .*out is not empty \(holds .*COMPLETE.json.*--overwrite"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "COMPLETE.json").read_text() == stamp
    hf_to_mcore(source, tmp_path / "out", overwrite=True, dtype=torch.bfloat16, progress=False)
    assert CheckpointReader(tmp_path / "out").dtype("decoder.final_layernorm.weight") == torch.bfloat16
    assert not (tmp_path / "out.partial").exists()
    # A symbolic link as the output: its target is written, the link kept.
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    hf_to_mcore(source, tmp_path / "link", progress=False)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "COMPLETE.json").is_file()


def test_an_output_folder_that_holds_no_checkpoint_is_refused_even_with_overwrite(tmp_path):
    """`--out ~/models --overwrite`, meant for `~/models/qwen-hf`: a folder with none of a checkpoint's or a model's
    files at its top is not replaced; what it holds is named, and kept."""
    source = make_tiny_model("qwen2", tmp_path / "hf")
    models = tmp_path / "models"
    for name in ("llama", "qwen"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match=r"output folder .*models holds 2 entries \(llama, qwen\) and none of a "
                                              r"checkpoint's or a model's files .*: not replaced, even with --overwrite"):
        hf_to_mcore(source, models, overwrite=True, progress=False)
    assert sorted(p.name for p in models.iterdir()) == ["llama", "qwen"] and not (tmp_path / "models.partial").exists()
    # What an overwrite cut short leaves (its marker and config.json deleted first, some weights not yet) is still
    # a checkpoint's folder: refused without --overwrite, replaced with it.
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ConversionError, match=r"output folder .*cut is not empty \(holds weight files\); pass --overwrite"):
        hf_to_mcore(source, tmp_path / "cut", progress=False)
    hf_to_mcore(source, tmp_path / "cut", overwrite=True, progress=False)
    assert (tmp_path / "cut" / "COMPLETE.json").is_file() and not (tmp_path / "cut" / "__0_0.distcp").read_bytes() == b"x"


def test_a_second_conversion_into_the_same_output_is_refused_while_the_first_writes(tmp_path):
    """The same command started twice (a job submitted again): the second would clear and write the first one's
    .partial folder, and the first would put a mix of both in place. Refused while the first holds its lock; the
    lock dies with the process that held it, and its file goes with a conversion that ends."""
    from megatron_dapo.convert.output import _lock

    source = make_tiny_model("qwen2", tmp_path / "hf")
    release = _lock(tmp_path / "out.partial.lock", tmp_path / "out")  # as a conversion running in another process
    with pytest.raises(ConversionError, match=r"another conversion is writing .*out \(it holds .*out.partial.lock\)"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    release()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_CREAT | os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); "
                               "time.sleep(60)", str(tmp_path / "out.partial.lock")], stdout=subprocess.PIPE)
    holder.stdout.readline()
    with pytest.raises(ConversionError, match=r"another conversion is writing"):
        hf_to_mcore(source, tmp_path / "out", progress=False)
    holder.kill()  # killed: its lock ends with it, its file stays
    holder.wait()
    hf_to_mcore(source, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "COMPLETE.json").is_file() and not (tmp_path / "out.partial.lock").exists()


def test_an_output_that_holds_the_input_is_refused_even_with_overwrite(tmp_path):
    source = make_tiny_model("qwen2", tmp_path / "work" / "hf")
    for out in (tmp_path / "work", source):
        with pytest.raises(ConversionError, match=r"output folder .* holds the input .*: replacing it would delete"):
            hf_to_mcore(source, out, overwrite=True, progress=False)
    assert (source / "config.json").is_file() and not list(tmp_path.glob("**/*.partial"))
    hf_to_mcore(source, tmp_path / "work" / "mcore", progress=False)  # beside it is fine
    with pytest.raises(ConversionError, match=r"holds the input"):
        mcore_to_hf(tmp_path / "work" / "mcore", tmp_path / "work", overwrite=True, progress=False)
    assert (tmp_path / "work" / "mcore" / "COMPLETE.json").is_file()


def test_an_input_in_the_outputs_partial_folder_is_refused(tmp_path):
    """`<out>.partial` is cleared before anything is written: an input there would be deleted before it is read."""
    source = make_tiny_model("qwen2", tmp_path / "model.partial" / "hf")
    with pytest.raises(ConversionError, match=r"the input .*model.partial/hf is in .*model.partial, the folder this "
                                              r"conversion writes first"):
        hf_to_mcore(source, tmp_path / "model", progress=False)
    assert (source / "config.json").is_file() and (source / "model.safetensors").is_file()


def test_a_partial_folder_left_whole_is_read_by_no_loader(tmp_path):
    """A conversion killed while it verified its output leaves `<out>.partial` with every file, the marker
    included, but unverified: no loader takes it (the conversion's own verification does), and no output is
    named so."""
    from megatron_dapo.actor.checkpoint import CheckpointError, check_complete
    from megatron_dapo.config.loader import ConfigError
    from megatron_dapo.trainer.startup import check_model_folder

    source = make_tiny_model("qwen2", tmp_path / "hf")
    hf_to_mcore(source, tmp_path / "mcore", verify_tolerance=1e-4, progress=False)  # verified in its .partial
    check_complete(tmp_path / "mcore")
    shutil.copytree(tmp_path / "mcore", tmp_path / "left.partial")
    shutil.copytree(source, tmp_path / "hf-left.partial")
    unfinished = r"left.partial is an unfinished save or conversion \(a .partial folder"
    with pytest.raises(CheckpointError, match=rf"checkpoint .*{unfinished}"):
        check_complete(tmp_path / "left.partial")  # model.megatron_checkpoint's load
    with pytest.raises(ConversionError, match=rf"--mcore .*{unfinished}"):
        mcore_to_hf(tmp_path / "left.partial", tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match=rf"--hf .*hf-{unfinished}"):
        hf_to_mcore(tmp_path / "hf-left.partial", tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match=rf"--hf-template .*hf-{unfinished}"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", hf_template=tmp_path / "hf-left.partial", progress=False)
    with pytest.raises(ConfigError, match=rf"model.path .*hf-{unfinished}"):
        check_model_folder(str(tmp_path / "hf-left.partial"))
    with pytest.raises(ConversionError, match=r"--out .*out.partial: a name ending in .partial"):
        hf_to_mcore(source, tmp_path / "out.partial", progress=False)
    assert _no_output(tmp_path)


def test_a_tied_config_over_an_untied_checkpoint_is_refused(tmp_path):
    """The output layer is not the embedding: writing the embedding alone would lose the model's head."""
    source = make_tiny_model("llama", tmp_path / "hf")  # untied
    hf_to_mcore(source, tmp_path / "mcore", progress=False)
    marker = json.loads((tmp_path / "mcore" / "COMPLETE.json").read_text())
    (tmp_path / "mcore" / "COMPLETE.json").write_text(json.dumps({k: v for k, v in marker.items() if k != "hf_config"}))
    template = tmp_path / "template"
    template.mkdir()
    config = json.loads((source / "config.json").read_text())
    (template / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ConversionError, match=r"tensor 'output_layer.weight' differs from "
                                              r"'embedding.word_embeddings.weight' \(from row 0\) but the config.json "
                                              r"sets tie_word_embeddings: true"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", hf_template=template, progress=False)
    assert _no_output(tmp_path)


def test_a_damaged_marker_is_named_through_the_command(tmp_path):
    """COMPLETE.json cut short (a disk that filled up as it was written): the command names the file, exit 1 as for
    any conversion error, no traceback and no output."""
    import subprocess
    import sys

    hf_to_mcore(make_tiny_model("qwen2", tmp_path / "hf"), tmp_path / "mcore", progress=False)
    (tmp_path / "mcore" / "COMPLETE.json").write_text('{"step": 3, "hf_con')
    proc = subprocess.run([sys.executable, "-m", "megatron_dapo", "convert", "mcore-to-hf", "--mcore",
                           str(tmp_path / "mcore"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{tmp_path / 'mcore' / 'COMPLETE.json'} cannot be read (JSONDecodeError" in proc.stderr, proc.stderr
    assert _no_output(tmp_path)


def test_the_output_config_names_the_architecture_and_no_stale_weight_index_is_copied(tmp_path):
    source = make_tiny_model("qwen3", tmp_path / "hf")
    config = json.loads((source / "config.json").read_text())
    del config["architectures"]  # read by its model_type
    (source / "config.json").write_text(json.dumps(config))
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model-1.bin"}}))
    (source / "tokenizer_config.json").write_text("{}")
    hf_to_mcore(source, tmp_path / "mcore", progress=False)
    mcore_to_hf(tmp_path / "mcore", tmp_path / "back", hf_template=source, progress=False)
    back = tmp_path / "back"
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    for empty in (None, []):  # as good as absent: named too
        (source / "config.json").write_text(json.dumps({**config, "architectures": empty}))
        mcore_to_hf(tmp_path / "mcore", tmp_path / f"empty{empty}", hf_template=source, progress=False)
        assert json.loads((tmp_path / f"empty{empty}" / "config.json").read_text())["architectures"] == \
            ["Qwen3ForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    assert (back / "tokenizer_config.json").is_file() and not (back / "pytorch_model.bin.index.json").exists()
    # And a config.json with its architectures alone gets its model_type, which AutoConfig reads it by.
    del config["model_type"]
    config["architectures"] = ["Qwen3ForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    mcore_to_hf(tmp_path / "mcore", tmp_path / "typed", hf_template=source, progress=False)
    assert json.loads((tmp_path / "typed" / "config.json").read_text())["model_type"] == "qwen3"
    assert type(transformers.AutoConfig.from_pretrained(tmp_path / "typed")).__name__ == "Qwen3Config"


def test_bad_megatron_checkpoints_are_named(tmp_path):
    source = make_tiny_model("llama", tmp_path / "hf")
    hf_to_mcore(source, tmp_path / "mcore", progress=False)
    # Not a checkpoint at all.
    with pytest.raises(CheckpointFormatError, match="no .metadata file.*a Hugging Face folder"):
        mcore_to_hf(source, tmp_path / "out", progress=False)
    # A template of another model than the checkpoint's marker records: the differing fields are named.
    template = tmp_path / "template"
    template.mkdir()
    config = json.loads((source / "config.json").read_text())
    (template / "config.json").write_text(json.dumps({**config, "intermediate_size": 128, "vocab_size": 200}))
    with pytest.raises(ConversionError, match=r"is another model than the one .*mcore was made from \(vocab_size: "
                                              r"checkpoint 211, template 200; intermediate_size: checkpoint 96, template "
                                              r"128\)"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", hf_template=template, progress=False)
    # Nor may a template change what the layers compute: the same weights under another RoPE base or norm epsilon
    # are another model, which --verify, built from the written config, would pass.
    rope = {**config["rope_parameters"], "rope_theta": 1e6, "rope_type": "default"}  # llama3 scaling dropped too
    (template / "config.json").write_text(json.dumps({**config, "rope_parameters": rope, "rms_norm_eps": 1e-2}))
    with pytest.raises(ConversionError, match=r"another model than the one .*mcore was made from \(rms_norm_eps: "
                                              r"checkpoint 1e-06, template 0.01; rope_theta: checkpoint 50000.0, "
                                              r"template 1000000.0; rope_scaling: checkpoint RopeScaling\("):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", hf_template=template, progress=False)
    (template / "config.json").write_text(json.dumps({**config, "intermediate_size": 128, "vocab_size": 200}))
    # A checkpoint whose marker records no config, for another config: the first mismatching key is named.
    marker = json.loads((tmp_path / "mcore" / "COMPLETE.json").read_text())
    (tmp_path / "mcore" / "COMPLETE.json").write_text(json.dumps({k: v for k, v in marker.items() if k != "hf_config"}))
    with pytest.raises(ConversionError, match=r"tensor 'decoder.layers.mlp.linear_fc1.weight' has shape \(2, 192, 64\), "
                                              r"expected \(2, 256, 64\)"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", hf_template=template, progress=False)
    (tmp_path / "mcore" / "COMPLETE.json").write_text(json.dumps(marker))
    # A save that did not finish.
    (tmp_path / "mcore" / "COMPLETE.json").rename(tmp_path / "marker")
    with pytest.raises(ConversionError, match="no COMPLETE.json, so the save that wrote it did not finish"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", progress=False)
    (tmp_path / "marker").rename(tmp_path / "mcore" / "COMPLETE.json")
    # megatron-core's metadata.json cut short, or not an object: named, not a JSONDecodeError.
    backend = tmp_path / "mcore" / "metadata.json"
    kept = backend.read_text()
    for damaged, said in (("", "not a readable JSON file"), ("[]", "holds a JSON list, not an object")):
        backend.write_text(damaged)
        with pytest.raises(CheckpointFormatError, match=f"{backend}: {re.escape(said)}"):
            mcore_to_hf(tmp_path / "mcore", tmp_path / "out", progress=False)
    backend.write_text(kept)
    (tmp_path / "step_000007.partial").mkdir()  # a save that crashed before it wrote anything
    with pytest.raises(ConversionError, match=r"--mcore .*step_000007.partial is an unfinished save or conversion"):
        mcore_to_hf(tmp_path / "step_000007.partial", tmp_path / "out", progress=False)
    # A data file cut short (a copy that stopped): found by its size before torch's reader fails on it.
    data = (tmp_path / "mcore" / "__0_0.distcp").read_bytes()
    (tmp_path / "mcore" / "__0_0.distcp").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=rf"mcore: file\(s\) cut short: __0_0.distcp \({len(data) // 2} "
                                                    rf"bytes of {len(data)}\)"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", progress=False)
    # A data file listed in the metadata but gone.
    (tmp_path / "mcore" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointFormatError, match=r"listed in .metadata are missing: __0_0.distcp"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "out", progress=False)
    assert _no_output(tmp_path)


def test_shard_sizes_parse():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    with pytest.raises(Exception, match="not a size"):
        parse_size("5 parsecs")


def test_convert_help_lists_both_directions(capsys):
    from megatron_dapo.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["convert", "--help"])  # what `megatron-dapo --help` tells to run
    assert stopped.value.code == 0 and "{hf-to-mcore,mcore-to-hf}" in capsys.readouterr().out


def test_dtype_notes_say_what_the_copy_does_to_the_weights():
    from megatron_dapo.convert.main import dtype_notes

    assert dtype_notes(torch.float32, torch.float32, "hf-to-mcore") == []
    assert dtype_notes(torch.float32, None, "hf-to-mcore") == []  # written as stored
    assert dtype_notes(torch.bfloat16, torch.float32, "hf-to-mcore") == []
    assert "holds their values exactly" in dtype_notes(torch.bfloat16, torch.float32, "mcore-to-hf")[0]
    assert dtype_notes(torch.float16, torch.bfloat16, "mcore-to-hf") == [
        "the checkpoint's model weights are float16; the bf16 copy rounds them (pass --dtype fp16 to keep them exact)"]
    # float64 weights round whatever is written, and no --dtype keeps them.
    for target, given in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        assert dtype_notes(torch.float64, target, "mcore-to-hf") == [
            f"the checkpoint's model weights are float64; the {given} copy rounds them"]
        assert dtype_notes(torch.float64, target, "hf-to-mcore") == [
            f"the checkpoint's model weights are float64; the {given} copy rounds them (leave out --dtype to keep "
            "them exact)"]
    assert "fp16's range (65504)" in dtype_notes(torch.float64, torch.float16, "hf-to-mcore")[0]

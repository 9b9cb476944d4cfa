"""`megatron-dapo check-config`: layouts that fit an allocation and layouts that do not, with the messages."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dapo.cli import main as cli_main
from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import load_config
from megatron_dapo.models.arch import ModelArch
from megatron_dapo.parallel.preflight import (check_allocation, layer_activation_bytes, mlp_activation_bytes,
                                              parameter_counts)

ROOT = Path(__file__).resolve().parents[2]
# Published config.json values of the recipes' models (no weights are needed to check a layout).
QWEN25_32B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "intermediate_size": 27648,
              "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
              "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
              "tie_word_embeddings": False, "hidden_act": "silu"}
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 2560, "intermediate_size": 9728,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True, "hidden_act": "silu"}
CONFIGS = {"recipes/dapo-qwen2.5-32b": QWEN25_32B, "recipes/dapo-qwen3-4b": QWEN3_4B, "trading/config": QWEN3_4B}
"""The GPU configs under examples/ and their models."""


def _check(recipe: str, nodes: int, gpus: int, *overrides: str, memory: float = 80.0):
    return _check_config(f"recipes/{recipe}", nodes, gpus, *overrides, memory=memory)


def _check_config(name: str, nodes: int, gpus: int, *overrides: str, memory: float = 80.0):
    config = load_config(ROOT / "examples" / f"{name}.yaml", list(overrides))
    return check_allocation(config, nodes, gpus, memory, arch=ModelArch.from_hf_config(CONFIGS[name]))


def test_parameter_counts_match_the_published_sizes():
    for config, billions in ((QWEN25_32B, 32.76), (QWEN3_4B, 4.02)):
        arch = ModelArch.from_hf_config(config)
        layer, embedding, output = parameter_counts(arch)
        total = layer * arch.num_layers + embedding + output + arch.hidden_size
        assert abs(total / 1e9 - billions) < 0.01, total


def test_layer_activations_count_the_swiglu_mlp_and_grouped_query_attention():
    """Bytes a token keeps per layer (bf16): norm and linear inputs 8 x hidden, queries twice (fused attention's
    input and output), keys and values, the SwiGLU MLP's tensors (10 x MLP width, measured below), Qwen3's q/k
    norm inputs. Llama 3 8B's shape gives 48 x hidden."""
    llama3_8b = ModelArch.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu"})
    assert layer_activation_bytes(llama3_8b) == 48 * 4096
    qwen25_32b, qwen3_4b = ModelArch.from_hf_config(QWEN25_32B), ModelArch.from_hf_config(QWEN3_4B)
    # 8 x 5120 + 4 x 5120 (queries) + 4 x 1024 (keys, values) + 10 x 27648
    assert layer_activation_bytes(qwen25_32b) == 342016
    # 8 x 2560 + 4 x 4096 + 4 x 1024 + 10 x 9728, + 2 x (4096 + 1024) for the q/k norms
    assert layer_activation_bytes(qwen3_4b) == 148480
    # Tensor parallelism splits all but the four replicated inputs; sequence parallelism splits those too.
    assert layer_activation_bytes(qwen25_32b, tp=8) == 8 * 5120 + (342016 - 8 * 5120) / 8
    assert layer_activation_bytes(qwen25_32b, tp=8, sequence_parallel=True) == 342016 / 8


MLP_SAVED = """
import json, sys
import torch
from megatron.core.transformer.spec_utils import build_module
from megatron_dapo.actor.model import layer_spec, transformer_config
from megatron_dapo.models.arch import ModelArch
from megatron_dapo.parallel.config import ParallelConfig
from megatron_dapo.parallel.init import init_distributed

arch = ModelArch.from_hf_config(json.loads(sys.argv[1]))
mlp = build_module(layer_spec(arch).submodules.mlp,
                   config=transformer_config(arch, init_distributed(ParallelConfig(), seed=0), bf16=True))
weights = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
kept = {}

def pack(t):
    if t.untyped_storage().data_ptr() not in weights:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t

x = torch.randn(32, 1, arch.hidden_size, dtype=torch.bfloat16, requires_grad=True)
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    mlp.to(torch.bfloat16)(x)
print(sum(kept.values()) // 32)
"""


def test_the_mlp_keeps_what_the_estimate_counts():
    """megatron-core's MLP as the actor builds it (bf16, 32 tokens): the tensors its autograd keeps for the backward,
    past the weights, are its input (2 x hidden bytes a token, counted with the replicated inputs) and
    `mlp_activation_bytes` (a world of one in a process of its own)."""
    config = {**QWEN25_32B, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 1}
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    run = subprocess.run([sys.executable, "-c", MLP_SAVED, json.dumps(config)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == 2 * 64 + mlp_activation_bytes(ModelArch.from_hf_config(config)) == 1088


@pytest.mark.parametrize("script", ["dapo-qwen2.5-32b.sbatch", "dapo-qwen3-4b-1node.sbatch", "trading.sbatch"])
def test_each_gpu_sbatch_script_fits_the_allocation_it_asks_for(script):
    text = (ROOT / "examples" / "slurm" / script).read_text()
    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    # One rank per GPU: the node's GPUs as Slurm gives them (--gpus-per-node, which sbatch's own option overrides)
    assert re.search(r"^PROCS_PER_TASK=\$\{PROCS_PER_TASK:-\$\{SLURM_GPUS_ON_NODE:-(\d+)\}\}", text, re.M)[1] == str(gpus)
    name = re.search(r"^CONFIG=examples/(.+)\.yaml", text, re.M).group(1)
    report = _check_config(name, nodes, gpus)
    assert report.fits, report.render()


def test_the_4b_recipe_s_advice_for_sglang_fits_its_node():
    text = (ROOT / "examples" / "recipes" / "dapo-qwen3-4b.yaml").read_text()
    advice = re.search(r"SGLang is installed: (rollout\.name=sglang rollout\.engines=\d+) ", text).group(1).split()
    report = _check("dapo-qwen3-4b", 1, 8, *advice)
    assert report.fits, report.render()
    assert not _check("dapo-qwen3-4b", 1, 8, "rollout.name=sglang").fits  # four engines: three on no first rank


def test_paper_recipe_on_16_nodes_fits_with_the_estimate_shown():
    report = _check("dapo-qwen2.5-32b", 16, 8)
    text = report.render()
    assert report.fits and text.endswith("fits this allocation")
    assert "layout: TP8+SP x PP1 x DP16 = 128 ranks" in text
    assert "model: Qwen2ForCausalLM, 32.76B parameters" in text
    assert re.search(r"optimizer 3\.1 \(sharded over DP 16\).* = 36\.2 GB of 80 GB", text), text
    # 32.76B / TP8 parameters (the vocabulary padded to 152576) x 20 bytes (fp32 master weights and Adam moments
    # gathered, 12, and one of them in transit twice, 8), x 8 ranks a node
    assert "host memory while a checkpoint is saved: each rank gathers its shard's optimizer state from its " \
           "data-parallel group, 81.9 GB per rank, 655 GB per node" in text, text
    # The save's gathers on the device (8 + 4 / 16 bytes a parameter) beside the actor, SGLang's weights (8.2 GB)
    # and the contexts of its 7 other TP workers (3.5 GB).
    assert ("GPU memory while a checkpoint is saved: the actor's weights, gradients and optimizer state 27.6 GB + a "
            "gathered optimizer state 33.8 + the rollout engine's weights (its KV cache freed) and its workers' "
            "contexts 11.7 + overhead 4 = 77.1 GB of 80 GB") in text, text


def test_a_layout_whose_checkpoint_save_does_not_fit_is_refused():
    """At TP4 the 32B recipe trains and generates in 80 GB, but a save's gathers of 8 bytes per parameter of the
    rank's shard do not fit beside the actor and SGLang's weights."""
    report = _check("dapo-qwen2.5-32b", 16, 8, "parallel.tensor_model_parallel_size=4")
    assert not report.fits
    (problem,) = report.problems
    assert problem.startswith("a checkpoint's save needs 134.5 GB per GPU") and "tensor_model_parallel_size" in problem


def test_too_few_nodes_for_the_optimizer_state_says_what_to_change():
    report = _check("dapo-qwen2.5-32b", 1, 8)
    assert not report.fits
    assert "optimizer 49.2" in report.render()
    assert any("exceeds the GPU's 80 GB" in p and "use more nodes" in p for p in report.problems), report.problems


def test_activations_without_recompute_point_at_recompute():
    report = _check("dapo-qwen2.5-32b", 16, 8, "actor.recompute_activations=false", "parallel.sequence_parallel=false")
    assert not report.fits
    (problem,) = report.problems
    assert "set actor.recompute_activations=true" in problem and "set parallel.sequence_parallel=true" in problem
    assert "lower actor.ppo_max_token_len_per_gpu (now 22528)" in problem


def test_layouts_that_cannot_split_the_model_or_the_allocation():
    # TP x PP does not divide the ranks.
    report = _check("dapo-qwen2.5-32b", 3, 8, "parallel.pipeline_model_parallel_size=2")
    assert report.problems == [
        "parallel.tensor_model_parallel_size (8) x parallel.pipeline_model_parallel_size (2) = 16 does not divide "
        "24 ranks: use a number of nodes that makes nodes x 8 a multiple of 16, or change TP / PP"]
    # TP across nodes, and more TP ranks than KV heads.
    report = _check("dapo-qwen2.5-32b", 16, 8, "parallel.tensor_model_parallel_size=16")
    text = " | ".join(report.problems)
    assert "parallel.tensor_model_parallel_size (16) must divide --gpus-per-node (8)" in text
    assert "num_key_value_heads (8) is not divisible by parallel.tensor_model_parallel_size (16)" in text
    # Layers that do not split into the pipeline stages.
    report = _check("dapo-qwen3-4b", 1, 8, "parallel.tensor_model_parallel_size=1",
                    "parallel.pipeline_model_parallel_size=8")
    assert any("num_hidden_layers (36) is not divisible by parallel.pipeline_model_parallel_size (8)" in p
               for p in report.problems), report.problems


def test_batches_and_sequence_lengths():
    report = _check("dapo-qwen3-4b", 8, 8, "actor.ppo_mini_batch_size=2", "data.train_batch_size=64")
    assert any("= 16 sequences per optimizer step is less than the 32 data-parallel ranks: 16 rank(s) idle" in n
               for n in report.notes), report.notes  # wasteful, not refused: the actor runs it
    report = _check("dapo-qwen3-4b", 1, 8, "data.max_response_length=40000", "reward.overlong_buffer.len=2048")
    assert any("41024 tokens exceeds the model's max_position_embeddings (32768)" in p for p in report.problems)
    report = _check("dapo-qwen3-4b", 1, 8, "rollout.embedded.max_seq_len=9000")
    assert report.problems == ["data.max_prompt_length + data.max_response_length = 9216 tokens exceeds "
                               "rollout.embedded.max_seq_len (9000), and the engine refuses a prompt it cannot extend "
                               "by a full response: raise rollout.embedded.max_seq_len or lower them"], report.problems
    assert not _check("dapo-qwen3-4b", 1, 8, "rollout.embedded.max_seq_len=9216").problems
    # SGLang refuses a request past its context_length, when one is given.
    report = _check("dapo-qwen2.5-32b", 16, 8, "rollout.sglang.server_args.context_length=16384")
    assert report.problems == ["data.max_prompt_length + data.max_response_length = 22528 tokens exceeds "
                               "rollout.sglang.server_args.context_length (16384) less the 2 tokens SGLang keeps back, "
                               "and the engine refuses a prompt it "
                               "cannot extend by a full response: raise rollout.sglang.server_args.context_length or "
                               "lower them"], report.problems
    # It gives a request 2 tokens less than its context length.
    assert "exceeds rollout.sglang.server_args.context_length (22528) less the 2 tokens SGLang keeps back" in \
        _check("dapo-qwen2.5-32b", 16, 8, "rollout.sglang.server_args.context_length=22528").problems[0]
    assert not _check("dapo-qwen2.5-32b", 16, 8, "rollout.sglang.server_args.context_length=22530").problems
    # A short test of a recipe with a decay over the run: the run ends within the warm-up (80 steps).
    notes = _check("dapo-qwen3-4b", 1, 8, "trainer.total_training_steps=20", "actor.optim.lr_decay_style=cosine").notes
    assert any("run's 80 optimizer steps (20 x 4) end before the decay starts" in n for n in notes), notes
    assert not any("decay" in n for n in _check("dapo-qwen3-4b", 1, 8, "actor.optim.lr_decay_style=cosine").notes)


def test_embedded_engine_kv_cache_counts_on_rank_0():
    # Colocated, the engine's KV cache (21.7 GB) is freed while the actor trains: it stands in for the activations
    # (2.5 GB) and logits (5.6 GB) of the 30.2 GB training estimate, not on top of them: 30.2 + 8.0 + 13.6.
    text = _check("dapo-qwen3-4b", 1, 8).render()
    assert "KV cache 21.7 GB (rollout.embedded.max_batch_size 16 x 9216 tokens), freed while the actor trains" in text
    assert "activations and logits = 51.9 GB there\n" in text, text
    report = _check("dapo-qwen3-4b", 1, 8, "rollout.embedded.max_batch_size=128")
    assert not report.fits
    assert "KV cache 173.9 GB" in report.render()
    assert report.problems[0].split(": ", 1)[1].startswith("lower rollout.embedded.max_batch_size or set rollout.name=sglang")


def test_cli_exit_codes_and_model_config_flag(tmp_path):
    model_config = tmp_path / "config.json"
    model_config.write_text(json.dumps(QWEN25_32B))
    recipe = str(ROOT / "examples" / "recipes" / "dapo-qwen2.5-32b.yaml")
    command = [sys.executable, "-m", "megatron_dapo", "check-config", recipe, "--gpus-per-node", "8",
               "--model-config", str(model_config)]
    fits = subprocess.run(command + ["--nodes", "16"], capture_output=True, text=True)
    assert fits.returncode == 0 and "fits this allocation" in fits.stdout, fits.stderr
    too_small = subprocess.run(command + ["--nodes", "1"], capture_output=True, text=True)
    assert too_small.returncode == 1 and "problem: the estimate" in too_small.stdout
    # Without a readable model folder, the model's checks are skipped and the note says how to run them.
    bare = subprocess.run(command[:-2] + ["--nodes", "16"], capture_output=True, text=True)
    assert bare.returncode == 0 and "note: models/Qwen2.5-32B/config.json is not readable here" in bare.stdout
    assert bare.stdout.rstrip().endswith("the layout and batches fit this allocation; the model and its memory were "
                                         "not checked"), bare.stdout
    # model.path's own config.json broken: named, exit code 2, no traceback.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    unread = subprocess.run(command[:-2] + ["--nodes", "16", f"model.path={tmp_path / 'model'}"], capture_output=True,
                            text=True)
    assert unread.returncode == 2 and "(model.path's config.json): not a readable JSON file" in unread.stderr
    assert "Traceback" not in unread.stderr, unread.stderr
    # Overrides after the options count too; a broken --model-config is named, without a traceback.
    later = subprocess.run(command + ["--nodes", "16", "rollout.sglang.mem_fraction_static=0.98"], capture_output=True,
                           text=True)
    assert later.returncode == 1 and "lower rollout.sglang.mem_fraction_static to 0.88" in later.stdout, later.stderr
    model_config.write_text("{not json")
    broken = subprocess.run(command + ["--nodes", "16"], capture_output=True, text=True)
    assert broken.returncode == 2 and f"{model_config} (--model-config): not a readable JSON file" in broken.stderr
    assert "Traceback" not in broken.stderr, broken.stderr
    model_config.write_text("[]")  # JSON, but no config.json
    broken = subprocess.run(command + ["--nodes", "16"], capture_output=True, text=True)
    assert broken.returncode == 2 and f"{model_config} (--model-config): holds a JSON list" in broken.stderr
    assert "Traceback" not in broken.stderr, broken.stderr
    # Without model.path or training files the training would not start: said, and config.json here is not read.
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_32B))
    unset = subprocess.run(command[:-2] + ["--nodes", "16", "model.path=''", "data.train_files=[]"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert unset.returncode == 1, unset.stdout + unset.stderr
    assert "problem: model.path is not set: the training refuses to start without it" in unset.stdout, unset.stdout
    assert "note: data.train_files is not set" in unset.stdout and "model: " not in unset.stdout, unset.stdout


def test_an_allocation_that_cannot_exist_is_a_usage_error_not_a_verdict(capsys):
    """Exit 1 is "does not fit" (a script may then ask for more nodes); a count below 1 or a GPU memory that is not
    a positive number is the command line's fault: argparse's exit 2, naming the flag."""
    recipe = str(ROOT / "examples" / "recipes" / "dapo-qwen3-4b.yaml")
    for flags, message in ((["--nodes", "0", "--gpus-per-node", "8"], "argument --nodes: 0 must be at least 1"),
                           (["--nodes", "1", "--gpus-per-node", "eight"], "argument --gpus-per-node: 'eight' is not a "
                                                                          "whole number"),
                           (["--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "0"],
                            "argument --gpu-memory-gb: 0 must be a positive number of GB"),
                           (["--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "nan"],
                            "argument --gpu-memory-gb: nan must be a positive number of GB")):
        with pytest.raises(SystemExit) as exited:
            cli_main(["check-config", recipe, *flags])
        assert exited.value.code == 2, flags
        assert message in capsys.readouterr().err, flags


def test_colocated_sglang_shares_its_gpus_with_the_resident_actor():
    report = _check("dapo-qwen2.5-32b", 16, 8)
    text = report.render()
    # SGLang takes its share of what is free when it starts: 80 - 4 overhead - the actor before its Adam moments.
    assert ("SGLang engine (colocated, 8 GPU(s)): rollout.sglang.mem_fraction_static 0.7 of the 50.4 GB free when "
            "it starts = 35.3 GB per GPU, bf16 weights 8.2 GB of it") in text
    # The other 7 TP workers' CUDA contexts on the node's first GPU, made when they first read a weight bucket there.
    assert ("the other 7 SGLang TP workers' CUDA contexts on the node's first GPU (they read each weight bucket "
            "there): 3.5 GB, counted below") in text
    assert "actor's weights, gradients and optimizer state (27.6 GB): 70.4 GB of 80 GB" in text
    report = _check("dapo-qwen2.5-32b", 16, 8, "rollout.sglang.mem_fraction_static=0.98")
    assert report.problems == ["colocated SGLang needs 84.5 GB per GPU while it generates: set actor.offload=true, "
                               "or lower rollout.sglang.mem_fraction_static to 0.88 or less"], report.problems
    report = _check("dapo-qwen2.5-32b", 16, 8, "rollout.sglang.tp_size=1")
    assert any(p.startswith("the SGLang engine's weights (65.5 GB per GPU at rollout.sglang.tp_size 1)")
               for p in report.problems), report.problems
    # The actor alone fills the GPUs before SGLang starts: no share of a negative remainder is offered as a fix.
    report = _check("dapo-qwen2.5-32b", 1, 8, "parallel.tensor_model_parallel_size=2", "rollout.engines=1")
    assert ("colocated SGLang finds no GPU memory free when it starts: the actor's weights and gradients take 114.7 GB "
            "of 80 GB per GPU already: set actor.offload=true") in " ".join(report.problems), report.problems
    assert not any("mem_fraction_static to" in p for p in report.problems), report.problems
    report = _check("dapo-qwen2.5-32b", 16, 8, "rollout.sglang.tp_size=16")
    assert "rollout.sglang.tp_size (16) is more than a node's 8 GPUs: an engine runs on one node; lower it" in \
        report.problems


def test_actor_offload_gives_sglang_the_whole_gpu_and_checks_the_push():
    """actor.offload: SGLang starts with the actor in host memory (76 GB free instead of 50.4), and what
    must fit is the actor next to SGLang's weights during the push."""
    report = _check("dapo-qwen2.5-32b", 16, 8, "actor.offload=true", "rollout.sglang.mem_fraction_static=0.85")
    text = report.render()
    assert "mem_fraction_static 0.85 of the 76.0 GB free when it starts = 64.6 GB per GPU" in text
    assert ("wait in host memory (11.3 GB per GPU; its gradients are dropped); during the push the actor and "
            "SGLang's weights share the GPU: 43.3 GB of 80 GB") in text
    assert report.problems == [], report.problems
    report = _check("dapo-qwen2.5-32b", 4, 8, "actor.offload=true", "rollout.sglang.tp_size=1",
                    "rollout.engines=4")
    assert any(p.startswith("the weight push needs") and "raise rollout.sglang.tp_size" in p
               for p in report.problems), report.problems
    # Without the distributed optimizer more nodes do not shard the optimizer state: not offered as a fix.
    report = _check("dapo-qwen2.5-32b", 4, 8, "actor.offload=true", "rollout.sglang.tp_size=1", "rollout.engines=4",
                    "parallel.use_distributed_optimizer=false")
    push = next(p for p in report.problems if p.startswith("the weight push needs"))
    assert "more nodes" not in push and "set parallel.use_distributed_optimizer=true" in push, push
    with pytest.raises(ConfigError, match="set actor.offload=false"):
        _check("dapo-qwen2.5-32b", 16, 8, "actor.offload=true", "rollout.mode=disaggregated")


def test_disaggregated_sglang_takes_gpus_from_the_trainer():
    overrides = ("rollout.name=sglang", "rollout.mode=disaggregated", "rollout.engines=1", "rollout.sglang.tp_size=4",
                 "parallel.tensor_model_parallel_size=2", "actor.ppo_mini_batch_size=32")
    report = _check("dapo-qwen3-4b", 1, 8, *overrides)
    text = report.render()
    assert report.fits, text
    assert "= 4 ranks (4 per node; GPUs 4..7 of each node are SGLang's)" in text
    assert "layout: TP2+SP x PP1 x DP2 = 4 ranks" in text and "while SGLang generates" not in text
    report = _check("dapo-qwen3-4b", 1, 8, *overrides[:3], "rollout.sglang.tp_size=8")
    assert report.problems == ["rollout.mode=disaggregated: the SGLang engine's rollout.sglang.tp_size (8) GPUs "
                               "leave none of a node's 8 for the trainer: lower rollout.sglang.tp_size or use "
                               "rollout.mode=colocated"]
    report = _check("dapo-qwen3-4b", 1, 8, *overrides[:3], "rollout.sglang.tp_size=2",
                    "parallel.tensor_model_parallel_size=4")
    assert report.problems == ["parallel.tensor_model_parallel_size (4) x parallel.pipeline_model_parallel_size (1) = "
                               "4 does not divide 6 ranks: use a number of nodes that makes nodes x 6 a multiple of 4, "
                               "or change TP / PP"]
    report = _check("dapo-qwen3-4b", 2, 8, *overrides[:2], "rollout.sglang.tp_size=2",
                    "parallel.tensor_model_parallel_size=4")
    assert any("parallel.tensor_model_parallel_size (4) must divide the 6 trainer ranks per node" in p
               for p in report.problems), report.problems


def test_rollout_engines_need_replicas_and_sglang_hosts_first_on_their_node():
    report = _check("dapo-qwen2.5-32b", 16, 8)
    assert "rollout: 16 engine(s) on rank(s) 0, 8, 16, 24, 32, 40, 48, 56, ..." in report.render()
    report = _check("dapo-qwen2.5-32b", 16, 8, "rollout.engines=32")
    assert ("rollout.engines (32) is more than the 16 data-parallel replicas: each engine takes its weights from a "
            "replica of its own; lower it") in report.problems
    report = _check("dapo-qwen2.5-32b", 16, 8, "rollout.engines=32", "parallel.tensor_model_parallel_size=4")
    assert any(p.startswith("rollout.engines (32) puts SGLang engines on ranks [4, 12, 20, 28], which are not the "
                            "first rank of their node") for p in report.problems), report.problems


def test_sglang_gpus_are_checked_where_base_gpu_id_puts_them():
    report = _check("dapo-qwen2.5-32b", 16, 8, "rollout.sglang.base_gpu_id=4")
    assert report.problems == ["the SGLang engine needs GPUs 4..11 (rollout.sglang.base_gpu_id=4, "
                               "rollout.sglang.tp_size=8) but this node has 8"], report.problems
    report = _check("dapo-qwen3-4b", 1, 8, "rollout.name=sglang", "rollout.mode=disaggregated", "rollout.engines=1",
                    "rollout.sglang.tp_size=4", "rollout.sglang.base_gpu_id=0")
    assert report.problems == ["rollout.mode=disaggregated: the SGLang engine's GPUs 0..3 overlap the trainer's GPUs "
                               "0..3; set rollout.sglang.base_gpu_id >= 4 or rollout.mode=colocated"], report.problems


def test_actor_offload_gives_the_embedded_engine_the_gpu_while_it_generates():
    """Offloaded, the actor is in host memory while the KV cache is there, and the cache is gone while the actor
    trains: 8.0 GB of engine weights + the larger of 59.8 GB of cache and the actor's 26.2 GB, + 4 overhead."""
    report = _check("dapo-qwen3-4b", 1, 8, "rollout.embedded.max_batch_size=44")
    assert "exceeds the GPU's 80 GB: lower rollout.embedded.max_batch_size or set rollout.name=sglang, or set " \
           "actor.offload=true" in report.problems[0], report.problems
    report = _check("dapo-qwen3-4b", 1, 8, "rollout.embedded.max_batch_size=44", "actor.offload=true")
    assert report.fits, report.render()
    assert "KV cache 59.8 GB (rollout.embedded.max_batch_size 44 x 9216 tokens), with the actor in host memory " \
           "while it generates (actor.offload) = 71.8 GB there" in report.render()


def test_pipeline_stages_are_estimated_each_for_itself():
    """The first stage holds PP micro-batches' activations and the embedding, the last one micro-batch, the output
    layer and the logits: no GPU holds both peaks, so the busier stage decides (here the last, 34.4 GB, where the
    first stage's activations with the last stage's logits would say 36.9)."""
    report = _check("dapo-qwen3-4b", 1, 8, "parallel.tensor_model_parallel_size=1",
                    "parallel.pipeline_model_parallel_size=4", "rollout.engines=2", "rollout.name=sglang",
                    "rollout.sglang.tp_size=4", memory=35.0)
    text = report.render()
    assert ("memory estimate for the busiest GPU (last pipeline stage; the first pipeline stage: 25.7 GB): weights "
            "2.6 GB + gradients 5.2 + optimizer 7.8 (sharded over DP 2) + activations 3.6 (18432 tokens per "
            "micro-batch, 1 in flight, recomputed) + logits 11.2 + overhead 4 = 34.4 GB of 35 GB") in text, text
    assert not any("exceeds the GPU" in p for p in report.problems), report.problems


def test_an_sglang_tp_size_the_model_does_not_split_into_is_named():
    """SGLang splits attention heads, KV heads (or replicates them evenly) and the MLP width over its TP ranks;
    a tp_size that does not would fail inside SGLang once the actor is built. Refused here, and by `train`
    before its start-up (Trainer._make_engine)."""
    report = _check("dapo-qwen3-4b", 1, 8, "rollout.name=sglang", "rollout.engines=1", "rollout.sglang.tp_size=3")
    assert ("rollout.sglang.tp_size=3 does not divide the model's 32 attention heads or its 8 KV heads (nor is "
            "tp_size a multiple of them) or its MLP width 9728: choose a tp_size that does (up to 16: 1, 2, 4, 8, 16)") \
        in report.problems, report.problems
    report = _check("dapo-qwen3-4b", 1, 8, "rollout.name=sglang", "rollout.engines=1", "rollout.sglang.tp_size=8")
    assert not any("rollout.sglang.tp_size=8" in p for p in report.problems), report.problems


def test_the_logits_without_the_fused_kernels_are_noted():
    """The estimate counts the logits as the fused kernels hold them; the pure-torch path's float32 copies are a
    note with their size: 20 bytes x 22528 tokens x 152576 / 8 vocabulary columns."""
    notes = _check("dapo-qwen2.5-32b", 16, 8).notes
    assert any("without them the pure-torch log-prob's backward holds about five float32 copies of a micro-batch's "
               "logits, 8.6 GB more" in n for n in notes), notes

"""rollout.sglang in the run config, and where the engine's GPUs go (no GPU or sglang needed)."""
from __future__ import annotations

import pytest

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import dump_config, load_config
from megatron_dapo.rollout.sglang import SGLangEngineConfig


def test_sglang_section_loads_and_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout: {name: sglang, mode: disaggregated,\n"
                    "          sglang: {tp_size: 4, base_gpu_id: 4, mem_fraction_static: 0.8,\n"
                    "                   server_args: {attention_backend: fa3}}}\n")
    config = load_config(path)
    assert config.rollout.sglang == SGLangEngineConfig(tp_size=4, base_gpu_id=4, mem_fraction_static=0.8,
                                                       server_args={"attention_backend": "fa3"})
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped) == config


def test_bad_sglang_values_name_their_keys():
    overrides = ["rollout.sglang.tp_size=0", "rollout.sglang.base_gpu_id=-1", "rollout.sglang.mem_fraction_static=1.2",
                 "rollout.sglang.server_args.tp_size=2"]
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "rollout.sglang.tp_size must be >= 1, got 0" in message
    assert "rollout.sglang.base_gpu_id must be >= 0 or null, got -1" in message
    assert "rollout.sglang.mem_fraction_static must be in (0, 1), got 1.2" in message
    assert "rollout.sglang.server_args.tp_size is set by the trainer" in message


def test_server_args_the_weight_push_cannot_serve_are_refused():
    overrides = ["rollout.sglang.server_args={dp_size: 2, pp_size: 2, nnodes: 1, load_format: dummy}"]
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "rollout.sglang.server_args.dp_size=2: the trainer's weight push needs an SGLang engine of one node" in message
    assert "rollout.sglang.server_args.pp_size=2" in message and "nnodes" not in message
    assert "rollout.sglang.server_args.load_format=dummy: the engines generate from model.path's weights" in message
    assert load_config(None, ["rollout.sglang.server_args={load_format: safetensors}"])  # a real format is fine


@pytest.mark.parametrize(("value", "shown"), [("0", "0"), ("32k", "'32k'"), ("true", "True"), ("2048.5", "2048.5")])
def test_context_length_must_be_a_number_of_tokens(value, shown):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"rollout.sglang.server_args.context_length={value}"])
    assert str(err.value) == ("rollout.sglang.server_args.context_length must be a whole number of tokens >= 1 or "
                              f"absent, got {shown}")


def test_context_length_is_the_engines_length_limit():
    config = load_config(None, ["rollout.name=sglang", "rollout.sglang.server_args.context_length=4096"])
    assert config.rollout.length_limit() == ("rollout.sglang.server_args.context_length", 4096)
    assert load_config(None, ["rollout.name=sglang"]).rollout.length_limit() is None
    # Only the engine in use has a say.
    assert load_config(None, ["rollout.sglang.server_args.context_length=4096"]).rollout.length_limit() is None


def test_colocated_engine_starts_on_node_0s_first_gpu():
    config = SGLangEngineConfig(tp_size=2)
    assert config.gpus("colocated", local_world_size=8, visible_gpus=8) == range(0, 2)
    assert SGLangEngineConfig(tp_size=8).gpus("colocated", local_world_size=8,
                                              visible_gpus=8) == range(0, 8)


def test_disaggregated_engine_takes_the_gpus_after_the_trainers():
    config = SGLangEngineConfig(tp_size=4)
    assert config.gpus("disaggregated", local_world_size=4, visible_gpus=8) == range(4, 8)
    with pytest.raises(ConfigError, match=r"GPUs 6\.\.9 \(rollout.sglang.base_gpu_id=null, so 6, .*this node has 8.*"
                                          r"--nproc-per-node"):
        config.gpus("disaggregated", local_world_size=6, visible_gpus=8)
    with pytest.raises(ConfigError, match=r"GPUs 6\.\.9 \(rollout.sglang.base_gpu_id=6, "):
        SGLangEngineConfig(tp_size=4, base_gpu_id=6).gpus("disaggregated", local_world_size=6, visible_gpus=8)
    with pytest.raises(ConfigError, match=r"GPUs 2\.\.5 overlap the trainer's GPUs 0\.\.3.*base_gpu_id >= 4"):
        SGLangEngineConfig(tp_size=4, base_gpu_id=2).gpus("disaggregated", local_world_size=4,
                                                          visible_gpus=8)


def test_no_gpu_says_to_use_the_embedded_engine():
    with pytest.raises(ConfigError, match="needs CUDA GPUs.*set rollout.name=embedded"):
        SGLangEngineConfig().gpus("colocated", local_world_size=1, visible_gpus=0)


def test_tp_sizes_sglang_cannot_split_the_model_by_are_named_with_those_it_can():
    """Qwen3-4B's shape: 32 heads, 8 KV heads, MLP 9728 (= 2^9 x 19). SGLang splits each evenly or refuses the model
    when it loads it; KV heads may also be replicated (tp a multiple of them)."""
    from megatron_dapo.models.arch import ModelArch

    arch = ModelArch.from_hf_config({"architectures": ["Qwen3ForCausalLM"], "hidden_size": 2560,
                                     "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                                     "max_position_embeddings": 32768, "tie_word_embeddings": True})
    for tp in (1, 2, 4, 8, 16):
        assert SGLangEngineConfig(tp_size=tp).model_problems(arch) == [], tp
    assert SGLangEngineConfig(tp_size=3).model_problems(arch) == [
        "rollout.sglang.tp_size=3 does not divide the model's 32 attention heads or its 8 KV heads (nor is tp_size "
        "a multiple of them) or its MLP width 9728: choose a tp_size that does (up to 16: 1, 2, 4, 8, 16)"]
    # 24 heads, 6 KV heads at tp 4: the heads split, the KV heads neither split nor replicate
    narrow = ModelArch.from_hf_config({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536,
                                       "intermediate_size": 9216, "num_hidden_layers": 2, "num_attention_heads": 24,
                                       "num_key_value_heads": 6, "vocab_size": 1000,
                                       "max_position_embeddings": 4096})
    assert SGLangEngineConfig(tp_size=4).model_problems(narrow) == [
        "rollout.sglang.tp_size=4 does not divide its 6 KV heads (nor is tp_size a multiple of them): choose a "
        "tp_size that does (up to 16: 1, 2, 3, 6, 12)"]

"""Reading config.json: families, unsupported models, RoPE (incl. Llama 3 scaling) against transformers."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megatron_dapo.models.arch import ModelArch, ModelError
from tests.tiny_models import FAMILIES, make_tiny_model

LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
CONFIGS = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}


def test_family_switches(tmp_path):
    archs = {f: ModelArch.from_pretrained(make_tiny_model(f, tmp_path / f)) for f in FAMILIES}
    qwen2, llama, qwen3 = archs["qwen2"], archs["llama"], archs["qwen3"]
    assert (qwen2.architecture, qwen2.qkv_bias, qwen2.qk_norm, qwen2.tie_word_embeddings) == (
        "Qwen2ForCausalLM", True, False, True)
    assert (llama.qkv_bias, llama.qk_norm, llama.rope_theta, llama.rope_scaling.factor) == (False, False, 5e4, 4.0)
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim, qwen3.rope_scaling) == (False, True, 24, None)
    assert (qwen3.vocab_size, qwen3.num_layers, qwen3.num_heads, qwen3.num_kv_heads) == (211, 2, 4, 2)


def test_model_type_stands_in_for_a_missing_architectures_list():
    """A config built in memory (architectures None) is read by its model_type."""
    arch = ModelArch.from_hf_config(transformers.Qwen3Config().to_dict())
    assert (arch.family, arch.architecture) == ("qwen3", "Qwen3ForCausalLM")


def test_unsupported_architecture_lists_the_supported_ones():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50).to_dict()
    config["architectures"] = ["GPT2LMHeadModel"]
    with pytest.raises(ModelError) as err:
        ModelArch.from_hf_config(config, source="gpt2/config.json")
    message = str(err.value)
    assert message.startswith("gpt2/config.json: architecture GPT2LMHeadModel is not supported")
    for supported in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


@pytest.mark.parametrize(
    ("family", "change", "message"),
    [
        ("qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
         r"rope type 'yarn' \(rope_scaling / rope_parameters\) is not supported"),
        ("llama", dict(rope_parameters=None, rope_scaling=dict(type="linear", factor=2.0)), "rope type 'linear'"),
        ("qwen2", dict(layer_types=["sliding_attention", "full_attention"]), "sliding-window attention"),
        ("qwen2", dict(use_sliding_window=True, layer_types=None), "sliding-window attention"),
        ("qwen2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        ("llama", dict(attention_bias=True), "attention_bias: true .* is not supported for llama"),
        ("qwen3", dict(attention_bias=True), "attention_bias: true .* is not supported for qwen3"),
        ("llama", dict(mlp_bias=True), "mlp_bias: true is not supported"),
        ("qwen3", dict(quantization_config=dict(quant_method="fp8", weight_block_size=[128, 128])),
         r"quantization_config \(quant_method 'fp8'\) is not supported: start from the unquantized model"),
        ("llama", dict(num_key_value_heads=5),
         r"num_attention_heads \(32\) is not a multiple of num_key_value_heads \(5\)"),
        ("qwen3", dict(head_dim=25), r"head_dim \(25\) must be even"),
        ("llama", dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0.5 is not supported"),
        ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=8192,
                                            partial_rotary_factor=0.5)), r"partial_rotary_factor 0.5"),
        ("llama", dict(rope_scaling=dict(type="linear", factor=2.0),
                       rope_parameters=dict(rope_type="default", rope_theta=5e5)),
         r"rope_scaling and rope_parameters disagree on rope_type \('linear' / 'default'\): keep one of them"),
    ],
)
def test_unsupported_features_are_refused_naming_the_key(family, change, message):
    config = {**CONFIGS[family]().to_dict(), **change}
    with pytest.raises(ModelError, match=message):
        ModelArch.from_hf_config(config)


def test_a_config_json_that_does_not_read_is_named(tmp_path):
    """A download cut short, an edit gone wrong: the file is named, not a JSONDecodeError from nowhere."""
    path = tmp_path / "config.json"
    for text, message in (('{"architectures": ["Qwen2', "not a readable JSON file"),
                          ("[]", "holds a JSON list, not an object"), (b"\xff\xfe", "not a readable JSON file")):
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        with pytest.raises(ModelError, match=f"{path}: {message}"):
            ModelArch.from_pretrained(tmp_path)
    with pytest.raises(ModelError, match="x.json: holds a list, not a config.json object"):
        ModelArch.from_hf_config([], source="x.json")


def test_missing_key_is_named():
    config = transformers.Qwen2Config().to_dict()
    del config["intermediate_size"]
    with pytest.raises(ModelError, match="qwen/config.json: missing key 'intermediate_size'"):
        ModelArch.from_hf_config(config, source="qwen/config.json")


def test_values_that_are_no_numbers_are_named():
    config = transformers.Qwen2Config().to_dict()
    for key, value, message in (("hidden_size", None, "missing key 'hidden_size'"),
                                ("hidden_size", "896", None),  # a number written as text reads as that number
                                ("hidden_size", "wide", "hidden_size is 'wide', not an integer"),
                                ("num_hidden_layers", 2.5, "num_hidden_layers is 2.5, not an integer"),
                                ("num_key_value_heads", 0, "num_key_value_heads is 0; it must be at least 1"),
                                ("rms_norm_eps", "tiny", "rms_norm_eps is 'tiny', not a number"),
                                ("rope_parameters", {"rope_type": "default", "rope_theta": "x"},
                                 "rope_theta is 'x', not a number")):
        if message is None:
            assert ModelArch.from_hf_config({**config, key: value}).hidden_size == 896
            continue
        with pytest.raises(ModelError, match=f"q/config.json: {message}"):
            ModelArch.from_hf_config({**config, key: value}, source="q/config.json")
    # A null rope_theta is an absent one, as transformers reads it: 10000.
    assert ModelArch.from_hf_config({**config, "rope_parameters": None, "rope_theta": None}).rope_theta == 10000.0


def test_a_llama3_scaling_without_its_original_context_takes_the_model_s_as_transformers_does():
    rope = {k: v for k, v in LLAMA31_ROPE.items() if k != "original_max_position_embeddings"}
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=16384,
                                      rope_theta=500000.0, rope_scaling=rope)
    written = {**config.to_dict(), "rope_parameters": None, "rope_scaling": rope, "rope_theta": 500000.0}
    arch = ModelArch.from_hf_config(written)
    assert arch.rope_scaling.original_max_position_embeddings == 16384
    assert torch.equal(arch.rope_inv_freq(), ROPE_INIT_FUNCTIONS["llama3"](config)[0])
    with pytest.raises(ModelError, match="l/config.json: rope type 'llama3' needs low_freq_factor in rope_scaling"):
        ModelArch.from_hf_config({**written, "rope_scaling": {**rope, "low_freq_factor": None}}, source="l/config.json")


@pytest.mark.parametrize("family", FAMILIES)
def test_keys_a_config_leaves_out_are_read_as_transformers_reads_them(family):
    """Without num_key_value_heads (and, for Qwen3, head_dim) transformers does not derive them from the heads and
    width: Qwen2 and Qwen3 take 32 KV heads, Qwen3 a head width of 128. The weights are read by that, so the
    shapes this project expects must be too."""
    written = {"architectures": [CONFIGS[family].__name__.replace("Config", "ForCausalLM")], "hidden_size": 256,
               "num_attention_heads": 64, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 100,
               "max_position_embeddings": 64}
    hf = CONFIGS[family](**written)
    arch = ModelArch.from_hf_config(written)
    assert arch.num_kv_heads == hf.num_key_value_heads
    assert arch.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert (arch.num_kv_heads, arch.head_dim) == {"qwen2": (32, 4), "llama": (64, 4), "qwen3": (32, 128)}[family]


def test_all_problems_are_reported_together():
    config = {**transformers.LlamaConfig().to_dict(), "hidden_act": "gelu", "mlp_bias": True}
    with pytest.raises(ModelError, match="hidden_act.*; mlp_bias"):
        ModelArch.from_hf_config(config)


@pytest.mark.parametrize("rope", [None, LLAMA31_ROPE])
def test_inv_freq_matches_transformers(rope):
    """Llama 3.1's real shape (head_dim 128, theta 5e5, 8192 original context), plain and llama3-scaled."""
    config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=rope
    )
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        expected = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        expected = ROPE_INIT_FUNCTIONS[rope_type](config)[0]
    got = ModelArch.from_hf_config(config.to_dict()).rope_inv_freq()
    assert got.shape == (64,) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    if rope is not None:  # the scaling did change the low frequencies
        unscaled = {"rope_type": "default", "rope_theta": 500000.0}
        plain = ModelArch.from_hf_config({**config.to_dict(), "rope_parameters": unscaled}).rope_inv_freq()
        assert not torch.equal(got, plain) and torch.equal(got[:10], plain[:10])


def test_pre_v5_config_keys_are_read():
    """Older config.json files carry rope_theta + rope_scaling (with "type" or "rope_type")."""
    new_style = transformers.LlamaConfig(rope_theta=500000.0, rope_scaling=LLAMA31_ROPE).to_dict()
    old_style = {k: v for k, v in new_style.items() if k != "rope_parameters"}
    params = dict(new_style["rope_parameters"])
    old_style["rope_theta"] = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    old_style["rope_scaling"] = params
    assert ModelArch.from_hf_config(old_style) == ModelArch.from_hf_config(new_style)
    assert ModelArch.from_hf_config(new_style).rope_theta == 500000.0

"""A Hugging Face model's architecture, read from its config.json (no transformers needed).

The supported families share one block (RMSNorm -> GQA attention with RoPE -> RMSNorm -> SwiGLU
MLP) and differ only in a few switches:

    family  q/k/v bias  q_norm/k_norm  rope
    qwen2   yes         no             default
    llama   no          no             default or "llama3" scaling
    qwen3   no          yes            default

Everything else a config.json can ask for (sliding-window attention, another activation or rope
type, llama/qwen3's attention_bias or mlp_bias) is refused here, naming the key, so that the
Megatron actor, the HF <-> Megatron tables and the rollout engine all build the same model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}
"""Hugging Face architecture name -> family; each family is also its config's model_type."""


class ModelError(ValueError):
    """A model folder or architecture this project cannot use; the message says why."""


def read_json_object(path: str | Path, what: str = "") -> dict[str, Any]:
    """The object a JSON file holds (config.json, an index), or ModelError naming the file: a download cut short
    or an edit gone wrong is told apart from a bug. what: how the message names the file's role (" (--hf-template's
    config.json)")."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"{path}{what}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}{what}: holds a JSON {type(data).__name__}, not an object")
    return data


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (rope_type "llama3")."""

    factor: float
    """Low frequencies are divided by this."""
    low_freq_factor: float
    """Wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float
    """Wavelengths below original_max_position_embeddings / high_freq_factor are left alone."""
    original_max_position_embeddings: int
    """Context length the model was pretrained with."""


ABSENT_DEFAULTS = {"qwen2": {"num_key_value_heads": 32}, "qwen3": {"num_key_value_heads": 32, "head_dim": 128}}
"""What transformers' config classes take for a key a config.json leaves out, where that is not what the other keys
imply (a key given as null means the implied value there too): both then read one file alike."""


@dataclass(frozen=True, kw_only=True)
class ModelArch:
    family: str
    """qwen2 (also Qwen2.5), llama (Llama 3), qwen3."""
    architecture: str
    """The Hugging Face class, e.g. "Qwen2ForCausalLM"."""
    vocab_size: int
    """Rows of the embedding and of lm_head (before any padding)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_layers: int
    """Decoder blocks."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA: num_heads is a multiple of it)."""
    head_dim: int
    """Width of one head; may differ from hidden_size / num_heads (Qwen3)."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: RopeScaling | None
    """Llama 3 RoPE scaling, or None for plain RoPE."""
    max_position_embeddings: int
    """Longest sequence (prompt + completion) the model supports."""
    tie_word_embeddings: bool
    """lm_head.weight is model.embed_tokens.weight."""
    qkv_bias: bool
    """q_proj, k_proj and v_proj have a bias (o_proj never does)."""
    qk_norm: bool
    """Per-head RMSNorm on queries and keys before RoPE (q_norm, k_norm)."""

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config") -> ModelArch:
        """Read a config.json dict (or `PretrainedConfig.to_dict()`); anything unsupported raises ModelError."""
        if not isinstance(config, Mapping):
            raise ModelError(f"{source}: holds a {type(config).__name__}, not a config.json object")
        architecture, family = _architecture(config, source)
        problems = _unsupported_features(config, family)
        config = {**ABSENT_DEFAULTS.get(family, {}), **config}

        def number(key: str, kind: type = int, default: Any = None) -> Any:
            """config[key] as `kind`; absent or null: `default` (None: the key is required)."""
            value = config.get(key)
            if value is None:
                if default is None:
                    raise ModelError(f"{source}: missing key {key!r}")
                return default
            try:
                if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                got = kind(value)
            except (TypeError, ValueError):
                raise ModelError(f"{source}: {key} is {value!r}, not {'an integer' if kind is int else 'a number'}") \
                    from None
            if kind is int and got < 1:  # a size or a count: 0 heads would divide by zero further on
                raise ModelError(f"{source}: {key} is {value!r}; it must be at least 1")
            return got

        heads = number("num_attention_heads")
        hidden = number("hidden_size")
        theta, scaling = _rope(config, problems, source)
        arch = cls(
            family=family,
            architecture=architecture,
            vocab_size=number("vocab_size"),
            hidden_size=hidden,
            intermediate_size=number("intermediate_size"),
            num_layers=number("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=number("num_key_value_heads", default=heads),
            head_dim=number("head_dim", default=hidden // heads),
            rms_norm_eps=number("rms_norm_eps", float, 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=number("max_position_embeddings"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
        )
        if arch.num_heads % arch.num_kv_heads:
            problems.append(
                f"num_attention_heads ({arch.num_heads}) is not a multiple of num_key_value_heads ({arch.num_kv_heads})"
            )
        if arch.head_dim < 1:
            problems.append(f"hidden_size ({hidden}) over num_attention_heads ({heads}) leaves no head_dim: give "
                            "head_dim")
        elif arch.head_dim % 2:
            problems.append(f"head_dim ({arch.head_dim}) must be even for RoPE")
        if problems:
            raise ModelError(f"{source}: " + "; ".join(problems))
        return arch

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ModelArch:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelError(f"{folder}: no config.json (expected a Hugging Face model folder)")
        return cls.from_hf_config(read_json_object(path), source=str(path))

    def rope_inv_freq(self):
        """Rotary inverse frequencies [head_dim / 2], float32, with Llama 3 scaling applied.

        Bit-identical to transformers' default and "llama3" rope initialization.
        """
        import torch

        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        if self.rope_scaling is not None:
            # Long wavelengths are slowed by `factor`, short ones kept, and the band in between
            # blends the two linearly in (original context / wavelength).
            s = self.rope_scaling
            low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
            high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
            wavelen = 2 * math.pi / inv
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            scaled = torch.where(medium, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
            inv = scaled
        return inv.to(torch.float32)


def _architecture(config: Mapping[str, Any], source: str) -> tuple[str, str]:
    """(Hugging Face class, family) from `architectures`, or from `model_type` when that list is absent."""
    architectures = config.get("architectures") or []
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name, SUPPORTED_ARCHITECTURES[name]
    model_type = config.get("model_type")
    if not architectures:
        for name, family in SUPPORTED_ARCHITECTURES.items():
            if family == model_type:
                return name, family
    found = ", ".join(architectures) or f"model_type {model_type!r}"
    supported = ", ".join(f"{name} (model_type {family!r})" for name, family in SUPPORTED_ARCHITECTURES.items())
    raise ModelError(f"{source}: architecture {found} is not supported; supported: {supported}")


def _unsupported_features(config: Mapping[str, Any], family: str) -> list[str]:
    """What the config asks for that none of our models (actor, weight tables, rollout engine) implements."""
    problems = []
    act = config.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {act!r} is not supported (only 'silu': the MLP is SwiGLU)")
    layer_types = config.get("layer_types") or []
    if "sliding_attention" in layer_types or (not layer_types and config.get("use_sliding_window")):
        problems.append("sliding-window attention (use_sliding_window / layer_types) is not supported")
    # Qwen2 always has q/k/v biases and no o_proj bias; llama and qwen3 put all four behind one key.
    if family != "qwen2" and config.get("attention_bias"):
        problems.append(
            f"attention_bias: true (q/k/v and o_proj biases) is not supported for {family}; "
            "the Megatron weight tables have no o_proj bias"
        )
    if config.get("mlp_bias"):
        problems.append("mlp_bias: true is not supported (the SwiGLU projections have no bias)")
    quantization = config.get("quantization_config")
    if quantization:  # fp8 / int weights and their scales: read as plain numbers they would be garbage
        method = quantization.get("quant_method", "?") if isinstance(quantization, Mapping) else quantization
        problems.append(f"quantization_config (quant_method {method!r}) is not supported: start from the "
                        "unquantized model (bf16 / fp32 weights)")
    return problems


def _rope(config: Mapping[str, Any], problems: list[str], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling, from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    older, newer = ({("rope_type" if k == "type" else k): v for k, v in (config.get(key) or {}).items()}
                    for key in ("rope_scaling", "rope_parameters"))
    clash = sorted(k for k in set(older) & set(newer) if older[k] != newer[k])
    if clash:  # which one transformers reads depends on its version: the model is not one function
        problems.append(f"rope_scaling and rope_parameters disagree on {', '.join(clash)} "
                        f"({', '.join(f'{older[k]!r} / {newer[k]!r}' for k in clash)}): keep one of them")
    params = {**older, **newer}
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor {partial!r} is not supported (RoPE turns every dimension of a head)")
    theta = next((v for v in (params.get("rope_theta"), config.get("rope_theta")) if v is not None), 10000.0)
    try:
        theta = float(theta)
    except (TypeError, ValueError):
        raise ModelError(f"{source}: rope_theta is {theta!r}, not a number") from None
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        problems.append(f"rope type {rope_type!r} (rope_scaling / rope_parameters) is not supported; "
                        "supported: 'default' and 'llama3'")
        return theta, None
    # transformers takes max_position_embeddings for a missing original_max_position_embeddings (and warns)
    params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [key for key in keys if params.get(key) is None]
    if missing:
        raise ModelError(f"{source}: rope type 'llama3' needs {', '.join(missing)} in rope_scaling / rope_parameters")
    try:
        scaling = RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except (TypeError, ValueError) as err:
        raise ModelError(f"{source}: a value of rope_scaling / rope_parameters is not a number ({err})") from None
    return theta, scaling

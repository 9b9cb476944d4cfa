"""A Hugging Face model folder's architecture, read from its config.json (no transformers needed)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}


class ModelError(ValueError):
    """A model folder or architecture this project cannot use; the message says why."""


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3 frequency scaling (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, kw_only=True)
class ModelArch:
    family: str
    """qwen2 (also Qwen2.5), llama (Llama 3), qwen3."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config") -> ModelArch:
        architectures = config.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelError(
                f"{source}: architecture {architectures or config.get('model_type')!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            heads = config["num_attention_heads"]
            rope = config.get("rope_parameters") or {}
            scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            return cls(
                family=family,
                architecture=arch,
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=_rope_scaling(scaling, source),
                max_position_embeddings=config["max_position_embeddings"],
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
                qk_norm=family == "qwen3",
            )
        except KeyError as err:
            raise ModelError(f"{source}: missing key {err.args[0]!r}") from None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ModelArch:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelError(f"{folder}: no config.json (expected a Hugging Face model folder)")
        return cls.from_hf_config(json.loads(path.read_text()), source=str(path))

    def rope_inv_freq(self):
        """Rotary inverse frequencies [head_dim / 2], float32, with Llama 3 scaling applied."""
        import torch

        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        if self.rope_scaling is not None:
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


def _rope_scaling(scaling: dict | None, source: str) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind != "llama3":
        raise ModelError(f"{source}: rope scaling {kind!r} is not supported (only 'llama3')")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )

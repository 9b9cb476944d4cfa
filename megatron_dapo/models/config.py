from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Local Hugging Face model folder (config.json + safetensors) the actor starts from."""
    tokenizer_path: str | None = None
    """Tokenizer folder; defaults to model.path."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""
    """Local Hugging Face model folder (config.json + safetensors) the actor starts from."""
    megatron_checkpoint: str | None = None
    """A megatron-core checkpoint to take the actor's starting weights from instead of model.path's safetensors
    (one written by `megatron-dapo convert hf-to-mcore`, or a run's checkpoints/step_N); model.path still
    gives config.json, and the rollout engine is sent these weights before the first rollout. Read at a fresh
    start only: a run that resumes reads its own checkpoint alone, so this one may be deleted by then."""
    tokenizer_path: str | None = None
    """Tokenizer folder; defaults to model.path."""

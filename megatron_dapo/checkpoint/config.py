from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_dapo.config.loader import ConfigError


@dataclass(kw_only=True)
class CheckpointConfig:
    save_freq: int = 10
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept in the run folder; older ones are deleted after a new one is complete."""
    resume: bool = True
    """Continue from the last complete checkpoint in the run folder when there is one (the only weights the
    actor of such a run reads); false starts from the starting weights (model.path, or
    model.megatron_checkpoint), in a run folder that holds no checkpoints."""
    save_hf: bool = False
    """Also write each checkpoint as a Hugging Face folder (safetensors, config, tokenizer) in its step_N/hf, for
    serving and evaluation; rank 0 converts it from the saved checkpoint while the other ranks wait. Not for a
    save on a stop request (Slurm's warning leaves minutes), and deleted with its checkpoint (keep_last)."""
    hf_dtype: Literal["bf16", "fp32"] = "bf16"
    """The weights' dtype in that folder."""

    def __post_init__(self) -> None:
        if self.save_freq < 0:
            raise ConfigError(f"checkpoint.save_freq must be >= 0, got {self.save_freq}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")

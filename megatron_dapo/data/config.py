from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dapo.config.loader import ConfigError


@dataclass(kw_only=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet or JSONL files of training prompts in the DAPO-Math-17k layout."""
    val_files: list[str] = field(default_factory=list)
    """Held-out prompts for periodic validation (same layout)."""
    prompt_key: str = "prompt"
    """Column holding the prompt as chat messages."""
    gen_batch_size: int = 96
    """Prompts per generation batch of dynamic sampling (each sampled rollout.n times). Without it
    (algorithm.filter_groups.enable=false) a step draws train_batch_size prompts and trains on all of them."""
    train_batch_size: int = 32
    """Prompt groups per training step, after dynamic sampling has filtered them."""
    max_prompt_length: int = 2048
    """Prompts with more tokens are dropped and counted."""
    max_response_length: int = 20480
    """Generation stops after this many tokens (the paper's L_max)."""
    shuffle: bool = True
    """Shuffle the prompts every epoch (seeded by trainer.seed)."""

    def __post_init__(self) -> None:
        problems = []
        for key in ("gen_batch_size", "train_batch_size", "max_prompt_length", "max_response_length"):
            if getattr(self, key) < 1:
                problems.append(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if problems:
            raise ConfigError(problems)

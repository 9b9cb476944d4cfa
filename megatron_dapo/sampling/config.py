from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_dapo.config.loader import ConfigError


@dataclass(kw_only=True)
class FilterGroupsConfig:
    enable: bool = True
    """Dynamic sampling: keep only prompt groups whose metric varies, over-sampling until the batch is full."""
    metric: str = "acc"
    """The figure whose variance decides, named as in verl: acc; score (the task's, before overlong shaping);
    seq_reward or seq_final_reward (after it); or a task's own such as profit_loss."""
    max_num_gen_batches: int = 10
    """Generation batches allowed per step; 0 means no limit. A stop request (a STOP file, as Slurm's time-limit
    warning writes it, or a signal to rank 0) ends a step's generation batches either way: the step trains on the
    groups kept so far."""
    on_exhausted: Literal["error", "train"] = "train"
    """After max_num_gen_batches: stop with an error, or train on the groups kept so far."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_num_gen_batches < 0:
            problems.append(f"algorithm.filter_groups.max_num_gen_batches must be >= 0 (0 = no limit), got "
                            f"{self.max_num_gen_batches}")
        if not self.metric:
            problems.append("algorithm.filter_groups.metric must name a reward field, e.g. acc or score")
        if problems:
            raise ConfigError(problems)

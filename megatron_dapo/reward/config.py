from __future__ import annotations

from dataclasses import dataclass, field

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.reward.custom import target_problem


@dataclass(kw_only=True)
class OverlongBufferConfig:
    enable: bool = True
    """Add the paper's soft overlong punishment (Eq. 13) to the task reward."""
    len: int = 4096
    """Buffer length L_cache: the punishment ramps over the last `len` tokens before max_response_length."""
    penalty_factor: float = 1.0
    """Scale of the punishment: -penalty_factor at max_response_length."""


@dataclass(kw_only=True)
class RewardConfig:
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    """Soft overlong punishment."""
    timeout_s: float = 10.0
    """A reward function that takes longer on one sample costs that sample, not the run."""
    num_workers: int = 2
    """Processes scoring rewards on each engine's host (each host scores the completions its engine sampled)."""
    worker_max_rss_gb: float | None = 8.0
    """A worker whose resident memory grows past this (a reward function that caches or leaks) is replaced by a
    fresh one between samples (nothing is lost); one that passes twice this while scoring a sample is killed then,
    and the sample fails as `memory` (before it takes the host's memory); null: never."""
    functions: dict[str, str] = field(default_factory=dict)
    """Reward functions by data_source: 'package.module:function' or 'path/to/file.py:function' (reward/custom.py);
    an entry for a built-in source (math_dapo, ...) replaces it."""

    def __post_init__(self) -> None:
        problems = []
        if self.overlong_buffer.len < 1:
            problems.append(f"reward.overlong_buffer.len must be >= 1, got {self.overlong_buffer.len}")
        if self.overlong_buffer.penalty_factor < 0:
            problems.append(
                f"reward.overlong_buffer.penalty_factor must be >= 0, got {self.overlong_buffer.penalty_factor}"
            )
        if self.num_workers < 1:
            problems.append(f"reward.num_workers must be >= 1, got {self.num_workers}")
        if self.worker_max_rss_gb is not None and not 0 < self.worker_max_rss_gb < float("inf"):
            problems.append(f"reward.worker_max_rss_gb must be > 0 or null, got {self.worker_max_rss_gb}")
        if not 0 < self.timeout_s < float("inf"):  # NaN too: a NaN deadline would never pass
            problems.append(f"reward.timeout_s must be a number of seconds > 0, got {self.timeout_s}")
        problems += [p for source, target in self.functions.items() if (p := target_problem(source, target))]
        if problems:
            raise ConfigError(problems)

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.rollout.embedded.config import EmbeddedEngineConfig
from megatron_dapo.rollout.sglang.config import SGLangEngineConfig


@dataclass(kw_only=True)
class ValidationSamplingConfig:
    n: int = 1
    """Samples per validation prompt (avg@n and pass@n are reported)."""
    temperature: float = 1.0
    """Sampling temperature for validation (the paper evaluates at 1.0)."""
    top_p: float = 0.7
    """Nucleus sampling for validation (the paper evaluates at 0.7)."""
    top_k: int = -1
    """Top-k for validation; -1 disables it."""

    def __post_init__(self) -> None:
        if problems := sampling_problems("rollout.val", self.n, self.temperature, self.top_p, self.top_k):
            raise ConfigError(problems)


def sampling_problems(prefix: str, n: int, temperature: float, top_p: float, top_k: int) -> list[str]:
    """What is wrong with one set of sampling settings, each naming its key (NaN fails every range)."""
    problems = []
    if n < 1:
        problems.append(f"{prefix}.n must be >= 1, got {n}")
    if not 0 < temperature < float("inf"):
        problems.append(f"{prefix}.temperature must be > 0 (use top_k=1 for greedy), got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"{prefix}.top_p must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        problems.append(f"{prefix}.top_k must be -1 (off) or >= 1, got {top_k}")
    return problems


@dataclass(kw_only=True)
class RolloutConfig:
    name: Literal["embedded", "sglang"] = "embedded"
    """Rollout engine: the embedded PyTorch engine (any machine) or SGLang (GPU)."""
    mode: Literal["colocated", "disaggregated"] = "colocated"
    """colocated: the engine shares the trainer's GPUs and frees its memory while they train; disaggregated: its own."""
    engines: int = 1
    """Rollout engines, each on the first rank of its own data-parallel replica; each samples a share of every batch."""
    n: int = 16
    """Responses sampled per prompt (the group size G)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 disables it."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    weight_bucket_mb: int = 512
    """Size of one weight-sync bucket from the trainer to the engine."""
    parity_threshold: float = 0.05
    """Stop the run when the engine's and the trainer's probe log-probs differ by more than this."""
    val: ValidationSamplingConfig = field(default_factory=ValidationSamplingConfig)
    """Sampling settings for validation."""
    embedded: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    """The embedded engine's device, dtype, batch size and length limit (used when name is embedded)."""
    sglang: SGLangEngineConfig = field(default_factory=SGLangEngineConfig)
    """The SGLang engine's GPUs, memory share and further server arguments (used when name is sglang)."""

    def __post_init__(self) -> None:
        problems = sampling_problems("rollout", self.n, self.temperature, self.top_p, self.top_k)
        if self.engines < 1:
            problems.append(f"rollout.engines must be >= 1, got {self.engines}")
        if not self.parity_threshold >= 0:
            problems.append(f"rollout.parity_threshold must be >= 0, got {self.parity_threshold}")
        if self.weight_bucket_mb < 1:
            problems.append(f"rollout.weight_bucket_mb must be >= 1, got {self.weight_bucket_mb}")
        if problems:
            raise ConfigError(problems)

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.rollout.embedded.config import EmbeddedEngineConfig
from megatron_dapo.rollout.engine import MIN_TEMPERATURE
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
    if not MIN_TEMPERATURE <= temperature < float("inf"):
        problems.append(f"{prefix}.temperature must be >= {MIN_TEMPERATURE:g} (use top_k=1 for greedy), "
                        f"got {temperature}")
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
    parity_threshold: float | None = None
    """Stop the run when the engine's and the trainer's log-probs of the probe differ by more than this, on
    average over its tokens. None: PARITY_FLOAT32 where both compute in float32, PARITY_HALF otherwise."""
    val: ValidationSamplingConfig = field(default_factory=ValidationSamplingConfig)
    """Sampling settings for validation."""
    embedded: EmbeddedEngineConfig = field(default_factory=EmbeddedEngineConfig)
    """The embedded engine's device, dtype, batch size and length limit (used when name is embedded)."""
    sglang: SGLangEngineConfig = field(default_factory=SGLangEngineConfig)
    """The SGLang engine's GPUs, memory share and further server arguments (used when name is sglang)."""

    def __post_init__(self) -> None:
        problems = sampling_problems("rollout", self.n, self.temperature, self.top_p, self.top_k)
        if self.top_k == 1:
            problems.append(
                "rollout.top_k=1 samples greedily: the rollout.n responses to a prompt are the same, so every group "
                "has advantage 0 and nothing trains (SGLang would also report its log-probs at temperature 1); "
                "greedy decoding is for validation (rollout.val.top_k=1)"
            )
        if self.engines < 1:
            problems.append(f"rollout.engines must be >= 1, got {self.engines}")
        if self.parity_threshold is not None and not self.parity_threshold >= 0:
            problems.append(f"rollout.parity_threshold must be >= 0, got {self.parity_threshold}")
        if self.weight_bucket_mb < 1:
            problems.append(f"rollout.weight_bucket_mb must be >= 1, got {self.weight_bucket_mb}")
        if problems:
            raise ConfigError(problems)

    def length_limit(self) -> tuple[str, int] | None:
        """(the key, its value) of the engine's own limit on prompt + response tokens where one is set, else None:
        the model's max_position_embeddings is then the limit. SGLang refuses a request whose prompt plus
        max_new_tokens exceeds its context_length (sglang 0.5.23, TokenizerManager._validate_one_request), and so
        does the embedded engine with its max_seq_len."""
        if self.name == "embedded" and self.embedded.max_seq_len is not None:
            return "rollout.embedded.max_seq_len", self.embedded.max_seq_len
        if self.name == "sglang" and self.sglang.server_args.get("context_length") is not None:
            return "rollout.sglang.server_args.context_length", self.sglang.server_args["context_length"]
        return None

    def held_back(self) -> int:
        """Tokens of its context length the engine gives no request: SGLang caps a request's max_new_tokens at
        context_length - 2 - its prompt (sglang 0.5.23, Scheduler.init_req_max_new_tokens with max_req_len =
        context_len - 1), and its context length is the model's max_position_embeddings unless set."""
        return SGLANG_HELD_BACK if self.name == "sglang" else 0

    def parity_threshold_for(self, trainer_float32: bool) -> float:
        """rollout.parity_threshold, or its default for the trainer's and the engine's precision."""
        if self.parity_threshold is not None:
            return self.parity_threshold
        engine_float32 = (self.name == "embedded"
                          and self.embedded.torch_dtype(self.embedded.torch_device()) == torch.float32)
        return PARITY_FLOAT32 if trainer_float32 and engine_float32 else PARITY_HALF


SGLANG_HELD_BACK = 2
"""Tokens of SGLang's context length no request gets (RolloutConfig.held_back)."""

PARITY_FLOAT32 = 1e-3
"""Default probe bound (mean |difference| of log-probs) where trainer and engine both run float32: their
log-probs then agree to ~1e-6 (CPU, tests/trainer/test_toy.py)."""
PARITY_HALF = 0.5
"""Default bound where either side runs bf16 (or fp16). Rounding alone moves log-probs by about 0.1 on average
where logits reach ~45 (measured on a CPU: a random Qwen2-shaped model, hidden 512, 4 layers, its output layer
scaled up to such logits, bf16 against float32 on the same weights: 0.10 mean, 0.33 largest over 47 tokens; two
bf16 implementations can differ by up to about twice that), while weights in the wrong place move log-probs by
nats. In bf16 an engine one step behind is not told apart from rounding; the push's own checks (every tensor
named, shaped and present) cover what the probe cannot."""

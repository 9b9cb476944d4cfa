from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_dapo.config.loader import ConfigError

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate, reached after the warm-up (the paper keeps it constant at 1e-6)."""
    lr_warmup_steps: int = 20
    """Optimizer steps of linear warm-up from 0 to lr. The schedule counts a full batch's optimizer steps
    (data.train_batch_size / ppo_mini_batch_size x ppo_epochs) for every training step, also for a step that
    trained on fewer groups than that, so it follows the run's progress."""
    lr_decay_style: Literal["constant", "cosine", "linear"] = "constant"
    """After the warm-up: stay at lr, or decay to min_lr by lr_decay_steps along a half cosine or a line."""
    min_lr: float = 0.0
    """Where the decay ends (and stays)."""
    lr_decay_steps: int = 0
    """The optimizer step (counted from 0, warm-up included) that runs at min_lr; 0: the run's last, step
    trainer.total_training_steps x data.train_batch_size / ppo_mini_batch_size x ppo_epochs - 1."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""


@dataclass(kw_only=True)
class ActorConfig:
    clip_ratio_low: float = 0.2
    """eps_low: the ratio is clipped below at 1 - clip_ratio_low."""
    clip_ratio_high: float = 0.28
    """eps_high: the ratio is clipped above at 1 + clip_ratio_high (clip-higher)."""
    clip_ratio_c: float = 10.0
    """Dual-clip bound: for negative advantages the loss is at most -A * clip_ratio_c."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How token losses become the batch loss; token-mean divides by the global batch's token count."""
    entropy_coeff: float = 0.0
    """Entropy bonus: the loss minimised is the policy loss - entropy_coeff x entropy, both aggregated by
    loss_agg_mode (DAPO uses none)."""
    tis_imp_ratio_cap: float | None = None
    """Truncated importance weight exp(old - rollout log-prob) capped at this; None disables it."""
    ppo_mini_batch_size: int = 32
    """Prompt groups per optimizer step; data.train_batch_size / this = updates per rollout step."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    ppo_max_token_len_per_gpu: int = 16384
    """Token budget of one micro-batch (prompt + response tokens), on each data-parallel rank."""
    recompute_activations: bool = False
    """Recompute each transformer layer in backward to save activation memory."""
    offload: bool = False
    """Colocated rollout: keep the weights and optimizer state in host memory while the engine generates
    (gradients are dropped), so the engine's KV cache can use that GPU memory; costs a copy each way per step."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.clip_ratio_low < 1:
            problems.append(f"actor.clip_ratio_low must be in [0, 1), got {self.clip_ratio_low}")
        if self.clip_ratio_high < self.clip_ratio_low:
            problems.append(
                f"actor.clip_ratio_high ({self.clip_ratio_high}) < actor.clip_ratio_low ({self.clip_ratio_low}): "
                "set actor.clip_ratio_high >= actor.clip_ratio_low (clip-higher widens the upper bound)"
            )
        if self.clip_ratio_c <= 1:
            problems.append(f"actor.clip_ratio_c must be > 1 (dual-clip bound), got {self.clip_ratio_c}")
        if self.entropy_coeff < 0:
            problems.append(f"actor.entropy_coeff must be >= 0 (a bonus for entropy), got {self.entropy_coeff}")
        if self.tis_imp_ratio_cap is not None and self.tis_imp_ratio_cap <= 0:
            problems.append(f"actor.tis_imp_ratio_cap must be > 0 or null, got {self.tis_imp_ratio_cap}")
        for key in ("ppo_mini_batch_size", "ppo_epochs", "ppo_max_token_len_per_gpu"):
            if getattr(self, key) < 1:
                problems.append(f"actor.{key} must be >= 1, got {getattr(self, key)}")
        if self.optim.lr <= 0:
            problems.append(f"actor.optim.lr must be > 0, got {self.optim.lr}")
        if self.optim.lr_warmup_steps < 0:
            problems.append(f"actor.optim.lr_warmup_steps must be >= 0, got {self.optim.lr_warmup_steps}")
        if not 0 <= self.optim.min_lr <= self.optim.lr:
            problems.append(f"actor.optim.min_lr must be in [0, actor.optim.lr={self.optim.lr}], got {self.optim.min_lr}")
        if self.optim.lr_decay_steps < 0:
            problems.append(f"actor.optim.lr_decay_steps must be >= 0 (0: the run's last step), "
                            f"got {self.optim.lr_decay_steps}")
        elif self.optim.lr_decay_style != "constant" and 0 < self.optim.lr_decay_steps <= self.optim.lr_warmup_steps:
            problems.append(f"actor.optim.lr_decay_steps ({self.optim.lr_decay_steps}) must be > "
                            f"actor.optim.lr_warmup_steps ({self.optim.lr_warmup_steps}): the decay starts after "
                            "the warm-up")
        if self.optim.grad_clip < 0:
            problems.append(f"actor.optim.grad_clip must be >= 0 (0 disables), got {self.optim.grad_clip}")
        if self.optim.weight_decay < 0:
            problems.append(f"actor.optim.weight_decay must be >= 0, got {self.optim.weight_decay}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            problems.append(f"actor.optim.betas must be two numbers in [0, 1), got {list(self.optim.betas)}")
        if self.optim.eps <= 0:
            problems.append(f"actor.optim.eps must be > 0, got {self.optim.eps}")
        if problems:
            raise ConfigError(problems)

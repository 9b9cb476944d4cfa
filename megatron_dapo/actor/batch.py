"""The actor's input: token sequences with per-token masks and log-probs, and its micro-batching."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class ActorBatch:
    """B sequences (prompt + response), right-padded to S. Per-token tensors are aligned with `tokens`:
    entry [b, t] is about token t given tokens 0..t-1 (entry t = 0 is unused)."""

    tokens: torch.Tensor
    """[B, S] int64."""
    lengths: torch.Tensor
    """[B] tokens in use per row."""
    loss_mask: torch.Tensor
    """[B, S] 1 where token t is a response token whose loss counts."""
    advantages: torch.Tensor | None = None
    """[B] one advantage per sequence (or [B, S])."""
    old_logp: torch.Tensor | None = None
    """[B, S] log-probs under the policy that generated the batch, as the trainer computes them."""
    rollout_logp: torch.Tensor | None = None
    """[B, S] log-probs reported by the rollout engine."""

    def __post_init__(self) -> None:
        b, s = self.tokens.shape
        if self.lengths.shape != (b,) or self.loss_mask.shape != (b, s):
            raise ValueError(
                f"batch shapes disagree: tokens {tuple(self.tokens.shape)}, lengths {tuple(self.lengths.shape)}, "
                f"loss_mask {tuple(self.loss_mask.shape)}"
            )

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: torch.Tensor | slice) -> ActorBatch:
        """The sub-batch of these rows, trimmed to its longest sequence."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        picked = {k: (v[index] if v is not None else None) for k, v in picked.items()}
        width = int(picked["lengths"].max()) if picked["lengths"].numel() else 1
        for key in ("tokens", "loss_mask", "old_logp", "rollout_logp"):
            if picked[key] is not None:
                picked[key] = picked[key][:, :width]
        if picked["advantages"] is not None and picked["advantages"].dim() == 2:
            picked["advantages"] = picked["advantages"][:, :width]
        return replace(self, **picked)


def split_by_token_budget(lengths: list[int], budget: int, multiple: int = 1) -> list[list[int]]:
    """Consecutive rows grouped so that rows x padded length <= budget (a row longer than the budget
    goes alone). `multiple`: the padded length is rounded up to it (sequence parallelism needs TP)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row, length in enumerate(lengths):
        width = -(-max(longest, length) // multiple) * multiple
        if current and width * (len(current) + 1) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, length)
    if current:
        groups.append(current)
    return groups

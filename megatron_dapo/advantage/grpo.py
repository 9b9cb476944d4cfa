"""Group-normalized advantages (GRPO / DAPO)."""
from __future__ import annotations

import torch

from megatron_dapo.checks import check_finite


def group_advantages(rewards: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """rewards: [G, n] (n responses to each of G prompts) -> advantages [G, n].

    A = (R - mean(R)) / (std(R) + eps) within each group (std with Bessel's correction, as verl);
    with norm_by_std=False, A = R - mean(R). `valid` ([G, n] bool, all True when None) leaves responses out:
    they neither count in their group's mean and std nor get an advantage (0; their rewards may be anything,
    NaN included). A group with fewer than two valid responses has no baseline: its advantages are 0, and so are
    those of a group whose valid rewards are all equal (exactly: in float32, rewards such as 0.7 leave a mean
    1 ulp off, and that rounding divided by its own tiny std would give every response the same non-zero
    advantage). Computed in float64, returned in float32.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, n], got shape {tuple(rewards.shape)}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid must have the rewards' shape {tuple(rewards.shape)}, got {tuple(valid.shape)}")
    valid = valid.to(torch.bool)
    rewards = torch.where(valid, rewards.to(torch.float64), 0.0)
    check_finite("reward", rewards.reshape(-1))  # flat: "sample g x n + j", the response's row in the batch
    count = valid.sum(dim=1, keepdim=True)
    mean = rewards.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, rewards - mean, 0.0)
    if norm_by_std:
        std = (centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    spread = (torch.where(valid, rewards, -inf).amax(dim=1, keepdim=True)
              - torch.where(valid, rewards, inf).amin(dim=1, keepdim=True))
    return torch.where((count >= 2) & (spread > 0), centred, 0.0).to(torch.float32)

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
    NaN included). A group with fewer than two valid responses has no baseline: its advantages are 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, n], got shape {tuple(rewards.shape)}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid must have the rewards' shape {tuple(rewards.shape)}, got {tuple(valid.shape)}")
    valid = valid.to(torch.bool)
    rewards = torch.where(valid, rewards.to(torch.float32), 0.0)
    check_finite("reward", rewards.reshape(-1))  # flat: "sample g x n + j", the response's row in the batch
    count = valid.sum(dim=1, keepdim=True)
    mean = rewards.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(valid, rewards - mean, 0.0)
    if norm_by_std:
        std = (centred.square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    return torch.where(count >= 2, centred, 0.0)

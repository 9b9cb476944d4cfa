"""Group-normalized advantages (GRPO / DAPO)."""
from __future__ import annotations

import torch

from megatron_dapo.checks import check_finite


def group_advantages(rewards: torch.Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards: [G, n] (n responses to each of G prompts) -> advantages [G, n].

    A = (R - mean(R)) / (std(R) + eps) within each group (std with Bessel's correction, as verl);
    with norm_by_std=False, A = R - mean(R). A group of one response gets advantage 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, n], got shape {tuple(rewards.shape)}")
    check_finite("reward", rewards)
    rewards = rewards.to(torch.float32)
    if rewards.shape[1] == 1:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not norm_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)

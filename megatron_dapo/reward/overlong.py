"""Overlong reward shaping and overlong filtering (DAPO paper, section 3.4)."""
from __future__ import annotations

import torch


def overlong_penalty(
    response_lengths: torch.Tensor, *, max_response_length: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """Soft overlong punishment (Eq. 13), scaled by penalty_factor; lengths [B] -> penalties [B] (<= 0).

    With L_max = max_response_length and L_cache = buffer_len:
      0                                        if |y| <= L_max - L_cache
      ((L_max - L_cache) - |y|) / L_cache      inside the buffer
      -1                                       at and beyond L_max
    """
    if not 0 < buffer_len < max_response_length:
        raise ValueError(f"buffer_len must be in (0, max_response_length={max_response_length}), got {buffer_len}")
    expected = max_response_length - buffer_len
    ramp = (expected - response_lengths.to(torch.float32)) / buffer_len
    return ramp.clamp(min=-1.0, max=0.0) * penalty_factor


def overlong_filter_mask(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Zero the loss mask of truncated responses. response_mask: [B, L]; truncated: [B] bool -> [B, L]."""
    return response_mask * (~truncated.bool()).unsqueeze(-1).to(response_mask.dtype)

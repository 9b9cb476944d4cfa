"""Refuse non-finite numbers at stage boundaries, naming the sample that carries them."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def check_finite(name: str, values: torch.Tensor, mask: torch.Tensor | None = None, meaning: str = "",
                 samples: Sequence[int] | None = None) -> None:
    """Raise ValueError naming the first non-finite entry of `values` (where `mask` is set), and `meaning`:
    what such a value says about the run, when that is known.

    values: [B] (one number per sample) or [B, L] (per token); mask: same shape, or None.
    samples: each row's number in the whole batch, when `values` holds some of its rows (default: 0 .. B-1).
    """
    bad = ~torch.isfinite(values)
    if mask is not None:
        bad &= mask.bool()
    if not bool(bad.any()):
        return
    where = bad.nonzero()[0].tolist()
    count = int(bad.sum())
    value = values[tuple(where)].item()
    sample = samples[where[0]] if samples is not None else where[0]
    position = f"sample {sample}" + (f", token {where[1]}" if len(where) > 1 else "")
    raise ValueError(f"{name} is not finite at {position} (value {value}; {count} such entries): refusing to train on "
                     f"it{'; ' + meaning if meaning else ''}")

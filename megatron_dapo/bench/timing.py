"""Wall-clock timing of a benchmark's call: one warm-up, then the median of timed repeats."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def timed(fn: Callable[[], Any], repeats: int, cuda: bool) -> tuple[float, list[Any]]:
    """`fn()` once untimed (allocations, kernels picked), then `repeats` times: the median seconds, and what each
    timed call returned. cuda: synchronize around each call, so that its queued work counts."""
    fn()
    seconds, results = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        results.append(fn())
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), results

"""The compiled CUDA kernels (`megatron_dapo._C`), when setup.py built them.

The ops in this package call a kernel only for CUDA tensors of a dtype it takes, and only when the
extension imports; everywhere else they run their pure-torch reference, with the same results.
`MEGATRON_DAPO_KERNELS=0` in the environment forces the references (for A/B checks).
"""
from __future__ import annotations

import os

import torch

STATS_LAYOUT = 2
"""The log-prob statistics as megatron_dapo.ops.logprob reads them: (max, sum exp(z - m), sum exp(z - m) * (z - m),
target z). 1: the third was sum exp(z - m) * z."""

try:
    from megatron_dapo import _C as EXTENSION
    UNAVAILABLE_BECAUSE = None
except ImportError as err:  # not built (CPU torch or no nvcc at install time), or built for another torch
    EXTENSION = None
    UNAVAILABLE_BECAUSE = str(err)
else:
    if getattr(EXTENSION, "STATS_LAYOUT", 1) != STATS_LAYOUT:  # an editable install's build of older sources
        UNAVAILABLE_BECAUSE = (f"{EXTENSION.__file__} was built from older sources (statistics layout "
                               f"{getattr(EXTENSION, 'STATS_LAYOUT', 1)}, these read {STATS_LAYOUT}): rebuild it "
                               "with `pip install --no-build-isolation -e .`")
        EXTENSION = None

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_kernel(tensor: torch.Tensor) -> bool:
    """Whether the fused kernel serves this tensor (else the reference does)."""
    return (EXTENSION is not None and tensor.is_cuda and tensor.dtype in KERNEL_DTYPES
            and os.environ.get("MEGATRON_DAPO_KERNELS", "1") != "0")


def describe() -> str:
    """One line for logs: which implementation the ops use."""
    if EXTENSION is None:
        line = f"fused kernels: not built ({UNAVAILABLE_BECAUSE}); pure-torch references in use"
        if torch.cuda.is_available():  # where it costs: the reference makes float32 copies of the logits
            line += ("; on a GPU the reference's log-prob backward holds about five float32 [tokens, vocab / TP] "
                     "arrays besides the logits (the kernels none): reinstall with nvcc present to build them")
        return line
    return "fused kernels: megatron_dapo._C (CUDA tensors); pure-torch references elsewhere"

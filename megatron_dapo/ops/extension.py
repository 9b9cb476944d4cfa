"""The compiled CUDA kernels (`megatron_dapo._C`), when setup.py built them.

The ops in this package call a kernel only for CUDA tensors of a dtype it takes, and only when the
extension imports; everywhere else they run their pure-torch reference, with the same results.
`MEGATRON_DAPO_KERNELS=0` in the environment forces the references (for A/B checks).
"""
from __future__ import annotations

import os

import torch

try:
    from megatron_dapo import _C as EXTENSION
    UNAVAILABLE_BECAUSE = None
except ImportError as err:  # not built (CPU torch or no nvcc at install time), or built for another torch
    EXTENSION = None
    UNAVAILABLE_BECAUSE = str(err)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_kernel(tensor: torch.Tensor) -> bool:
    """Whether the fused kernel serves this tensor (else the reference does)."""
    return (EXTENSION is not None and tensor.is_cuda and tensor.dtype in KERNEL_DTYPES
            and os.environ.get("MEGATRON_DAPO_KERNELS", "1") != "0")


def describe() -> str:
    """One line for logs: which implementation the ops use."""
    if EXTENSION is None:
        return f"fused kernels: not built ({UNAVAILABLE_BECAUSE}); pure-torch references in use"
    return "fused kernels: megatron_dapo._C (CUDA tensors); pure-torch references elsewhere"

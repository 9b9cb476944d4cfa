"""The compiled CUDA kernels (`megatron_dapo._C`), when setup.py built them.

The ops in this package call a kernel only for CUDA tensors of a dtype it takes, and only when the
extension imports; everywhere else they run their pure-torch reference, with the same results.
`MEGATRON_DAPO_KERNELS=0` in the environment forces the references (for A/B checks).
"""
from __future__ import annotations

import os
import re
import warnings

import torch

STATS_LAYOUT = 3
"""The log-prob statistics as megatron_dapo.ops.logprob reads them: (max, sum exp(z - m), sum exp(z - m) * (z - m),
target z), and what the backward takes (3: the max, log sum exp(z - m) and E[z - m]). 2: the backward took lse and
E[z]; 1: the third statistic was sum exp(z - m) * z."""

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


def runs_on(archs: str, capability: tuple[int, int]) -> bool | None:
    """Whether a build holding code for `archs` (the module's CUDA_ARCHS: "sm80_ptx90_sm90", machine code for 8.0
    and 9.0 and PTX of 9.0) runs on a GPU of compute `capability` (8, 6); None when the build did not record them.
    Machine code runs on its own major version from its minor on (8.0's on 8.6 and 8.9); PTX on its version and
    any later (the driver compiles it); an "a" (arch-specific) build on its version alone."""
    cc = capability[0] * 10 + capability[1]
    names = archs.split("_")
    if not names or any(not re.fullmatch(r"(sm|ptx)\d+[af]?", name) for name in names):
        return None
    for name in names:
        kind, version, variant = re.fullmatch(r"(sm|ptx)(\d+)([af]?)", name).groups()
        version = int(version)
        if variant == "a":
            ran = cc == version
        elif kind == "sm" or variant == "f":
            ran = cc // 10 == version // 10 and cc >= version
        else:
            ran = cc >= version
        if ran:
            return True
    return False


_RUNS_ON_DEVICE: dict[int, bool] = {}
"""Device index -> whether the built module holds code for it (asked once per device)."""


def _runs_on_device(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _RUNS_ON_DEVICE:
        capability = torch.cuda.get_device_capability(index)
        ran = runs_on(getattr(EXTENSION, "CUDA_ARCHS", "unknown"), capability)
        _RUNS_ON_DEVICE[index] = ran is not False  # a build that recorded no architectures is trusted
        if ran is False:
            warnings.warn(_not_for_this_gpu(capability), stacklevel=3)
    return _RUNS_ON_DEVICE[index]


def _not_for_this_gpu(capability: tuple[int, int]) -> str:
    return (f"the fused kernels in {EXTENSION.__file__} were built for {EXTENSION.CUDA_ARCHS}, not for this GPU "
            f"(compute capability {capability[0]}.{capability[1]}): the pure-torch references run instead; rebuild "
            f"with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]} pip install --no-build-isolation -e .")


def use_kernel(tensor: torch.Tensor) -> bool:
    """Whether the fused kernel serves this tensor (else the reference does)."""
    return (EXTENSION is not None and tensor.is_cuda and tensor.dtype in KERNEL_DTYPES
            and os.environ.get("MEGATRON_DAPO_KERNELS", "1") != "0" and _runs_on_device(tensor.device))


def describe() -> str:
    """One line for logs: which implementation the ops use."""
    if EXTENSION is None:
        line = f"fused kernels: not built ({UNAVAILABLE_BECAUSE}); pure-torch references in use"
        if torch.cuda.is_available():  # where it costs: the reference makes float32 copies of the logits
            line += ("; on a GPU the reference's log-prob backward holds about five float32 [tokens, vocab / TP] "
                     "arrays besides the logits (the kernels none): reinstall with nvcc present to build them")
        return line
    if os.environ.get("MEGATRON_DAPO_KERNELS", "1") == "0":
        return "fused kernels: built, not in use (MEGATRON_DAPO_KERNELS=0); pure-torch references in use"
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        if runs_on(getattr(EXTENSION, "CUDA_ARCHS", "unknown"), capability) is False:
            return "fused kernels: not in use: " + _not_for_this_gpu(capability)
    return "fused kernels: megatron_dapo._C (CUDA tensors); pure-torch references elsewhere"

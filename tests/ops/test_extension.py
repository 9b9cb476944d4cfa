"""The CUDA extension is built wherever it can be (a CUDA build of torch and nvcc), and its bindings
refuse bad input with a clear message. CI installs the CUDA build of torch, so a compile error there
fails this test even on a machine with no GPU."""
import shutil
from pathlib import Path

import pytest
import torch

from megatron_dapo.ops import extension
from tests.required import unavailable


def _can_build() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or (Path(CUDA_HOME) / "bin" / "nvcc").exists())


def test_extension_is_built_where_it_can_be():
    if not _can_build():
        unavailable("extension", f"torch {torch.__version__} is a CPU build or nvcc is missing: the extension is not "
                                 "built here")
    assert extension.EXTENSION is not None, f"megatron_dapo._C did not import: {extension.UNAVAILABLE_BECAUSE}"
    for name in ("logprob_stats", "logprob_grad_into", "dapo_loss_forward", "dapo_loss_backward"):
        assert hasattr(extension.EXTENSION, name), name


def test_describe_says_which_implementation_runs():
    line = extension.describe()
    assert ("megatron_dapo._C" in line) == (extension.EXTENSION is not None)


def test_bindings_refuse_cpu_tensors_by_name():
    if extension.EXTENSION is None:
        unavailable("extension", f"the extension is not built here: {extension.UNAVAILABLE_BECAUSE}")
    ext = extension.EXTENSION
    logits, targets = torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="logits must be a CUDA tensor"):
        ext.logprob_stats(logits, targets, 1.0, 8)
    with pytest.raises(RuntimeError, match="logp must be a CUDA tensor"):
        ext.dapo_loss_forward(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3), None, 0.2, 0.28, 3.0,
                              torch.ones(1))
    # Without CUDA tensors the ops take the reference path instead of the kernel.
    assert not extension.use_kernel(logits)

"""The CUDA extension is built wherever it can be (a CUDA build of torch and nvcc), and its bindings
refuse bad input with a clear message. CI installs the CUDA build of torch, so a compile error there
fails this test even on a machine with no GPU."""
import os
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


def test_a_build_runs_on_the_gpus_it_holds_code_for():
    """Machine code runs on its major version from its minor on, PTX on its version and later, an arch-specific
    ("a") build on its own version only; a build that recorded nothing is not judged."""
    runs_on = extension.runs_on
    default = "sm80_ptx90_sm90"  # setup.py's DEFAULT_ARCHS, 8.0;9.0+PTX
    assert [runs_on(default, cc) for cc in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))] == [True] * 6
    assert [runs_on(default, cc) for cc in ((7, 0), (7, 5))] == [False, False]
    assert runs_on("sm90", (10, 0)) is False and runs_on("sm90", (8, 0)) is False and runs_on("sm86", (8, 0)) is False
    assert runs_on("sm90a", (9, 0)) is True and runs_on("ptx90a", (10, 0)) is False
    assert runs_on("sm100f", (10, 3)) is True and runs_on("sm100f", (12, 0)) is False
    assert runs_on("unknown", (9, 0)) is None and runs_on("", (9, 0)) is None


def test_the_build_records_the_architectures_it_holds_code_for():
    """setup.py passes the architectures nvcc compiled for to the module: with no GPU at build time (CI) the
    default list, on a GPU machine at least that GPU's."""
    if extension.EXTENSION is None:
        unavailable("extension", f"the extension is not built here: {extension.UNAVAILABLE_BECAUSE}")
    archs = extension.EXTENSION.CUDA_ARCHS
    if torch.cuda.is_available():
        assert extension.runs_on(archs, torch.cuda.get_device_capability()) is True, archs
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert set(archs.split("_")) == {"sm80", "sm90", "ptx90"}, archs
    else:  # a list of one's own (a build at test time would have used it too)
        assert extension.runs_on(archs, (9, 0)) is not None, archs


def test_an_nvcc_of_another_major_cuda_version_skips_the_build_naming_both(tmp_path):
    """torch's build stops on a toolkit of another major CUDA version than torch's (a `module load cuda/12.8` beside
    a CUDA 13 torch): setup.py skips the extension with a line naming both, and the install goes on."""
    import subprocess
    import sys

    if torch.version.cuda is None:
        unavailable("extension", f"torch {torch.__version__} is a CPU build: setup.py skips the extension anyway")
    other = int(torch.version.cuda.split(".")[0]) - 1
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other}.8, V{other}.8.93'\n")
    nvcc.chmod(0o755)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "CUDA_HOME": str(tmp_path / "cuda")}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("megatron-dapo"), proc.stderr[-2000:]
    assert (f"CUDA extension not built (nvcc of CUDA {other}.8 ({tmp_path / 'cuda'}) and torch {torch.__version__}'s "
            f"CUDA {torch.version.cuda} differ in major version") in proc.stderr, proc.stderr[-2000:]


def test_a_gpu_the_build_holds_no_code_for_runs_the_references_and_says_so(monkeypatch):
    """A build for sm_90 only (as one on an H100 node) on an A100: the ops take the references, with one warning
    naming the GPU and the rebuild, and the start-up line says the kernels are not in use."""
    import types

    built = types.SimpleNamespace(CUDA_ARCHS="sm90", __file__="/site/megatron_dapo/_C.so")
    monkeypatch.setattr(extension, "EXTENSION", built)
    monkeypatch.setattr(extension, "_RUNS_ON_DEVICE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(UserWarning, match=r"built for sm90, not for this GPU \(compute capability 8.0\).*"
                                         r"TORCH_CUDA_ARCH_LIST=8.0"):
        assert extension._runs_on_device(torch.device("cuda", 0)) is False
    assert extension._runs_on_device(torch.device("cuda", 0)) is False  # asked once: no second warning
    assert extension.describe().startswith("fused kernels: not in use: the fused kernels in /site/megatron_dapo/_C.so")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert extension._runs_on_device(torch.device("cuda", 1)) is True
    assert extension.describe().startswith("fused kernels: megatron_dapo._C")
    monkeypatch.setenv("MEGATRON_DAPO_KERNELS", "0")  # turned off: said, not "in use"
    assert extension.describe() == ("fused kernels: built, not in use (MEGATRON_DAPO_KERNELS=0); pure-torch "
                                    "references in use")

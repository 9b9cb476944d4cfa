"""Install megatron-dapo.

The fused CUDA kernels in csrc/ are built as the extension module `megatron_dapo._C` when a CUDA
build of torch and nvcc are both present (no GPU is needed to compile). Otherwise the build says so in
one line and the package uses its pure-torch reference ops, with the same results. Build with
`pip install --no-build-isolation -e .` so that the build sees the installed torch.
Environment: MEGATRON_DAPO_NO_EXTENSION=1 skips the extension; TORCH_CUDA_ARCH_LIST picks the
GPU architectures (default: the visible GPUs', or DEFAULT_ARCHS when there is none). The module records
the architectures it holds code for: on another GPU the package uses the reference ops and says so.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _set_cuda_home():
    """torch takes CUDA_HOME from the directory above the first `nvcc` on PATH; where that is a wrapper
    script (/usr/local/bin/nvcc, say) the toolkit's libraries are not there. Unless CUDA_HOME is set, take a
    toolkit folder that has both bin/nvcc and the CUDA runtime library, of torch's CUDA major version where one is
    (another one's build is skipped): nvcc's on PATH, /usr/local/cuda, then /usr/local/cuda-X.Y, newest first."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    try:
        import torch

        major = (torch.version.cuda or "").split(".")[0]
    except ImportError:
        major = ""

    def version(home: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", home.name))

    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    candidates += sorted(Path("/usr/local").glob("cuda-*"), key=version, reverse=True)
    toolkits = [home for home in candidates if (home / "bin" / "nvcc").exists()
                and any((home / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))]
    matching = [home for home in toolkits if (_nvcc_release(str(home / "bin" / "nvcc")) or "").split(".")[0] == major]
    if matching or toolkits:
        os.environ["CUDA_HOME"] = str((matching or toolkits)[0])


DEFAULT_ARCHS = "8.0;9.0+PTX"
"""Where no GPU is visible at build time: A100 and H100 machine code, and H100's PTX, which a newer GPU's driver
compiles for it when the module loads."""


def _nvcc_release(nvcc: str) -> str | None:
    """The CUDA release of `nvcc` ("13.0"), or None when its --version does not say."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found[1]}.{found[2]}" if found else None


def _archs_token() -> str:
    """The architectures the build compiles for as one C token (sm80_sm90_ptx90: machine code for 8.0 and 9.0,
    PTX of 9.0), from the flags torch's build passes to nvcc; "unknown" when those cannot be read."""
    from torch.utils import cpp_extension

    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception:  # a private function of torch's: the module then says it does not know
        return "unknown"
    codes = [code for flag in flags for code in re.findall(r"code=\[?([\w,]+)", flag)]
    names = []
    for code in ",".join(codes).split(","):
        found = re.fullmatch(r"(sm|compute)_(\d+[af]?)", code)
        if found:
            names.append(("sm" if found[1] == "sm" else "ptx") + found[2])
    return "_".join(dict.fromkeys(names)) or "unknown"


def _extension():
    """([ext_modules], {cmdclass}) for the CUDA extension, or ([], {}) with a line saying why not."""
    def skip(why):
        print(f"megatron-dapo: CUDA extension not built ({why}); the pure-torch reference ops are used",
              file=sys.stderr)
        return [], {}

    if os.environ.get("MEGATRON_DAPO_NO_EXTENSION") == "1":
        return skip("MEGATRON_DAPO_NO_EXTENSION=1")
    _set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable at build time; install torch first and build with "
                    "--no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None or shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin") + os.pathsep
                                         + os.environ.get("PATH", "")) is None:
        return skip("nvcc not found (set CUDA_HOME)")
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc")
    release = _nvcc_release(nvcc if Path(nvcc).exists() else shutil.which("nvcc"))
    if release is not None and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch's build refuses to go on and the whole install would fail
        return skip(f"nvcc of CUDA {release} ({CUDA_HOME}) and torch {torch.__version__}'s CUDA "
                    f"{torch.version.cuda} differ in major version: set CUDA_HOME to a CUDA "
                    f"{torch.version.cuda.split('.')[0]} toolkit")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = f"-DMDAPO_CUDA_ARCHS={_archs_token()}"
    sources = [str(Path("csrc") / name) for name in ("bindings.cpp", "logprob.cu", "dapo_loss.cu")]
    ext = CUDAExtension(
        name="megatron_dapo._C",
        sources=sources,
        depends=[str(path) for path in sorted(Path("csrc").glob("*.cuh"))],  # a header change rebuilds too
        # Fast math's flush-to-zero and approximate division, not its approximate expf: __expf is written out where
        # it is meant, and the loss's ratio exp(logp - old_logp) stays as the reference computes it.
        extra_compile_args={"cxx": ["-O3", archs],
                            "nvcc": ["-O3", "-ftz=true", "-prec-div=false", "-prec-sqrt=false", "-lineinfo", archs]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extension()

setup(
    name="megatron-dapo",
    version="0.1.0",
    description="DAPO reinforcement learning for LLMs on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dapo", "megatron_dapo.*"]),
    package_data={"megatron_dapo": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "transformers>=4.56",  # from_pretrained(dtype=...)
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "psutil",  # megatron-core dist_checkpointing writers need it
        "matplotlib",
        "pyarrow>=13",  # RecordBatch.to_pylist(maps_as_pydicts=...)
    ],
    extras_require={
        "sglang": ["sglang>=0.5.23"],  # the flattened-bucket broadcast and weight-update sessions
        "te": ["transformer-engine[pytorch]>=2.0"],
        # tensorboard: the logging.tensorboard sink is tested too; ninja: the kernels are compiled for the CPU
        # model of tests/ops/cuda_on_cpu (with the machine's C++ compiler) and checked there
        "test": ["pytest>=8.0", "tensorboard", "ninja"],
        "dev": ["pytest>=8.0", "ruff>=0.5"],
        "bench": ["liger-kernel"],
        "tensorboard": ["tensorboard"],  # logging.tensorboard
        "wandb": ["wandb"],  # logging.wandb_project
    },
    entry_points={"console_scripts": ["megatron-dapo=megatron_dapo.cli:main"]},
)

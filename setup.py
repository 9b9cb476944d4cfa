"""Install megatron-dapo.

The fused CUDA kernels in csrc/ are built as the extension module `megatron_dapo._C` when a CUDA
build of torch and nvcc are both present (no GPU is needed to compile). Otherwise the build says so in
one line and the package uses its pure-torch reference ops, with the same results. Build with
`pip install --no-build-isolation -e .` so that the build sees the installed torch.
Environment: MEGATRON_DAPO_NO_EXTENSION=1 skips the extension; TORCH_CUDA_ARCH_LIST picks the
GPU architectures (default: the visible GPU's, or 9.0 (H100) when there is none).
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _set_cuda_home():
    """torch takes CUDA_HOME from the directory above the first `nvcc` on PATH; where that is a wrapper
    script (/usr/local/bin/nvcc, say) the toolkit's libraries are not there. Prefer a toolkit folder
    that has both bin/nvcc and the CUDA runtime library, unless CUDA_HOME is set."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates += sorted(Path("/usr/local").glob("cuda*"), reverse=True)
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and any((home / lib / "libcudart.so").exists()
                                                     for lib in ("lib64", "lib")):
            os.environ["CUDA_HOME"] = str(home)
            return


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
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources = [str(Path("csrc") / name) for name in ("bindings.cpp", "logprob.cu", "dapo_loss.cu")]
    ext = CUDAExtension(
        name="megatron_dapo._C",
        sources=sources,
        depends=[str(path) for path in sorted(Path("csrc").glob("*.cuh"))],  # a header change rebuilds too
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
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

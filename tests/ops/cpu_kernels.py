"""The CUDA kernels of csrc/ built for the CPU, on the CUDA execution model of cuda_on_cpu/runtime.h.

The sources are compiled as they are, with two mechanical rewrites: `kernel<<<grid, block, shared,
stream>>>(args)` becomes a call of the model's launcher (which is told the kernel's `__launch_bounds__`),
and the launchers' `is_cuda()` checks accept the CPU, which stands in for the device. `cuda_on_cpu/` holds
the CUDA and c10/cuda headers the kernels include, in front of torch's on the include path. The module has
the functions of `megatron_dapo._C`, taking CPU tensors.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch.utils.cpp_extension

CSRC = Path(__file__).resolve().parents[2] / "csrc"
INCLUDE = Path(__file__).resolve().parent / "cuda_on_cpu"
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(")
BOUNDS = re.compile(r"__launch_bounds__\(([^()]*)\)\s+(\w+)\s*\(")
SOURCES = ("logprob.cu", "dapo_loss.cu")


def rewrite(text: str, name: str) -> str:
    """One kernel source made plain C++ for the CPU model."""
    bounds = {kernel: bound for bound, kernel in BOUNDS.findall(text)}

    def launch(m: re.Match) -> str:
        config = f"::emu::Config({m[2]})"
        bound = bounds.get(m[1].split("<")[0])
        return f'::emu::launch("{m[1]}", {config}{f".bounded({bound})" if bound else ""}, {m[1]}, '

    text, launches = LAUNCH.subn(launch, text)
    if not launches:
        raise AssertionError(f"csrc/{name}: no kernel launch found to rewrite")
    if "<<<" in text:
        raise AssertionError(f"csrc/{name}: a kernel launch the rewrite does not read: "
                             f"{text[text.index('<<<') - 80:text.index('<<<') + 40]!r}")
    # Line numbers in messages (a misaligned access, a compile error) are csrc/'s: the rewrites add no lines.
    return f'#line 1 "{CSRC / name}"\n' + text.replace(".is_cuda()", ".is_cpu()")


def build(directory: Path):
    """Compile the kernels and bindings in `directory` (a fresh one: a build killed half-way leaves a lock there
    that the next build would wait on for ever); returns the loaded module."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / "bindings.cpp")]
    for name in SOURCES:
        target = directory / (Path(name).stem + ".cpp")
        target.write_text(rewrite((CSRC / name).read_text(), name))
        sources.append(str(target))
    return torch.utils.cpp_extension.load(
        name="megatron_dapo_cpu_kernels",
        sources=sources,
        extra_include_paths=[str(INCLUDE), str(CSRC)],
        extra_cflags=["-O2", "-fsanitize=alignment", "-include", str(INCLUDE / "runtime.h")],
        build_directory=str(directory),
        verbose=False,
    )

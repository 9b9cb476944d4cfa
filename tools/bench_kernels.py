"""Benchmark the fused kernels against the references (see megatron_dapo/bench/kernels.py)."""
import sys

from megatron_dapo.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(prog="python tools/bench_kernels.py"))

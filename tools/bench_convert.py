"""Benchmark checkpoint conversion for a Qwen2.5-0.5B-shaped random model: GB/s and peak memory.

    python tools/bench_convert.py [--workdir /tmp/megatron-dapo-bench] [--out benchmarks/results]

Builds a random Qwen2.5-0.5B-shaped Hugging Face folder in bf16 (tied embeddings, 494M parameters,
0.99 GB, saved in 500 MB shards), then runs each direction in a fresh process, `--repeats` times:
hf-to-mcore, and mcore-to-hf into 500 MB shards. Each run reports seconds, GB/s of tensors converted,
and the process's peak resident memory above what it held before converting (imports done), next to
the two sizes the streaming design bounds it by: one source shard (memory-mapped while read) and the
largest tensor group (the embedding). Appends rows to benchmarks/results/convert.csv.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARD = "500MB"


def make_model(folder: Path) -> None:
    from megatron_dapo.bench.models import save_random_qwen25_05b

    save_random_qwen25_05b(folder, torch.bfloat16, max_shard_size=SHARD)


def _high_water_mark() -> int:
    """Peak resident bytes of this process image (VmHWM; ru_maxrss would carry the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(direction: str, source: str, out: str) -> None:
    """One conversion in this process; prints its figures as JSON."""
    import psutil

    from megatron_dapo.convert.hf_to_mcore import hf_to_mcore
    from megatron_dapo.convert.main import parse_size
    from megatron_dapo.convert.mcore_to_hf import mcore_to_hf

    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if direction == "hf-to-mcore":
        summary = hf_to_mcore(source, out, overwrite=True, progress=False)
    else:
        summary = mcore_to_hf(source, out, dtype=torch.bfloat16, shard_size_bytes=parse_size(SHARD), overwrite=True,
                              progress=False)
    seconds = time.perf_counter() - start
    peak = _high_water_mark()
    print(json.dumps({"seconds": seconds, "bytes": summary["bytes"], "tensors": summary["tensors"],
                      "baseline_rss": before, "peak_rss": peak}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/megatron-dapo-bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0

    work = Path(args.workdir)
    hf, mcore, back = work / "qwen2.5-0.5b-random-bf16", work / "qwen2.5-0.5b-mcore", work / "qwen2.5-0.5b-back"
    if not (hf / "model.safetensors.index.json").exists():
        shutil.rmtree(hf, ignore_errors=True)
        make_model(hf)
    largest_shard = max(p.stat().st_size for p in hf.glob("*.safetensors"))
    largest_group = 151936 * 896 * 2  # the embedding, bf16
    from megatron_dapo.bench.results import append_rows, machine

    rows = []
    for direction, source, out in (("hf-to-mcore", hf, mcore), ("mcore-to-hf", mcore, back)):
        runs = []
        for _ in range(args.repeats):
            done = subprocess.run([sys.executable, __file__, "--child", direction, str(source), str(out)],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        seconds = statistics.median(r["seconds"] for r in runs)
        extra = max(r["peak_rss"] - r["baseline_rss"] for r in runs)
        rows.append({"machine": machine(), "torch": torch.__version__, "direction": direction, "dtype": "bf16",
                     "tensors": runs[0]["tensors"], "gb": round(runs[0]["bytes"] / 1e9, 3),
                     "seconds_median": round(seconds, 3), "gb_per_s": round(runs[0]["bytes"] / seconds / 1e9, 3),
                     "peak_extra_rss_gb": round(extra / 1e9, 3),
                     "baseline_rss_gb": round(max(r["baseline_rss"] for r in runs) / 1e9, 3),
                     "largest_source_shard_gb": round(largest_shard / 1e9, 3) if direction == "hf-to-mcore" else "",
                     "largest_group_gb": round(largest_group / 1e9, 3), "repeats": args.repeats})
        print(rows[-1], flush=True)
    append_rows(args.out, "convert", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

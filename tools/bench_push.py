"""Benchmark the weight push (Megatron actor -> embedded engine) for a Qwen2.5-0.5B-shaped random model.

    torchrun --nproc-per-node N tools/bench_push.py --tp N [--out benchmarks/results]

Builds a random Qwen2.5-0.5B-shaped Hugging Face folder (rank 0, once), loads it into the Megatron
actor at TP = --tp (PP 1; bf16 on a GPU, fp32 on CPU), starts the embedded engine on rank 0 (on its
GPU when there is one) and times `push_weights` a few times:
seconds, GB/s of HF-named tensors delivered, buckets; then the weight-parity probe (128 random tokens) after
the last push: the mean and largest |engine - trainer| log-prob, the figures `rollout.parity_threshold`
bounds (bf16 on both sides on a GPU). Appends a row to benchmarks/results/push.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--model", default="/tmp/megatron-dapo-bench/qwen2.5-0.5b-random")
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from megatron_dapo.actor.actor import MegatronActor
    from megatron_dapo.actor.config import ActorConfig
    from megatron_dapo.bench.models import save_random_qwen25_05b
    from megatron_dapo.bench.results import append_rows, machine
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_distributed
    from megatron_dapo.rollout.embedded import EmbeddedEngine
    from megatron_dapo.rollout.embedded.config import EmbeddedEngineConfig
    from megatron_dapo.rollout.reshard import probe_parity, push_weights

    layout = init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp), seed=1)
    rank = dist.get_rank()
    folder = Path(args.model)
    if rank == 0 and not (folder / "model.safetensors").exists():
        save_random_qwen25_05b(folder)
    dist.barrier()
    gpu = torch.cuda.is_available()  # GPU: bf16 actor and engine on the rank's device; CPU: fp32
    actor = MegatronActor(ActorConfig(), folder, layout, temperature=1.0, bf16=gpu)
    engine_config = EmbeddedEngineConfig(device="cuda" if gpu else "cpu", dtype="bfloat16" if gpu else "float32")
    engine = EmbeddedEngine.from_pretrained(folder, engine_config) if rank == 0 else None
    runs = []
    for version in range(1, args.repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        stats = push_weights(actor, engine, version=version, bucket_mb=args.bucket_mb)
        if gpu:
            torch.cuda.synchronize()
        dist.barrier()
        runs.append((time.perf_counter() - start, stats))
    probe = torch.randint(0, actor.arch.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    parity = probe_parity(actor, engine, probe)
    if rank == 0:
        seconds = statistics.median(s for s, _ in runs)
        stats = runs[-1][1]
        row = {"machine": machine(), "torch": torch.__version__, "tp": args.tp,
               "world": dist.get_world_size(), "bucket_mb": args.bucket_mb, "tensors": stats.tensors,
               "gb": round(stats.bytes / 1e9, 3), "seconds_median": round(seconds, 3),
               "gb_per_s": round(stats.bytes / seconds / 1e9, 3), "buckets": stats.buckets,
               "probe_mean_diff": f"{parity.mean:.3g}", "probe_max_diff": f"{parity.max:.3g}"}
        print(row, flush=True)
        append_rows(args.out, "push", [row])
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

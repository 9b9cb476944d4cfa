"""Benchmark one DAPO update step of the Megatron actor on a Qwen2.5-0.5B-shaped random model.

    torchrun --nproc-per-node N tools/bench_update.py --tp N [--batch 32] [--seq-len 1024] [--out benchmarks/results]

Builds the random model (rank 0, once), loads it into the actor at TP = --tp (bf16 on a GPU, fp32 on
CPU) and times, after one warm-up step, --repeats update steps of --batch sequences of --seq-len
tokens (the second half of each is the response, advantages random): forward-backward over
micro-batches of actor.ppo_max_token_len_per_gpu tokens and one optimizer step. Reports tokens/s
and model FLOPs utilisation: 6 x parameters x tokens plus attention (12 x layers x hidden x S^2 per
sequence, halved for causality), over the time and the device's peak: the datasheet's (--peak-tflops; 989
for an H100 or H200 SXM in bf16 dense) and an 8192^3 bf16 matrix product's measured in the same run (mfu_of_matmul).
Appends a row to benchmarks/results/update.csv.

It then times actor.offload's round trip in the same run: the weights and optimizer state copied to
host memory and their device memory freed (gradients dropped), then copied back; median of
--repeats. Appends a row to benchmarks/results/offload.csv with the ratio to one update step.
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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-tokens", type=int, default=16384, help="actor.ppo_max_token_len_per_gpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (GPU only)")
    parser.add_argument("--model", default="/tmp/megatron-dapo-bench/qwen2.5-0.5b-random")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from megatron_dapo.actor.actor import MegatronActor
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.config import ActorConfig
    from megatron_dapo.bench.models import qwen25_05b_config, save_random_qwen25_05b
    from megatron_dapo.bench.results import append_rows, machine, ops_in_use
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_distributed
    from megatron_dapo.parallel.preflight import parameter_counts

    layout = init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp,
                                             sequence_parallel=args.tp > 1), seed=1)
    rank, gpu = dist.get_rank(), torch.cuda.is_available()
    folder = Path(args.model)
    if rank == 0 and not (folder / "model.safetensors").exists():
        save_random_qwen25_05b(folder)
    dist.barrier()
    config = ActorConfig(ppo_mini_batch_size=args.batch, ppo_max_token_len_per_gpu=args.micro_tokens)
    actor = MegatronActor(config, folder, layout, temperature=1.0, bf16=gpu)
    gen = torch.Generator().manual_seed(0)
    hf = qwen25_05b_config()
    b, s = args.batch, args.seq_len
    mask = torch.zeros(b, s, dtype=torch.long)
    mask[:, s // 2:] = 1
    batch = ActorBatch(tokens=torch.randint(0, hf.vocab_size, (b, s), generator=gen),
                       lengths=torch.full((b,), s), loss_mask=mask, advantages=torch.randn(b, generator=gen))
    batch.old_logp, _ = actor.compute_logprobs(batch)

    def step() -> float:
        if gpu:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        actor.update(batch, group_size=1)  # one mini-batch of `batch` sequences: one optimizer step
        if gpu:
            torch.cuda.synchronize()
        dist.barrier()
        return time.perf_counter() - start

    step()
    seconds = statistics.median(step() for _ in range(args.repeats))
    matmul = _matmul_tflops() if gpu else 0.0  # this device's reachable bf16 rate, measured in the same run
    if rank == 0:  # written before the offload round trips, which a time limit or the host's memory may cut short
        layer, _, _ = parameter_counts(actor.arch)
        matmul_params = layer * hf.num_hidden_layers + hf.vocab_size * hf.hidden_size  # + the output projection
        tokens = b * s
        flops = 6 * matmul_params * tokens + 6 * hf.num_hidden_layers * hf.hidden_size * s * s * b
        world = dist.get_world_size()
        row = {"machine": machine(), "torch": torch.__version__, "ops": ops_in_use(),
               "dtype": "bfloat16" if gpu else "float32", "tp": args.tp, "world": world,
               "batch": b, "seq_len": s, "micro_tokens": args.micro_tokens, "seconds_median": round(seconds, 3),
               "tokens_per_s": round(tokens / seconds, 1),
               "tflops_per_gpu": round(flops / seconds / world / 1e12, 2),
               "peak_tflops": args.peak_tflops if gpu else "",
               "mfu": round(flops / seconds / world / (args.peak_tflops * 1e12), 3) if gpu else "",
               "matmul_tflops": round(matmul, 1) if gpu else "",
               "mfu_of_matmul": round(flops / seconds / world / (matmul * 1e12), 3) if gpu else ""}
        print(row, flush=True)
        append_rows(args.out, "update", [row])
    round_trips = [_offload_round_trip(actor, gpu) for _ in range(args.repeats)]
    if rank == 0:
        copied, dropped = round_trips[0][0], round_trips[0][1]
        offload_s = statistics.median(r[2] for r in round_trips)
        reload_s = statistics.median(r[3] for r in round_trips)
        row = {"machine": row["machine"], "torch": torch.__version__, "dtype": row["dtype"], "tp": args.tp,
               "world": world, "copied_gb": round(copied / 1e9, 3), "dropped_gb": round(dropped / 1e9, 3),
               "offload_s": round(offload_s, 4), "reload_s": round(reload_s, 4),
               "gb_per_s": round(2 * copied / (offload_s + reload_s) / 1e9, 2),
               "round_trip_per_update_step": round((offload_s + reload_s) / seconds, 4)}
        print(row, flush=True)
        append_rows(args.out, "offload", [row])
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of a large bf16 matrix product on this GPU (the median of `repeats`), a peak the device reaches:
    the datasheet's (--peak-tflops) differs between the SXM and PCIe parts and is rarely reached."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def _offload_round_trip(actor, gpu: bool) -> tuple[int, int, float, float]:
    """(bytes copied, bytes dropped, seconds to offload, seconds to reload), timed on this rank."""
    dist.barrier()
    start = time.perf_counter()
    out = actor.offload()
    if gpu:
        torch.cuda.empty_cache()  # as the trainer does before the engine takes the memory
    middle = time.perf_counter()
    actor.reload()
    end = time.perf_counter()
    return out.copied_bytes, out.dropped_bytes, middle - start, end - middle


if __name__ == "__main__":
    sys.exit(main())

"""The embedded engine on responses of unlike lengths: rows refilled as responses end, against chunked decoding.

    python tools/bench_refill.py [--prompts 16] [--n 2] [--max-batch-size 8] [--prompt-len 32]
                                 [--new-tokens 96] [--stop-ids 4000] [--repeats 3] [--out benchmarks/results]

A random Qwen2.5-0.5B-shaped model (bf16 on a GPU, fp32 on CPU), whose next-token distribution is near
uniform: with --stop-ids K random stop tokens a response ends at each token with probability about
K / vocab, so lengths vary (geometric, capped at --new-tokens). Refilled: one generate call over every
prompt, as the engine runs (a row whose response ended takes a waiting prompt). Chunked: one call per
max_batch_size / n prompts, each decoding until its longest response ends (an engine without refill).
Both in the same run, one warm-up, median of --repeats; throughput over the tokens generated. Prints and
appends a row to benchmarks/results/refill.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--stop-ids", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="/tmp/megatron-dapo-bench/qwen2.5-0.5b-random")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.max_batch_size % args.n:
        parser.error("--max-batch-size must be a multiple of --n (a chunk holds whole prompts)")

    from megatron_dapo.bench.models import save_random_qwen25_05b
    from megatron_dapo.bench.results import append_rows, machine
    from megatron_dapo.bench.timing import timed
    from megatron_dapo.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
    from megatron_dapo.rollout.engine import SamplingParams

    cuda = torch.cuda.is_available()
    folder = Path(args.model)
    if not (folder / "model.safetensors").exists():
        save_random_qwen25_05b(folder)
    engine = EmbeddedEngine.from_pretrained(folder, EmbeddedEngineConfig(
        device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32", max_batch_size=args.max_batch_size))
    vocab = engine.arch.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
    stops = tuple(torch.randperm(vocab, generator=gen)[:args.stop_ids].tolist())
    per_chunk = args.max_batch_size // args.n

    def params(seed: int) -> SamplingParams:
        return SamplingParams(n=args.n, max_new_tokens=args.new_tokens, temperature=1.0, stop_token_ids=stops,
                              seed=seed)

    def refilled() -> int:
        return sum(len(c.token_ids) for cs in engine.generate(prompts, params(1)) for c in cs)

    def chunked() -> int:
        return sum(len(c.token_ids) for i in range(0, len(prompts), per_chunk)
                   for cs in engine.generate(prompts[i:i + per_chunk], params(1 + i)) for c in cs)

    ours_s, ours_runs = timed(refilled, args.repeats, cuda)
    ours_tokens = round(statistics.mean(ours_runs))
    print(f"refilled: {ours_s:.2f} s, {ours_tokens} tokens, {ours_tokens / ours_s:.1f} tokens/s (chunked next)",
          flush=True)
    chunked_s, chunked_runs = timed(chunked, args.repeats, cuda)
    chunked_tokens = round(statistics.mean(chunked_runs))
    row = {"machine": machine(), "torch": torch.__version__, "prompts": args.prompts, "n": args.n,
           "max_batch_size": args.max_batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "stop_ids": args.stop_ids, "refilled_s": round(ours_s, 2), "refilled_tokens": ours_tokens,
           "refilled_tok_per_s": round(ours_tokens / ours_s, 1), "chunked_s": round(chunked_s, 2),
           "chunked_tokens": chunked_tokens, "chunked_tok_per_s": round(chunked_tokens / chunked_s, 1),
           "speedup": round((ours_tokens / ours_s) / (chunked_tokens / chunked_s), 2)}
    print(row, flush=True)
    append_rows(args.out, "refill", [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())

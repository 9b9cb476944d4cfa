"""Generation throughput: the embedded engine against transformers' `generate`, same weights, same run.

    python tools/bench_generate.py [--batch 64] [--prompt-len 128] [--new-tokens 256] [--out benchmarks/results]

A random Qwen2.5-0.5B-shaped model (bf16 on a GPU, fp32 on CPU). Both sample exactly --new-tokens
tokens (no stop token) for --batch prompts of --prompt-len random tokens, at temperature 1 with
top-k and top-p off, in one batch each; one warm-up, then the median of --repeats timed runs.
Prints and appends a row to benchmarks/results/generate.csv with both throughputs and their ratio.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="/tmp/megatron-dapo-bench/qwen2.5-0.5b-random")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from megatron_dapo.bench.models import save_random_qwen25_05b
    from megatron_dapo.bench.results import append_rows, machine
    from megatron_dapo.bench.timing import timed
    from megatron_dapo.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
    from megatron_dapo.rollout.engine import SamplingParams

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    folder = Path(args.model)
    if not (folder / "model.safetensors").exists():
        save_random_qwen25_05b(folder)
    engine = EmbeddedEngine.from_pretrained(folder, EmbeddedEngineConfig(
        device=device, dtype="bfloat16" if cuda else "float32", max_batch_size=args.batch))
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    vocab = reference.config.vocab_size
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)

    def ours():
        out = engine.generate(prompts.tolist(), params)
        assert all(len(c[0].token_ids) == args.new_tokens for c in out)

    def theirs():
        with torch.inference_mode():
            out = reference.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                     do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     pad_token_id=0)
        assert out.shape[1] == args.prompt_len + args.new_tokens

    tokens = args.batch * args.new_tokens
    ours_s, _ = timed(ours, args.repeats, cuda)
    print(f"embedded engine: {ours_s:.3f} s, {tokens / ours_s:.1f} tokens/s (transformers next)", flush=True)
    theirs_s, _ = timed(theirs, args.repeats, cuda)
    row = {"machine": machine(), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "embedded_s": round(ours_s, 3), "embedded_tok_per_s": round(tokens / ours_s, 1),
           "transformers_s": round(theirs_s, 3), "transformers_tok_per_s": round(tokens / theirs_s, 1),
           "speedup": round(theirs_s / ours_s, 2)}
    print(row, flush=True)
    append_rows(args.out, "generate", [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())

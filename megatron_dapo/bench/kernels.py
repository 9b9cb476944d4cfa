"""Kernel benchmark: log-prob + entropy (forward, backward, both) and the DAPO loss, on one GPU.

For each shape it reports milliseconds, the achieved bandwidth against the memory floor (forward:
one read of the logits; backward: one read + one write; both: three passes' bytes), that bandwidth
as a share of the device's copy bandwidth measured in the same run, and the peak memory allocated
beyond the inputs. Implementations: ours (megatron_dapo._C), the pure-torch reference, torch.compile
of the reference, and Liger-Kernel's cross entropy and GRPO loss (loss_type dapo: log-prob and loss fused,
no entropy) when they import. Writes a CSV and a PNG chart.

    python tools/bench_kernels.py --out benchmarks/results      (or: megatron-dapo bench kernels)
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_dapo.ops import extension
from megatron_dapo.ops.logprob import combine_stats, local_grad, local_stats

VOCABS = (32000, 128256, 151936)
TOKENS = (1024, 4096, 16384, 32768)
TPS = (1, 2, 8)
HEADLINE = (  # (tokens, vocab, tp, dtype): the headline shape first, then a few others, in about a minute
    (16384, 151936, 1, "bfloat16"),
    (16384, 151936, 8, "bfloat16"),
    (4096, 128256, 2, "bfloat16"),
    (1024, 32000, 1, "bfloat16"),
    (16384, 151936, 1, "float32"),
)
FIELDS = ("device", "op", "impl", "tokens", "vocab", "tp", "dtype", "pass", "ms", "gbps", "pct_copy_bw",
          "peak_extra_mib", "grad_written", "note")
GRAD_WRITTEN = {"ours": "into a buffer made beforehand (not in peak_extra_mib; over the logits in the actor)",
                "reference": "new", "torch.compile": "new", "liger (cross entropy)": "over its input",
                "liger (grpo loss)": "over its input"}
"""Where each implementation's backward puts the logits' gradient: a new one counts in peak_extra_mib."""
SMALL_BYTES = 256 << 20
"""Logits under this many bytes: a row's note says that the launches count in its time."""

_FLUSH: list[torch.Tensor] = []


def flush_l2() -> None:
    """Write twice the device's L2 cache, so that the next call reads its inputs from memory. Without it the
    shapes whose logits fit in L2 (50 MB on an H100: 1024 x 151936 / tp8 bf16 is 39 MB, and the loss's 1M tokens
    16 MB) are read from it at every timed call after the first, and credited with more than the memory's
    bandwidth."""
    if not _FLUSH:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        _FLUSH.append(torch.empty(2 * (getattr(props, "L2_cache_size", 0) or 64 << 20), dtype=torch.uint8,
                                  device="cuda"))
    _FLUSH[0].zero_()


def time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10,
            setup: Callable[[], object] | None = None) -> float:
    """Median milliseconds of `fn` on the current stream, each call from an idle GPU and a cold L2 cache;
    `setup` runs before each call, outside the timing."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        flush_l2()
        torch.cuda.synchronize()  # from an idle GPU: neither the flush nor a setup's copy hides fn's launches
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    if setup:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbps(nbytes: int = 2 << 30, warm_s: float = 0.5) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now, after `warm_s` seconds
    of copies: an idle GPU's clocks are low, and a copy measured on them would make every kernel's share of
    it look higher than it is."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    deadline = time.perf_counter() + warm_s
    while time.perf_counter() < deadline:
        dst.copy_(src)
        torch.cuda.synchronize()
    ms = time_ms(lambda: dst.copy_(src), warmup=5, iters=50)
    return 2 * nbytes / ms / 1e6  # the buffers go with the frame


def _logprob_impls(logits, targets, temperature, valid):
    """name -> (forward, backward) callables over the same inputs, backward writing one gradient; or, for a
    kernel that does both in one call, (None, None, both, setup) with `setup` run before each call untimed."""
    ext = extension.EXTENSION if extension.use_kernel(logits) else None  # none for a GPU the build has no code for
    ones = torch.ones(logits.shape[0], device=logits.device)
    # The backward's saved statistics from our kernel when it loaded (a few numbers per token): the reference's
    # float32 copies of the logits would not fit beside the largest shapes.
    stats = (ext.logprob_stats if ext is not None else local_stats)(logits, targets, temperature, valid)
    _, _, *saved = combine_stats(stats[None])  # top, log_total, shifted
    grad = torch.empty_like(logits)
    impls = {}
    if ext is not None:
        impls["ours"] = (lambda: combine_stats(ext.logprob_stats(logits, targets, temperature, valid)[None]),
                         lambda: ext.logprob_grad_into(logits, targets, *saved, ones, ones, temperature, valid, grad))
    impls["reference"] = (lambda: combine_stats(local_stats(logits, targets, temperature, valid)[None]),
                          lambda: local_grad(logits, targets, *saved, ones, ones, temperature, valid))
    try:
        # dynamic: one graph for every shape of a dtype, not a recompile per shape of the grid
        stats_c, grad_c = torch.compile(local_stats, dynamic=True), torch.compile(local_grad, dynamic=True)
        impls["torch.compile"] = (lambda: combine_stats(stats_c(logits, targets, temperature, valid)[None]),
                                  lambda: grad_c(logits, targets, *saved, ones, ones, temperature, valid))
    except Exception as err:  # no triton, say
        print(f"torch.compile unavailable: {err}", file=sys.stderr)
    # Liger's kernels write the logits' gradient over their input: each call gets a fresh copy of the logits,
    # made outside the timing, so that it never runs on its own gradient (values near 0 can run faster).
    scratch = []  # allocated only when a Liger kernel imports: a logits-sized buffer

    @torch.no_grad()
    def refill():
        if not scratch:
            scratch.append(torch.empty_like(logits))
        scratch[0].copy_(logits)
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception as err:  # not installed, or fails to import (a Triton it does not fit): no Liger row
        if not isinstance(err, ImportError) or "liger_kernel" not in str(err):
            print(f"Liger-Kernel does not import: {type(err).__name__}: {err}", file=sys.stderr)
    else:
        # Liger's cross entropy (-log p of the target, no entropy) computes its gradient in the forward.
        def liger_ce():
            x = scratch[0].detach().requires_grad_(True)
            loss = LigerCrossEntropyFunction.apply(x, targets.clamp(min=0), None, -100)[0]
            loss.backward()
        impls["liger (cross entropy)"] = (None, None, liger_ce, refill)
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as err:  # not installed, or fails to import (a Triton it does not fit): no Liger row
        if not isinstance(err, ImportError) or "liger_kernel" not in str(err):
            print(f"Liger-Kernel does not import: {type(err).__name__}: {err}", file=sys.stderr)
    else:
        # Liger's GRPO loss with loss_type="dapo": log-prob from the logits and the clipped loss, fused; its
        # logits are [batch, completion + 1, vocab], here one row of all the tokens.
        ids = targets.clamp(min=0)[None, :-1].contiguous()
        old = torch.zeros(ids.shape, device=logits.device)
        advantage = torch.ones(1, device=logits.device)

        def liger_grpo():
            x = scratch[0].detach().unsqueeze(0).requires_grad_(True)
            loss = triton_grpo_loss(x, old, None, ids, advantage, None, temperature=temperature, beta=0.0,
                                    eps_low=0.2, eps_high=0.28, inplace=True, loss_type="dapo", reduce=True)[0]
            loss.backward()
        impls["liger (grpo loss)"] = (None, None, liger_grpo, refill)
    return impls


def bench_logprob(tokens: int, vocab: int, tp: int, dtype: torch.dtype, copy_gbps: float, device: str):
    local = vocab // tp
    shape = dict(device=device, op="logprob_entropy", tokens=tokens, vocab=vocab, tp=tp,
                 dtype=str(dtype).replace("torch.", ""))
    unmeasured = dict(ms="", gbps="", pct_copy_bw="", peak_extra_mib="")
    try:  # the logits, their gradient's buffer and the backward's statistics, made once for every implementation
        gen = torch.Generator(device="cuda").manual_seed(0)
        logits = (torch.randn(tokens, local, device="cuda", generator=gen) * 3).to(dtype)
        targets = torch.randint(0, local, (tokens,), device="cuda", generator=gen)
        impls = _logprob_impls(logits, targets, 1.0, local)
    except torch.OutOfMemoryError:  # a row that says so (no implementation's), and the next shape
        impls = None
    if impls is None:  # outside the except: its traceback no longer holds the tensors made so far
        logits = targets = None
        torch.cuda.empty_cache()
        print(f"{tokens} x {vocab} TP{tp} {dtype}: out of memory for the inputs", flush=True)
        return [dict(shape, impl="(inputs)", **{"pass": "both"}, grad_written="", **unmeasured,
                     note="out of memory for the inputs")]
    elt = logits.element_size()
    floor = {"forward": tokens * local * elt, "backward": 2 * tokens * local * elt, "both": 3 * tokens * local * elt}
    # Each call is timed alone from an idle GPU: under a few hundred MB of logits its launches are a share of the
    # time worth saying beside the bandwidth (the kernels' floor is met at the large shapes).
    small = "small: launch time counts" if floor["forward"] < SMALL_BYTES else ""
    rows = []
    for name, fns in impls.items():
        setup = None
        if len(fns) == 4:
            passes, setup = {"both": fns[2]}, fns[3]
        else:
            fwd, bwd = fns
            passes = {"forward": fwd, "backward": bwd, "both": lambda f=fwd, b=bwd: (f(), b())}
        for which, fn in passes.items():
            # peak_extra_mib counts what a call allocates, the gradient too where it is new (grad_written)
            row = dict(shape, impl=name, **{"pass": which},
                       grad_written="" if which == "forward" else GRAD_WRITTEN.get(name, ""), note=small)
            try:
                ms = time_ms(fn, setup=setup)
                gbps = floor[which] / ms / 1e6
                row.update(ms=round(ms, 4), gbps=round(gbps, 1), pct_copy_bw=round(100 * gbps / copy_gbps, 1),
                           peak_extra_mib=round(peak_extra_mib(fn, setup), 1))
            except torch.OutOfMemoryError:
                row.update(unmeasured, note="out of memory")
                torch.cuda.empty_cache()
            except Exception as err:  # an implementation that does not take this shape or this API version
                row.update(unmeasured, note=f"failed: {err}"[:120])
            rows.append(row)
            print(" ".join(f"{k}={row[k]}" for k in ("impl", "tokens", "vocab", "tp", "dtype", "pass", "ms", "gbps",
                                                      "pct_copy_bw", "peak_extra_mib", "note")), flush=True)
    return rows


def bench_loss(tokens: int, device: str):
    from megatron_dapo.actor.loss import policy_loss

    gen = torch.Generator(device="cuda").manual_seed(1)
    logp = -torch.rand(tokens, device="cuda", generator=gen) * 3
    old = logp + torch.randn(tokens, device="cuda", generator=gen) * 0.3
    adv = torch.randn(tokens, device="cuda", generator=gen)
    mask = (torch.rand(tokens, device="cuda", generator=gen) > 0.2).float()
    count = mask.sum().reshape(1)
    clips = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)

    def reference():
        x = logp.detach().requires_grad_(True)
        from megatron_dapo.actor.loss import aggregate_loss, token_policy_loss
        per_token = token_policy_loss(x, old, adv, mask=mask, **clips)
        aggregate_loss(per_token.loss, mask, "token-mean", global_tokens=count).backward()

    impls = {"reference": reference}
    if extension.use_kernel(logp):  # the op runs the kernel (else it would time the reference as "ours")
        from megatron_dapo.ops.dapo_loss import dapo_loss

        def ours():  # the op alone (its metric sums made in the kernel) against the reference, like for like
            x = logp.detach().requires_grad_(True)
            dapo_loss(x, old, adv, mask, None, clips["clip_ratio_low"], clips["clip_ratio_high"],
                      clips["clip_ratio_c"], count)[0].backward()

        def ours_checked():  # what the actor calls: the kernel behind policy_loss's input checks (host syncs)
            x = logp.detach().requires_grad_(True)
            policy_loss(x, old, adv, mask, loss_agg_mode="token-mean", global_tokens=count, **clips).loss.backward()
        impls["ours"], impls["ours_checked"] = ours, ours_checked
    rows = []
    for name, fn in impls.items():
        ms = time_ms(fn)
        rows.append(dict(device=device, op="dapo_loss", impl=name, tokens=tokens, vocab="", tp="", dtype="float32",
                         **{"pass": "both"}, ms=round(ms, 4), gbps="", pct_copy_bw="",
                         peak_extra_mib=round(peak_extra_mib(fn), 1), grad_written="new", note=""))
        print(f"dapo_loss impl={name} tokens={tokens} ms={ms:.4f}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["op"] == "logprob_entropy" and r["pass"] == "both" and r["pct_copy_bw"] != ""]
    shapes = sorted({(r["tokens"], r["vocab"], r["tp"], r["dtype"]) for r in shown})
    impls = sorted({r["impl"] for r in shown})
    fig, ax = plt.subplots(figsize=(max(8, len(shapes) * 0.5), 5))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        values = {(r["tokens"], r["vocab"], r["tp"], r["dtype"]): r["pct_copy_bw"] for r in shown if r["impl"] == impl}
        ax.bar([j + i * width for j in range(len(shapes))], [values.get(s, 0) for s in shapes], width, label=impl)
    ax.set_xticks([j + 0.4 for j in range(len(shapes))])
    ax.set_xticklabels([f"{t}x{v}/tp{p} {d}" for t, v, p, d in shapes], rotation=90, fontsize=7)
    ax.set_ylabel("% of measured copy bandwidth (forward + backward)")
    ax.axhline(85, color="grey", linestyle="--", linewidth=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None, prog: str = "megatron-dapo bench kernels") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the CSV and PNG")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    parser.add_argument("--tp", type=int, nargs="*", default=list(TPS))
    parser.add_argument("--dtype", nargs="*", default=["bfloat16", "float32"])
    parser.add_argument("--loss-tokens", type=int, nargs="*", default=[1 << 20])
    parser.add_argument("--preset", choices=["grid", "headline"], default="grid",
                        help="grid: every combination of the lists above; headline: a few shapes, the 16384 x "
                             "151936 bf16 one first")
    parser.add_argument("--name", default=None, help="file name stem (default: kernels, or kernels_headline)")
    args = parser.parse_args(argv)
    name = args.name or ("kernels" if args.preset == "grid" else f"kernels_{args.preset}")
    shapes = list(HEADLINE) if args.preset == "headline" else [
        (tokens, vocab, tp, dtype) for dtype in args.dtype for vocab in args.vocab for tp in args.tp
        for tokens in args.tokens]
    if not torch.cuda.is_available():
        print("bench kernels: needs a CUDA device (none here)", file=sys.stderr)
        return 2
    print(extension.describe())
    device = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    print(f"device: {device}; measured copy bandwidth {copy_gbps:.0f} GB/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(device=device, op="copy", impl="torch copy_", tokens="", vocab="", tp="", dtype="bfloat16",
                 **{"pass": "copy"}, ms="", gbps=round(copy_gbps, 1), pct_copy_bw=100.0, peak_extra_mib="", note="")]
    with open(out / f"{name}.csv", "w", newline="") as f:  # written as it goes: a run cut short keeps its rows
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        for tokens, vocab, tp, dtype in shapes:
            new_rows = bench_logprob(tokens, vocab, tp, getattr(torch, dtype), copy_gbps, device)
            torch.cuda.empty_cache()
            writer.writerows(new_rows)
            f.flush()
            rows += new_rows
        for tokens in args.loss_tokens:
            new_rows = bench_loss(tokens, device)
            writer.writerows(new_rows)
            rows += new_rows
        try:  # the same again, the GPU warm: the % figures hold if it is no higher
            end_gbps = copy_bandwidth_gbps()
        except RuntimeError as err:  # a kernel's CUDA error is sticky: every later call fails, said below
            print(f"copy bandwidth at the end not measured: {err}", file=sys.stderr)
        else:
            print(f"copy bandwidth at the end {end_gbps:.0f} GB/s (at the start {copy_gbps:.0f})")
            end = dict(rows[0], impl="torch copy_ (at the end)", gbps=round(end_gbps, 1),
                       pct_copy_bw=round(100 * end_gbps / copy_gbps, 1))
            writer.writerow(end)
            rows.append(end)
    print_headline(rows)  # before the chart: a plotting failure must not lose the figures
    try:
        plot(rows, out / f"{name}.png")
    except Exception as err:  # no matplotlib, say: the CSV holds every row
        print(f"wrote {out / (name + '.csv')}; no chart ({type(err).__name__}: {err})", file=sys.stderr)
    else:
        print(f"wrote {out / (name + '.csv')} and {out / (name + '.png')}")
    broken = [r for r in rows if str(r["impl"]).startswith("ours") and str(r.get("note", "")).startswith("failed")]
    if broken:  # a CUDA error in our kernel fails every later row too: the run must not read as done
        print(f"our kernels failed on {len(broken)} of the rows, the first ({broken[0]['op']} {broken[0]['tokens']} x "
              f"{broken[0].get('vocab', '')}): {broken[0]['note']}", file=sys.stderr)
        return 1
    if not any(r["impl"] == "ours" and (r["ms"] != "" or r.get("note") == "out of memory") for r in rows):
        # the extension did not load or is not used on this GPU, no shape was given, or no shape's inputs fit
        in_use = extension.use_kernel(torch.empty(1, device="cuda", dtype=torch.bfloat16))
        why = (extension.describe() if not in_use else "no shapes to measure" if not rows
               else "no shape's inputs fit in memory")
        print(f"our kernels were not measured: {why}", file=sys.stderr)
        return 1
    short = [r for r in rows if (r["impl"] == "ours" and r.get("note") == "out of memory") or r["impl"] == "(inputs)"]
    if short:  # a shape too large for this GPU's memory: said, not a failure
        print(f"our kernels ran out of memory on {len(short)} shape(s), the first {short[0]['tokens']} x "
              f"{short[0].get('vocab', '')}", file=sys.stderr)
    return 0


def print_headline(rows: list[dict]) -> None:
    """The headline figures of the 16384 x 151936 bf16 TP1 shape and of the loss, as ratios of one run."""
    head = {r["impl"]: r for r in rows if r["op"] == "logprob_entropy" and r["pass"] == "both" and r["tokens"] == 16384
            and r["vocab"] == 151936 and r["tp"] == 1 and r["dtype"] == "bfloat16" and r["ms"] != ""}
    if "ours" in head:
        ours = head["ours"]
        line = f"headline 16384 x 151936 bf16, forward + backward: ours {ours['ms']} ms, {ours['pct_copy_bw']}% of copy"
        for impl, row in head.items():
            if impl != "ours":
                line += f"; {impl} {row['ms']} ms ({row['ms'] / ours['ms']:.2f}x ours)"
        print(line)
    loss = {r["impl"]: r for r in rows if r["op"] == "dapo_loss"}
    if "ours" in loss and "reference" in loss:
        checked = (f" (through policy_loss's input checks: {loss['reference']['ms'] / loss['ours_checked']['ms']:.1f}x)"
                   if "ours_checked" in loss else "")
        print(f"loss at {loss['ours']['tokens']} tokens: reference / ours = "
              f"{loss['reference']['ms'] / loss['ours']['ms']:.1f}x{checked}")


if __name__ == "__main__":
    sys.exit(main())

"""What rank 0 sends every rank once per step: the kept groups pickled (as before) against the packed
actor batch (`ActorBatch.pack`, what the trainer sends). Bytes on the wire, and seconds from what
rank 0 holds to the padded batch on a receiving rank, measured on one process (the network time scales
with the bytes), and how much of the receiver's memory the unpickled groups hold (the padded batch, which
both ways build, not counted).

    python tools/bench_batch_transfer.py [--responses 1024] [--response-len 7000] [--prompt-len 200]
"""
from __future__ import annotations

import argparse
import gc
import os
import pickle
import time
from pathlib import Path

import torch

from megatron_dapo.actor.batch import ActorBatch
from megatron_dapo.bench.results import append_rows, machine
from megatron_dapo.data.dataset import Prompt
from megatron_dapo.reward.registry import RewardResult
from megatron_dapo.rollout.engine import Completion
from megatron_dapo.trainer.groups import Group, build_actor_batch

GROUP_SIZE = 16


def make_groups(responses: int, response_len: int, prompt_len: int, vocab: int = 151936) -> list[Group]:
    """Groups of 16 responses with lengths spread uniformly up to 2 x response_len (mean response_len)."""
    gen = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(responses // GROUP_SIZE):
        prompt = Prompt(prompt_ids=torch.randint(vocab, (prompt_len,), generator=gen).tolist(), ground_truth="1",
                        data_source="math_dapo", extra_info={}, index=0)
        lengths = torch.randint(1, 2 * response_len, (GROUP_SIZE,), generator=gen).tolist()
        completions = [Completion(token_ids=torch.randint(vocab, (n,), generator=gen).tolist(),
                                  logprobs=(-torch.rand(n, generator=gen)).tolist(), finish_reason="stop")
                       for n in lengths]
        rewards = [RewardResult(score=float(i % 2), acc=float(i % 2)) for i in range(GROUP_SIZE)]
        groups.append(Group(prompt=prompt, completions=completions, rewards=rewards,
                            scores=[r.score for r in rewards]))
    return groups


def resident_gib() -> float:
    """This process's resident memory now (Linux /proc/self/statm), GiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--responses", type=int, default=1024)
    parser.add_argument("--response-len", type=int, default=7000)
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.responses < GROUP_SIZE or min(args.response_len, args.prompt_len) < 1:
        parser.error(f"--responses must be at least one group of {GROUP_SIZE}, and the lengths at least 1")
    torch.set_num_threads(2)

    groups = make_groups(args.responses, args.response_len, args.prompt_len)
    tokens = sum(len(g.prompt.prompt_ids) + len(c.token_ids) for g in groups for c in g.completions)

    # before: rank 0 pickles the groups; every other rank unpickles them and builds the padded batch itself
    start = time.perf_counter()
    payload = pickle.dumps(groups, protocol=pickle.HIGHEST_PROTOCOL)
    middle = time.perf_counter()
    before = resident_gib()
    received = pickle.loads(payload)
    held_gib = resident_gib() - before  # the groups alone, while they live (the batch below is built either way)
    build_actor_batch(received, norm_by_std=True, overlong_filtering=True)
    pickled = (len(payload), middle - start, time.perf_counter() - middle)
    del payload, received
    gc.collect()

    # now: rank 0 builds the padded batch and packs it; every other rank unpacks what it received
    start = time.perf_counter()
    batch = build_actor_batch(groups, norm_by_std=True, overlong_filtering=True)
    header, tensors = batch.pack()
    middle = time.perf_counter()
    sent = [t.clone() for t in tensors]  # what the receiver's buffers hold after the broadcast
    back = ActorBatch.unpack(pickle.loads(pickle.dumps(header)), sent)
    packed = (sum(t.numel() * t.element_size() for t in tensors), middle - start, time.perf_counter() - middle)
    assert torch.equal(back.tokens, batch.tokens) and torch.equal(back.rollout_logp, batch.rollout_logp)

    rows = [{"machine": machine(), "responses": args.responses, "tokens": tokens, "form": form,
             "bytes_sent_gb": round(nbytes / 1e9, 4), "bytes_per_token": round(nbytes / tokens, 2),
             "sender_s": round(sender, 3), "receiver_s": round(receiver, 3)}
            for form, (nbytes, sender, receiver) in (("pickled groups", pickled), ("packed batch", packed))]
    for row in rows:
        print(f"{row['form']:>15}: {row['bytes_sent_gb']:.3f} GB sent ({row['bytes_per_token']} B/token); "
              f"rank 0 {row['sender_s']:.2f} s, each other rank {row['receiver_s']:.2f} s to its padded batch")
    print(f"{tokens / 1e6:.1f} M tokens on {machine()}: the packed batch sends {pickled[0] / packed[0]:.1f}x fewer "
          f"bytes, and a receiving rank is ready {pickled[2] / packed[2]:.0f}x sooner; the unpickled groups hold "
          f"{held_gib:.2f} GiB of its memory ({held_gib * 2**30 / tokens:.0f} bytes a token)")
    append_rows(args.out, "batch_transfer", rows)


if __name__ == "__main__":
    main()

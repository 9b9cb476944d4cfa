"""Generation: prefill the distinct prompts, fan out n rows each, decode until done.

Rows that finish (a stop token, or max_new_tokens) leave the batch at once: the live rows of
the KV cache move to the front and the next step computes only them, and prompts still waiting
are prefilled into the rows freed.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from megatron_dapo.rollout.embedded.kv_cache import KVCache
from megatron_dapo.rollout.embedded.model import CausalLM
from megatron_dapo.rollout.embedded.sampling import sample_next
from megatron_dapo.rollout.engine import Completion, RolloutError, SamplingParams


def right_padded(sequences: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token ids [B, longest], padded on the right with id 0 (pads are never attended by real tokens)."""
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [0] * (width - len(s)) for s in sequences], dtype=torch.long).to(device)


def prefill_last_logits(model: CausalLM, cache: KVCache, prompts: list[list[int]], start: int = 0) -> torch.Tensor:
    """Run the prompts (right-padded) into cache rows start..start+P-1 -> fp32 logits of each prompt's last token
    [P, V]."""
    device = model.inv_freq.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = right_padded(prompts, device)  # [P, width]
    width = tokens.shape[1]
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    views = [cache.prefill_view(layer, len(prompts), start) for layer in range(model.arch.num_layers)]
    hidden = model(tokens, positions, views)  # [P, width, hidden]
    last = hidden[torch.arange(len(prompts), device=device), lengths - 1]  # [P, hidden]
    return model.logits(last)


class _Batch:
    """The rows being decoded: row r of the KV cache is completion `rows[r]`, with `cached[r]` tokens cached."""

    def __init__(self, device: torch.device) -> None:
        self.rows: list[int] = []
        self.cached: list[int] = []
        """Tokens cached per row, on the host (no sync for the spans)."""
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # [A], the same on the device
        self.logits: torch.Tensor | None = None  # [A, V] fp32: each row's next-token logits

    def add(self, rows: list[int], cached: list[int], logits: torch.Tensor) -> None:
        self.rows += rows
        self.cached += cached
        self.lengths = torch.cat([self.lengths, torch.tensor(cached, device=self.lengths.device)])
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def keep(self, cache: KVCache, keep: list[int]) -> torch.Tensor:
        """Only rows `keep` (indices into the batch) go on, moved to the front of the cache; returns their index
        on the device, for what the caller holds per row."""
        index = torch.tensor(keep, dtype=torch.long, device=self.lengths.device)
        if keep:
            cache.select_rows(index, max(self.cached))
        self.rows = [self.rows[i] for i in keep]
        self.cached = [self.cached[i] for i in keep]
        self.lengths = self.lengths[index]
        return index


@torch.inference_mode()
def generate_batch(
    model: CausalLM,
    cache: KVCache,
    prompts: list[list[int]],
    copies: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    names: list[int] | None = None,
    max_rows: int | None = None,
) -> list[Completion]:
    """Sample copies[i] completions of prompts[i]; returns them row by row (prompt-major), sum(copies) in all.

    At most `max_rows` rows are decoded at once (None: all). A row that finishes leaves the batch at once, and
    waiting prompts take the free rows as soon as there are enough for all of a prompt's copies (one prefill
    for them all; a prompt with more copies than `max_rows` takes what an empty batch holds), so the batch
    stays full while responses of unlike lengths end. `names`: the caller's index of each prompt, for errors."""
    device = model.inv_freq.device
    names = list(names) if names is not None else list(range(len(prompts)))
    total = sum(copies)
    max_rows = total if max_rows is None else max_rows
    waiting, row = deque(), 0  # (prompt, its first completion not yet decoding, how many are left)
    for i, c in enumerate(copies):
        if c:
            waiting.append((i, row, c))
        row += c
    if not waiting:
        return []
    cache.reserve(min(max_rows, total), max(len(p) for p in prompts) + params.max_new_tokens)
    completions = [Completion() for _ in range(total)]
    prompt_of = [i for i, c in enumerate(copies) for _ in range(c)]  # completion -> prompt
    stop = set(params.stop_token_ids)
    batch = _Batch(device)
    while True:
        _admit(model, cache, prompts, waiting, batch, max_rows)
        if not batch.rows:
            return completions
        try:
            tokens, logprobs = sample_next(batch.logits, params, generator)  # [A], [A]
        except RuntimeError:  # torch.multinomial refuses probabilities that are NaN or infinite
            _check_finite(batch, completions, [names[prompt_of[row]] for row in batch.rows])
            raise
        host_logprobs = logprobs.tolist()
        if not all(map(math.isfinite, host_logprobs)):  # greedy takes argmax of NaN logits without a word
            _check_finite(batch, completions, [names[prompt_of[row]] for row in batch.rows])
        keep = []
        for i, (row, token, logprob) in enumerate(zip(batch.rows, tokens.tolist(), host_logprobs)):
            completion = completions[row]
            completion.token_ids.append(token)
            completion.logprobs.append(logprob)
            if token in stop:
                completion.finish_reason = "stop"
            elif len(completion.token_ids) == params.max_new_tokens:
                completion.finish_reason = "length"
            else:
                keep.append(i)
        if len(keep) < len(batch.rows):  # drop finished rows from the batch
            tokens = tokens[batch.keep(cache, keep)]
        if not keep:
            batch.logits = None
            continue
        views = cache.decode_views(batch.lengths, span=max(batch.cached) + 1)
        hidden = model(tokens[:, None], batch.lengths[:, None], views)  # the new token sits at position == lengths
        batch.logits = model.logits(hidden[:, 0])
        batch.lengths = batch.lengths + 1
        batch.cached = [n + 1 for n in batch.cached]


def _admit(model: CausalLM, cache: KVCache, prompts: list[list[int]], waiting: deque, batch: _Batch,
           max_rows: int) -> None:
    """Waiting prompts into the free rows after the batch's, all copies of each (or what an empty batch holds of
    one with more than max_rows), prefilled once per prompt; their logits join the batch's."""
    taken, copies, rows, cached = [], [], [], []
    free = max_rows - len(batch.rows)
    while waiting:
        prompt, row, left = waiting[0]
        take = left if left <= free else (min(left, max_rows) if not batch.rows and not taken else 0)
        if not take:
            break
        taken.append(prompt)
        copies.append(take)
        rows += range(row, row + take)
        cached += [len(prompts[prompt])] * take
        free -= take
        if take == left:
            waiting.popleft()
        else:
            waiting[0] = (prompt, row + take, left - take)
    if not taken:
        return
    start, device = len(batch.rows), batch.lengths.device
    logits = prefill_last_logits(model, cache, [prompts[p] for p in taken], start)  # [P, V]
    if sum(copies) > len(taken):  # row start + r <- its prompt's prefill
        src = torch.repeat_interleave(torch.arange(len(taken), device=device), torch.tensor(copies, device=device))
        cache.select_rows(src + start, max(len(prompts[p]) for p in taken), dst=start)
        logits = logits[src]
    batch.add(rows, cached, logits)


def _check_finite(batch: _Batch, completions: list[Completion], prompt_of_row: list[int]) -> None:
    """Raise RolloutError naming the prompts whose logits hold NaN or an infinity."""
    bad = (~torch.isfinite(batch.logits)).any(dim=-1).nonzero().flatten().tolist()
    if bad:
        prompts = sorted({prompt_of_row[row] for row in bad})
        steps = ", ".join(map(str, sorted({len(completions[batch.rows[row]].token_ids) for row in bad})))
        raise RolloutError(
            f"the model's logits hold NaN or an infinity at new token {steps} of {len(bad)} sequence(s), from "
            f"prompt(s) {prompts[:10]}: the weights are broken, or the engine's dtype overflows "
            "(rollout.embedded.dtype=float16: use bfloat16 or float32)")

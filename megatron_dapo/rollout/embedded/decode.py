"""One batch of generation: prefill the distinct prompts, fan out n rows each, decode until done.

Rows that finish (a stop token, or max_new_tokens) leave the batch at once: the live rows of
the KV cache move to the front and the next step computes only them.
"""
from __future__ import annotations

import math

import torch

from megatron_dapo.rollout.embedded.kv_cache import KVCache
from megatron_dapo.rollout.embedded.model import CausalLM
from megatron_dapo.rollout.embedded.sampling import sample_next
from megatron_dapo.rollout.engine import Completion, RolloutError, SamplingParams


def right_padded(sequences: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token ids [B, longest], padded on the right with id 0 (pads are never attended by real tokens)."""
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [0] * (width - len(s)) for s in sequences], dtype=torch.long).to(device)


def prefill_last_logits(model: CausalLM, cache: KVCache, prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts (right-padded) into cache rows 0..P-1 -> fp32 logits of each prompt's last token [P, V]."""
    device = model.inv_freq.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = right_padded(prompts, device)  # [P, width]
    width = tokens.shape[1]
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    views = [cache.prefill_view(layer, len(prompts)) for layer in range(model.arch.num_layers)]
    hidden = model(tokens, positions, views)  # [P, width, hidden]
    last = hidden[torch.arange(len(prompts), device=device), lengths - 1]  # [P, hidden]
    return model.logits(last)


@torch.inference_mode()
def generate_batch(
    model: CausalLM,
    cache: KVCache,
    prompts: list[list[int]],
    copies: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    names: list[int] | None = None,
) -> list[Completion]:
    """Sample copies[i] completions of prompts[i]; returns them row by row (prompt-major), sum(copies) in all.
    `names`: the caller's index of each prompt, for errors."""
    device = model.inv_freq.device
    rows = sum(copies)
    prompt_lengths = [len(p) for p in prompts]
    cache.reserve(rows, max(prompt_lengths) + params.max_new_tokens)

    logits = prefill_last_logits(model, cache, prompts)  # [P, V]
    src = torch.repeat_interleave(torch.arange(len(prompts), device=device), torch.tensor(copies, device=device))
    if rows > len(prompts):  # row r <- its prompt's prefill
        cache.select_rows(src, max(prompt_lengths))
        logits = logits[src]  # [R, V]
    host_lengths = [n for n, c in zip(prompt_lengths, copies) for _ in range(c)]  # tokens cached per row
    lengths = torch.tensor(host_lengths, device=device)  # [R]

    completions = [Completion() for _ in range(rows)]
    active = list(range(rows))  # completion index of each live row
    stop = set(params.stop_token_ids)
    row_prompt = [(names or range(len(prompts)))[p] for p in src.tolist()]
    for step in range(params.max_new_tokens):
        try:
            tokens, logprobs = sample_next(logits, params, generator)  # [A], [A]
        except RuntimeError:  # torch.multinomial refuses probabilities that are NaN or infinite
            _check_finite(logits, [row_prompt[row] for row in active], step)
            raise
        host_logprobs = logprobs.tolist()
        if not all(map(math.isfinite, host_logprobs)):  # greedy takes argmax of NaN logits without a word
            _check_finite(logits, [row_prompt[row] for row in active], step)
        keep = []
        for i, (row, token, logprob) in enumerate(zip(active, tokens.tolist(), host_logprobs)):
            completion = completions[row]
            completion.token_ids.append(token)
            completion.logprobs.append(logprob)
            if token in stop:
                completion.finish_reason = "stop"
            elif step + 1 == params.max_new_tokens:
                completion.finish_reason = "length"
            else:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows from the batch
            index = torch.tensor(keep, device=device)
            cache.select_rows(index, max(host_lengths))
            active = [active[i] for i in keep]
            host_lengths = [host_lengths[i] for i in keep]
            lengths, tokens = lengths[index], tokens[index]
        views = cache.decode_views(lengths, span=max(host_lengths) + 1)
        hidden = model(tokens[:, None], lengths[:, None], views)  # the new token sits at position == lengths
        logits = model.logits(hidden[:, 0])
        lengths = lengths + 1
        host_lengths = [n + 1 for n in host_lengths]
    return completions


def _check_finite(logits: torch.Tensor, prompt_of_row: list[int], step: int) -> None:
    """Raise RolloutError naming the prompts whose logits hold NaN or an infinity."""
    bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten().tolist()
    if bad:
        prompts = sorted({prompt_of_row[row] for row in bad})
        raise RolloutError(
            f"the model's logits hold NaN or an infinity at new token {step} of {len(bad)} sequence(s), from "
            f"prompt(s) {prompts[:10]}: the weights are broken, or the engine's dtype overflows "
            "(rollout.embedded.dtype=float16: use bfloat16 or float32)")

"""Next-token sampling: temperature, top-k, then top-p (nucleus), as pure functions on logits.

The reported log-prob of a sampled token is always under the temperature-scaled, untruncated
distribution, log_softmax(logits / T): that is the distribution the trainer recomputes, so the
importance ratio compares like with like. Top-k and top-p only decide which tokens may be drawn.
"""
from __future__ import annotations

import torch

from megatron_dapo.rollout.engine import SamplingParams


def allowed_tokens(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Which tokens may be sampled: logprobs [B, V] -> bool [B, V].

    Top-k keeps the k most likely tokens (-1: all). Top-p then keeps, of those, the smallest
    most-likely-first set whose renormalized probability reaches top_p; the most likely
    token is always kept. Ties are broken by the order of a stable sort (lower id first).
    """
    if top_k == -1 and top_p >= 1.0:
        return torch.ones_like(logprobs, dtype=torch.bool)
    sorted_lp, order = logprobs.sort(dim=-1, descending=True, stable=True)
    keep = torch.ones_like(sorted_lp, dtype=torch.bool)
    if top_k > 0:
        keep[:, top_k:] = False
    if top_p < 1.0:
        probs = sorted_lp.exp() * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        keep &= mass_before < top_p
    return torch.zeros_like(keep).scatter(-1, order, keep)


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [B, V] fp32 -> (tokens [B] int64, their log-probs [B] fp32 under log_softmax(logits / T))."""
    logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
    if params.greedy:
        tokens = logprobs.argmax(dim=-1)
    else:
        probs = logprobs.exp()
        if params.top_k != -1 or params.top_p < 1.0:
            probs = probs * allowed_tokens(logprobs, params.top_k, params.top_p)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)

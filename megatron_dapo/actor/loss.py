"""The DAPO policy loss: clip-higher, dual clip, token-level aggregation over the global batch.

Pure functions on tensors; they are also the reference the fused kernels are checked against.
Shapes: B sequences x L response positions; `mask` marks the tokens that count.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from megatron_dapo.actor.config import LossAggMode
from megatron_dapo.checks import check_finite

LOG_RATIO_CLAMP = 20.0
"""log(ratio) is clamped to +-20 before exp so a stale log-prob cannot overflow to inf."""


@dataclass
class TokenLoss:
    """Per-token loss and what happened to each token; all [B, L]."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped_high: torch.Tensor
    clipped_low: torch.Tensor
    dual_clipped: torch.Tensor
    kl_k1: torch.Tensor
    kl_k3: torch.Tensor


@dataclass
class PolicyLossOutput:
    """This shard's share of the global loss, and metric sums that add up across shards."""

    loss: torch.Tensor
    """Scalar. Summing it over micro-batches and DP ranks gives the loss of the whole batch."""
    tokens: torch.Tensor
    """Valid tokens in this shard."""
    clip_high: torch.Tensor
    """Tokens with A > 0 and ratio > 1 + clip_ratio_high."""
    clip_low: torch.Tensor
    """Tokens with A < 0 and ratio < 1 - clip_ratio_low."""
    dual_clip: torch.Tensor
    """Tokens with A < 0 and ratio > clip_ratio_c."""
    kl_k1: torch.Tensor
    """Sum of old_logp - logp."""
    kl_k3: torch.Tensor
    """Sum of (ratio - 1) - log(ratio)."""
    ratio_max: torch.Tensor
    """Largest ratio over valid tokens."""
    clip_high_prob: torch.Tensor
    """Sum over the clip_high tokens of their probability under the old policy, exp(old_logp)."""
    clip_high_prob_max: torch.Tensor
    """The largest of those probabilities (0 when no token is clipped high)."""

    MAXIMA = ("ratio_max", "clip_high_prob_max")
    """The fields that combine across shards by their maximum; the others (but the loss) add up."""

    def sums(self) -> dict[str, torch.Tensor]:
        """The fields that add up across shards, detached (not the loss): add them, then call `loss_metrics`."""
        return {f.name: getattr(self, f.name).detach() for f in fields(self)
                if f.name != "loss" and f.name not in self.MAXIMA}

    def maxima(self) -> dict[str, torch.Tensor]:
        """The fields that combine by their maximum, detached."""
        return {name: getattr(self, name).detach() for name in self.MAXIMA}


def loss_metrics(sums: dict[str, float], maxima: dict[str, float]) -> dict[str, float]:
    """Metric sums added over the global batch, and maxima taken over it -> the figures that are logged."""
    tokens = max(float(sums["tokens"]), 1.0)
    return {
        "actor/pg_clipfrac_high": float(sums["clip_high"]) / tokens,
        "actor/pg_clipfrac_low": float(sums["clip_low"]) / tokens,
        "actor/pg_clipfrac_dual": float(sums["dual_clip"]) / tokens,
        "actor/pg_clip_high_prob_mean": float(sums["clip_high_prob"]) / max(float(sums["clip_high"]), 1.0),
        "actor/pg_clip_high_prob_max": float(maxima["clip_high_prob_max"]),
        "actor/ppo_kl": float(sums["kl_k1"]) / tokens,
        "actor/ppo_kl_k3": float(sums["kl_k3"]) / tokens,
        "actor/ratio_max": float(maxima["ratio_max"]),
    }


def up_clipped_prob(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_ratio_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the tokens that clip-higher holds back (inside the mask, A > 0, ratio > 1 + clip_ratio_high): the sum of
    their probabilities under the old policy, and the largest (0 when there are none); float32 scalars.
    DAPO's paper watches these: the tokens the upper bound stops are the unlikely ones, which is why it raises
    that bound. advantages: [B, L] or [B]."""
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    valid = mask.bool()
    log_ratio = torch.where(valid, logp.detach() - old_logp, torch.zeros_like(old_logp))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    held = valid & (advantages > 0) & (ratio > 1.0 + clip_ratio_high)
    prob = torch.where(held, torch.exp(old_logp.float()), torch.zeros((), dtype=torch.float32, device=logp.device))
    return prob.sum(dtype=torch.float32), prob.max() if prob.numel() else prob.new_zeros(())


def truncated_is_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, tis_cap: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token constant weight min(exp(old_logp - rollout_logp), tis_cap); 1 where `mask` is 0."""
    if rollout_logp is None:
        raise ValueError("actor.tis_imp_ratio_cap is set but the batch has no rollout log-probs (rollout_logp)")
    drift = (old_logp - rollout_logp).detach()
    if mask is not None:
        drift = torch.where(mask.bool(), drift, torch.zeros_like(drift))
    return torch.exp(drift.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=tis_cap)


def token_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
    mask: torch.Tensor | None = None,
) -> TokenLoss:
    """Per-token clipped surrogate loss (to be minimised).

    logp, old_logp, rollout_logp, mask: [B, L]; advantages: [B, L] or [B] (broadcast over tokens).
    Where `mask` is 0 the inputs are ignored (padding may hold anything, NaN included): the loss
    there is 0 and no NaN can leak into the gradient.
    loss = -A * clip(r, 1 - eps_low, 1 + eps_high) taken pessimistically, and for A < 0 bounded
    by -A * clip_ratio_c (dual clip). With `tis_cap`, each token's loss is weighted by the
    truncated importance weight min(exp(old_logp - rollout_logp), tis_cap), a constant.
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    log_ratio = logp - old_logp
    if mask is not None:
        valid = mask.bool()
        log_ratio = torch.where(valid, log_ratio, torch.zeros_like(log_ratio))
        advantages = torch.where(valid, advantages, torch.zeros_like(advantages))
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    pessimistic = torch.maximum(unclipped, clipped)
    dual_bound = -advantages * clip_ratio_c
    loss = torch.where(advantages < 0, torch.minimum(pessimistic, dual_bound), pessimistic)
    if tis_cap is not None:
        loss = loss * truncated_is_weight(old_logp, rollout_logp, tis_cap, mask)
    detached = ratio.detach()
    return TokenLoss(
        loss=loss,
        ratio=detached,
        clipped_high=(advantages > 0) & (detached > 1.0 + clip_ratio_high),
        clipped_low=(advantages < 0) & (detached < 1.0 - clip_ratio_low),
        dual_clipped=(advantages < 0) & (detached > clip_ratio_c),
        kl_k1=-log_ratio.detach(),
        kl_k3=(detached - 1.0) - log_ratio.detach(),
    )


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAggMode,
    *,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    global_rows: float | None = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """Reduce per-token losses [B, L] to this shard's share of the global batch loss.

    The denominators are those of the whole global batch (all micro-batches, all DP ranks), so the
    shards' results add up to the unsplit batch's loss and gradient:
      token-mean               sum(loss) / global_tokens
      seq-mean-token-sum       sum_b sum_t loss / global_seqs
      seq-mean-token-mean      sum_b mean_t loss / global_seqs
      seq-mean-token-sum-norm  sum(loss) / (global_rows * norm_len)   (norm_len: e.g. max response length)
    global_tokens counts the mask's tokens, global_seqs the sequences with at least one (a response whose whole
    loss is masked, by overlong filtering or a failed reward, is in no mean), global_rows every sequence (the
    constant of the -norm mode). Defaults (None) use this shard's own counts, i.e. the unsplit batch.
    """
    masked = torch.where(mask.bool(), loss, torch.zeros_like(loss))
    mask = mask.to(loss.dtype)
    if global_seqs is None:
        global_seqs = (mask.sum(-1) > 0).sum()
    seqs = torch.clamp(torch.as_tensor(global_seqs, dtype=loss.dtype), min=1.0)
    if mode == "token-mean":
        tokens = global_tokens if global_tokens is not None else mask.sum()
        return masked.sum() / torch.clamp(torch.as_tensor(tokens, dtype=loss.dtype), min=1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum() / seqs
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        horizon = norm_len if norm_len is not None else loss.shape[-1]
        rows = global_rows if global_rows is not None else loss.shape[0]
        return masked.sum() / (rows * horizon)
    raise ValueError(
        f"unknown actor.loss_agg_mode {mode!r}; use token-mean, seq-mean-token-sum, seq-mean-token-mean "
        "or seq-mean-token-sum-norm"
    )


def _fused_loss_available(logp: torch.Tensor) -> bool:
    from megatron_dapo.ops.extension import use_kernel

    return use_kernel(logp) and logp.dtype == torch.float32


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float,
    loss_agg_mode: LossAggMode = "token-mean",
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    global_rows: float | None = None,
    norm_len: float | None = None,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
    samples: Sequence[int] | None = None,
) -> PolicyLossOutput:
    """The DAPO policy loss of one shard (micro-batch on one rank) and its metric sums.

    logp: [B, L] current log-probs (with grad); old_logp, rollout_logp, mask: [B, L];
    advantages: [B] or [B, L]. Non-finite inputs at valid tokens are refused with the sample named: its number in
    `samples` (each row's number in the whole batch) when given.
    token-mean on CUDA runs as one fused op when the extension is built (megatron_dapo.ops.dapo_loss).
    """
    diverged = ("the policy's own log-probs: its weights have diverged (NaN or inf), and nothing of them is saved; "
                "lower actor.optim.lr and start again from the last complete checkpoint")
    check_finite("logp", logp.detach(), mask, meaning=diverged, samples=samples)
    check_finite("old_logp", old_logp, mask, meaning=diverged, samples=samples)
    adv_tokens = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == logp.dim() - 1 else advantages
    check_finite("advantages", adv_tokens, mask, samples=samples)
    if rollout_logp is not None and tis_cap is not None:
        check_finite("rollout_logp", rollout_logp, mask, samples=samples)
    if loss_agg_mode == "token-mean" and _fused_loss_available(logp):
        from megatron_dapo.ops.dapo_loss import fused_token_mean_loss

        weight = truncated_is_weight(old_logp, rollout_logp, tis_cap, mask) if tis_cap is not None else None
        tokens = global_tokens if global_tokens is not None else mask.sum()
        return fused_token_mean_loss(logp, old_logp, advantages, mask, clip_ratio_low=clip_ratio_low,
                                     clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
                                     global_tokens=tokens, weight=weight)
    per_token = token_policy_loss(
        logp, old_logp, advantages,
        clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
        rollout_logp=rollout_logp, tis_cap=tis_cap, mask=mask,
    )
    loss = aggregate_loss(
        per_token.loss, mask, loss_agg_mode,
        global_tokens=global_tokens, global_seqs=global_seqs, global_rows=global_rows, norm_len=norm_len,
    )
    valid = mask.bool()
    ratios = torch.where(valid, per_token.ratio, torch.zeros_like(per_token.ratio))
    clip_high_prob, clip_high_prob_max = up_clipped_prob(logp, old_logp, adv_tokens, mask, clip_ratio_high)
    return PolicyLossOutput(
        loss=loss,
        tokens=valid.sum(dtype=torch.float32),
        clip_high=(per_token.clipped_high & valid).sum(dtype=torch.float32),
        clip_low=(per_token.clipped_low & valid).sum(dtype=torch.float32),
        dual_clip=(per_token.dual_clipped & valid).sum(dtype=torch.float32),
        kl_k1=per_token.kl_k1.sum(dtype=torch.float32),
        kl_k3=per_token.kl_k3.sum(dtype=torch.float32),
        ratio_max=ratios.max() if ratios.numel() else ratios.new_zeros(()),
        clip_high_prob=clip_high_prob,
        clip_high_prob_max=clip_high_prob_max,
    )

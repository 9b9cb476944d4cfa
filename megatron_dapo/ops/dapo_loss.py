"""The DAPO token-mean loss as one op: `megatron_dapo::dapo_loss`, forward and backward.

One pass over the per-token tensors gives the loss (already divided by the global token count) and
every metric sum; the backward is one elementwise pass giving d loss / d logp, which then feeds the
log-prob backward. The fused CUDA kernel runs for CUDA tensors when the extension is built; the
pure-torch reference (`reference_forward` / `reference_backward`, written from the formulas in
megatron_dapo.actor.loss) runs otherwise, with the same results.

Output of the op, one tensor: [loss, tokens, clip_high, clip_low, dual_clip, kl_k1, kl_k3, ratio_max].
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_dapo.actor.loss import LOG_RATIO_CLAMP, PolicyLossOutput, up_clipped_prob
from megatron_dapo.ops.extension import EXTENSION, use_kernel

FIELDS = ("loss", "tokens", "clip_high", "clip_low", "dual_clip", "kl_k1", "kl_k3", "ratio_max")


def _dtype(logp: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logp.dtype, torch.float32)


def _token_terms(logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c):
    """Per token: loss, d loss / d logp, ratio, log-ratio, valid (the kernel's arithmetic, in torch)."""
    dtype = _dtype(logp)
    logp, old_logp, advantages = logp.to(dtype), old_logp.to(dtype), advantages.to(dtype)
    valid = mask != 0
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    raw = torch.where(valid, logp - old_logp, zero)
    a = torch.where(valid, advantages, zero)
    inside_clamp = (raw >= -LOG_RATIO_CLAMP) & (raw <= LOG_RATIO_CLAMP)
    log_ratio = raw.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    unclipped, clipped = -a * ratio, -a * ratio.clamp(lo, hi)
    d_unclipped = -a
    d_clipped = torch.where((ratio >= lo) & (ratio <= hi), -a, zero)
    pessimistic = torch.maximum(unclipped, clipped)
    d_pessimistic = torch.where(unclipped > clipped, d_unclipped,
                                torch.where(unclipped < clipped, d_clipped, 0.5 * (d_unclipped + d_clipped)))
    dual = -a * clip_c
    negative = a < 0
    loss = torch.where(negative, torch.minimum(pessimistic, dual), pessimistic)
    d_dual = torch.where(pessimistic < dual, d_pessimistic, torch.where(pessimistic > dual, zero, 0.5 * d_pessimistic))
    d_loss = torch.where(negative, d_dual, d_pessimistic)
    w = weight.to(dtype) if weight is not None else torch.ones((), dtype=dtype, device=logp.device)
    d_logp = torch.where(valid & inside_clamp, d_loss * ratio * w, zero)
    return loss * w, d_logp, ratio, log_ratio, valid, a


def reference_forward(logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c, global_tokens):
    loss, _, ratio, log_ratio, valid, a = _token_terms(logp, old_logp, advantages, mask, weight,
                                                       clip_low, clip_high, clip_c)
    dtype = loss.dtype
    zero = torch.zeros((), dtype=dtype, device=loss.device)

    def count(condition):
        return (condition & valid).sum(dtype=dtype)

    denominator = torch.clamp(global_tokens.to(dtype).reshape(()), min=1.0)
    return torch.stack([
        torch.where(valid, loss, zero).sum() / denominator,
        valid.sum(dtype=dtype),
        count((a > 0) & (ratio > 1.0 + clip_high)),
        count((a < 0) & (ratio < 1.0 - clip_low)),
        count((a < 0) & (ratio > clip_c)),
        torch.where(valid, -log_ratio, zero).sum(),
        torch.where(valid, (ratio - 1.0) - log_ratio, zero).sum(),
        torch.where(valid, ratio, zero).max() if ratio.numel() else zero,
    ])


def reference_backward(grad_loss, logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c,
                       global_tokens):
    _, d_logp, *_ = _token_terms(logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c)
    scale = grad_loss.to(d_logp.dtype).reshape(()) / torch.clamp(global_tokens.to(d_logp.dtype).reshape(()), min=1.0)
    return (d_logp * scale).to(logp.dtype)


@torch.library.custom_op("megatron_dapo::dapo_loss", mutates_args=())
def dapo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              weight: Optional[torch.Tensor], clip_low: float, clip_high: float, clip_c: float,
              global_tokens: torch.Tensor) -> torch.Tensor:
    """Token-mean DAPO loss and metric sums (see FIELDS); all per-token inputs of one shape."""
    if use_kernel(logp) and logp.dtype == torch.float32:
        return EXTENSION.dapo_loss_forward(logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c,
                                           global_tokens)
    return reference_forward(logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c, global_tokens)


@dapo_loss.register_fake
def _(logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c, global_tokens):
    return logp.new_empty((len(FIELDS),), dtype=_dtype(logp))


@torch.library.custom_op("megatron_dapo::dapo_loss_backward", mutates_args=())
def dapo_loss_backward(grad_loss: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor, weight: Optional[torch.Tensor],
                       clip_low: float, clip_high: float, clip_c: float, global_tokens: torch.Tensor) -> torch.Tensor:
    """d loss / d logp, the shape and dtype of logp."""
    if use_kernel(logp) and logp.dtype == torch.float32:
        return EXTENSION.dapo_loss_backward(grad_loss, logp, old_logp, advantages, mask, weight, clip_low,
                                            clip_high, clip_c, global_tokens)
    return reference_backward(grad_loss, logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c,
                              global_tokens).contiguous()  # the kernel's layout, whatever logp's strides


@dapo_loss_backward.register_fake
def _(grad_loss, logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c, global_tokens):
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logp, old_logp, advantages, mask, weight, clip_low, clip_high, clip_c, global_tokens = inputs
    ctx.save_for_backward(logp, old_logp, advantages, mask, weight, global_tokens)
    ctx.clips = (clip_low, clip_high, clip_c)


def _backward(ctx, grad_out):
    logp, old_logp, advantages, mask, weight, global_tokens = ctx.saved_tensors
    grad = dapo_loss_backward(grad_out[0].contiguous(), logp, old_logp, advantages, mask, weight, *ctx.clips,
                              global_tokens)
    return grad, None, None, None, None, None, None, None, None


dapo_loss.register_autograd(_backward, setup_context=_setup)


def fused_token_mean_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float,
    global_tokens: float | torch.Tensor,
    weight: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """`actor.loss.policy_loss` for loss_agg_mode "token-mean" through the op (shapes as there)."""
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    tokens = torch.as_tensor(global_tokens, dtype=torch.float32, device=logp.device).reshape(1)
    out = dapo_loss(logp.contiguous(), old_logp.contiguous(), advantages.contiguous(),
                    mask.to(torch.float32).contiguous(), weight.contiguous() if weight is not None else None,
                    float(clip_ratio_low), float(clip_ratio_high), float(clip_ratio_c), tokens)
    values = dict(zip(FIELDS, out.unbind()))
    # The probabilities of the up-clipped tokens are a metric only, a few elementwise passes over [B, L]: in torch.
    clip_high_prob, clip_high_prob_max = up_clipped_prob(logp, old_logp, advantages, mask, clip_ratio_high)
    return PolicyLossOutput(**{name: values[name] if name == "loss" else values[name].detach().float()
                               for name in FIELDS},
                            clip_high_prob=clip_high_prob, clip_high_prob_max=clip_high_prob_max)

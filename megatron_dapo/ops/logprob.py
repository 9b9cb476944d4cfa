"""Per-token log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits [T, V/tp] for its slice of the vocabulary. One pass over the
local slice gives four numbers per token (`local_stats`); the ranks exchange them with one
all-gather of [tp, T, 4] floats and combine (`combine_stats`). Backward needs only the logits and
three saved numbers per token (the max m, log sum exp(z - m), E_p[z - m]); nothing of size [T, V] is kept
between the passes beyond the logits themselves.

With z = logits / temperature, p = softmax(z) over the full vocabulary and y the target:
    logp = z_y - lse              entropy = lse - E_p[z]
    d/dz_j = g_logp * (1[j = y] - p_j) + g_entropy * p_j * (E_p[z] - z_j)
The entropy is computed as log(sum exp(z - m)) - E_p[z - m] with m the row's max, both terms of the size of
log V: taken as lse - E_p[z], two numbers of the size of the logits, it would lose fp32's precision times
their size (logits of 60 whose entropy is 3e-4 would come out with a 10% error). The backward forms z_j - lse
and E_p[z] - z_j from z_j - m for the same reason: the entropy's gradient of a likely token is smaller than
float32's steps at the logits' size.

`local_stats` and `local_grad` are the pure-torch references of the fused CUDA kernels. The ops
`megatron_dapo::logprob_stats`, `::logprob_grad`, `::logprob_grad_` (in place) and `::logprob_entropy`
(unsplit vocabulary, with autograd; `logprob_entropy()` calls it) are `torch.library` custom ops that run the
kernel for CUDA tensors when the extension is built and the reference otherwise.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_dapo.ops.extension import EXTENSION, use_kernel

STATS = 4  # per token: local max m, sum exp(z - m), sum exp(z - m) * (z - m), target logit (0 off-rank)


def local_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, valid_columns: int) -> torch.Tensor:
    """logits [T, Vl] (any float dtype), targets [T] local column or -1 when another rank owns it.

    Columns >= valid_columns are vocabulary padding and are ignored. Returns [T, 4] in float32
    (float64 for float64 logits).
    """
    z = logits[:, :valid_columns].to(_compute_dtype(logits)) / temperature
    m = z.max(dim=-1).values if valid_columns else z.new_full(z.shape[:1], float("-inf"))
    # A -inf logit is a token that cannot be drawn: it adds nothing (not 0 * -inf), and a slice of nothing else
    # gives (-inf, 0, 0), which adds nothing when the ranks combine theirs (exp(-inf - -inf) would be NaN).
    shifted = z - torch.where(m == float("-inf"), 0.0, m)[:, None]
    e = torch.exp(shifted)
    target = _target_logit(z, targets, valid_columns)
    return torch.stack([m, e.sum(-1), torch.where(e == 0, 0.0, e * shifted).sum(-1), target], dim=-1)


def _target_logit(z: torch.Tensor, targets: torch.Tensor, valid_columns: int) -> torch.Tensor:
    """z [T, V] at each row's target [T], 0 where the target is not a column of this slice (negative: another
    rank's; at or beyond valid_columns: padding, owned by nobody), as the kernel reads it."""
    if not valid_columns:  # a slice of padding only (a tiny vocabulary over many ranks): it owns no target
        return z.new_zeros(z.shape[:1])
    target = z.gather(1, targets.clamp(0, valid_columns - 1)[:, None])[:, 0]
    return torch.where((targets >= 0) & (targets < valid_columns), target, torch.zeros_like(target))


class Combined(NamedTuple):
    """Per token [T], from every vocabulary slice's statistics."""
    logp: torch.Tensor
    entropy: torch.Tensor
    top: torch.Tensor
    """max z over the vocabulary, for the backward."""
    log_total: torch.Tensor
    """log sum exp(z - top), for the backward: lse = top + log_total."""
    shifted: torch.Tensor
    """E_p[z - top], for the backward: E_p[z] = top + shifted. The backward takes the three apart, not lse and E[z]:
    those would round to the logits' magnitude first (top 60 in float32: steps of 4e-6), and the entropy's gradient
    p (E[z] - z) of a likely token is smaller than that."""


def combine_stats(stats: torch.Tensor) -> Combined:
    """stats [R, T, 4] from the R vocabulary slices -> log-prob, entropy, and what the backward needs."""
    m, s, w, t = stats.unbind(-1)
    top = m.max(dim=0).values
    scale = torch.exp(m - top)
    total = (s * scale).sum(0)
    # Each slice's w moved to the common max, (w + (m - top) s) e^(m - top), each product scaled first (a slice of
    # finfo.min logits would make (m - top) s overflow); a slice with nothing that can be drawn (s = 0, m = -inf)
    # adds nothing, not 0 * -inf.
    shifted = torch.where(s == 0, 0.0, w * scale + (m - top) * (s * scale)).sum(0) / total  # E_p[z - top]
    log_total = torch.log(total)
    # The log-prob as (z_target - top) - log_total, both terms small for a likely token: z_target - lse would round
    # to lse's magnitude first (top 60 in float32: steps of 4e-6, which a log-prob of -5e-4 is off by).
    return Combined(logp=(t.sum(0) - top) - log_total, entropy=log_total - shifted, top=top, log_total=log_total,
                    shifted=shifted)


def local_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    top: torch.Tensor,
    log_total: torch.Tensor,
    shifted: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    valid_columns: int,
) -> torch.Tensor:
    """Gradient w.r.t. the local logits [T, Vl], in their dtype (padding columns get 0). top, log_total, shifted:
    the rows' statistics (Combined)."""
    d = logits.to(_compute_dtype(logits)) / temperature - top[:, None]  # z - top: small where p is not
    p = torch.exp(d - log_total[:, None])
    # A token that cannot be drawn (-inf) has no gradient: p = 0, and its entropy term is not 0 * inf.
    grad = torch.where(p == 0, 0.0, grad_entropy[:, None] * p * (shifted[:, None] - d)) - grad_logp[:, None] * p
    # + grad_logp at each row's target, where this rank holds it: a scatter, which torch.compile keeps in one graph
    # (a nonzero() over the rows would break it in two and round-trip the fp32 gradient through memory).
    owned = (targets >= 0) & (targets < valid_columns)  # another rank's, or padding: no column of ours
    at = targets.clamp(0, max(grad.shape[1] - 1, 0))[:, None]
    grad.scatter_add_(1, at, torch.where(owned, grad_logp, 0.0)[:, None].to(grad.dtype))
    grad[:, valid_columns:] = 0
    return (grad / temperature).to(logits.dtype)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


# ---- custom ops: the kernel for CUDA tensors when built, the reference otherwise -----------------


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _check_columns(logits: torch.Tensor, valid_columns: int) -> None:
    """The kernel and the reference read the same columns only when valid_columns is one of the logits' widths
    (the kernel would clamp it, the reference fail to gather or, below 0, drop columns from the end)."""
    if not 0 <= valid_columns <= logits.shape[-1]:
        raise ValueError(f"valid_columns={valid_columns} is outside [0, {logits.shape[-1]}], the logits' columns "
                         f"(logits {tuple(logits.shape)})")


@torch.library.custom_op("megatron_dapo::logprob_stats", mutates_args=())
def logprob_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, valid_columns: int) -> torch.Tensor:
    """`local_stats` as an op: logits [T, Vl], local targets [T] (-1: not on this rank) -> [T, 4]."""
    _check_columns(logits, valid_columns)
    if use_kernel(logits):
        return EXTENSION.logprob_stats(_rows(logits), targets, temperature, valid_columns)
    return local_stats(logits, targets, temperature, valid_columns)


@logprob_stats.register_fake
def _(logits, targets, temperature, valid_columns):
    return logits.new_empty((logits.shape[0], STATS), dtype=_compute_dtype(logits))


@torch.library.custom_op("megatron_dapo::logprob_grad", mutates_args=())
def logprob_grad(logits: torch.Tensor, targets: torch.Tensor, top: torch.Tensor, log_total: torch.Tensor,
                 shifted: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor, temperature: float,
                 valid_columns: int) -> torch.Tensor:
    """`local_grad` as an op: the logits gradient [T, Vl] in the logits' dtype, in new memory."""
    _check_columns(logits, valid_columns)
    if use_kernel(logits):
        logits = _rows(logits)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        EXTENSION.logprob_grad_into(logits, targets, top, log_total, shifted, grad_logp, grad_entropy, temperature,
                                    valid_columns, grad)
        return grad
    return local_grad(logits, targets, top, log_total, shifted, grad_logp, grad_entropy, temperature,
                      valid_columns).contiguous()  # the kernel's layout, whatever the logits' strides


@logprob_grad.register_fake
def _(logits, targets, top, log_total, shifted, grad_logp, grad_entropy, temperature, valid_columns):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("megatron_dapo::logprob_grad_", mutates_args=("logits",))
def logprob_grad_(logits: torch.Tensor, targets: torch.Tensor, top: torch.Tensor, log_total: torch.Tensor,
                  shifted: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor, temperature: float,
                  valid_columns: int) -> None:
    """The logits gradient written over the logits (whose values are then gone): no new [T, Vl] memory."""
    _check_columns(logits, valid_columns)
    if use_kernel(logits) and logits.stride(-1) == 1:
        EXTENSION.logprob_grad_into(logits, targets, top, log_total, shifted, grad_logp, grad_entropy, temperature,
                                    valid_columns, logits)
    else:
        logits.copy_(local_grad(logits, targets, top, log_total, shifted, grad_logp, grad_entropy, temperature,
                                valid_columns))


@logprob_grad_.register_fake
def _(logits, targets, top, log_total, shifted, grad_logp, grad_entropy, temperature, valid_columns):
    return None


@torch.library.custom_op("megatron_dapo::logprob_entropy", mutates_args=())
def logprob_entropy_op(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                       valid_columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
    """`logprob_entropy` as an op: (logp, entropy, top, log_total, shifted), [T] each; the last three are what its
    backward keeps (not differentiable). Taking them back out of the outputs would not do: z_y - logp is NaN for a
    target that cannot be drawn (-inf - -inf)."""
    combined = combine_stats(logprob_stats(logits, targets, temperature, valid_columns)[None])
    return combined.logp, combined.entropy, combined.top, combined.log_total, combined.shifted


@logprob_entropy_op.register_fake
def _(logits, targets, temperature, valid_columns):
    shape, dtype = logits.shape[:1], _compute_dtype(logits)
    return tuple(logits.new_empty(shape, dtype=dtype) for _ in range(5))


def _logprob_entropy_setup(ctx, inputs, output):
    logits, targets, temperature, valid_columns = inputs
    _, _, top, log_total, shifted = output
    ctx.mark_non_differentiable(top, log_total, shifted)
    ctx.save_for_backward(logits, targets, top, log_total, shifted)
    ctx.temperature, ctx.valid_columns = temperature, valid_columns


def _logprob_entropy_backward(ctx, grad_logp, grad_entropy, _grad_top, _grad_log_total, _grad_shifted):
    logits, targets, top, log_total, shifted = ctx.saved_tensors
    grad = logprob_grad(logits, targets, top, log_total, shifted, _or_zeros(grad_logp, top),
                        _or_zeros(grad_entropy, top), ctx.temperature, ctx.valid_columns)
    return grad, None, None, None


def _or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return grad.contiguous() if grad is not None else torch.zeros_like(like)


logprob_entropy_op.register_autograd(_logprob_entropy_backward, setup_context=_logprob_entropy_setup)


def logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                    valid_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsplit vocabulary: logits [T, V] (columns >= valid_columns are padding), targets [T] in
    [0, valid_columns) -> (logp, entropy), [T] each. Differentiable in the logits."""
    logp, entropy, *_ = logprob_entropy_op(logits, targets, temperature, valid_columns)
    return logp, entropy


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, vocab_start, vocab_size, group, inplace_backward):
        vl = logits.shape[-1]
        valid = max(0, min(vl, vocab_size - vocab_start))
        local_targets = targets - vocab_start
        # A target in the padding columns is owned by no rank, on the kernel and the reference alike.
        local_targets = torch.where((local_targets >= 0) & (local_targets < valid), local_targets, -1)
        stats = logprob_stats(logits, local_targets, temperature, valid)
        world = dist.get_world_size(group) if group is not None else 1
        if world > 1:
            parts = [torch.empty_like(stats) for _ in range(world)]
            dist.all_gather(parts, stats.contiguous(), group=group)
            gathered = torch.stack(parts)
        else:
            gathered = stats[None]
        combined = combine_stats(gathered)
        ctx.save_for_backward(logits, local_targets, combined.top, combined.log_total, combined.shifted)
        ctx.temperature, ctx.valid, ctx.inplace = temperature, valid, inplace_backward
        return combined.logp, combined.entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_targets, *stats = ctx.saved_tensors  # top, log_total, shifted
        grad_logp, grad_entropy = _or_zeros(grad_logp, stats[0]), _or_zeros(grad_entropy, stats[0])
        if ctx.inplace:  # the logits are not needed after this: their memory takes the gradient
            logprob_grad_(logits, local_targets, *stats, grad_logp, grad_entropy, ctx.temperature, ctx.valid)
            grad = logits
        else:
            grad = logprob_grad(logits, local_targets, *stats, grad_logp, grad_entropy, ctx.temperature, ctx.valid)
        return grad, None, None, None, None, None, None


def vocab_parallel_logprob(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under softmax(logits / temperature) over the full vocabulary.

    logits: [..., V/tp], this rank's slice starting at vocabulary index `vocab_start`; targets: [...]
    full-vocabulary ids; vocab_size: the true vocabulary (padding columns beyond it are ignored);
    group: the tensor-parallel group (None for an unsplit vocabulary). Returns (logp, entropy), [...].
    inplace_backward: the backward writes the logits gradient over the logits (no second [T, V/tp]
    buffer); only for logits that nothing else reads afterwards, such as a linear layer's output
    (autograd raises if something saved them; refused for a leaf tensor, whose values would be lost).
    """
    if inplace_backward and logits.requires_grad and (logits.is_leaf or getattr(logits._base, "is_leaf", False)):
        raise ValueError("inplace_backward writes the gradient over the logits, which here are a leaf tensor (or a "
                         "view of one): its values would be replaced by its gradient")
    lead = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    if inplace_backward and flat.shape[0] > 1 and flat.stride(0) < flat.shape[1]:
        raise ValueError(f"inplace_backward writes the gradient over the logits, whose rows here share memory (row "
                         f"stride {flat.stride(0)} < {flat.shape[1]} columns: an expanded view): each row's gradient "
                         "would overwrite another's logits; pass inplace_backward=False")
    vocab_size = vocab_size if vocab_size is not None else vocab_start + flat.shape[-1]
    logp, entropy = _VocabParallelLogprob.apply(flat, targets.reshape(-1), float(temperature), vocab_start,
                                                vocab_size, group, inplace_backward)
    return logp.reshape(lead), entropy.reshape(lead)

"""Per-token log-probs and entropy from vocabulary-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits [T, V/tp] for its slice of the vocabulary. One pass over the
local slice gives four numbers per token (`local_stats`); the ranks exchange them with one
all-gather of [tp, T, 4] floats and combine (`combine_stats`). Backward needs only the logits and
two saved numbers per token (lse, E[z]); nothing of size [T, V] is kept between the passes
beyond the logits themselves.

With z = logits / temperature, p = softmax(z) over the full vocabulary and y the target:
    logp = z_y - lse              entropy = lse - E_p[z]
    d/dz_j = g_logp * (1[j = y] - p_j) + g_entropy * p_j * (E_p[z] - z_j)

`local_stats` and `local_grad` are the pure-torch references of the fused CUDA kernels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

STATS = 4  # per token: local max m, sum exp(z - m), sum exp(z - m) * z, target logit (0 off-rank)


def local_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float, valid_columns: int) -> torch.Tensor:
    """logits [T, Vl] (any float dtype), targets [T] local column or -1 when another rank owns it.

    Columns >= valid_columns are vocabulary padding and are ignored. Returns [T, 4] in float32
    (float64 for float64 logits).
    """
    z = logits[:, :valid_columns].to(_compute_dtype(logits)) / temperature
    m = z.max(dim=-1).values if valid_columns else z.new_full(z.shape[:1], float("-inf"))
    e = torch.exp(z - m[:, None])
    owned = targets >= 0
    target = z.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    target = torch.where(owned, target, torch.zeros_like(target))
    return torch.stack([m, e.sum(-1), (e * z).sum(-1), target], dim=-1)


def combine_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """stats [R, T, 4] from the R vocabulary slices -> (logp, lse, expected_z), each [T].

    entropy = lse - expected_z.
    """
    m, s, w, t = stats.unbind(-1)
    top = m.max(dim=0).values
    scale = torch.exp(m - top)
    total = (s * scale).sum(0)
    lse = top + torch.log(total)
    expected_z = (w * scale).sum(0) / total
    return t.sum(0) - lse, lse, expected_z


def local_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    expected_z: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    valid_columns: int,
) -> torch.Tensor:
    """Gradient w.r.t. the local logits [T, Vl], in their dtype (padding columns get 0)."""
    z = logits.to(_compute_dtype(logits)) / temperature
    p = torch.exp(z - lse[:, None])
    grad = grad_entropy[:, None] * p * (expected_z[:, None] - z) - grad_logp[:, None] * p
    owned = targets >= 0
    rows = owned.nonzero()[:, 0]
    grad[rows, targets[rows]] += grad_logp[rows]
    grad[:, valid_columns:] = 0
    return (grad / temperature).to(logits.dtype)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, vocab_start, vocab_size, group):
        vl = logits.shape[-1]
        local_targets = targets - vocab_start
        local_targets = torch.where((local_targets >= 0) & (local_targets < vl), local_targets, -1)
        valid = max(0, min(vl, vocab_size - vocab_start))
        stats = local_stats(logits, local_targets, temperature, valid)
        world = dist.get_world_size(group) if group is not None else 1
        if world > 1:
            parts = [torch.empty_like(stats) for _ in range(world)]
            dist.all_gather(parts, stats.contiguous(), group=group)
            gathered = torch.stack(parts)
        else:
            gathered = stats[None]
        logp, lse, expected_z = combine_stats(gathered)
        ctx.save_for_backward(logits, local_targets, lse, expected_z)
        ctx.temperature, ctx.valid = temperature, valid
        return logp, lse - expected_z

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, local_targets, lse, expected_z = ctx.saved_tensors
        zeros = torch.zeros_like(lse)
        grad = local_grad(
            logits, local_targets, lse, expected_z,
            grad_logp if grad_logp is not None else zeros,
            grad_entropy if grad_entropy is not None else zeros,
            ctx.temperature, ctx.valid,
        )
        return grad, None, None, None, None, None


def vocab_parallel_logprob(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under softmax(logits / temperature) over the full vocabulary.

    logits: [..., V/tp], this rank's slice starting at vocabulary index `vocab_start`; targets: [...]
    full-vocabulary ids; vocab_size: the true vocabulary (padding columns beyond it are ignored);
    group: the tensor-parallel group (None for an unsplit vocabulary). Returns (logp, entropy), [...].
    """
    lead = targets.shape
    flat = logits.reshape(-1, logits.shape[-1])
    vocab_size = vocab_size if vocab_size is not None else vocab_start + flat.shape[-1]
    logp, entropy = _VocabParallelLogprob.apply(flat, targets.reshape(-1), float(temperature), vocab_start,
                                                vocab_size, group)
    return logp.reshape(lead), entropy.reshape(lead)

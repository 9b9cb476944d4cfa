"""The custom ops (megatron_dapo::logprob_*, ::dapo_loss): registrations, references and gradients.

On a machine without the CUDA extension (or without a GPU) the ops run their pure-torch references;
these tests check those against the naive formulas with autograd, and check each op's schema, fake
(meta) and autograd registrations with torch.library.opcheck.
"""
import pytest
import torch

from megatron_dapo.actor.loss import policy_loss
from megatron_dapo.ops import dapo_loss as loss_ops
from megatron_dapo.ops import logprob as lp_ops

CLIPS = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


def _loss_inputs(rows=6, cols=9, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, cols, generator=gen, dtype=dtype) * 3
    old = logp + torch.randn(rows, cols, generator=gen, dtype=dtype) * 0.4  # ratios on both sides of the clips
    adv = torch.randn(rows, generator=gen, dtype=dtype)
    mask = (torch.rand(rows, cols, generator=gen) > 0.3).to(dtype)
    mask[0] = 0  # an all-padding row
    return logp, old, adv, mask


def test_loss_op_equals_policy_loss_in_value_metrics_and_gradient():
    logp, old, adv, mask = _loss_inputs()
    logp[~mask.bool()] = float("nan")  # padding may hold anything
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    ref = policy_loss(a, old, adv, mask, loss_agg_mode="token-mean", global_tokens=40.0, **CLIPS)
    ours = loss_ops.fused_token_mean_loss(b, old, adv, mask, global_tokens=40.0, **CLIPS)
    assert ours.clip_high + ours.clip_low > 0, "the inputs must exercise the clips"
    for name in loss_ops.FIELDS:
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref, name).double(), rtol=1e-6, atol=1e-7,
                                   msg=name)
    # The up-clipped tokens' old probabilities (both paths compute them with one function): by hand here.
    valid = mask.bool()
    held = valid & (adv[:, None] > 0) & (torch.exp(torch.where(valid, logp - old, 0.0)) > 1 + CLIPS["clip_ratio_high"])
    probs = torch.exp(old[held])
    assert held.sum() == ours.clip_high > 0
    torch.testing.assert_close(ours.clip_high_prob.double(), probs.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.clip_high_prob_max.double(), probs.max(), rtol=1e-6, atol=0)
    ref.loss.backward()
    ours.loss.backward()
    grad_ref = torch.nan_to_num(a.grad, nan=0.0)
    assert torch.isfinite(b.grad).all()
    torch.testing.assert_close(b.grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_loss_op_with_importance_weight_and_dual_clip():
    """The op's loss, metric sums and gradient with a truncated importance weight equal the reference policy
    loss's with the same weight (rollout log-probs and a cap), dual-clipped tokens included."""
    from megatron_dapo.actor.loss import truncated_is_weight

    logp, old, adv, mask = _loss_inputs(seed=3)
    old = logp + 2.0  # ratio e^-2 ... and with negative advantages the dual clip bites at e^2
    old[1] = logp[1] - 2.0
    rollout = old - torch.randn(old.shape, generator=torch.Generator().manual_seed(4), dtype=old.dtype) * 0.5
    weight = truncated_is_weight(old, rollout, 1.3, mask)
    assert (weight < 1.3).any() and (weight == 1.3).any(), "some weights capped, some not"
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    ref = policy_loss(a, old, adv, mask, loss_agg_mode="token-mean", global_tokens=mask.sum(), rollout_logp=rollout,
                      tis_cap=1.3, **CLIPS)
    ours = loss_ops.fused_token_mean_loss(b, old, adv, mask, global_tokens=mask.sum(), weight=weight, **CLIPS)
    assert ours.dual_clip > 0
    for name in loss_ops.FIELDS:
        torch.testing.assert_close(getattr(ours, name).double(), getattr(ref, name).double(), rtol=1e-6, atol=1e-7,
                                   msg=name)
    unweighted = loss_ops.fused_token_mean_loss(logp, old, adv, mask, global_tokens=mask.sum(), **CLIPS)
    assert not torch.isclose(unweighted.loss, ours.loss), "the weight must change the loss"
    ref.loss.backward()
    ours.loss.backward()
    torch.testing.assert_close(b.grad, torch.nan_to_num(a.grad, nan=0.0), rtol=1e-10, atol=1e-12)
    # A dual-clipped token: loss -A * clip_c * weight, no gradient.
    row, col = next((r, c) for r in range(1, logp.shape[0]) for c in range(logp.shape[1])
                    if mask[r, c] and adv[r] < 0 and torch.exp(logp[r, c] - old[r, c]) > 3.0)
    assert b.grad[row, col] == 0


def test_loss_gradcheck_fp64():
    logp, old, adv, mask = _loss_inputs(rows=3, cols=5, seed=7)
    weight = torch.rand_like(logp) + 0.5
    tokens = mask.sum().reshape(1)

    def f(x):
        return loss_ops.dapo_loss(x, old, adv[:, None].expand_as(x).contiguous(), mask, weight, 0.2, 0.28, 3.0,
                                  tokens)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),))


def test_loss_ops_registrations():
    logp, old, adv, mask = _loss_inputs(seed=5)
    adv = adv[:, None].expand_as(logp).contiguous()
    tokens = mask.sum().reshape(1)
    torch.library.opcheck(loss_ops.dapo_loss, (logp.clone().requires_grad_(True), old, adv, mask, None, 0.2, 0.28,
                                               3.0, tokens))
    torch.library.opcheck(loss_ops.dapo_loss_backward, (torch.ones(()), logp, old, adv, mask, None, 0.2, 0.28, 3.0,
                                                        tokens))
    column_major = logp.t().contiguous().t()
    torch.library.opcheck(loss_ops.dapo_loss_backward, (torch.ones(()), column_major, old, adv, mask, None, 0.2,
                                                        0.28, 3.0, tokens))


def _logits(tokens=7, vocab=37, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=gen, dtype=dtype) * 3
    targets = torch.randint(0, vocab - 3, (tokens,), generator=gen)
    return logits, targets


def _naive(logits, targets, temperature, valid):
    logprobs = torch.log_softmax(logits[:, :valid] / temperature, -1)
    return logprobs.gather(-1, targets[:, None])[:, 0], -(logprobs.exp() * logprobs).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprob_entropy_op_matches_naive_with_padding_columns(temperature):
    logits, targets = _logits()
    valid = logits.shape[1] - 3  # 3 padding columns
    logits[:, valid:] = 1e4
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    logp, entropy = lp_ops.logprob_entropy(x, targets, temperature, valid)
    ref_lp, ref_h = _naive(y, targets, temperature, valid)
    torch.testing.assert_close(logp, ref_lp, rtol=0, atol=1e-10)
    torch.testing.assert_close(entropy, ref_h, rtol=0, atol=1e-10)
    g = torch.randn(2, logits.shape[0], dtype=logits.dtype, generator=torch.Generator().manual_seed(1))
    (g[0] * logp + g[1] * entropy).sum().backward()
    (g[0] * ref_lp + g[1] * ref_h).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-9)
    assert (x.grad[:, valid:] == 0).all()


def test_logprob_entropy_gradcheck_fp64():
    logits, targets = _logits(tokens=4, vocab=9, seed=2)

    def f(x):
        logp, entropy = lp_ops.logprob_entropy(x, targets, 0.8, 9)
        return logp, entropy

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),))


def test_inplace_backward_equals_out_of_place():
    logits, targets = _logits(tokens=5, vocab=16, dtype=torch.float32, seed=4)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        scaled = leaf * 1.0  # a fresh tensor nothing else reads: the gradient may overwrite it
        logp, entropy = lp_ops.vocab_parallel_logprob(scaled, targets, temperature=0.7, inplace_backward=inplace)
        (logp.sum() + 0.3 * entropy.sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_inplace_backward_refuses_logits_that_something_saved():
    logits, targets = _logits(tokens=3, vocab=8, dtype=torch.float32)
    leaf = logits.clone().requires_grad_(True)
    saved = torch.exp(leaf)  # exp saves its output for its own backward
    logp, _ = lp_ops.vocab_parallel_logprob(saved, targets, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_logprob_ops_registrations():
    logits, targets = _logits(tokens=6, vocab=20, dtype=torch.float32, seed=6)
    local = torch.where(targets < 10, targets, -1)  # half the targets live on another rank
    stats = lp_ops.logprob_stats(logits, local, 0.9, 17)
    logp, _, *saved = lp_ops.combine_stats(stats[None])  # top, log_total, shifted
    g = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(lp_ops.logprob_stats, (logits, local, 0.9, 17))
    torch.library.opcheck(lp_ops.logprob_grad, (logits, local, *saved, g[0], g[1], 0.9, 17))
    torch.library.opcheck(lp_ops.logprob_grad_, (logits.clone(), local, *saved, g[0], g[1], 0.9, 17))
    torch.library.opcheck(lp_ops.logprob_entropy_op, (logits.clone().requires_grad_(True), targets.clamp(max=16), 0.9,
                                                      17))
    transposed = logits.t().contiguous().t()  # column-major: the fake must give the real op's strides
    torch.library.opcheck(lp_ops.logprob_grad, (transposed, local, *saved, g[0], g[1], 0.9, 17))

"""The DAPO policy loss against values worked out by hand."""
import math

import pytest
import torch

from megatron_dapo.actor.loss import aggregate_loss, loss_metrics, policy_loss

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)

# One sequence, six tokens: (advantage, ratio) -> expected per-token loss, by hand:
#   A=+1 r=1.0 : -1.0                      (inside the clip range)
#   A=+1 r=1.5 : max(-1.5, -1.28) = -1.28  (clipped high)
#   A=+1 r=0.5 : max(-0.5, -0.8) = -0.5    (low ratio, positive A: unclipped term is the pessimistic one)
#   A=-1 r=0.5 : max(0.5, 0.8) = 0.8       (clipped low)
#   A=-1 r=5.0 : min(max(5, 1.28), 3) = 3  (dual clip at clip_ratio_c)
#   A=-2 r=1.1 : 2.2
ADV = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -2.0]], dtype=torch.float64)
RATIO = torch.tensor([[1.0, 1.5, 0.5, 0.5, 5.0, 1.1]], dtype=torch.float64)
EXPECTED = [-1.0, -1.28, -0.5, 0.8, 3.0, 2.2]
# d loss_t / d logp_t = -A * r where the unclipped term is selected, 0 where a clip is active.
EXPECTED_GRAD = [-1.0, 0.0, -0.5, 0.0, 0.0, 2.2]


def _inputs():
    old = torch.full_like(RATIO, -2.0)
    logp = (old + RATIO.log()).requires_grad_(True)
    return logp, old, torch.ones_like(RATIO)


def test_clipped_loss_gradient_and_metrics_by_hand():
    logp, old, mask = _inputs()
    out = policy_loss(logp, old, ADV, mask, **CLIP)
    assert out.loss.item() == pytest.approx(sum(EXPECTED) / 6, abs=1e-12)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([g / 6 for g in EXPECTED_GRAD], abs=1e-12)
    assert (out.clip_high.item(), out.clip_low.item(), out.dual_clip.item(), out.tokens.item()) == (1, 1, 1, 6)
    assert out.ratio_max.item() == pytest.approx(5.0)
    logr = [math.log(r) for r in RATIO[0].tolist()]
    assert out.kl_k1.item() == pytest.approx(-sum(logr))
    assert out.kl_k3.item() == pytest.approx(sum(r - 1 - lr for r, lr in zip(RATIO[0].tolist(), logr)))
    metrics = loss_metrics({k: v.item() for k, v in out.sums().items()},
                           {k: v.item() for k, v in out.maxima().items()})
    assert metrics["actor/pg_clipfrac_high"] == pytest.approx(1 / 6)
    assert metrics["actor/pg_clipfrac_low"] == pytest.approx(1 / 6)
    assert metrics["actor/pg_clipfrac_dual"] == pytest.approx(1 / 6)
    assert metrics["actor/ratio_max"] == pytest.approx(5.0)
    assert metrics["actor/ppo_kl"] == pytest.approx(-sum(logr) / 6)  # k1 and k3 per token, not swapped
    assert metrics["actor/ppo_kl_k3"] == pytest.approx(sum(r - 1 - lr for r, lr in zip(RATIO[0].tolist(), logr)) / 6)
    assert metrics["actor/ppo_kl"] != pytest.approx(metrics["actor/ppo_kl_k3"])
    # The one token clipped high was sampled at probability e^-2 by the old policy.
    assert metrics["actor/pg_clip_high_prob_mean"] == metrics["actor/pg_clip_high_prob_max"] == pytest.approx(
        math.exp(-2.0))


def test_up_clipped_probabilities_count_only_the_tokens_clipped_high():
    # Row 0: clipped high at old probability 0.1 and 0.3; row 1: a ratio past the bound with A < 0 (not clip-higher),
    # one inside the bound, and one clipped high but masked out.
    old = torch.tensor([[0.1, 0.3, 0.5], [0.2, 0.6, 0.05]], dtype=torch.float64).log()
    ratio = torch.tensor([[1.5, 2.0, 1.1], [1.5, 1.2, 1.9]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = policy_loss(old + ratio.log(), old, adv, mask, **CLIP)
    assert out.clip_high.item() == 2
    assert out.clip_high_prob.item() == pytest.approx(0.4)
    assert out.clip_high_prob_max.item() == pytest.approx(0.3)
    none = policy_loss(old, old, adv, mask, **CLIP)  # on-policy: nothing is clipped
    assert none.clip_high_prob.item() == none.clip_high_prob_max.item() == 0.0
    metrics = loss_metrics({k: v.item() for k, v in none.sums().items()},
                           {k: v.item() for k, v in none.maxima().items()})
    assert metrics["actor/pg_clip_high_prob_mean"] == 0.0


def test_sequence_advantage_broadcasts_over_tokens():
    logp, old, mask = _inputs()
    per_seq = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask, **CLIP).loss
    per_tok = policy_loss(logp, old, torch.ones_like(ADV), mask, **CLIP).loss
    assert per_seq.item() == per_tok.item() == pytest.approx((-1.0 - 1.28 - 0.5 - 0.5 - 1.28 - 1.1) / 6)


def test_log_ratio_is_clamped_against_overflow():
    logp = torch.tensor([[0.0]], dtype=torch.float64)
    old = torch.tensor([[-1000.0]], dtype=torch.float64)
    out = policy_loss(logp, old, torch.tensor([[-1.0]], dtype=torch.float64), torch.ones(1, 1), **CLIP)
    assert math.isfinite(out.ratio_max.item()) and out.ratio_max.item() == pytest.approx(math.exp(20.0))
    assert out.loss.item() == pytest.approx(3.0)  # the dual-clip bound


@pytest.mark.parametrize(
    ("mode", "norm_len", "expected"),
    [
        ("token-mean", None, 21 / 6),
        ("seq-mean-token-sum", None, (3 + 18) / 2),
        ("seq-mean-token-mean", None, (1.5 + 4.5) / 2),
        ("seq-mean-token-sum-norm", None, 21 / (3 * 4)),
        ("seq-mean-token-sum-norm", 10, 21 / (3 * 10)),
    ],
)
def test_aggregation_modes_by_hand(mode, norm_len, expected):
    """The third row's loss is all masked (a truncated response, overlong filtering): it is in no mean; only the
    -norm mode's constant counts every row."""
    loss = torch.tensor([[1.0, 2.0, float("nan"), 99.0], [3.0, 4.0, 5.0, 6.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert aggregate_loss(loss, mask, mode, norm_len=norm_len).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_split_gives_the_unsplit_loss_and_gradient(mode):
    gen = torch.Generator().manual_seed(0)
    B, L = 8, 10
    old = -torch.rand(B, L, generator=gen, dtype=torch.float64) * 3
    base = old + 0.3 * torch.randn(B, L, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    mask[[1, 5]] = 0  # filtered responses: in no shard's count
    kwargs = dict(CLIP, loss_agg_mode=mode, norm_len=L)

    whole = base.clone().requires_grad_(True)
    full = policy_loss(whole, old, adv, mask, **kwargs).loss
    full.backward()

    split = base.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        part = policy_loss(split[rows], old[rows], adv[rows], mask[rows], **kwargs,
                           global_tokens=mask.sum(), global_seqs=(mask.sum(-1) > 0).sum(), global_rows=B).loss
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(split.grad, whole.grad, rtol=1e-12, atol=1e-15)


def test_truncated_importance_weight():
    # old - rollout = ln 2 -> weight 2, capped at 1.5; A=+1, r=1 -> loss -1 * 1.5.
    logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    rollout = torch.tensor([[-1.0 - math.log(2.0), -1.0 + math.log(2.0)]], dtype=torch.float64)
    out = policy_loss(logp, logp.clone(), torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2), **CLIP,
                      rollout_logp=rollout, tis_cap=1.5)
    assert out.loss.item() == pytest.approx((-1.5 - 0.5) / 2)
    # Drifts of ln 1.2 and -ln 2: weights 1.2 and 0.5; the other way round (rollout - old) they would be 0.83 and
    # 2 capped at 1.5, which the symmetric case above cannot tell apart.
    rollout = torch.tensor([[-1.0 - math.log(1.2), -1.0 + math.log(2.0)]], dtype=torch.float64)
    out = policy_loss(logp, logp.clone(), torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2), **CLIP,
                      rollout_logp=rollout, tis_cap=1.5)
    assert out.loss.item() == pytest.approx((-1.2 - 0.5) / 2)


def test_padding_may_hold_nan_without_touching_loss_or_gradient():
    logp = torch.tensor([[-1.0, -2.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, float("nan")]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, float("nan")]], dtype=torch.float64)
    out = policy_loss(logp, old, adv, torch.tensor([[1, 1, 0]]), **CLIP)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    assert out.kl_k1.item() == 0 and out.kl_k3.item() == 0


@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages"])
def test_non_finite_inputs_are_refused_with_the_sample_named(which):
    logp, old, mask = _inputs()
    tensors = {"logp": logp.detach().clone(), "old_logp": old.clone(), "advantages": ADV.clone()}
    tensors[which][0, 4] = float("inf") if which == "advantages" else float("nan")
    with pytest.raises(ValueError, match=rf"{which} is not finite at sample 0, token 4"):
        policy_loss(tensors["logp"], tensors["old_logp"], tensors["advantages"], mask, **CLIP)

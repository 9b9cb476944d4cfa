"""token-mean over 2 real gloo ranks gives exactly the gradient of the unsplit batch."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_dapo.actor.loss import policy_loss
from tests.distributed import run_checks

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


def _batch():
    gen = torch.Generator().manual_seed(7)
    B, L, H, V = 6, 9, 5, 11
    hidden = torch.randn(B, L, H, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (B, L), generator=gen)
    weight = torch.randn(H, V, generator=gen, dtype=torch.float64) * 0.5
    old = torch.log_softmax(hidden @ weight, -1).gather(-1, targets[..., None])[..., 0] + 0.2 * torch.randn(
        B, L, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = (torch.arange(L)[None] < torch.tensor([9, 3, 5, 1, 7, 8])[:, None]).long()
    return hidden, targets, weight, old, adv, mask


def _loss(weight, hidden, targets, old, adv, mask, **kw):
    logp = torch.log_softmax(hidden @ weight, -1).gather(-1, targets[..., None])[..., 0]
    return policy_loss(logp, old, adv, mask, **CLIP, **kw).loss


def check_token_mean_over_data_parallel_ranks(rank: int, world_size: int, workdir: Path) -> None:
    hidden, targets, weight0, old, adv, mask = _batch()
    whole = weight0.clone().requires_grad_(True)
    full = _loss(whole, hidden, targets, old, adv, mask)
    full.backward()

    rows = slice(0, 2) if rank == 0 else slice(2, 6)  # unequal shards on purpose
    local_tokens = mask[rows].sum().to(torch.float64)
    global_tokens = local_tokens.clone()
    dist.all_reduce(global_tokens)
    shard = weight0.clone().requires_grad_(True)
    part = _loss(shard, hidden[rows], targets[rows], old[rows], adv[rows], mask[rows], global_tokens=global_tokens)
    part.backward()
    loss_sum = part.detach().clone()
    dist.all_reduce(loss_sum)
    dist.all_reduce(shard.grad)
    assert loss_sum.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(shard.grad, whole.grad, rtol=1e-12, atol=1e-14)


def check_local_token_mean_is_not_global(rank: int, world_size: int, workdir: Path) -> None:
    """The mistake this guards against: normalising by each rank's own token count."""
    hidden, targets, weight0, old, adv, mask = _batch()
    whole = weight0.clone().requires_grad_(True)
    _loss(whole, hidden, targets, old, adv, mask).backward()
    rows = slice(0, 2) if rank == 0 else slice(2, 6)
    shard = weight0.clone().requires_grad_(True)
    (_loss(shard, hidden[rows], targets[rows], old[rows], adv[rows], mask[rows]) / world_size).backward()
    dist.all_reduce(shard.grad)
    assert not torch.allclose(shard.grad, whole.grad, rtol=1e-6)


CHECKS = [check_token_mean_over_data_parallel_ranks, check_local_token_mean_is_not_global]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(world_size=2, checks=CHECKS, workdir=tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_distributed(results, check):
    assert not results[check.__name__], "\n".join(results[check.__name__])

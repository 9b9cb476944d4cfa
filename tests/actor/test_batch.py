"""The actor batch: micro-batching by a token budget (every row once, within the budget, little padding),
and its unpadded form for sending to other ranks."""
import random

import pytest
import torch

from megatron_dapo.actor.batch import ActorBatch, split_by_token_budget


def _padded_tokens(groups: list[list[int]], lengths: list[int], multiple: int = 1) -> int:
    return sum(len(g) * -(-max(lengths[r] for r in g) // multiple) * multiple for g in groups)


@pytest.mark.parametrize("multiple", [1, 2, 8])
def test_every_row_once_and_every_group_within_the_budget(multiple):
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(1, 900)
        groups = split_by_token_budget(lengths, budget, multiple)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
        for g in groups:
            assert g == sorted(g)
            width = -(-max(lengths[r] for r in g) // multiple) * multiple
            assert len(g) == 1 or len(g) * width <= budget, (lengths, budget, g)


def test_worked_example():
    # Longest first: 9 alone (2 x 9 > 12), then 5 + 4 (2 x 5 <= 12, 3 x 5 > 12), then 3, 2, 1 (3 x 3 <= 12).
    assert split_by_token_budget([3, 9, 1, 5, 2, 4], 12) == [[1], [3, 5], [0, 2, 4]]
    # Padded to multiples of 4: 9 -> 12 fills the budget alone, 5 -> 8 alone, then 4, 3, 2 (3 x 4) and 1.
    assert split_by_token_budget([3, 9, 1, 5, 2, 4], 12, multiple=4) == [[1], [3], [0, 4, 5], [2]]
    assert split_by_token_budget([20, 3], 10) == [[0], [1]]  # a row over the budget goes alone
    assert split_by_token_budget([], 10) == []


def test_mixed_lengths_pad_far_less_than_grouping_in_arrival_order():
    """DAPO-like responses (most short, a long tail up to the limit) with the 32B recipe's budget of one
    full-length sequence: grouping longest first needs fewer micro-batches and pads much less than
    taking rows as they come (here 1.004 against 1.24 padded tokens per real token)."""
    rng = random.Random(1)
    limit = 22528
    lengths = [min(limit, 2048 + int(rng.expovariate(1 / 4000))) for _ in range(512)]
    groups = split_by_token_budget(lengths, limit)

    arrival: list[list[int]] = []  # the same rule, rows in arrival order
    current, longest = [], 0
    for row, length in enumerate(lengths):
        if current and max(longest, length) * (len(current) + 1) > limit:
            arrival.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, length)
    arrival.append(current)

    real = sum(lengths)
    ours, theirs = _padded_tokens(groups, lengths) / real, _padded_tokens(arrival, lengths) / real
    assert len(groups) < 0.8 * len(arrival), (len(groups), len(arrival))
    assert ours < 1.01 and theirs > 1.2, (ours, theirs)


def _batch_from(groups, vocab=151936, seed=0, advantages_per_token=False) -> ActorBatch:
    """What trainer/groups.build_actor_batch makes: rows of prompt + response, right-padded with zeros."""
    from megatron_dapo.data.dataset import Prompt
    from megatron_dapo.reward.registry import RewardResult
    from megatron_dapo.rollout.engine import Completion
    from megatron_dapo.trainer.groups import Group, build_actor_batch

    gen = torch.Generator().manual_seed(seed)
    made = []
    for prompt_len, response_lens in groups:
        prompt = Prompt(prompt_ids=torch.randint(vocab, (prompt_len,), generator=gen).tolist(), ground_truth="",
                        data_source="math_dapo", extra_info={}, index=0)
        completions = [Completion(token_ids=torch.randint(vocab, (r,), generator=gen).tolist(),
                                  logprobs=(-torch.rand(r, generator=gen) * 5).tolist(),
                                  finish_reason="length" if r == max(response_lens) else "stop")
                       for r in response_lens]
        rewards = [RewardResult(score=float(i % 2), acc=float(i % 2)) for i in range(len(response_lens))]
        made.append(Group(prompt=prompt, completions=completions, rewards=rewards,
                          scores=[r.score for r in rewards]))
    batch = build_actor_batch(made, norm_by_std=True, overlong_filtering=True)
    if advantages_per_token:
        batch.advantages = batch.advantages[:, None] * batch.loss_mask
    return batch


@pytest.mark.parametrize("advantages_per_token", [False, True])
def test_a_packed_batch_comes_back_bit_for_bit(advantages_per_token):
    batch = _batch_from([(5, [1, 7, 3]), (1, [12, 2, 9]), (9, [4, 4, 30])], advantages_per_token=advantages_per_token)
    header, tensors = batch.pack()
    total = int(batch.lengths.sum())
    sent = {name: t for (name, *_), t in zip(header["fields"], tensors)}
    assert sent["tokens"].dtype == torch.int32 and sent["tokens"].shape == (total,)
    assert sent["loss_mask"].dtype == torch.uint8 and sent["rollout_logp"].shape == (total,)
    assert sum(t.numel() * t.element_size() for t in tensors) < 0.5 * sum(
        t.numel() * t.element_size() for t in (batch.tokens, batch.loss_mask, batch.rollout_logp))
    back = ActorBatch.unpack(header, [t.clone() for t in tensors])
    for name in ("tokens", "lengths", "loss_mask", "advantages", "rollout_logp"):
        a, b = getattr(batch, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert back.old_logp is None


def test_an_unpacked_batch_is_the_same_batch_for_the_actor():
    """The row sub-batches the actor cuts from it (micro-batches, trimmed to their longest row) are equal."""
    batch = _batch_from([(3, [2, 11]), (6, [1, 5])], seed=1)
    batch.old_logp = batch.rollout_logp * 0.5
    back = ActorBatch.unpack(*batch.pack())
    for rows in (slice(0, 2), slice(2, 4), torch.tensor([3, 0])):
        a, b = batch.rows(rows), back.rows(rows)
        for name in ("tokens", "lengths", "loss_mask", "advantages", "old_logp", "rollout_logp"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_data_parallel_shares_balance_tokens_and_keep_every_row_once():
    """Groups of n responses whose lengths go together (one prompt's long, another's short): contiguous blocks
    would give one rank every long row; the deal gives each rank close to its share of the tokens, every row
    exactly once, each rank's rows in batch order, and no row to ranks beyond the rows."""
    from megatron_dapo.actor.batch import data_parallel_shares

    lengths = [8000] * 4 + [500] * 4 + [3000] * 4 + [100] * 4
    shares = data_parallel_shares(lengths, 2)
    assert sorted(r for share in shares for r in share) == list(range(16))
    assert all(share == sorted(share) for share in shares)
    tokens = [sum(lengths[r] for r in share) for share in shares]
    assert tokens == [23200, 23200], tokens  # contiguous halves: 34000 and 12400
    assert data_parallel_shares([5, 9], 4) == [[1], [0], [], []]
    assert data_parallel_shares([], 2) == [[], []]
    rng = random.Random(3)
    lengths = [rng.randint(1, 20000) for _ in range(512)]
    tokens = [sum(lengths[r] for r in share) for share in data_parallel_shares(lengths, 16)]
    assert max(tokens) - min(tokens) <= max(lengths), tokens  # within one row of each other

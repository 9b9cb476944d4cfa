import math

import pytest
import torch

from megatron_dapo.advantage.grpo import group_advantages


def test_group_normalised_by_hand():
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), eps=0.0)
    assert adv[0].tolist() == pytest.approx([0.5 / math.sqrt(1 / 3), -0.5 / math.sqrt(1 / 3)] * 2)
    assert adv[1].tolist() == [0.0] * 4  # a constant group, even without eps (0 / 0 otherwise)


def test_constant_group_gets_zero_with_default_eps():
    assert group_advantages(torch.tensor([[3.0, 3.0, 3.0]])).tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("value", [0.7, 0.1, -0.3, 1e-3])
def test_equal_rewards_that_binary_cannot_hold_get_zero(value):
    """In float32 the mean of twelve 0.7s is 1 ulp off 0.7, and that rounding over its own std was 0.106."""
    rewards = torch.full((1, 12), value)
    assert group_advantages(rewards).tolist() == [[0.0] * 12]
    assert group_advantages(rewards, norm_by_std=False).tolist() == [[0.0] * 12]
    # Not equal: normalised as usual.
    rewards[0, 0] += 0.5
    adv = group_advantages(rewards)
    assert adv[0, 0] > 3 and adv[0, 1:].tolist() == pytest.approx([-1 / math.sqrt(12)] * 11, rel=1e-5)


def test_large_rewards_are_normalised_without_overflow():
    adv = group_advantages(torch.tensor([[1e20, -1e20, 0.0]], dtype=torch.float64))
    assert adv[0].tolist() == pytest.approx([1.0, -1.0, 0.0])


def test_without_std_division():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0], [-1.0, 2.0, 5.0, 2.0]]), norm_by_std=False)
    assert adv.tolist() == [[0.5, -0.5, 0.5, -0.5], [-3.0, 0.0, 3.0, 0.0]]


def test_group_of_one_has_zero_advantage():
    assert group_advantages(torch.tensor([[1.0], [0.0]])).tolist() == [[0.0], [0.0]]


def test_non_finite_reward_is_refused_with_the_sample_named():
    with pytest.raises(ValueError, match=r"reward is not finite at sample 5 \(value nan"):  # group 1, response 2
        group_advantages(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, float("nan")]]))


def test_shape_is_checked():
    with pytest.raises(ValueError, match=r"\[groups, n\]"):
        group_advantages(torch.tensor([1.0, 0.0]))


def test_invalid_responses_leave_the_group_statistics():
    """A response whose reward failed: its group is normalised over the others, as if it had not been drawn."""
    rewards = torch.tensor([[1.0, float("nan"), 0.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, False, True, True, False], [True, True, True, True, True]])
    adv = group_advantages(rewards, valid=valid)
    assert adv[0, [0, 2, 3]].tolist() == pytest.approx(group_advantages(torch.tensor([[1.0, 0.0, 1.0]]))[0].tolist())
    assert adv[0, [1, 4]].tolist() == [0.0, 0.0]
    assert adv[1].tolist() == pytest.approx(group_advantages(rewards[1:])[0].tolist())
    centred = group_advantages(rewards, valid=valid, norm_by_std=False)
    assert centred[0].tolist() == pytest.approx([1 / 3, 0.0, -2 / 3, 1 / 3, 0.0])


def test_group_with_one_valid_response_has_zero_advantage():
    adv = group_advantages(torch.tensor([[5.0, 1.0, 0.0]]), valid=torch.tensor([[False, True, False]]))
    assert adv.tolist() == [[0.0, 0.0, 0.0]]

import pytest
import torch

from megatron_dapo.reward.overlong import overlong_filter_mask, overlong_penalty


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (15, 0.0), (16, 0.0), (17, -0.25), (18, -0.5), (19, -0.75), (20, -1.0), (25, -1.0)],
)
def test_soft_punishment_at_the_buffer_edges(length, expected):
    # L_max = 20, L_cache = 4: free up to 16, then a ramp down to -1 at 20.
    penalty = overlong_penalty(torch.tensor([length]), max_response_length=20, buffer_len=4)
    assert penalty.item() == pytest.approx(expected)


def test_penalty_factor_scales():
    penalty = overlong_penalty(torch.tensor([16, 17, 20]), max_response_length=20, buffer_len=4, penalty_factor=1.5)
    assert penalty.tolist() == pytest.approx([0.0, -0.375, -1.5])


def test_buffer_must_leave_room():
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(torch.tensor([1]), max_response_length=8, buffer_len=8)


def test_overlong_filtering_zeroes_truncated_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = overlong_filter_mask(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]

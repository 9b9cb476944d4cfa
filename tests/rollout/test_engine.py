"""SamplingParams validation and the interface's typed results."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_dapo.rollout.engine import Completion, RolloutEngine, RolloutError, SamplingParams


def test_defaults():
    p = SamplingParams(max_new_tokens=8)
    assert (p.n, p.temperature, p.top_p, p.top_k, p.stop_token_ids, p.seed) == (1, 1.0, 1.0, -1, (), None)
    assert not p.greedy and SamplingParams(max_new_tokens=8, top_k=1).greedy


def test_stop_token_ids_become_a_tuple():
    assert SamplingParams(max_new_tokens=1, stop_token_ids=[3, 4]).stop_token_ids == (3, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
        (dict(max_new_tokens=4, n=0), "n must be >= 1, got 0"),
        (dict(max_new_tokens=4, temperature=0.0), r"must be >= 0.001 and finite \(use top_k=1 for greedy\), got 0.0"),
        # logits / 1e-39 overflow float32: NaN log-probs
        (dict(max_new_tokens=4, temperature=1e-39), r"temperature must be >= 0.001 and finite .*, got 1e-39"),
        (dict(max_new_tokens=4, temperature=float("inf")), r"temperature must be >= 0.001 and finite .*, got inf"),
        (dict(max_new_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(max_new_tokens=4, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(max_new_tokens=4, top_k=0), r"top_k must be -1 \(off\) or >= 1, got 0"),
        (dict(max_new_tokens=4, top_k=-2), r"top_k must be -1 \(off\) or >= 1, got -2"),
        (dict(max_new_tokens=4, stop_token_ids=(2, -1)), r"stop_token_ids must be >= 0, got \(2, -1\)"),
    ],
)
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(RolloutError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(temperature="0.7"), r"temperature must be a number, got '0.7'"),
    (dict(top_p=None), r"top_p must be a number, got None"),
    (dict(stop_token_ids="12"), r"stop_token_ids must be token ids \(integers\), got '12'"),  # not (1, 2)
    (dict(stop_token_ids=[2, 3.0]), r"stop_token_ids must be token ids \(integers\), got \(2, 3.0\)"),
    (dict(stop_token_ids=None), r"stop_token_ids must be token ids \(integers\), got None"),  # eos_token_id None
    (dict(stop_token_ids=True), r"stop_token_ids must be token ids \(integers\), got True"),
])
def test_values_of_the_wrong_type_are_named(kwargs, message):
    with pytest.raises(RolloutError, match=message):
        SamplingParams(max_new_tokens=4, **kwargs)


def test_stop_token_ids_given_as_a_generator_are_kept():
    """Read once: a check that used them up left no stop tokens, and every completion ran to max_new_tokens."""
    assert SamplingParams(max_new_tokens=4, stop_token_ids=(t for t in [2, 7])).stop_token_ids == (2, 7)
    assert SamplingParams(max_new_tokens=4, stop_token_ids=map(int, "35")).stop_token_ids == (3, 5)
    assert SamplingParams(max_new_tokens=4, stop_token_ids=np.int64(9)).stop_token_ids == (9,)


def test_all_problems_are_reported_together():
    with pytest.raises(RolloutError, match="n must be.*top_k must be"):
        SamplingParams(max_new_tokens=4, n=0, top_k=0)


def test_completion_and_interface_shape():
    c = Completion(token_ids=[5, 2], logprobs=[-0.1, -2.0], finish_reason="stop")
    assert c.finish_reason == "stop" and Completion().finish_reason == "length"
    with pytest.raises(TypeError, match="abstract"):
        RolloutEngine()  # abstract: engines must implement every method

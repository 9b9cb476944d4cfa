"""Reward functions keyed by `data_source`, and what they give back.

A reward function is a module-level function `fn(response, ground_truth, extra_info) -> RewardResult | float`
(or a mapping in verl's layout, below) registered with `@register_reward("name")`, or named in the config's
reward.functions (reward/custom.py). A float return means score = acc = that float (as verl does); a mapping in
verl's layout ({"score", "acc", "pred", other figures}) is read as the RewardResult it describes, its acc the
score when it has none. The functions run in worker processes (reward/scorer.py), so that one bad sample costs
one sample; a `data_source` with no registered function is a data or config error and raises before anything
is scored.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from megatron_dapo.reward import math_dapo
from megatron_dapo.reward.trading import task as trading_task

FAILED_SCORE = -1.0
"""Score of a sample whose reward function failed: the same as a wrong answer, so it is never rewarded."""


@dataclass
class RewardResult:
    score: float
    """The reward of one response (before overlong shaping)."""
    acc: float
    """1.0 if the response solved the task, else 0.0 (what dynamic sampling and accuracy metrics read)."""
    extra: dict[str, float] = field(default_factory=dict)
    """Task-specific numbers to log, e.g. {"profit_loss": 3.2}; empty for failed samples."""
    failed: bool = False
    """The reward function could not score this sample (raised, hung, returned a non-finite number)."""
    reason: str | None = None
    """Why it failed: "<kind>: <detail>", kind one of FAILURE_KINDS."""
    pred: str | None = None
    """The answer the verifier read from the response: in its val_generations row, and the vote in val/maj@K. None
    where the verifier reads no answers; "" where it read none in this response (no vote)."""


FAILURE_KINDS = ("error", "timeout", "non_finite", "bad_return", "worker_died", "memory", "not_scored")
"""not_scored: left unscored because its data_source's function had failed on all of it before (`give_up_after`)."""


def failure_kind(result: RewardResult) -> str:
    """Which of FAILURE_KINDS a failed result's is (its reason starts with it)."""
    kind = (result.reason or "").split(":", 1)[0]
    return kind if kind in FAILURE_KINDS else "error"


def failure_metrics(counts: Counter[str]) -> dict[str, float]:
    """reward/failed and reward/failed_KIND (every kind, 0 included) from failed responses counted per kind."""
    return {"reward/failed": float(sum(counts.values())),
            **{f"reward/failed_{kind}": float(counts[kind]) for kind in FAILURE_KINDS}}


RewardFn = Callable[[str, str, dict[str, Any]], "RewardResult | float | Mapping[str, Any]"]


class RewardSample(NamedTuple):
    data_source: str
    """Key into the registry, e.g. "math_dapo"."""
    response: str
    """The decoded response text."""
    ground_truth: str
    """The row's reward_model.ground_truth."""
    extra_info: dict[str, Any]
    """The row's extra_info (task data such as prices for the trading task)."""
    where: str = ""
    """The data file and row of its prompt, for the messages of a failure ("" where unknown)."""


@dataclass
class RewardBatch:
    results: list[RewardResult]
    """One result per sample, in the order given."""
    failure_counts: dict[str, int]
    """Failed samples per kind (FAILURE_KINDS); empty if none failed."""

    @property
    def num_failed(self) -> int:
        return sum(self.failure_counts.values())

    @property
    def scores(self) -> list[float]:
        return [r.score for r in self.results]

    @property
    def accs(self) -> list[float]:
        return [r.acc for r in self.results]


_REGISTRY: dict[str, RewardFn] = {}


def register_reward(data_source: str, fn: RewardFn | None = None, *, replace: bool = False):
    """Register `fn` for `data_source`; usable as `@register_reward("name")` or `register_reward("name", fn)`.

    The function must be importable by name (defined at module level): it runs in worker processes.
    `replace`: take the place of a function already registered (reward.functions in the config does).
    """
    def add(f: RewardFn) -> RewardFn:
        qualname = getattr(f, "__qualname__", "")
        if not callable(f) or not qualname or "<" in qualname:    # a lambda, or a function inside a function
            raise ValueError(f"reward function {f!r} for data_source {data_source!r} must be a function defined "
                             "at module level: it is sent by name to worker processes")
        old = _REGISTRY.get(data_source)
        if old is not None and not replace and _qualified_name(old) != _qualified_name(f):
            raise ValueError(f"data_source {data_source!r} already has reward function {_qualified_name(old)}")
        _REGISTRY[data_source] = f
        return f

    return add if fn is None else add(fn)


def registered_sources() -> list[str]:
    return sorted(_REGISTRY)


def registered_functions() -> dict[str, RewardFn]:
    """data_source -> its function, a copy."""
    return dict(_REGISTRY)


def get_reward_fn(data_source: str) -> RewardFn:
    try:
        return _REGISTRY[data_source]
    except KeyError:
        raise ValueError(_unknown_message(data_source)) from None


@register_reward("math_dapo")
def math_dapo_reward(response: str, ground_truth: str, extra_info: dict[str, Any]) -> RewardResult:
    """DAPO-Math-17k: +1 / -1 on the last `Answer:` line (see reward/math_dapo.py)."""
    verdict = math_dapo.compute_score(response, ground_truth)
    # No Answer line: "" (read none, no vote), not None (a verifier that reads no answers): a validation where no
    # response gives one yet still reports val/maj@K, as 0.
    return RewardResult(score=verdict.score, acc=verdict.acc, pred="" if verdict.pred is None else verdict.pred)


register_reward(trading_task.DATA_SOURCE, trading_task.reward)


def _qualified_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _unknown_message(data_source: str) -> str:
    return (f"no reward function for data_source {data_source!r}; registered: {registered_sources()} "
            f"(set reward.functions.{data_source}: 'package.module:function' or 'path/to/file.py:function')")

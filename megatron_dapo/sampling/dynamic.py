"""Dynamic sampling: over-sample generation batches until enough prompt groups carry signal.

A group whose metric is the same for every response (all correct, all wrong) has zero advantage
everywhere and teaches nothing; DAPO drops it and keeps generating until `train_batch_size`
groups with non-zero variance are collected.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from megatron_dapo.sampling.config import FilterGroupsConfig

G = TypeVar("G")


@dataclass
class SamplingStats:
    """What one step's collection did; logged every step."""

    gen_batches: int = 0
    """Generation batches asked for."""
    groups_generated: int = 0
    """Prompt groups generated and scored over those batches."""
    kept: int = 0
    """Groups in the training batch."""
    dropped_all_correct: int = 0
    """Groups whose metric was equal for every response, all of them right (by `all_correct`, else metric > 0)."""
    dropped_all_wrong: int = 0
    """Groups whose metric was equal for every response, not all of them right."""
    dropped_unscored: int = 0
    """Groups with fewer than two responses that have the metric (their rewards failed or gave no such field, or,
    under overlong filtering, they were cut at the length limit): nothing to compare."""
    trimmed: int = 0
    """Varied groups beyond train_batch_size, left out (the last generation batch's surplus)."""
    exhausted: bool = False
    """max_num_gen_batches was reached before the batch was full."""
    stopped: bool = False
    """A stop request ended the collection before the batch was full (the trainer then leaves the step untrained
    and stops; no metrics row has it)."""
    metric_missing: int = 0
    """Responses without a finite filter metric (their reward failed or gave no such field, or, under overlong
    filtering, they were cut at the length limit), left out of the variance test."""

    def shortfall(self, target: int, metric: str) -> str:
        """What an exhausted collection kept and why, for a message."""
        return (f"dynamic sampling kept {self.kept} of {target} groups after {self.gen_batches} generation batches "
                f"({self.dropped_all_correct} groups dropped as all-correct, {self.dropped_all_wrong} as all-wrong "
                f"by metric {metric!r}, {self.dropped_unscored} with fewer than two responses that count: a reward "
                "that failed or gave no such figure, or a response cut at the length limit under overlong "
                "filtering)")

    def metrics(self) -> dict[str, float]:
        return {
            "sampling/gen_batches": self.gen_batches,
            "sampling/groups_generated": self.groups_generated,
            "sampling/groups_kept": self.kept,
            "sampling/groups_dropped_all_correct": self.dropped_all_correct,
            "sampling/groups_dropped_all_wrong": self.dropped_all_wrong,
            "sampling/groups_dropped_unscored": self.dropped_unscored,
            "sampling/groups_trimmed": self.trimmed,
            "sampling/exhausted": float(self.exhausted),
            "sampling/metric_missing": self.metric_missing,
        }


@dataclass
class SampledBatch(Generic[G]):
    groups: list[G]
    """Kept groups, in generation order."""
    stats: SamplingStats = field(default_factory=SamplingStats)


class DynamicSamplingExhausted(RuntimeError):
    """Raised when on_exhausted='error' and max_num_gen_batches did not fill the batch."""

    def __init__(self, stats: SamplingStats, target: int, metric: str):
        self.stats = stats
        super().__init__(
            f"{stats.shortfall(target, metric)}; raise algorithm.filter_groups.max_num_gen_batches, lower "
            "data.train_batch_size, or set algorithm.filter_groups.on_exhausted=train to train on what was kept"
        )


def group_varies(values: Sequence[float]) -> bool:
    """True when the responses of one group do not all share one metric value. Missing values (NaN or infinite:
    a reward that failed, or one that gave no such field) are left out: it takes two present values that differ,
    and a missing value never stops a run."""
    present = [float(v) for v in values if math.isfinite(float(v))]
    return len(present) > 1 and min(present) != max(present)


class DynamicSampler(Generic[G]):
    """Collects `train_batch_size` groups whose metric varies, asking for generation batches as needed."""

    def __init__(self, config: FilterGroupsConfig, train_batch_size: int):
        self.config = config
        self.train_batch_size = train_batch_size

    def collect(
        self, generate: Callable[[], Sequence[G]], metric_values: Callable[[G], Sequence[float]],
        progress: Callable[[SamplingStats, int], None] | None = None,
        all_correct: Callable[[G], bool] | None = None, stop: Callable[[], bool] | None = None,
    ) -> SampledBatch[G]:
        """`generate()` returns one scored generation batch of groups; `metric_values(group)` gives
        the filter metric of each of its responses (NaN for one that does not count). Surplus groups are
        trimmed in generation order, so the same generations always give the same batch. `progress(stats,
        kept)` is called after each generation batch with the figures so far and the number of groups kept.
        `all_correct(group)`: whether a group dropped as alike is counted all-correct or all-wrong (without
        it, by the sign of the shared metric). `stop()`, asked after each generation batch that leaves the batch
        short: True ends the collection there with the groups kept so far and `stopped` set, whatever `on_exhausted`
        says (a stop request: a Slurm warning leaves no time for more generation batches; with
        max_num_gen_batches=0 nothing else would end a collection whose groups all stay alike)."""
        stats = SamplingStats()
        kept: list[G] = []
        limit = self.config.max_num_gen_batches if self.config.enable else 1
        while len(kept) < self.train_batch_size:
            if limit and stats.gen_batches >= limit:
                stats.exhausted = self.config.enable
                break
            batch = list(generate())
            stats.gen_batches += 1
            stats.groups_generated += len(batch)
            for group in batch:
                values = [float(v) for v in metric_values(group)]
                present = [v for v in values if math.isfinite(v)]
                stats.metric_missing += len(values) - len(present)
                if not self.config.enable:
                    kept.append(group)
                elif group_varies(present):
                    kept.append(group)
                elif len(present) < 2:
                    stats.dropped_unscored += 1
                elif all_correct(group) if all_correct is not None else present[0] > 0:
                    stats.dropped_all_correct += 1
                else:
                    stats.dropped_all_wrong += 1
            if progress is not None:
                progress(stats, len(kept))
            if len(kept) < self.train_batch_size and stop is not None and stop():
                stats.stopped = True
                break
        stats.trimmed = max(len(kept) - self.train_batch_size, 0)
        kept = kept[: self.train_batch_size]
        stats.kept = len(kept)
        if stats.exhausted and self.config.on_exhausted == "error":
            raise DynamicSamplingExhausted(stats, self.train_batch_size, self.config.metric)
        return SampledBatch(groups=kept, stats=stats)

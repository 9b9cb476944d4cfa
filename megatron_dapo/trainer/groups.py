"""Rollout data: groups of responses to one prompt, their rewards, and the actor batch built from them."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from megatron_dapo.actor.batch import ActorBatch
from megatron_dapo.advantage.grpo import group_advantages
from megatron_dapo.config.loader import ConfigError
from megatron_dapo.data.dataset import Prompt
from megatron_dapo.reward.overlong import overlong_filter_mask, overlong_penalty
from megatron_dapo.reward.registry import RewardResult
from megatron_dapo.rollout.engine import Completion


FINAL_REWARD_METRICS = ("seq_reward", "seq_final_reward")
"""verl's names for the reward after overlong shaping (no KL term here, so the two are one figure)."""
BUILTIN_METRICS = ("acc", "score", *FINAL_REWARD_METRICS)
"""The filter metrics every reward gives; any other name is a task's own figure."""


@dataclass
class Group:
    """The rollout.n responses to one prompt."""

    prompt: Prompt
    completions: list[Completion]
    rewards: list[RewardResult]
    """Task rewards, before overlong shaping."""
    scores: list[float]
    """Final rewards: task score + overlong punishment."""

    def metric(self, name: str, overlong_filtering: bool = False) -> list[float]:
        """Dynamic sampling's figure (algorithm.filter_groups.metric) per response, named as in verl: acc; score,
        the task's score before overlong shaping; seq_reward or seq_final_reward, the reward after it; or a task's
        own figure such as profit_loss. NaN where the response does not count (`counted`) or its reward did not
        give the figure."""
        nan = float("nan")
        if name in FINAL_REWARD_METRICS:
            values = list(self.scores)
        elif name in ("acc", "score"):
            values = [getattr(r, name) for r in self.rewards]
        else:
            values = [r.extra.get(name, nan) for r in self.rewards]
        return [v if counts else nan for v, counts in zip(values, self.counted(overlong_filtering))]

    def failed(self) -> list[bool]:
        return [r.failed for r in self.rewards]

    def truncated(self) -> list[bool]:
        return [c.finish_reason == "length" for c in self.completions]

    def counted(self, overlong_filtering: bool) -> list[bool]:
        """The responses that count in the group's advantages, dynamic sampling's test and the loss: not one whose
        reward failed (it was never scored), nor, under overlong filtering, one cut at the length limit: its reward
        says where it was cut, not how good it was, and as the others' baseline it would shift their advantages
        (wrong answers beside many cut ones came out at 0) as surely as it would train on itself."""
        cut = self.truncated() if overlong_filtering else [False] * len(self.completions)
        return [not (failed or truncated) for failed, truncated in zip(self.failed(), cut)]

    def all_correct(self, overlong_filtering: bool) -> bool:
        """Whether every counted response is right (acc > 0): how a group dynamic sampling drops for being alike
        is reported, whatever figure it filters on (an all-right group cut short scores 0 after shaping)."""
        return all(r.acc > 0 for r, counts in zip(self.rewards, self.counted(overlong_filtering)) if counts)


class FilterMetricCheck:
    """Whether the rewards of each data_source give dynamic sampling's metric (algorithm.filter_groups.metric). A
    task's own figure that no scored reward gives makes every group look alike: every one is dropped, and the step
    trains on nothing, fails as exhausted or, without a batch limit, never ends. That is a misspelt key, or a task
    that gives the figure to no answer yet. A figure one data_source's rewards give and another's do not (one
    task's figure, with prompts of several) drops every group of the other: the run trains on one task alone,
    silently. Either is a ConfigError naming the key, the data_sources and the figures their rewards do give, once
    a data_source's scored rewards have come in `patience` generation batches without it. The batches are
    counted over the run, not per step (the other task's groups fill each step in a batch or two), and across
    its attempts: the count is saved with each checkpoint (`state_dict`), so a run requeued more often than
    `patience` batches is checked all the same.

    A data_source whose rewards gave the figure once is not checked again (`done` once all have)."""

    def __init__(self, name: str, patience: int, sources):
        self.name, self.patience = name, patience
        self.sources = set(sources)
        self.confirmed: set[str] = set()
        """The data_sources whose rewards have given the figure."""
        self.batches: Counter[str] = Counter()
        """Per data_source: the generation batches with scored rewards of it."""
        self.scored: Counter[str] = Counter()
        self.given: dict[str, set[str]] = {}

    @property
    def waiting(self) -> set[str]:
        """The data_sources whose rewards have not given the figure yet."""
        return self.sources - self.confirmed

    @property
    def done(self) -> bool:
        return not self.waiting

    def add(self, groups: list[Group]) -> None:
        seen = set()
        for group in groups:
            source = group.prompt.data_source
            for reward in group.rewards:
                if not reward.failed:
                    seen.add(source)
                    self.scored[source] += 1
                    self.given.setdefault(source, set()).update(reward.extra)
        self.batches.update(seen)

    def state_dict(self) -> dict:
        """The counts so far, as JSON (for the trainer state)."""
        return {"metric": self.name, "confirmed": sorted(self.confirmed), "batches": dict(self.batches),
                "scored": dict(self.scored), "given": {source: sorted(figures) for source, figures in self.given.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Go on from a `state_dict` (a resumed run's), whatever its data_sources were; one counted for another
        metric (the config changed since) is not taken: the counts start again."""
        if state.get("metric") != self.name:
            return
        self.confirmed = set(state.get("confirmed", ()))
        self.batches = Counter(state.get("batches", {}))
        self.scored = Counter(state.get("scored", {}))
        self.given = {source: set(figures) for source, figures in state.get("given", {}).items()}

    def check(self, step: int) -> None:
        """Raises the ConfigError described above for the data_sources overdue."""
        self.confirmed |= {s for s, figures in self.given.items() if self.name in figures}
        overdue = sorted(s for s in self.waiting if self.batches[s] >= self.patience)
        if not overdue:
            return
        scored, batches = sum(self.scored[s] for s in overdue), max(self.batches[s] for s in overdue)
        figures = ", ".join(sorted(set(BUILTIN_METRICS).union(*(self.given[s] for s in overdue))))
        key = f"algorithm.filter_groups.metric={self.name!r}"
        if not self.confirmed:
            raise ConfigError(
                f"{key}: none of the {scored} rewards scored in {batches} generation batches (by step {step}) gives "
                f"such a figure (they give {figures}), so every group was dropped: a misspelt key, or a task that "
                "gives the figure to no answer yet (filter on score or acc)")
        raise ConfigError(
            f"{key}: the rewards of data_source {', '.join(map(repr, overdue))} give no such figure ({scored} scored "
            f"in {batches} generation batches by step {step}; they give {figures}), only those of "
            f"{', '.join(map(repr, sorted(self.confirmed)))} do, so every group of the first was dropped: filter on a "
            "figure every data_source's reward gives (score or acc), or give it in each reward function")


def shaped_scores(rewards: list[RewardResult], completions: list[Completion], *, enable: bool,
                  max_response_length: int, buffer_len: int, penalty_factor: float) -> list[float]:
    scores = torch.tensor([r.score for r in rewards], dtype=torch.float64)
    if enable:
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        scores = scores + overlong_penalty(lengths, max_response_length=max_response_length, buffer_len=buffer_len,
                                           penalty_factor=penalty_factor).double()
    return scores.tolist()


def build_actor_batch(groups: list[Group], *, norm_by_std: bool, overlong_filtering: bool) -> ActorBatch:
    """Groups -> right-padded [B, S] sequences (B = groups x n) with response masks, advantages and
    the rollout engine's log-probs, aligned with the tokens."""
    rows = [(g.prompt.prompt_ids, c) for g in groups for c in g.completions]
    width = max(len(p) + len(c.token_ids) for p, c in rows)
    b = len(rows)
    tokens = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    rollout_logp = torch.zeros(b, width, dtype=torch.float32)
    lengths = torch.zeros(b, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        p, r = len(prompt), len(completion.token_ids)
        tokens[i, :p] = torch.tensor(prompt)
        tokens[i, p:p + r] = torch.tensor(completion.token_ids, dtype=torch.long)
        mask[i, p:p + r] = 1
        rollout_logp[i, p:p + r] = torch.tensor(completion.logprobs, dtype=torch.float32)
        lengths[i] = p + r
    if overlong_filtering:
        truncated = torch.tensor([t for g in groups for t in g.truncated()])
        mask = overlong_filter_mask(mask, truncated)
    # A response whose reward failed was never scored: it leaves its group's statistics and the loss, and so
    # does one cut at the length limit under overlong filtering (Group.counted).
    failed = torch.tensor([g.failed() for g in groups], dtype=torch.bool).reshape(b, 1)
    mask = mask.masked_fill(failed, 0)
    scores = torch.tensor([g.scores for g in groups], dtype=torch.float64)  # a finite float64 reward stays finite
    counted = torch.tensor([g.counted(overlong_filtering) for g in groups], dtype=torch.bool)
    advantages = group_advantages(scores, norm_by_std=norm_by_std, valid=counted).reshape(-1)
    return ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                      rollout_logp=rollout_logp)


def rollout_metrics(groups: list[Group], max_response_length: int) -> dict[str, float]:
    rewards = [r for g in groups for r in g.rewards]
    scored = _scored(groups)
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    logprobs = [lp for g in groups for c in g.completions for lp in c.logprobs]
    n = max(len(rewards), 1)
    return {
        **extra_means("reward/", rewards),
        **({"critic/score_mean": _mean(scored)} if scored else {}),  # no score read as a mean of 0
        "critic/acc_mean": sum(r.acc for r in rewards) / n,
        "critic/reward_failed": float(sum(r.failed for r in rewards)),
        "response_length/mean": sum(lengths) / n,
        "response_length/max": float(max(lengths, default=0)),
        "response_length/clip_ratio": sum(length >= max_response_length for length in lengths) / n,
        "rollout/mean_token_prob": (torch.tensor(logprobs).exp().mean().item() if logprobs else 0.0),
    }


def validation_metrics(groups: list[Group], k: int) -> dict[str, float]:
    """avg@k, pass@k and mean score over every prompt, the same per data_source (val/SOURCE/...), and the
    mean of each extra reward figure over the responses that report it. maj@k (majority vote) over the prompts
    of the data_sources whose verifier reports the answer it read (RewardResult.pred, "" for none read), when every
    prompt's does."""
    voting = {g.prompt.data_source for g in groups if any(r.pred is not None for r in g.rewards)}

    def summary(prefix: str, part: list[Group]) -> dict[str, float]:
        accs = [[r.acc for r in g.rewards] for g in part]  # a failed reward counts as wrong
        result = {f"{prefix}acc_avg@{k}": sum(sum(a) for a in accs) / (len(accs) * k),
                  f"{prefix}pass@{k}": sum(max(a) > 0 for a in accs) / len(accs)}
        if scored := _scored(part):  # every reward failed: no score, not a mean of 0
            result[f"{prefix}score_mean"] = _mean(scored)
        if all(g.prompt.data_source in voting for g in part):
            result[f"{prefix}maj@{k}"] = sum(majority_vote(g.rewards) for g in part) / len(part)
        return result

    result = summary("val/", groups)
    for source in sorted({g.prompt.data_source for g in groups}):
        result.update(summary(f"val/{source}/", [g for g in groups if g.prompt.data_source == source]))
    result.update(extra_means("val/", [r for g in groups for r in g.rewards]))
    return result


def majority_vote(rewards: list[RewardResult]) -> float:
    """Whether the answer most responses gave is right: 1 or 0, or the share of right answers among those tied
    for the most votes (what a random pick among them scores on average). Responses without an answer (no
    `pred`, a blank one: `Answer: $ $` normalises to nothing, or a failed reward) do not vote; none voting
    scores 0."""
    votes: dict[str, list[float]] = {}
    for r in rewards:
        if r.pred is not None and r.pred.strip() and not r.failed:
            votes.setdefault(r.pred, []).append(r.acc)
    if not votes:
        return 0.0
    most = max(len(accs) for accs in votes.values())
    tied = [accs for accs in votes.values() if len(accs) == most]
    return sum(max(accs) > 0 for accs in tied) / len(tied)


def _scored(groups: list[Group]) -> list[float]:
    """The shaped scores of the responses whose reward did not fail (a failed one's score is a placeholder)."""
    return [s for g in groups for s, failed in zip(g.scores, g.failed()) if not failed]


def extra_means(prefix: str, rewards: list[RewardResult]) -> dict[str, float]:
    """The mean of each extra figure over the responses that report it (one data_source's may not)."""
    names = sorted({key for r in rewards for key in r.extra})
    return {f"{prefix}{name}_mean": _mean([r.extra[name] for r in rewards if name in r.extra]) for name in names}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)

"""Completions -> groups: decode each response, score it with the reward functions, add the overlong punishment;
and stop the run when a data_source's reward function fails on every response (a broken function, not bad
answers)."""
from __future__ import annotations

import time
from collections import Counter

from megatron_dapo.config.root import DAPOConfig
from megatron_dapo.reward.registry import RewardSample
from megatron_dapo.reward.scorer import RewardScorer
from megatron_dapo.trainer.groups import Group, shaped_scores


ALL_FAILED_STOP = 16
"""Responses of a data_source scored at once, every one failing (and at least two prompts' worth), that stop the run
as a broken reward function."""


def broken_reward_threshold(n: int) -> int:
    """Responses of one data_source, every one failing, that make its reward function broken: ALL_FAILED_STOP, and
    at least two prompts' worth of `n` responses each, since one bad prompt (a ground truth its verifier cannot
    read) fails all of its own responses."""
    return max(ALL_FAILED_STOP, 2 * n)


def check_reward_functions(samples: list[RewardSample], results: list, broken_after: int) -> None:
    """RuntimeError naming the data_source whose function failed on every one of its responses here, when there are
    `broken_after` or more of them: a broken function (a missing file, a wrong signature), not bad answers, and
    training on would train on nothing of that source, step after step."""
    for source in dict.fromkeys(s.data_source for s in samples):
        mine = [(s, r) for s, r in zip(samples, results) if s.data_source == source]
        if len(mine) >= broken_after and all(r.failed for _, r in mine):
            kinds = Counter(r.reason.split(":", 1)[0] for _, r in mine)
            first, result = mine[0]
            raise RuntimeError(
                f"the reward function of data_source {source!r} failed on every one of its {len(mine)} responses "
                f"scored here ({', '.join(f'{kind} {count}' for kind, count in kinds.items())}); the first"
                f"{f' ({first.where})' if first.where else ''}: {result.reason}. Fix the reward function "
                f"(reward.functions){_raise_for(kinds)}")


RAISE_FOR = {"timeout": "reward.timeout_s", "memory": "reward.worker_max_rss_gb"}
"""The setting to raise, by failure kind."""


def _raise_for(kinds: Counter[str]) -> str:
    settings = [RAISE_FOR[kind] for kind in RAISE_FOR if kinds[kind]]
    return f" or raise {' and '.join(settings)}" if settings else ""


def score_groups(cfg: DAPOConfig, scorer: RewardScorer, tokenizer, prompts, outputs,
                 n: int) -> tuple[list[Group], float]:
    """The groups of `prompts` (one engine's share) and their `outputs` (n completions each), scored and shaped;
    with the seconds the scoring took."""
    start = time.perf_counter()
    samples = [RewardSample(p.data_source, tokenizer.decode(c.token_ids, skip_special_tokens=True),
                            p.ground_truth, p.extra_info, p.where) for p, cs in zip(prompts, outputs) for c in cs]
    broken_after = broken_reward_threshold(n)
    results = scorer.score(samples, give_up_after=broken_after, group_size=n).results
    seconds = time.perf_counter() - start
    check_reward_functions(samples, results, broken_after)
    buffer = cfg.reward.overlong_buffer
    groups = []
    for i, (prompt, completions) in enumerate(zip(prompts, outputs)):
        rewards = results[i * n:(i + 1) * n]
        scores = shaped_scores(rewards, completions, enable=buffer.enable,
                               max_response_length=cfg.data.max_response_length,
                               buffer_len=buffer.len, penalty_factor=buffer.penalty_factor)
        groups.append(Group(prompt=prompt, completions=completions, rewards=rewards, scores=scores))
    return groups, seconds

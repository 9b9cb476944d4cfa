"""When a data_source's reward function counts as broken: every response failing, two prompts' worth at least."""
import pytest

from megatron_dapo.reward.registry import FAILED_SCORE, RewardResult, RewardSample
from megatron_dapo.trainer.scoring import broken_reward_threshold, check_reward_functions


def _results(sources_failed):
    samples = [RewardSample(source, "r", "g", {}, f"train.parquet row {i}") for i, (source, _) in enumerate(sources_failed)]
    results = [RewardResult(score=FAILED_SCORE, acc=0.0, failed=True, reason="error: ValueError: bad") if failed
               else RewardResult(score=1.0, acc=1.0) for _, failed in sources_failed]
    return samples, results


def test_one_bad_prompt_is_not_a_broken_function():
    n = 16
    assert broken_reward_threshold(n) == 32 and broken_reward_threshold(4) == 16
    # Every response of one prompt fails (its ground truth cannot be read), beside a working source: the run goes on.
    check_reward_functions(*_results([("task", True)] * n + [("math", False)] * n), broken_reward_threshold(n))
    # Two prompts' worth, every one failing: broken, named, beside the working source.
    with pytest.raises(RuntimeError, match=r"the reward function of data_source 'task' failed on every one of its "
                                           r"32 responses scored here \(error 32\); the first \(train.parquet row 16\): "
                                           r"error: ValueError"):
        check_reward_functions(*_results([("math", False)] * n + [("task", True)] * 2 * n), broken_reward_threshold(n))
    # The setting to raise is the one the failures point to: timeouts and memory, not for errors alone.
    samples, results = _results([("task", True)] * 32)
    results[:2] = [RewardResult(score=FAILED_SCORE, acc=0.0, failed=True, reason=reason)
                   for reason in ("memory: the worker held 17 GB", "timeout: no result after 10 s")]
    with pytest.raises(RuntimeError, match=r"\(memory 1, timeout 1, error 30\).* Fix the reward function "
                                           r"\(reward.functions\) or raise reward.timeout_s and "
                                           r"reward.worker_max_rss_gb$"):
        check_reward_functions(samples, results, broken_reward_threshold(16))
    with pytest.raises(RuntimeError, match=r"Fix the reward function \(reward.functions\)$"):
        check_reward_functions(*_results([("task", True)] * 32), broken_reward_threshold(16))
    # One success among them: not broken.
    check_reward_functions(*_results([("task", True)] * 40 + [("task", False)]), broken_reward_threshold(n))

"""Groups of responses: the figures dynamic sampling filters on, and what a failed reward does to the batch."""
import dataclasses
import math

import pytest

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.data.dataset import Prompt
from megatron_dapo.reward.math_dapo import compute_score
from megatron_dapo.reward.registry import FAILED_SCORE, RewardResult
from megatron_dapo.rollout.engine import Completion
from megatron_dapo.sampling.config import FilterGroupsConfig
from megatron_dapo.sampling.dynamic import DynamicSampler
from megatron_dapo.trainer.groups import (FilterMetricCheck, Group, build_actor_batch, majority_vote,
                                          rollout_metrics, validation_metrics)


def _group(rewards: list[RewardResult], penalties: list[float] | None = None, length: int = 3,
           source: str = "math_dapo") -> Group:
    prompt = Prompt(prompt_ids=[1, 2], ground_truth="7", data_source=source, extra_info={}, index=0)
    completions = [Completion(token_ids=[3 + i] * length, logprobs=[-0.5] * length, finish_reason="stop")
                   for i in range(len(rewards))]
    penalties = penalties or [0.0] * len(rewards)
    return Group(prompt=prompt, completions=completions, rewards=rewards,
                 scores=[r.score + p for r, p in zip(rewards, penalties)])


def _failed() -> RewardResult:
    return RewardResult(score=FAILED_SCORE, acc=0.0, failed=True, reason="timeout: 10 s")


def test_filter_figures_are_named_as_in_verl():
    group = _group([RewardResult(score=1.0, acc=1.0, extra={"pnl": 2.0}), RewardResult(score=-1.0, acc=0.0),
                    _failed()], penalties=[-0.5, 0.0, 0.0])
    nan = [math.isnan(v) for v in group.metric("acc")]
    assert group.metric("acc")[:2] == [1.0, 0.0] and nan == [False, False, True]
    assert group.metric("score")[:2] == [1.0, -1.0]  # the task's score, before overlong shaping
    assert group.metric("seq_reward")[:2] == group.metric("seq_final_reward")[:2] == [0.5, -1.0]  # after it
    assert math.isnan(group.metric("seq_reward")[2]) and math.isnan(group.metric("score")[2])
    assert group.metric("pnl")[0] == 2.0 and all(math.isnan(v) for v in group.metric("pnl")[1:])


def test_a_filter_figure_one_data_source_does_not_give_is_named():
    """Filtering on one task's figure with prompts of two tasks would drop every group of the other: refused once
    that task's rewards have come in `patience` batches without it, naming both, counted over the steps (the other
    task's groups fill each step in a batch or two). A task whose rewards give the figure once is not checked
    again; one that gives no figure at all is the misspelt case."""
    pnl = [RewardResult(score=1.0, acc=1.0, extra={"pnl": 1.0}), RewardResult(score=0.0, acc=0.0, extra={"pnl": 0.0})]
    plain = [RewardResult(score=1.0, acc=1.0), RewardResult(score=-1.0, acc=0.0)]
    check = FilterMetricCheck("pnl", patience=2, sources={"trading", "math_dapo"})
    check.add([_group(pnl, source="trading"), _group(plain), _group([_failed(), _failed()], source="trading")])
    check.check(step=1)
    assert check.waiting == {"math_dapo"} and not check.done
    check.add([_group(plain)])  # the next step's first batch
    with pytest.raises(ConfigError, match=r"algorithm.filter_groups.metric='pnl': the rewards of data_source "
                                          r"'math_dapo' give no such figure \(4 scored in 2 generation batches by step "
                                          r"2; they give acc, score, seq_final_reward, seq_reward\), only those of "
                                          r"'trading' do"):
        check.check(step=2)
    check.add([_group(pnl, source="math_dapo")])  # the trading rewards need not give it again
    check.check(step=3)
    assert check.done
    # The counts go on across attempts (saved with each checkpoint as JSON): one batch, a resume, another batch.
    import json

    first = FilterMetricCheck("pnl", patience=2, sources={"trading", "math_dapo"})
    first.add([_group(pnl, source="trading"), _group(plain)])
    first.check(step=1)
    resumed = FilterMetricCheck("pnl", patience=2, sources={"trading", "math_dapo"})
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.confirmed == {"trading"} and resumed.waiting == {"math_dapo"}
    resumed.add([_group(plain)])
    with pytest.raises(ConfigError, match=r"'math_dapo' give no such figure \(4 scored in 2 generation batches"):
        resumed.check(step=2)
    other = FilterMetricCheck("profit", patience=2, sources={"trading", "math_dapo"})  # the metric changed since
    other.load_state_dict(first.state_dict())
    assert not other.batches and not other.confirmed
    misspelt = FilterMetricCheck("pnl", patience=1, sources={"math_dapo"})
    misspelt.add([_group([_failed(), _failed()])])  # nothing scored: nothing to tell yet
    misspelt.check(step=1)
    misspelt.add([_group(plain)])
    with pytest.raises(ConfigError, match=r"none of the 2 rewards scored in 1 generation batches \(by step 1\) gives "
                                          r"such a figure"):
        misspelt.check(step=1)


def test_a_failed_reward_leaves_the_statistics_and_the_loss():
    """A correct answer whose reward timed out is not pushed down as a wrong one: its row has no loss tokens and
    the other responses' advantages are those of the group without it."""
    right, wrong = RewardResult(score=1.0, acc=1.0), RewardResult(score=-1.0, acc=0.0)
    groups = [_group([right, wrong, _failed(), wrong]), _group([right, wrong, right, wrong])]
    batch = build_actor_batch(groups, norm_by_std=True, overlong_filtering=False)
    assert batch.loss_mask[2].sum() == 0 and batch.loss_mask[[0, 1, 3, 4, 5, 6, 7]].sum(dim=1).tolist() == [3] * 7
    # [1, -1, -1]: mean -1/3, sample std sqrt(4/3); [1, -1, 1, -1]: mean 0, sample std sqrt(4/3).
    third = math.sqrt(4 / 3)
    assert batch.advantages[[0, 1, 3]].tolist() == pytest.approx([4 / 3 / third, -2 / 3 / third, -2 / 3 / third],
                                                                  rel=1e-5)
    assert batch.advantages[2] == 0
    assert batch.advantages[4:].tolist() == pytest.approx([1 / third, -1 / third] * 2, rel=1e-5)


def test_dynamic_sampling_judges_a_group_by_its_scored_responses():
    """Right + failed: one scored response, nothing to compare: dropped. Right, wrong + failed: kept."""
    right, wrong = RewardResult(score=1.0, acc=1.0), RewardResult(score=-1.0, acc=0.0)
    lone, varied = _group([right, _failed(), _failed()]), _group([right, wrong, _failed()])
    for metric in ("acc", "score", "seq_reward"):
        sampler = DynamicSampler(FilterGroupsConfig(metric=metric, max_num_gen_batches=1), train_batch_size=2)
        sampled = sampler.collect(lambda: [lone, varied], lambda g: g.metric(metric))
        assert sampled.groups == [varied], metric
        stats = sampled.stats
        assert (stats.metric_missing, stats.dropped_unscored, stats.dropped_all_correct) == (3, 1, 0), metric


def _cut(group: Group, *rows: int) -> Group:
    for row in rows:
        group.completions[row].finish_reason = "length"
    return group


def test_overlong_filtering_leaves_a_cut_response_out_of_its_group_s_baseline():
    """Scores after shaping: 4 cut at the limit (wrong, -1 - 1), 2 right, 2 wrong. Kept in the mean (-1) and std,
    the cut ones lifted the two wrong answers to advantage 0: they were not pushed down at all. Left out, the
    group is 2 right against 2 wrong, and a cut response has no advantage and no loss."""
    right, wrong = RewardResult(score=1.0, acc=1.0), RewardResult(score=-1.0, acc=0.0)
    group = _cut(_group([wrong] * 4 + [right, right, wrong, wrong], penalties=[-1.0] * 4 + [0.0] * 4), 0, 1, 2, 3)
    batch = build_actor_batch([group], norm_by_std=True, overlong_filtering=True)
    assert batch.loss_mask.sum(dim=1).tolist() == [0] * 4 + [3] * 4
    std = math.sqrt(4 / 3)  # of [1, 1, -1, -1], Bessel's
    assert batch.advantages.tolist() == pytest.approx([0.0] * 4 + [1 / std] * 2 + [-1 / std] * 2, rel=1e-5)
    unfiltered = build_actor_batch([group], norm_by_std=True, overlong_filtering=False)
    assert unfiltered.advantages[6].item() == pytest.approx(0.0, abs=1e-6)  # what the baseline did before
    assert unfiltered.loss_mask.sum().item() == 24


def test_dynamic_sampling_judges_a_group_by_the_responses_that_count():
    """Under overlong filtering, a cut response is in no variance test: 2 cut (wrong) and 2 right is an all-right
    group (dropped as all-correct, as it is when filtered on the shaped reward, which the cut makes 0 for an answer
    right before it); all cut is unscored; 1 cut, 1 right and 1 wrong is kept. Without filtering, each varies."""
    right, wrong = RewardResult(score=1.0, acc=1.0), RewardResult(score=-1.0, acc=0.0)
    all_right = _cut(_group([wrong, wrong, right, right]), 0, 1)
    all_cut = _cut(_group([right, wrong, wrong]), 0, 1, 2)
    varied = _cut(_group([wrong, right, wrong]), 0)
    shaped_right = _cut(_group([right, right, right], penalties=[-1.0, 0.0, 0.0]), 0)  # 0 after shaping, then 1, 1
    for metric in ("acc", "seq_reward"):
        for filtering in (True, False):
            sampler = DynamicSampler(FilterGroupsConfig(metric=metric, max_num_gen_batches=1), train_batch_size=5)
            sampled = sampler.collect(lambda: [all_right, all_cut, varied, shaped_right],
                                      lambda g: g.metric(metric, filtering), all_correct=lambda g: g.all_correct(
                                          filtering))
            stats = sampled.stats
            if filtering:
                assert sampled.groups == [varied], metric
                assert (stats.dropped_all_correct, stats.dropped_unscored, stats.metric_missing) == (2, 1, 7), metric
            else:
                assert sampled.groups == [all_right, all_cut, varied] + ([shaped_right] if metric != "acc" else [])
                assert stats.dropped_all_correct == int(metric == "acc") and stats.dropped_all_wrong == 0
            for group in sampled.groups:  # what the sampler keeps has a loss, as the batch masks it
                assert build_actor_batch([group], norm_by_std=True, overlong_filtering=filtering).loss_mask.any()
    # A group alike in its shaped reward, all right but each cut short (1 - 1 = 0), is counted all-correct.
    cut_right = _cut(_group([right, right], penalties=[-1.0, -1.0]), 0, 1)
    sampler = DynamicSampler(FilterGroupsConfig(metric="seq_reward", max_num_gen_batches=1), train_batch_size=1)
    stats = sampler.collect(lambda: [cut_right], lambda g: g.metric("seq_reward"),
                            all_correct=lambda g: g.all_correct(False)).stats
    assert (stats.dropped_all_correct, stats.dropped_all_wrong) == (1, 0)


def test_validation_counts_a_failed_reward_as_wrong():
    right = RewardResult(score=1.0, acc=1.0)
    metrics = validation_metrics([_group([right, _failed()]), _group([_failed(), _failed()])], k=2)
    assert metrics["val/acc_avg@2"] == 0.25 and metrics["val/pass@2"] == 0.5
    assert metrics["val/score_mean"] == 1.0  # the one scored response: a failed one's placeholder is no score
    # A data_source whose every reward failed has no score: none is logged, not a mean of 0.
    other = _group([_failed(), _failed()])
    other.prompt = dataclasses.replace(other.prompt, data_source="broken")
    metrics = validation_metrics([_group([right, _failed()]), other], k=2)
    assert "val/broken/score_mean" not in metrics and metrics["val/broken/acc_avg@2"] == 0.0
    assert metrics["val/score_mean"] == 1.0
    assert "critic/score_mean" not in rollout_metrics([other], max_response_length=8)


def test_majority_vote_by_hand():
    def said(pred, acc=0.0):
        return RewardResult(score=1.0 if acc else -1.0, acc=acc, pred=pred)

    unanswered = RewardResult(score=-1.0, acc=0.0)  # no Answer line: no vote
    # 42 (right) twice against 41 and 40 once: the majority is right, though most responses are wrong.
    assert majority_vote([said("42", 1.0), said("41"), said("42", 1.0), said("40"), unanswered, unanswered]) == 1.0
    assert majority_vote([said("41"), said("41"), said("42", 1.0)]) == 0.0
    assert majority_vote([said("41"), said("42", 1.0)]) == 0.5  # a tie: a random pick is right half the time
    assert majority_vote([unanswered, _failed()]) == 0.0
    failed_vote = RewardResult(score=FAILED_SCORE, acc=0.0, failed=True, reason="timeout: 10 s", pred="41")
    assert majority_vote([failed_vote, failed_vote, said("42", 1.0)]) == 1.0  # a failed reward does not vote
    # An answer that normalises to nothing is no vote either: blanks would pool and outvote the right answer.
    blank = compute_score("so the answer is\nAnswer: \\boxed{}", "42").pred
    assert blank == "" and majority_vote([said(blank)] * 3 + [said("42", 1.0)] * 2) == 1.0


def test_maj_at_k_is_reported_for_the_sources_whose_verifier_reads_an_answer():
    right, wrong = RewardResult(score=1.0, acc=1.0, pred="7"), RewardResult(score=-1.0, acc=0.0, pred="8")
    math_groups = [_group([right, wrong, right]), _group([wrong, wrong, right])]
    metrics = validation_metrics(math_groups, k=3)
    assert metrics["val/maj@3"] == metrics["val/math_dapo/maj@3"] == 0.5
    assert metrics["val/acc_avg@3"] == pytest.approx(0.5) and metrics["val/pass@3"] == 1.0
    # A custom function that returns a float gives no answer: no maj@k for its source, nor for the whole set.
    plain = _group([RewardResult(score=1.0, acc=1.0), RewardResult(score=-1.0, acc=0.0)] + [_failed()])
    plain.prompt = Prompt(prompt_ids=[1, 2], ground_truth="7", data_source="my_task", extra_info={}, index=1)
    metrics = validation_metrics(math_groups + [plain], k=3)
    assert metrics["val/math_dapo/maj@3"] == 0.5
    assert "val/my_task/maj@3" not in metrics and "val/maj@3" not in metrics


def test_maj_at_k_reads_0_where_no_response_gives_an_answer_yet():
    """A model that does not write `Answer:` lines yet (a base model's first validation): math_dapo's verifier
    still reads answers, so val/maj@K is there, and 0, not left out until some response gives one."""
    from megatron_dapo.reward.registry import math_dapo_reward

    unanswered = [math_dapo_reward("I think it is 42", "42", {}) for _ in range(2)]
    assert [r.pred for r in unanswered] == ["", ""] and math_dapo_reward("Answer: 42", "42", {}).pred == "42"
    metrics = validation_metrics([_group(unanswered), _group(unanswered)], k=2)
    assert metrics["val/maj@2"] == metrics["val/math_dapo/maj@2"] == 0.0


def test_the_mean_score_is_that_of_the_responses_scored():
    """A reward function that fails often must not look like a falling reward: critic/reward_failed says it."""
    right, wrong = RewardResult(score=1.0, acc=1.0), RewardResult(score=-1.0, acc=0.0)
    metrics = rollout_metrics([_group([right, wrong, right, _failed()], penalties=[-0.5, 0, 0, 0])], 8)
    assert metrics["critic/score_mean"] == pytest.approx((0.5 - 1.0 + 1.0) / 3)
    assert metrics["critic/acc_mean"] == 0.5 and metrics["critic/reward_failed"] == 1

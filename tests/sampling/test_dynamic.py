"""The dynamic-sampling collector against a scripted generator."""
import pytest

from megatron_dapo.sampling.config import FilterGroupsConfig
from megatron_dapo.sampling.dynamic import DynamicSampler, DynamicSamplingExhausted

# Each generation batch is a list of groups; a group is (name, per-response metric values).
SCRIPT = [
    [("a", [1, 1]), ("b", [0, 1]), ("c", [0, 0])],
    [("d", [1, 0]), ("e", [1, 1])],
    [("f", [0, 1]), ("g", [1, 0]), ("h", [0, 1])],
]


def _generator(script):
    batches = iter(script)
    return lambda: next(batches)


def _collect(script, target=3, **config):
    sampler = DynamicSampler(FilterGroupsConfig(**config), train_batch_size=target)
    return sampler.collect(_generator(script), lambda group: group[1])


def test_keeps_varied_groups_until_full_and_trims_in_order():
    out = _collect(SCRIPT)
    assert [name for name, _ in out.groups] == ["b", "d", "f"]
    s = out.stats
    assert (s.gen_batches, s.groups_generated, s.kept, s.trimmed) == (3, 8, 3, 2)
    assert (s.dropped_all_correct, s.dropped_all_wrong, s.exhausted) == (2, 1, False)


def test_exhausted_with_error_policy_names_counts_and_keys():
    with pytest.raises(DynamicSamplingExhausted) as err:
        _collect(SCRIPT, max_num_gen_batches=2, on_exhausted="error")
    message = str(err.value)
    assert "kept 2 of 3 groups after 2 generation batches" in message
    assert "algorithm.filter_groups.max_num_gen_batches" in message and "data.train_batch_size" in message
    assert err.value.stats.dropped_all_correct == 2


def test_exhausted_with_train_policy_returns_what_it_has():
    out = _collect(SCRIPT, max_num_gen_batches=2, on_exhausted="train")
    assert [name for name, _ in out.groups] == ["b", "d"]
    assert out.stats.exhausted and out.stats.gen_batches == 2


def test_exhausted_with_nothing_kept_returns_an_empty_batch():
    out = _collect([[("a", [1, 1])], [("b", [0, 0])]], max_num_gen_batches=2, on_exhausted="train")
    assert out.groups == [] and out.stats.exhausted


def test_zero_means_no_limit():
    script = [[("x", [1, 1])]] * 25 + [[("y", [0, 1])]]
    out = _collect(script, target=1, max_num_gen_batches=0)
    assert [name for name, _ in out.groups] == ["y"] and out.stats.gen_batches == 26


def test_disabled_takes_one_batch_unfiltered():
    out = _collect(SCRIPT, target=2, enable=False)
    assert [name for name, _ in out.groups] == ["a", "b"]
    assert (out.stats.gen_batches, out.stats.trimmed, out.stats.dropped_all_correct) == (1, 1, 0)


def test_other_metrics_such_as_profit_loss():
    script = [[("p", [0.25, 0.25]), ("q", [-3.5, 0.5]), ("r", [-1.0, -1.0])]]
    out = _collect(script, target=1, metric="profit_loss")
    assert [name for name, _ in out.groups] == ["q"]
    assert (out.stats.dropped_all_correct, out.stats.dropped_all_wrong) == (1, 1)


def test_missing_metric_values_are_left_out_and_never_stop_the_run():
    """A failed reward (no task field: NaN) or an infinite value is counted and left out of the variance test:
    a group needs two present values that differ; one with fewer than two is dropped as unscored."""
    nan, inf = float("nan"), float("inf")
    script = [[("a", [0.5, nan, 0.5]), ("b", [nan, -1.0, 2.0]), ("c", [nan, nan, nan]), ("d", [inf, 1.0, nan]),
               ("e", [nan, 3.0, 3.0])]]
    out = _collect(script, target=5, metric="profit_loss", max_num_gen_batches=1)
    assert [name for name, _ in out.groups] == ["b"]
    s = out.stats
    assert (s.dropped_all_correct, s.dropped_all_wrong, s.dropped_unscored, s.metric_missing) == (2, 0, 2, 8)
    assert out.stats.metrics()["sampling/metric_missing"] == 8


def test_progress_after_each_generation_batch():
    seen = []
    sampler = DynamicSampler(FilterGroupsConfig(), train_batch_size=3)
    sampler.collect(_generator(SCRIPT), lambda group: group[1],
                    progress=lambda stats, kept: seen.append((stats.gen_batches, kept, stats.dropped_all_correct,
                                                              stats.dropped_all_wrong)))
    assert seen == [(1, 1, 1, 1), (2, 2, 2, 1), (3, 5, 2, 1)]


@pytest.mark.parametrize("on_exhausted", ["error", "train"])
def test_a_stop_request_ends_the_collection_with_what_was_kept(on_exhausted):
    """A stop asked for after the second generation batch ends an unlimited collection of alike groups (which
    nothing else would end) there, with the groups kept so far and no error whatever on_exhausted says; a stop
    asked for once the batch is full changes nothing."""
    asked = []

    def stop():
        asked.append(True)
        return len(asked) >= 2

    sampler = DynamicSampler(FilterGroupsConfig(max_num_gen_batches=0, on_exhausted=on_exhausted), train_batch_size=2)
    alike = iter(lambda: [("x", [1, 1]), ("y", [0, 0])], None)  # never a varied group
    out = sampler.collect(lambda: next(alike), lambda group: group[1], stop=stop)
    assert out.groups == [] and (out.stats.gen_batches, out.stats.stopped, out.stats.exhausted) == (2, True, False)
    assert len(asked) == 2

    out = sampler.collect(_generator(SCRIPT), lambda group: group[1], stop=lambda: True)
    assert [name for name, _ in out.groups] == ["b"] and out.stats.stopped and out.stats.gen_batches == 1
    full = DynamicSampler(FilterGroupsConfig(), train_batch_size=1).collect(
        _generator(SCRIPT), lambda group: group[1], stop=lambda: True)
    assert [name for name, _ in full.groups] == ["b"] and not full.stats.stopped

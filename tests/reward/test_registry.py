import math
import os
import time

import pytest

from megatron_dapo.reward.registry import (
    _REGISTRY,
    FAILED_SCORE,
    RewardResult,
    RewardSample,
    failure_kind,
    get_reward_fn,
    register_reward,
    registered_sources,
)
from megatron_dapo.reward.scorer import RewardScorer, compute_rewards


@register_reward("test_troublesome")
def troublesome(response, ground_truth, extra_info):
    """Misbehaves on command: the response says how."""
    if response == "raise":
        return 1 / 0
    if response == "hang":
        time.sleep(600)
    if response == "nan":
        return float("nan")
    if response == "nan_extra":
        return RewardResult(score=1.0, acc=1.0, extra={"profit_loss": math.inf})
    if response == "text":
        return "correct"
    if response == "die":
        os._exit(3)
    if response == "float":
        return 0.5
    if response == "own_failure":
        return RewardResult(score=1.0, acc=1.0, failed=True, reason="no price data")
    return RewardResult(score=float(len(response)), acc=1.0, extra={"profit_loss": float(extra_info["pnl"])})


def plain(response, ground_truth, extra_info):
    return 1.0 if response == ground_truth else 0.0


register_reward("test_plain", plain)


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(timeout_s=0.5, num_workers=2) as s:
        yield s


def sample(response, pnl=0.0):
    return RewardSample("test_troublesome", response, "", {"pnl": pnl})


def test_good_samples_pass_through(scorer):
    batch = scorer.score([sample("abc", 2.5), ("test_troublesome", "abcd", "", {"pnl": -1.0}),
                          ("test_plain", "7", "7", {})])
    assert batch.failure_counts == {}
    assert batch.scores == [3.0, 4.0, 1.0]
    assert batch.accs == [1.0, 1.0, 1.0]                   # a float return is score and acc at once
    assert [r.extra for r in batch.results] == [{"profit_loss": 2.5}, {"profit_loss": -1.0}, {}]


def test_each_failure_costs_only_its_sample(scorer):
    responses = ["ab", "raise", "nan", "abc", "nan_extra", "text", "float", "own_failure"]
    batch = scorer.score([sample(r, 1.0) for r in responses])
    assert batch.scores == [2.0, FAILED_SCORE, FAILED_SCORE, 3.0, FAILED_SCORE, FAILED_SCORE, 0.5, FAILED_SCORE]
    assert batch.accs == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0]
    assert [r.failed for r in batch.results] == [False, True, True, False, True, True, False, True]
    assert batch.failure_counts == {"error": 2, "non_finite": 2, "bad_return": 1}
    assert batch.num_failed == 5
    reasons = [r.reason for r in batch.results]
    assert reasons[1].startswith("error: ZeroDivisionError: division by zero (at test_registry.py:")
    assert reasons[2] == "non_finite: score is nan"
    assert reasons[4] == "non_finite: extra['profit_loss'] is inf"
    assert reasons[5] == "bad_return: returned str, expected RewardResult, a mapping with 'score' or a float"
    assert reasons[7] == "error: no price data"
    assert batch.results[2].extra == {}


def test_a_hang_is_bounded_and_the_pool_recovers(scorer):
    start = time.monotonic()
    batch = scorer.score([sample("hang"), sample("a"), sample("hang"), sample("bb"), sample("ccc")])
    elapsed = time.monotonic() - start
    # both hangs run at once on the two workers and are killed after 0.5 s
    assert elapsed < 5.0, elapsed
    assert batch.scores == [FAILED_SCORE, 1.0, FAILED_SCORE, 2.0, 3.0]
    assert batch.failure_counts == {"timeout": 2}
    assert batch.results[0].reason == "timeout: no result after 0.5 s (worker killed)"
    # the replaced workers score the next batch
    assert scorer.score([sample("dddd")]).scores == [4.0]


def test_a_function_that_fails_on_everything_is_given_up_on(scorer):
    # 40 hangs at 0.5 s each on 2 workers would take 10 s; after 4 failures the rest are left unscored.
    start = time.monotonic()
    batch = scorer.score([sample("hang") for _ in range(40)], give_up_after=4)
    assert time.monotonic() - start < 5.0
    assert batch.num_failed == 40 and batch.failure_counts["timeout"] >= 4
    assert batch.failure_counts["timeout"] + batch.failure_counts["not_scored"] == 40
    reasons = {r.reason for r in batch.results if r.reason.startswith("not_scored")}
    assert reasons == {f"not_scored: the reward function of 'test_troublesome' failed on all "
                       f"{batch.failure_counts['timeout']} of its samples scored before"}, reasons  # one count for all
    assert scorer.score([sample("dddd")]).scores == [4.0]  # the pool still works


def test_giving_up_waits_for_a_success_and_is_per_data_source(scorer):
    # One success before the count is reached: every sample is scored.
    batch = scorer.score([sample("raise"), sample("ab")] + [sample("raise")] * 10, give_up_after=4)
    assert batch.failure_counts == {"error": 11} and batch.scores[1] == 2.0
    # A source whose function fails on everything is given up on; another source's samples, before and after
    # its, are all scored.
    plain = ("test_plain", "7", "7", {})
    batch = scorer.score([plain] * 2 + [sample("raise")] * 20 + [plain] * 3, give_up_after=4)
    assert batch.scores[:2] == [1.0, 1.0] and batch.scores[22:] == [1.0, 1.0, 1.0]
    assert batch.failure_counts["error"] >= 4 and batch.failure_counts["error"] + batch.failure_counts["not_scored"] == 20
    reason = next(r.reason for r in batch.results if r.reason and r.reason.startswith("not_scored"))
    assert reason.startswith("not_scored: the reward function of 'test_troublesome' failed on all ")


def test_a_few_bad_prompts_first_do_not_look_like_a_broken_function(scorer):
    """Two prompts whose 8 responses all fail (a ground truth the function cannot read), then 30 good prompts:
    sent prompt after prompt, the first 16 samples done could all be failures, and the function was given up on
    (or not, by the workers' timing). Sent response-major, the first 16 done span 16 prompts."""
    n = 8
    samples = [sample("raise")] * (2 * n) + [sample("ab")] * (30 * n)
    for _ in range(3):
        batch = scorer.score(samples, give_up_after=2 * n, group_size=n)
        assert batch.failure_counts == {"error": 2 * n}
        assert batch.scores[2 * n:] == [2.0] * (30 * n)
    with pytest.raises(ValueError, match="5 samples do not make groups of group_size=2"):
        scorer.score([sample("ab")] * 5, group_size=2)


def test_a_dying_worker_costs_its_sample(scorer):
    batch = scorer.score([sample("die"), sample("a"), sample("bb")])
    assert batch.scores == [FAILED_SCORE, 1.0, 2.0]
    assert batch.results[0].reason == "worker_died: exit code 3"
    assert scorer.score([sample("ccc")]).scores == [3.0]


def test_math_dapo_is_registered(scorer):
    assert "math_dapo" in registered_sources()
    samples = [("math_dapo", f"Reasoning...\nAnswer: \\boxed{{{i}}}", str(i if i % 4 else i + 1), {})
               for i in range(1000)]
    batch = scorer.score(samples)
    # i = 0, 4, ..., 996 (250 of them) are given a wrong ground truth
    assert batch.failure_counts == {}
    assert sum(batch.accs) == 750
    assert sum(batch.scores) == 750 - 250
    assert batch.results[5].pred == "5"


def test_unknown_data_source_names_sample_and_registered_ones(scorer):
    expected = r"sample 1: no reward function for data_source 'gsm9k'; registered: \[.*'math_dapo'"
    with pytest.raises(ValueError, match=expected):
        scorer.score([sample("a"), ("gsm9k", "a", "1", {})])
    with pytest.raises(ValueError, match="'gsm9k'"):
        get_reward_fn("gsm9k")


def test_registration_rules():
    with pytest.raises(ValueError, match="module level"):
        register_reward("test_lambda", lambda r, g, e: 1.0)
    with pytest.raises(ValueError, match="already has reward function"):
        register_reward("test_plain", troublesome)
    assert register_reward("test_plain", plain) is plain   # the same function again is fine
    assert get_reward_fn("test_plain") is plain


def test_compute_rewards_one_shot():
    batch = compute_rewards([("test_plain", "7", "7", {}), ("test_plain", "8", "7", {})], timeout_s=5.0, num_workers=1)
    assert batch.scores == [1.0, 0.0]


@register_reward("test_unusual")
def unusual(response, ground_truth, extra_info):
    """Returns what real reward functions return: numpy numbers, bools, odd extras; or forks."""
    import numpy as np

    if response == "np32":
        return np.float32(0.25)
    if response == "bool":
        return response == "bool"
    if response == "np_result":
        return RewardResult(score=np.float32(1.0), acc=np.bool_(True), extra={"n": np.int64(3)}, pred=np.int64(7))
    if response == "extra_none":
        return RewardResult(score=1.0, acc=1.0, extra=None)
    if response == "extra_clash":  # would overwrite val/score_mean, and land among another source's figures
        return RewardResult(score=1.0, acc=1.0, extra={"score": 5.0, "math/acc": 1.0, "n": 1.0})
    if response == "verl_dict":  # verl's layout, as its math_dapo.compute_score returns it
        return {"score": -1.0, "acc": False, "pred": "34", "steps": np.int64(2)}
    if response == "verl_score_only":
        return {"score": 0.5}
    if response == "dict_no_score":
        return {"reward": 1.0}
    if response == "dict_text_figure":
        return {"score": 1.0, "note": "fine"}
    if response == "fork":  # the child raises a little later, in the worker's loop, as a library's helper might
        if os.fork() == 0:
            time.sleep(0.2)
            raise RuntimeError("child")
        return 5.0
    return float(len(response))


def test_numbers_of_any_real_kind_are_taken_and_a_bad_extra_costs_its_sample(scorer):
    batch = scorer.score([RewardSample("test_unusual", r, "", {})
                          for r in ("np32", "bool", "np_result", "extra_none", "extra_clash")])
    assert batch.scores[:3] == [0.25, 1.0, 1.0] and batch.accs[:3] == [0.25, 1.0, 1.0]
    result = batch.results[2]
    assert result.extra == {"n": 3.0} and type(result.extra["n"]) is float and result.pred == "7"
    assert type(result.score) is float and type(result.acc) is float
    assert batch.results[3].failed and batch.results[3].reason == "bad_return: extra is NoneType, expected a dict of numbers"
    assert batch.results[4].failed and batch.results[4].reason.startswith(
        "bad_return: extra figure(s) ['score', 'math/acc']: 'score' would be logged as val/score_mean")


def test_a_mapping_in_verl_s_layout_is_read(scorer):
    """verl's reward functions return {"score", "acc", "pred", other figures}: taken as a RewardResult, through
    the same checks; acc defaults to the score, as for a float."""
    batch = scorer.score([RewardSample("test_unusual", r, "", {})
                          for r in ("verl_dict", "verl_score_only", "dict_no_score", "dict_text_figure")])
    verl, only = batch.results[:2]
    assert (verl.score, verl.acc, verl.pred, verl.extra, verl.failed) == (-1.0, 0.0, "34", {"steps": 2.0}, False)
    assert (only.score, only.acc, only.extra) == (0.5, 0.5, {})
    assert batch.results[2].reason == "bad_return: returned a mapping without 'score' (keys: reward)"
    assert batch.results[3].reason == "bad_return: extra['note'] is str, expected a number"


def test_a_forked_child_never_answers_for_a_sample(scorer):
    """A reward function that forks: the child, back in the worker's loop, exits without a word, so every later
    sample still gets its own result (before, each got the previous one's)."""
    samples = [RewardSample("test_unusual", r, "", {}) for r in ("fork", "ab", "abc", "abcd")]
    batch = scorer.score(samples)
    assert batch.scores == [5.0, 2.0, 3.0, 4.0] and batch.failure_counts == {}
    time.sleep(0.4)
    again = scorer.score([RewardSample("test_unusual", r, "", {}) for r in ("a", "abcde")])
    assert again.scores == [1.0, 5.0]


@register_reward("test_spawner")
def spawner(response, ground_truth, extra_info):
    """Starts a long child process (as a sandbox would), writes its pid where the test reads it, and hangs."""
    import subprocess

    child = subprocess.Popen(["sleep", "600"])
    with open(response, "w") as f:
        f.write(str(child.pid))
    time.sleep(600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_timed_out_sample_takes_what_its_function_started_with_it(scorer, tmp_path):
    pid_file = tmp_path / "child.pid"
    batch = scorer.score([RewardSample("test_spawner", str(pid_file), "", {})])
    assert batch.failure_counts == {"timeout": 1}
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the reward function's child outlived its killed worker"


_HELPER = {}


@register_reward("test_leaves_a_helper")
def leaves_a_helper(response, ground_truth, extra_info):
    """Keeps a helper process in a module global (a solver, a sandbox) and returns: it outlives the sample."""
    import subprocess

    if "child" not in _HELPER:
        _HELPER["child"] = subprocess.Popen(["sleep", "600"])
    with open(response, "w") as f:
        f.write(str(_HELPER["child"].pid))
    return 1.0


def test_closing_the_pool_ends_what_its_functions_left_running(tmp_path):
    pid_file = tmp_path / "child.pid"
    scorer = RewardScorer(timeout_s=5.0, num_workers=1)
    assert scorer.score([RewardSample("test_leaves_a_helper", str(pid_file), "", {})]).scores == [1.0]
    child = int(pid_file.read_text())
    assert _alive(child)
    watchers = [w.watcher for w in scorer._workers]
    assert all(w is not None and w.poll() is None for w in watchers)  # each worker's group has its watcher
    scorer.close()
    assert all(w.returncode is not None for w in watchers)  # stopped and reaped with their workers
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "a reward function's helper process outlived the closed pool"
    with pytest.raises(RuntimeError, match=r"score\(\) after close\(\)"):
        scorer.score([sample("a")])


def test_workers_die_with_a_killed_trainer(tmp_path):
    """SIGKILL to the process holding the pool (a trainer the OOM killer picks) ends its workers too, the one
    busy in a reward function that never returns included (an idle one sees its pipe close), and what a
    reward function left running (a helper process kept in a module global)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pid_file = tmp_path / "helper.pid"
    code = ("import os, sys, time\n"
            "import tests.reward.test_registry\n"
            "from megatron_dapo.reward.scorer import RewardScorer\n"
            "scorer = RewardScorer(timeout_s=600.0, num_workers=2)\n"
            "scorer.score([('math_dapo', 'Answer: 1', '1', {})])\n"
            f"scorer.score([('test_leaves_a_helper', {str(pid_file)!r}, '', {{}})])\n"
            "print(' '.join(str(w.process.pid) for w in scorer._workers), flush=True)\n"
            "scorer.score([('test_troublesome', 'hang', '', {})])\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    workers = [int(pid) for pid in holder.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    helper = int(pid_file.read_text())
    assert _alive(helper)
    time.sleep(1.0)  # the hanging sample reaches its worker
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "reward workers outlived the killed trainer"
    while _alive(helper) and time.monotonic() < deadline + 5:
        time.sleep(0.05)
    assert not _alive(helper), "a reward function's helper process outlived the killed trainer"


_HOARD = []


@register_reward("test_hoarding")
def hoarding(response, ground_truth, extra_info):
    """Keeps 40 MB of every call, as a reward function with an unbounded cache would; answers with its pid."""
    _HOARD.append(b"x" * (40 << 20))
    return RewardResult(score=float(os.getpid()), acc=1.0)


def test_a_worker_that_outgrows_its_memory_limit_is_replaced_between_samples():
    samples = [RewardSample("test_hoarding", str(i), "", {}) for i in range(12)]
    with RewardScorer(timeout_s=30, num_workers=1, max_rss_gb=None) as unbounded:
        assert len(set(unbounded.score(samples).scores)) == 1  # one worker scored all, 480 MB held
    with RewardScorer(timeout_s=30, num_workers=1, max_rss_gb=0.0) as scorer:  # base memory is already over
        batch = scorer.score(samples[:3])
        assert batch.num_failed == 0 and len(set(batch.scores)) == 3 and scorer.replaced_for_memory == 3
    with RewardScorer(timeout_s=30, num_workers=1) as probe:
        base = _resident(probe, [samples[0]])  # a worker's memory after one sample
    with RewardScorer(timeout_s=30, num_workers=1, max_rss_gb=(base + (60 << 20)) / 1e9) as scorer:
        batch = scorer.score(samples)
        # Replaced once it holds more than 60 MB above its state after one sample: after every third sample.
        assert batch.num_failed == 0 and all(r.acc == 1.0 for r in batch.results)
        pids = batch.scores
        assert len(set(pids)) == 4 and all(pids[i] == pids[i - i % 3] for i in range(12)), pids
        assert scorer.replaced_for_memory == 4


def _resident(scorer, samples):
    from megatron_dapo.reward.scorer import _resident_bytes

    scorer.score(samples)
    return _resident_bytes(scorer._workers[0].process.pid)


@register_reward("test_timers")
def timers(response, ground_truth, extra_info):
    """Leaves a timer armed, as a verifier's own timeout does when it raises before disarming it; or sleeps."""
    import signal

    if response == "alarm":
        signal.alarm(1)
        raise ValueError("failed before alarm(0)")
    if response == "handler":
        def expire(signum, frame):
            raise TimeoutError("the previous sample's timer")

        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        return 0.0
    time.sleep(1.5)
    return 1.0


def test_a_timer_a_function_leaves_armed_ends_with_its_sample():
    """Before, the next sample on that worker (of any data_source) was killed by the alarm, or failed in the
    handler, and counted against its own function."""
    with RewardScorer(timeout_s=10, num_workers=1) as one:
        batch = one.score([RewardSample("test_timers", r, "", {}) for r in ("alarm", "slow", "handler", "slow")])
    assert batch.scores == [FAILED_SCORE, 1.0, 0.0, 1.0], [r.reason for r in batch.results]
    assert batch.results[0].reason.startswith("error: ValueError: failed before alarm(0)")


def test_a_verifiers_slow_import_is_paid_at_start_not_by_a_sample(tmp_path, monkeypatch):
    """A reward function whose module takes 2 s to import (sympy, a sandbox) and a 1 s timeout: a fresh worker
    imports the module before it says it is ready, so its first sample is not timed out for the import."""
    import importlib
    import sys

    (tmp_path / "slow_verifier_module.py").write_text(
        "import time\ntime.sleep(2.0)\n\ndef verify(response, ground_truth, extra_info):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers start with the parent's sys.path
    module = importlib.import_module("slow_verifier_module")
    register_reward("test_slow_import", module.verify, replace=True)
    try:
        with RewardScorer(timeout_s=1.0, num_workers=1, startup_timeout_s=60) as scorer:
            batch = scorer.score([RewardSample("test_slow_import", "x", "", {})])
        assert batch.scores == [1.0], batch.results
    finally:
        sys.modules.pop("slow_verifier_module", None)
        _REGISTRY.pop("test_slow_import")


@register_reward("test_ballooning")
def ballooning(response, ground_truth, extra_info):
    """Holds extra_info["mb"] MB more, allocated 50 MB every 20 ms (a function that grows without bound, capped
    so that a pool that fails to stop it still ends), and keeps it with extra_info["keep"] (a cache); answers
    with its pid."""
    held = _HOARD if extra_info.get("keep") else []
    for _ in range(extra_info.get("mb", 0) // 50):
        held.append(b"x" * (50 << 20))
        time.sleep(0.02)
    return RewardResult(score=float(os.getpid()), acc=1.0)


def test_a_worker_growing_past_twice_its_memory_limit_in_a_sample_is_killed_then():
    """A sample that leaves its worker past the limit is scored, and the worker replaced after it (nothing lost);
    one that takes it past twice the limit fails as `memory` mid-sample (killed long before its end, 1 GB past
    that); the samples after each are scored by a fresh worker."""
    def sample(mb, keep=False):
        return RewardSample("test_ballooning", "", "", {"mb": mb, "keep": keep})

    with RewardScorer(timeout_s=30, num_workers=1) as probe:
        base = _resident(probe, [sample(0)])
    limit = base + (150 << 20)
    with RewardScorer(timeout_s=120, num_workers=1, max_rss_gb=limit / 1e9) as scorer:
        batch = scorer.score([sample(0), sample(250, keep=True), sample((2 * limit >> 20) + 1000), sample(0)])
        assert batch.failure_counts == {"memory": 1}, batch.failure_counts
        assert [r.failed for r in batch.results] == [False, False, True, False]
        reason = batch.results[2].reason
        assert reason.startswith("memory: the worker held ") and "> 2 x reward.worker_max_rss_gb=" in reason, reason
        assert "killed" in reason and failure_kind(batch.results[2]) == "memory", reason  # reward/failed_memory
        pids = batch.scores
        assert pids[0] == pids[1] != pids[3], pids  # replaced after the second sample, and after the killed one
        assert scorer.replaced_for_memory == 2

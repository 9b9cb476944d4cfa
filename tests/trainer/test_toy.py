"""The README's main job, shortened: the toy example learns with DAPO alone on a CPU."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_dapo.metrics.samples import read_samples
from megatron_dapo.trainer import checkpoints
from megatron_dapo.metrics.sinks import read_metrics

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 0.25
"""Validation avg@4 after 20 steps must beat step 0 by this much (seed 1: 0.50 -> 0.95 at step 10, 0.96 at 20)."""


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _toy_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "toy" / "run.py"), f"trainer.run_dir={run_dir}",
            "trainer.total_training_steps=10", "trainer.test_freq=10", "checkpoint.save_freq=5"]


def _linked_run_dir(toy_run: Path, tmp_path: Path, name: str = "run") -> Path:
    """A fresh run folder that shares the toy run's tokenizer, warm start and data (made once per module)."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    for made_once in ("base", "tokenizer", "data"):
        (run_dir / made_once).symlink_to(toy_run / made_once)
    return run_dir


def _torchrun(ranks: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", _free_port()]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One uninterrupted 20-step toy run (its first 10 steps are those of `_toy_command`'s 10-step runs)."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    env = {**os.environ, "MASTER_PORT": _free_port()}
    proc = subprocess.run([*_toy_command(run_dir), "trainer.total_training_steps=20"], cwd=run_dir.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir.parent / "console.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_toy_example_learns(toy_run):
    run_dir = toy_run
    rows = _rows(run_dir)
    val = {row["step"]: row["val/acc_avg@4"] for row in rows if "val/acc_avg@4" in row}
    assert 0.1 < val[0] < 0.8, f"the warm start should be right sometimes, not always: {val[0]}"
    assert val[20] >= val[0] + MARGIN, f"validation did not rise enough: {val}"
    train = [row for row in rows if "critic/acc_mean" in row]
    assert len(train) == 20 and all(row["rollout/probe_logp_max_diff"] < 1e-4 for row in train)
    # The engine's log-probs of what it sampled are the trainer's old log-probs (float32 on both sides).
    assert all(row["rollout/trainer_logp_mean_diff"] <= row["rollout/trainer_logp_max_diff"] < 1e-4 for row in train)
    assert all(key in train[0] for key in ("actor/pg_clipfrac_high", "actor/entropy", "actor/grad_norm",
                                          "sampling/gen_batches", "timing/update", "timing/reward", "perf/tokens_per_s"))
    # The engines' throughput counts every generated response, the groups dynamic sampling dropped too (rollout.n 8).
    generated = [row["perf/generated_tokens_per_s"] * row["timing/generate"] for row in train]
    kept_tokens = [row["response_length/mean"] * row["sampling/groups_kept"] * 8 for row in train]
    assert all(g >= k * (1 - 1e-9) for g, k in zip(generated, kept_tokens)), (generated, kept_tokens)
    assert any(g > k * 1.01 for g, k in zip(generated, kept_tokens)), "no step dropped a group"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000015", "step_000020"], checkpoints
    assert not (run_dir / "RUNNING").exists()  # the folder is free again
    # What a stop's warning must leave time for: each validation's time in its row, each save's on the console.
    validated = [row for row in rows if "val/acc_avg@4" in row]
    assert len(validated) == 3 and all(row["timing/validate"] > 0 for row in validated), validated
    console = (run_dir.parent / "console.txt").read_text()
    assert all(f"step {step}: checkpoint saved in " in console for step in (5, 10, 15, 20)), console[-3000:]
    assert re.search(r"step 10/20 .*step_s=\S+ validate_s=\S+ val/acc_avg@4=", console), console[-3000:]

    # Two responses as text each step and each validation, with how they scored.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    train_samples = [s for s in samples if s["split"] == "train"]
    per_step = [sum(s["step"] == step for s in train_samples) for step in range(1, 21)]
    kept = [row["sampling/groups_kept"] for row in train]
    assert per_step == [min(2, int(k)) for k in kept], (per_step, kept)  # the first completion of each kept group
    assert [s["step"] for s in samples if s["split"] == "val"] == [0, 0, 10, 10, 20, 20]
    for s in samples:
        assert s["acc"] in (0.0, 1.0) and s["finish_reason"] in ("stop", "length") and s["prompt"], s
        # The trainer's tokenizer is the warm start's: the chat template's newline survives (Qwen2's tokenizer
        # class, which a tokenizer folder next to the model's config.json would load, drops it).
        assert s["prompt"].startswith("Q:") and s["prompt"].endswith("\nA:"), s
        assert s["length"] >= 1 and s["response"] and s["ground_truth"].isdigit(), s

    plot = subprocess.run([sys.executable, "-m", "megatron_dapo", "plot", str(run_dir)], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_run_killed_after_a_checkpoint_resumes_where_it_stopped(toy_run, tmp_path):
    """kill -9 right after the step-5 checkpoint, start the same command again: it resumes from step 5
    and steps 6-10 are those of the uninterrupted run (same data, samples, rewards and updates)."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    env = {**os.environ, "MASTER_PORT": _free_port()}
    marker = run_dir / "checkpoints" / "step_000005" / "COMPLETE.json"
    proc = subprocess.Popen(_toy_command(run_dir), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"no step-5 checkpoint (exit code {proc.poll()})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / "step_000010").exists(), "the run finished before it was killed"
    stale = [run_dir / "checkpoints" / "step_000007.partial", run_dir / "checkpoints" / "step_000008"]  # crashed saves
    for folder in stale:
        (folder / "model").mkdir(parents=True)
    converted = run_dir / "checkpoints" / "step_000005_hf"  # a user's conversion beside the checkpoints: not a save's
    (converted / "model").mkdir(parents=True)

    again = subprocess.run(_toy_command(run_dir), cwd=tmp_path, env={**env, "MASTER_PORT": _free_port()},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout and "step_000005" in again.stdout, again.stdout[-2000:]
    assert "the config differs" not in again.stdout, again.stdout[-2000:]
    assert not any(folder.exists() for folder in stale)  # swept at the next save
    assert (converted / "model").is_dir()

    def by_step(rows):  # the last row of each training step (a step may have been logged before the kill)
        return {row["step"]: row for row in rows if "critic/acc_mean" in row}

    expected, resumed = by_step(_rows(toy_run)), by_step(_rows(run_dir))
    assert sorted(resumed) == list(range(1, 11))
    # The run's history: the rows the killed attempt logged after step 5 are superseded by the resumed ones.
    history = [row["step"] for row in read_metrics(run_dir) if "critic/acc_mean" in row]
    assert history == list(range(1, 11)), history
    assert any(row.get("resumed_from", "").endswith("step_000005") for row in _rows(run_dir))
    # So do the responses as text: the killed attempt's after step 5 are superseded too.
    train_samples = [s["step"] for s in read_samples(run_dir) if s["split"] == "train"]
    assert train_samples == sorted(train_samples) and set(train_samples) == set(range(1, 11)), train_samples
    assert [s["step"] for s in read_samples(run_dir) if s["split"] == "val"] == [0, 0, 10, 10]
    for step in range(6, 11):
        for key in ("critic/acc_mean", "sampling/gen_batches", "response_length/mean", "actor/pg_loss",
                    "actor/grad_norm", "actor/pg_clipfrac_high"):
            a, b = resumed[step][key], expected[step][key]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step} {key}: resumed {a}, uninterrupted {b}"

    # Resuming with other settings is allowed (a longer run, a new learning rate) and said aloud, each one named.
    longer = subprocess.run([*_toy_command(run_dir), "trainer.total_training_steps=11", "actor.optim.lr=5e-4"],
                            cwd=tmp_path, env={**env, "MASTER_PORT": _free_port()}, capture_output=True, text=True,
                            timeout=900)
    assert longer.returncode == 0, longer.stderr[-4000:]
    assert ("the config differs from the one the resumed run last started with (2): actor.optim.lr: 0.001 -> 0.0005; "
            "trainer.total_training_steps: 10 -> 11") in longer.stdout, longer.stdout[-2000:]

    # Not so the optimizer's layout, whose state would not load (megatron-core: a bare KeyError).
    other = subprocess.run([*_toy_command(run_dir), "trainer.total_training_steps=12",
                            "parallel.use_distributed_optimizer=false"], cwd=tmp_path,
                           env={**env, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert other.returncode != 0 and ("was saved with parallel.use_distributed_optimizer=true, whose optimizer state "
                                      "this run (=false) cannot load") in other.stderr, other.stderr[-4000:]
    # The folder's config.yaml is still that of the attempt that trained last, for the next attempt to be compared with.
    assert "total_training_steps: 11" in (run_dir / "config.yaml").read_text()

    # Nor another data order (here another trainer.seed; other files, or the same in another order, alike): refused
    # before the model is built, with the config's exit status.
    reseeded = subprocess.run([*_toy_command(run_dir), "trainer.total_training_steps=12", "trainer.seed=2"],
                              cwd=tmp_path, env={**env, "MASTER_PORT": _free_port()}, capture_output=True, text=True,
                              timeout=900)
    assert reseeded.returncode == 2, reseeded.stderr[-4000:]
    assert (f"resuming from {run_dir / 'checkpoints' / 'step_000011'}: the saved prompt stream" in reseeded.stderr
            and "seed=1) does not match this one" in reseeded.stderr), reseeded.stderr[-4000:]

    # A fresh start (checkpoint.resume=false) into this folder is refused before it writes anything there.
    config, metrics = (run_dir / "config.yaml").read_text(), (run_dir / "metrics.jsonl").read_text()
    fresh = subprocess.run([*_toy_command(run_dir), "checkpoint.resume=false", "trainer.seed=2"], cwd=tmp_path,
                           env={**env, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 2, fresh.stderr[-4000:]
    assert "holds an earlier run's checkpoints (the newest is step_000011)" in fresh.stderr, fresh.stderr[-4000:]
    assert (run_dir / "config.yaml").read_text() == config and (run_dir / "metrics.jsonl").read_text() == metrics


def test_a_folder_made_with_another_seed_is_refused_before_training(toy_run, tmp_path):
    """A run folder whose data and warm start trainer.seed=1 made (and no complete checkpoint: the first save was
    cut short) is not used for seed 2: its prompts and model are seed 1's."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    (run_dir / "checkpoints" / "step_000001.partial").mkdir(parents=True)
    proc = subprocess.run([*_toy_command(run_dir), "--prepare-only", "trainer.seed=2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-4000:]
    assert f"{run_dir} holds the data and warm start of trainer.seed=1, not 2" in proc.stderr, proc.stderr[-4000:]


def test_a_stop_asked_for_during_a_save_stops_on_that_checkpoint(toy_run, tmp_path):
    """A STOP file written while the step-1 checkpoint is being saved (its folder is still .partial, its Hugging
    Face copy to come): the run stops on that checkpoint instead of training step 2 and saving again, which would
    take more than the time a Slurm warning leaves."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    saving = run_dir / "checkpoints" / "step_000001.partial"
    proc = subprocess.Popen([*_toy_command(run_dir), "trainer.val_before_train=false", "checkpoint.save_freq=1",
                             "checkpoint.save_hf=true"], cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not saving.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    (run_dir / "STOP").touch()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"], out[-2000:]
    assert "stopping after step 1 (" in out and (run_dir / "checkpoints" / "step_000001" / "hf").is_dir(), out[-2000:]
    # Still there for the batch script to requeue on, marked as stopped on: the attempt that resumes deletes it.
    assert (run_dir / "STOP").read_text().startswith("honoured: the run stopped on this file after step 1")
    assert [row["step"] for row in read_metrics(run_dir) if "actor/lr" in row] == [1]


AFTER_STEP_1_REWARD = """
import os
from pathlib import Path

from megatron_dapo.reward.registry import math_dapo_reward


def score(response, ground_truth, extra_info):
    \"\"\"The toy's own reward for step 1's {calls} responses (counted in a file: the reward workers are processes);
    after them {after}.\"\"\"
    fd = os.open({count!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
        calls = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if calls <= {calls}:
        return math_dapo_reward(response, ground_truth, extra_info)
    {then}
"""

ASK_TO_STOP = ("every response is wrong, so every group is dropped as alike, and the first call asks the run to stop",
               "Path({stop!r}).touch()\n    return -1.0")
BREAK = ("it returns what no reward may: every response's reward fails", "return {{'reward': 1.0}}")


def _after_step_1(toy_run: Path, tmp_path: Path, run_dir: Path, kind: tuple[str, str]) -> str:
    """A reward file (its override) that is the toy's own for step 1's responses and then does `kind`."""
    step_1 = next(row for row in _rows(toy_run) if row["step"] == 1 and "critic/acc_mean" in row)
    calls = int(step_1["sampling/gen_batches"]) * 24 * 8  # the toy's data.gen_batch_size x rollout.n
    after, then = kind
    (tmp_path / "after_step_1.py").write_text(AFTER_STEP_1_REWARD.format(
        calls=calls, count=str(tmp_path / "calls"), after=after, then=then.format(stop=str(run_dir / "STOP"))))
    return "reward.functions.math_dapo=after_step_1.py:score"


def _by_step(rows: list[dict]) -> dict[int, dict]:
    """The last row of each training step."""
    return {row["step"]: row for row in rows if "critic/acc_mean" in row}


def test_a_stop_during_dynamic_sampling_leaves_the_step_untrained(toy_run, tmp_path):
    """A stop request, written while step 2's first generation batch is scored (every group alike, and
    max_num_gen_batches=0: nothing else would end its dynamic sampling), ends step 2's generation batches: step 2
    is not trained, step 1 (no save step) is saved, and the run stops. Started again with the toy's own reward, it
    resumes at step 1, and its step 2 is the uninterrupted run's: the same prompts and seeds, where an update from
    the groups kept so far would have been another step."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), "trainer.val_before_train=false", "trainer.total_training_steps=2"]
    proc = subprocess.run([*command, _after_step_1(toy_run, tmp_path, run_dir, ASK_TO_STOP),
                           "algorithm.filter_groups.max_num_gen_batches=0"],
                          cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"step 2: a stop was requested \(\S+STOP exists\): dynamic sampling ends after 1 generation "
                     r"batches with 0 of 8 groups; the step is not trained", proc.stderr), proc.stderr[-4000:]
    assert "stopping before step 2 (" in proc.stdout, proc.stdout[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"]
    assert sorted(_by_step(_rows(run_dir))) == [1]
    assert {s["step"] for s in read_samples(run_dir) if s["split"] == "train"} == {1}
    assert (run_dir / "STOP").read_text().startswith("honoured: the run stopped on this file after step 1")

    again = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout and "step_000001" in again.stdout, again.stdout[-2000:]
    resumed, expected = _by_step(_rows(run_dir)), _by_step(_rows(toy_run))
    assert sorted(resumed) == [1, 2]
    for key in ("critic/acc_mean", "sampling/gen_batches", "response_length/mean", "actor/pg_loss", "actor/grad_norm"):
        a, b = resumed[2][key], expected[2][key]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step 2 {key}: resumed {a}, uninterrupted {b}"


def test_a_validation_that_fails_keeps_the_step_it_follows(toy_run, tmp_path):
    """Step 1's validation fails (its reward fails on every response): the run stops with that error, but step 1,
    no save step, is saved first, with its metrics row and the validation marked as not run. The attempt that
    resumes (the reward mended) writes the row and validates step 1 before anything else."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), "trainer.val_before_train=false", "trainer.test_freq=1"]
    proc = subprocess.run([*command, "trainer.total_training_steps=2", _after_step_1(toy_run, tmp_path, run_dir, BREAK)],
                          cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode != 0
    assert "failed on every one of its" in proc.stderr, proc.stderr[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"], proc.stdout[-2000:]
    state = checkpoints.saved_trainer_state(run_dir / "checkpoints" / "step_000001")
    assert state["val_skipped"] and state["unlogged_row"]["step"] == 1, state
    assert not (run_dir / "metrics.jsonl").exists() or not _by_step(_rows(run_dir))

    again = subprocess.run([*command, "trainer.total_training_steps=1"], cwd=tmp_path,
                           env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "validating step 1" in again.stdout, again.stdout[-2000:]
    rows = [row for row in _rows(run_dir) if row["step"] == 1]
    assert any("critic/acc_mean" in row for row in rows) and any("val/acc_avg@4" in row for row in rows), rows


def test_a_sink_failing_at_a_save_step_stops_the_run_after_the_checkpoint(toy_run, tmp_path):
    """metrics.jsonl on a full disk (/dev/full): the row of step 1, the last step of a 1-step run, with a
    validation, cannot be written. The run stops with the error, and step 1's checkpoint is saved first, with the
    row, and without its Hugging Face copy (said). The attempt that resumes for a second step (the disk has room
    again) writes the copy and the row, validation included, and validates nothing again."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    command = [*_toy_command(run_dir), "trainer.val_before_train=false", "checkpoint.save_freq=1",
               "trainer.total_training_steps=2", "trainer.test_freq=1", "checkpoint.save_hf=true"]
    proc = subprocess.run([*command, "trainer.total_training_steps=1"], cwd=tmp_path,
                          env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert "step 1's metrics row could not be written to metrics.jsonl (OSError: [Errno 28] No space left on " \
           "device)" in proc.stderr, proc.stderr[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"], proc.stdout[-2000:]
    step_dir = run_dir / "checkpoints" / "step_000001"
    assert f"its metrics row could not be written: {step_dir} has no Hugging Face copy" in proc.stdout, proc.stdout
    assert not (step_dir / "hf").exists()
    assert checkpoints.is_complete(run_dir / "checkpoints" / "step_000001")
    kept = checkpoints.saved_trainer_state(run_dir / "checkpoints" / "step_000001")["unlogged_row"]
    assert kept["step"] == 1 and kept["sinks"] == ["metrics.jsonl"], kept
    (run_dir / "metrics.jsonl").unlink()
    again = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert ("step 1: writing its metrics row, which the attempt that saved this checkpoint could not write, into "
            "metrics.jsonl") in again.stdout, again.stdout[-2000:]
    assert (step_dir / "hf" / "config.json").is_file(), again.stdout[-2000:]
    assert "validating step 1" not in again.stdout, again.stdout[-2000:]
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2], rows
    assert rows[0] == {"step": 1, "time": rows[0]["time"], **kept["metrics"]}, rows[0]
    assert any(key.startswith("val/") for key in rows[0]) and "timing/step" in rows[0], rows[0]


def test_a_sink_failing_between_save_steps_keeps_the_step(toy_run, tmp_path):
    """metrics.jsonl on a full disk at step 1 of 2, no save step: the run stops with the error, step 1 saved first
    with its row (a run saving every 100 steps would otherwise lose up to 99)."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    proc = subprocess.run([*_toy_command(run_dir), "trainer.val_before_train=false", "trainer.total_training_steps=2"],
                          cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode != 0 and "No space left on device" in proc.stderr, proc.stderr[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"], proc.stdout[-2000:]
    kept = checkpoints.saved_trainer_state(run_dir / "checkpoints" / "step_000001")["unlogged_row"]
    assert kept["step"] == 1 and kept["sinks"] == ["metrics.jsonl"], kept


def test_a_validation_a_stop_skipped_runs_when_the_run_resumes(toy_run, tmp_path):
    """A stop asked for during the last step skips its validation for the checkpoint; the same command again
    validates that step, once: a third start finds the row and does not log another."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), "trainer.total_training_steps=1", "trainer.val_before_train=false"]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    (run_dir / "STOP").touch()  # newer than the process: kept at its start, seen after step 1
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert "its validation was skipped; the same command again runs it" in out, out[-2000:]
    assert not any(key.startswith("val/") for row in _rows(run_dir) for key in row)

    def validated():
        return [row["step"] for row in read_metrics(run_dir) if any(key.startswith("val/") for key in row)]

    for attempt in range(2):
        again = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                               capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stderr[-4000:]
        said = "validating step 1, whose validation the attempt that saved it did not log" in again.stdout
        assert said == (attempt == 0), again.stdout[-2000:]
        assert ("nothing to train: the run is at step 1, and trainer.total_training_steps is 1 (raise it to train "
                "on)") in again.stdout, again.stdout[-2000:]
        assert validated() == [1]


def test_a_folder_taken_over_during_a_save_gets_no_checkpoint(toy_run, tmp_path):
    """Another training takes the folder over while the step-1 checkpoint is being saved (this job was suspended
    past the lock's staleness, say): the save is not named step_000001, nothing is swept, and the run stops
    naming the newcomer, whose lock file stays."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    saving = run_dir / "checkpoints" / "step_000001.partial"
    proc = subprocess.Popen([*_toy_command(run_dir), "trainer.val_before_train=false", "checkpoint.save_freq=1"],
                            cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not saving.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    newcomer = {"host": "node-c", "pid": 7, "started": "now", "token": "newcomer"}
    (run_dir / "RUNNING").write_text(json.dumps(newcomer))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode != 0, out[-2000:]
    assert "was taken over by another training (host node-c, pid 7" in err, err[-4000:]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [saving.name], out[-2000:]
    assert json.loads((run_dir / "RUNNING").read_text()) == newcomer


def test_run_starts_from_a_converted_checkpoint(toy_run, tmp_path):
    """The trained policy published as a Hugging Face folder and converted back to megatron-core
    (`convert mcore-to-hf`, then `hf-to-mcore`): a run started from it with model.megatron_checkpoint
    validates at step 0 like the first run after its step 20, so the actor and the rollout engine
    both hold the trained weights, not model.path's warm start."""
    from megatron_dapo.convert.hf_to_mcore import hf_to_mcore
    from megatron_dapo.convert.mcore_to_hf import mcore_to_hf

    mcore_to_hf(toy_run / "checkpoints" / "step_000020", tmp_path / "policy-hf", dtype=torch.float32,
                hf_template=toy_run / "base", progress=False)
    hf_to_mcore(tmp_path / "policy-hf", tmp_path / "policy-mcore", progress=False)
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), "trainer.total_training_steps=1", f"model.megatron_checkpoint={tmp_path / 'policy-mcore'}"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    first = {row["step"]: row["val/acc_avg@4"] for row in _rows(toy_run) if "val/acc_avg@4" in row}
    started = [row["val/acc_avg@4"] for row in _rows(run_dir) if row["step"] == 0 and "val/acc_avg@4" in row]
    assert started and abs(started[0] - first[20]) <= 0.05 and started[0] >= first[0] + MARGIN, (started, first)

    # A checkpoint of another model (here: its marker says another vocabulary) is refused, the difference named;
    # megatron-core would load its embedding rows without checking their count.
    other = tmp_path / "other-mcore"
    shutil.copytree(tmp_path / "policy-mcore", other)
    marker = json.loads((other / "COMPLETE.json").read_text())
    vocab = marker["hf_config"]["vocab_size"]
    marker["hf_config"]["vocab_size"] = vocab + 64
    (other / "COMPLETE.json").write_text(json.dumps(marker))
    other_run = _linked_run_dir(toy_run, tmp_path, "other-run")
    proc = subprocess.run([*command, f"model.megatron_checkpoint={other}", f"trainer.run_dir={other_run}"],
                          cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode != 0
    assert (f"holds another model than model.path's config.json (vocab_size: checkpoint {vocab + 64}, model {vocab})"
            in proc.stderr), proc.stderr[-4000:]

    # The run goes on from its own checkpoint once its starting one is gone (pruned by the run it came from, say):
    # a resumed attempt reads nothing else. A fresh run folder names the key of the missing one.
    (tmp_path / "policy-mcore").rename(tmp_path / "moved")
    proc = subprocess.run([*command, "trainer.total_training_steps=2"], cwd=tmp_path,
                          env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000001'} at step 1" in proc.stdout, proc.stdout[-2000:]
    assert [row["step"] for row in read_metrics(run_dir) if "actor/lr" in row] == [1, 2]
    fresh = _linked_run_dir(toy_run, tmp_path, "fresh-run")
    proc = subprocess.run([*command, f"trainer.run_dir={fresh}"], cwd=tmp_path,
                          env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert (f"model.megatron_checkpoint={tmp_path / 'policy-mcore'}: checkpoint {tmp_path / 'policy-mcore'} does not "
            "exist") in proc.stderr, proc.stderr[-4000:]


def test_val_only_scores_the_last_checkpoint_as_the_run_did(toy_run, tmp_path):
    """trainer.val_only on a copy of the finished run: it loads step 20, pushes, validates once and exits,
    and the validation equals the one the run logged after step 20 (same weights, same seeds)."""
    import shutil

    run_dir = _linked_run_dir(toy_run, tmp_path)
    shutil.copytree(toy_run / "checkpoints", run_dir / "checkpoints")
    command = [*_toy_command(run_dir), "trainer.val_only=true"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rows(run_dir)
    assert len(rows) == 1 and rows[0]["step"] == 20, rows
    expected = next(row for row in _rows(toy_run) if row["step"] == 20 and "val/acc_avg@4" in row)
    for key in ("val/acc_avg@4", "val/pass@4", "val/score_mean"):
        assert rows[0][key] == expected[key], (key, rows[0][key], expected[key])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000015", "step_000020"]


def test_sglang_rollout_without_a_gpu_is_refused_naming_the_fix(toy_run, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: SGLang would start here")
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), "rollout.name=sglang"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "rollout.name=sglang needs CUDA GPUs" in proc.stderr and "set rollout.name=embedded" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]


@pytest.mark.parametrize(("engine", "key", "held"), [("embedded", "rollout.embedded.max_seq_len", 0),
                                                     ("sglang", "rollout.sglang.server_args.context_length", 2)])
def test_prompts_without_room_for_a_full_response_are_refused_at_start(toy_run, tmp_path, engine, key, held):
    """The toy's longest prompt is 8 tokens and its model has 64 positions: each limit is named, before any step
    (for SGLang before it would start, so on any machine). SGLang gives a request 2 tokens less than its context
    length."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), f"rollout.name={engine}", f"{key}=24", "data.max_response_length=60",
               "reward.overlong_buffer.len=8"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-4000:]
    spare = " less the 2 tokens SGLang keeps back" if held else ""
    for limit in (f"{64 - held}, the model's max_position_embeddings{spare}: lower",
                  f"{24 - held}, {key}{spare}: lower"):
        for files in ("data.train_files", "data.val_files"):
            assert (f"{files}: the longest prompt kept has 8 tokens; with data.max_response_length=60 that is 68 > "
                    f"{limit}") in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.count(f"or raise {key}") == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoints").exists(), proc.stderr[-4000:]


def test_data_files_that_cannot_be_read_are_named_by_their_key(toy_run, tmp_path):
    """A missing validation file is named before the ranks start; one without a prompt left once they read it. Both
    as config errors (exit code 2, no traceback), as is a typo in the example's own overrides."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    env = {**os.environ, "MASTER_PORT": _free_port()}
    missing = subprocess.run([*_toy_command(run_dir), f"data.val_files=[{tmp_path / 'gone.jsonl'}]"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=900)
    assert missing.returncode == 2, missing.stderr[-4000:]
    assert f"config error: data.val_files: data file {tmp_path / 'gone.jsonl'} does not exist" in missing.stderr, missing.stderr
    (tmp_path / "empty.jsonl").write_text("")
    empty = subprocess.run([*_toy_command(run_dir), f"data.val_files=[{tmp_path / 'empty.jsonl'}]"], cwd=tmp_path,
                           env={**env, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert empty.returncode == 2, empty.stderr[-4000:]
    assert "config error: data.val_files: no prompts left in" in empty.stderr, empty.stderr[-4000:]
    typo = subprocess.run([*_toy_command(run_dir), "trainer.seeed=3"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert typo.returncode == 2 and "config error: unknown key trainer.seeed (did you mean trainer.seed?)" in \
        typo.stderr, typo.stderr[-4000:]
    for proc in (missing, empty, typo):
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert not (run_dir / "checkpoints").exists()


def test_a_folder_another_training_holds_is_refused_untouched(toy_run, tmp_path):
    """The same command started twice: the second stops at once, naming the first, and changes nothing in the
    folder (not its config.yaml, not its STOP file)."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom megatron_dapo.trainer.lock import RunLock\n"
         "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run_dir / "STOP").touch()  # the first run's stop request
        proc = subprocess.run(_toy_command(run_dir), cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"trainer.run_dir={run_dir} is in use by a training that is still running" in proc.stderr, proc.stderr
    assert f"pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert (run_dir / "STOP").exists() and not (run_dir / "config.yaml").exists()


def test_two_ranks_with_an_engine_each(toy_run, tmp_path):
    """DP2 with rollout.engines=2: each rank hosts an embedded engine that samples half of every batch
    and takes its weights from its own replica; the probe agrees on both after every push."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_torchrun(2), *_toy_command(run_dir)[1:], "rollout.engines=2", "trainer.total_training_steps=3",
               "trainer.test_freq=3", "checkpoint.save_freq=0", "logging.progress_interval_s=0"]
    proc = subprocess.run(command, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0 hosts rollout engine 0 of 2" in proc.stdout and "rank 1 hosts rollout engine 1 of 2" in proc.stdout
    # a progress line after every generation batch (progress_interval_s=0), from rank 0 only
    assert proc.stderr.count("step 1: generation batch 1: ") == 1, proc.stderr[-4000:]
    assert re.search(r"step 3: generation batch \d+: 8/8 groups kept, \d+ all-correct and \d+ all-wrong dropped",
                     proc.stderr), proc.stderr[-4000:]
    assert proc.stderr.count("step 3: update took ") == 1 and "step 3: reshard took " in proc.stderr, proc.stderr[-4000:]
    rows = _rows(run_dir)
    train = [row for row in rows if "critic/acc_mean" in row]
    assert len(train) == 3 and all(row["rollout/probe_logp_max_diff"] < 1e-4 for row in train), train
    assert any("val/acc_avg@4" in row for row in rows if row["step"] == 3)


def test_an_engine_error_on_any_rank_stops_every_rank(toy_run, tmp_path):
    """Both engines' hosts fail in a rollout (each finds, scoring its share, that the reward function fails on
    every response): rank 0 raises with the engine named and rank 1 stops on rank 0's word, instead of waiting
    for a collective that never comes."""
    (tmp_path / "broken.py").write_text(BROKEN_REWARD)
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_torchrun(2), *_toy_command(run_dir)[1:], "rollout.engines=2",
               "reward.functions.math_dapo=broken.py:score"]
    proc = subprocess.run(command, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"RolloutError: rollout engine 0 \(rank 0; its share: the batch's prompts 0 to \d+\): RuntimeError: "
                     "the reward function of data_source 'math_dapo' failed on every one", proc.stderr), \
        proc.stderr[-4000:]
    assert "rank 0 failed during rollout: RolloutError: rollout engine 0 (rank 0;" in proc.stderr, proc.stderr[-4000:]


def test_a_reward_file_failing_on_one_rank_stops_every_rank_at_start(toy_run, tmp_path):
    """A reward file that imports on rank 0 and not on rank 1 (a package missing on one node, say): rank 1
    names the file and the key, and rank 0 stops at the same point with rank 1's message, before the
    actor is built, rather than going on alone into the actor's collectives."""
    (tmp_path / "node_reward.py").write_text(
        "import os\n"
        "if os.environ['RANK'] == '1':\n"
        "    import a_package_missing_on_this_node\n"
        "def score(response, ground_truth, extra_info):\n"
        "    return 1.0\n")
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_torchrun(2), *_toy_command(run_dir)[1:], "reward.functions.math_dapo=node_reward.py:score"]
    proc = subprocess.run(command, cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "a_package_missing_on_this_node" in proc.stderr and "reward.functions.math_dapo" in proc.stderr, \
        proc.stderr[-4000:]
    assert "[found on rank 1; every rank stops]" in proc.stderr, proc.stderr[-4000:]  # rank 0's words
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("mini_batch, caught_by", [(4, "the loss's check of the next mini-batch's log-probs"),
                                                   (8, "the trainer's probe after the push")])
def test_diverged_weights_stop_the_run_named_as_such(toy_run, tmp_path, mini_batch, caught_by):
    """A learning rate of 1e30 sends the weights to inf in the first optimizer step: the run stops at the next
    forward pass (with 8 groups a mini-batch, the step's only update is followed by the push and the probe)
    saying the policy's weights diverged, not that the push went wrong nor a bare 'not finite', and saves
    nothing."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), "actor.optim.lr=1e30", "actor.optim.lr_warmup_steps=0",
               f"actor.ppo_mini_batch_size={mini_batch}", "trainer.val_before_train=false", "checkpoint.save_freq=1"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    expected = {4: "logp is not finite at sample", 8: "after the weight push of step 1 the trainer's own log-probs"}
    assert expected[mini_batch] in proc.stderr, (caught_by, proc.stderr[-4000:])
    assert "its weights have diverged (NaN or inf)" in proc.stderr, proc.stderr[-4000:]
    assert "differ from the trainer's" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_a_model_path_holding_nan_stops_at_the_start_named_as_such(toy_run, tmp_path):
    """The probe at a fresh start: the actor's own log-probs are not finite, because model.path's weights are not
    (a broken conversion, say); said so before anything generates, not as a training that diverged. The same for
    a start from a Megatron checkpoint of such weights (model.megatron_checkpoint), named as the source."""
    from safetensors.torch import load_file, save_file

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for made_once in ("tokenizer", "data"):
        (run_dir / made_once).symlink_to(toy_run / made_once)
    shutil.copytree(toy_run / "base", run_dir / "base")
    weights = load_file(run_dir / "base" / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, run_dir / "base" / "model.safetensors", metadata={"format": "pt"})
    proc = subprocess.run(_toy_command(run_dir), cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(r"at the start, where each engine loaded model.path itself and the trainer built the actor from "
                     r"it, the trainer's own log-probs of the probe are not finite: model.path's weights \(\S+base\) "
                     r"hold NaN or inf", proc.stderr), proc.stderr[-4000:]
    assert "diverged" not in proc.stderr
    assert not (run_dir / "samples.jsonl").exists() or "train" not in (run_dir / "samples.jsonl").read_text()

    # The same weights as the Megatron checkpoint the actor starts from (model.megatron_checkpoint): named as such.
    from megatron_dapo.convert.hf_to_mcore import hf_to_mcore

    hf_to_mcore(run_dir / "base", tmp_path / "mcore", progress=False)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    proc = subprocess.run([*_toy_command(run_dir), f"model.megatron_checkpoint={tmp_path / 'mcore'}"], cwd=tmp_path,
                          env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (f"after the weight push at the start the trainer's own log-probs of the probe are not finite: "
            f"model.megatron_checkpoint's weights ({tmp_path / 'mcore'}) hold NaN or inf") in proc.stderr, \
        proc.stderr[-4000:]
    assert "diverged" not in proc.stderr


def test_probe_threshold_follows_precision_and_stops_the_run(toy_run, tmp_path):
    """A bf16 engine behind the float32 trainer: the probe's log-probs differ by bf16 rounding (~0.03 on average
    here). The default threshold for mixed precision lets the run train and logs the difference; the float32
    default, given explicitly, stops it with both figures and the engine named and nothing generated or saved, at the
    start: the engine loaded model.path itself, and is checked before its first generation as after every push."""
    from megatron_dapo.rollout.config import PARITY_FLOAT32, PARITY_HALF

    runs = {}
    for name, extra in (("default", []), ("float32", [f"rollout.parity_threshold={PARITY_FLOAT32}"])):
        (tmp_path / name).mkdir()
        run_dir = _linked_run_dir(toy_run, tmp_path / name)
        command = [*_toy_command(run_dir), "rollout.embedded.dtype=bfloat16", "trainer.total_training_steps=1",
                   "trainer.val_before_train=false", "checkpoint.save_freq=1", *extra]
        runs[name] = run_dir, subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                                             capture_output=True, text=True, timeout=300)
    run_dir, proc = runs["default"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    from megatron_dapo.cli import KNOWN_NOISE  # and the run's output is free of megatron-core's known noise

    assert not [m for _, m, *_ in KNOWN_NOISE if re.search(m, proc.stderr)], proc.stderr[-4000:]
    assert "layers: megatron-core's local spec" in proc.stdout, proc.stdout[-2000:]
    row = next(row for row in _rows(run_dir) if "critic/acc_mean" in row)
    assert PARITY_FLOAT32 < row["rollout/probe_logp_mean_diff"] < PARITY_HALF, row
    assert row["rollout/probe_logp_mean_diff"] <= row["rollout/probe_logp_max_diff"], row
    run_dir, proc = runs["float32"]
    assert proc.returncode != 0
    assert re.search(r"at the start, where each engine loaded model.path itself and the trainer built the actor from "
                     r"it, rollout engine 0 of 1 \(rank 0, weights from data-parallel replica 0\): its log-probs of the probe "
                     r"differ from the trainer's by [0-9.e-]+ on average, "
                     r"[0-9.e-]+ at most \(> rollout.parity_threshold=0.001\): the engine is not running the trainer's "
                     r"weights", proc.stderr), proc.stderr[-4000:]
    assert not (run_dir / "samples.jsonl").exists() or "train" not in (run_dir / "samples.jsonl").read_text()
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_actor_offload_changes_no_step(toy_run, tmp_path):
    """actor.offload=true: the actor's weights and optimizer state go to host memory while the engine
    generates, and come back for training. Steps 1-3 equal the first run's; the run then resumes from
    its step-3 checkpoint (pushed and probed with the actor offloaded around it) and step 4 equals too."""
    run_dir = _linked_run_dir(toy_run, tmp_path)
    for steps in (3, 4):
        command = [*_toy_command(run_dir), "actor.offload=true", f"trainer.total_training_steps={steps}",
                   "trainer.val_before_train=false", "checkpoint.save_freq=2"]
        proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "step_000003" in proc.stdout, proc.stdout[-2000:]
    expected = {row["step"]: row for row in _rows(toy_run) if "critic/acc_mean" in row}
    moved = {row["step"]: row for row in _rows(run_dir) if "critic/acc_mean" in row}
    assert sorted(moved) == [1, 2, 3, 4]
    for step, row in moved.items():
        assert row["actor/offloaded_gb"] > 0 and row["timing/actor_offload"] > 0, row
        assert row["rollout/probe_logp_max_diff"] < 1e-4, row
        for key in ("critic/acc_mean", "response_length/mean", "actor/pg_loss", "actor/grad_norm"):
            a, b = row[key], expected[step][key]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {step} {key}: with offload {a}, without {b}"


LAST_DIGIT_REWARD = '''
from megatron_dapo.reward.registry import RewardResult


def last_digit(response, ground_truth, extra_info):
    right = response.strip() == f"Answer: {ground_truth}"
    return RewardResult(score=1.0 if right else -1.0, acc=float(right), extra={"chars": float(len(response))})
'''


def test_a_reward_function_from_the_config(toy_run, tmp_path):
    """Half the validation prompts get a data_source the package does not know. Without a function for it
    the run stops at start-up naming the file's key, the rows and the key to set; with
    reward.functions.last_digit pointing at a Python file it validates both sources, each with its own
    metrics, and the file's extra figure is logged."""
    rows = (toy_run / "data" / "val.jsonl").read_text().splitlines()
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({**json.loads(row), **({"data_source": "last_digit"} if i % 2 else {})}) + "\n"
                           for i, row in enumerate(rows)))
    (tmp_path / "my_reward.py").write_text(LAST_DIGIT_REWARD)
    run_dir = _linked_run_dir(toy_run, tmp_path)
    command = [*_toy_command(run_dir), f"data.val_files=[{val}]", "trainer.total_training_steps=1",
               "trainer.test_freq=1", "trainer.val_before_train=false", "checkpoint.save_freq=0"]
    env = {**os.environ, "MASTER_PORT": _free_port()}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"data.val_files: {len(rows) // 2} rows have data_source 'last_digit'" in proc.stderr, proc.stderr[-4000:]
    assert "set reward.functions.last_digit:" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([*command, "reward.functions.last_digit=my_reward.py:last_digit",
                           "logging.val_generations=true"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = _rows(run_dir)[-1]
    assert row["step"] == 1
    for source in ("math_dapo", "last_digit"):
        assert 0 <= row[f"val/{source}/acc_avg@4"] <= 1 and f"val/{source}/pass@4" in row, row
    both = (row["val/math_dapo/acc_avg@4"] + row["val/last_digit/acc_avg@4"]) / 2
    assert abs(row["val/acc_avg@4"] - both) < 1e-9, row
    assert row["val/chars_mean"] > 0, row
    # logging.val_generations: every validation response, and the metrics add up from them
    responses = [json.loads(line) for line in (run_dir / "val_generations" / "step_000001.jsonl").read_text().splitlines()]
    assert len(responses) == 4 * len(rows)
    for source in ("math_dapo", "last_digit"):
        mine = [r for r in responses if r["data_source"] == source]
        assert len(mine) == 2 * len(rows)
        assert abs(sum(r["acc"] for r in mine) / len(mine) - row[f"val/{source}/acc_avg@4"]) < 1e-9
    assert all(set(r["extra"]) == {"chars"} for r in responses if r["data_source"] == "last_digit")
    assert any(r["pred"] for r in responses if r["data_source"] == "math_dapo")  # the answer the verifier read


FLAKY_REWARD = '''
from megatron_dapo.reward.math_dapo import compute_score
from megatron_dapo.reward.registry import RewardResult


def score(response, ground_truth, extra_info):
    """The toy's verifier with a task figure of its own, failing for numbers ending in 1 to 3."""
    if ground_truth in "0123":
        raise RuntimeError("cannot score this one")
    verdict = compute_score(response, ground_truth)
    return RewardResult(score=verdict.score, acc=verdict.acc, extra={"right": verdict.acc})
'''


def test_dynamic_sampling_on_a_task_figure_with_failing_rewards(toy_run, tmp_path):
    """algorithm.filter_groups.metric names a task's own figure that failed rewards do not give: those responses
    are left out of the variance test and counted, and the run trains on. A misspelt figure, which drops every
    group, stops the run once a step's max_num_gen_batches (4) have passed, naming the key and the figures the
    rewards give. (The data's prompts are under
    another column here, named by data.prompt_key.)"""
    (tmp_path / "flaky.py").write_text(FLAKY_REWARD)
    run_dir = _linked_run_dir(toy_run, tmp_path)
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (toy_run / "data" / f"{split}.jsonl").read_text().splitlines()]
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({("question" if k == "prompt" else k): v for k, v in row.items()}) + "\n" for row in rows))
    command = [*_toy_command(run_dir), "trainer.total_training_steps=1", "trainer.val_before_train=false",
               "trainer.test_freq=0", "checkpoint.save_freq=0", "reward.functions.math_dapo=flaky.py:score",
               f"data.train_files=[{tmp_path / 'train.jsonl'}]", f"data.val_files=[{tmp_path / 'val.jsonl'}]",
               "data.prompt_key=question"]
    env = {**os.environ, "MASTER_PORT": _free_port()}
    proc = subprocess.run([*command, "algorithm.filter_groups.metric=rigth"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert re.search(r"algorithm.filter_groups.metric='rigth': none of the \d+ rewards scored in 4 generation "
                     r"batches \(by step 1\) gives such a figure \(they give acc, right, score, seq_final_reward, "
                     r"seq_reward\)", proc.stderr), \
        proc.stderr[-4000:]
    proc = subprocess.run([*command, "algorithm.filter_groups.metric=right"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = _rows(run_dir)[-1]
    assert row["step"] == 1 and row["sampling/metric_missing"] >= 8, row  # a failing prompt: 8 responses
    assert row["sampling/groups_dropped_unscored"] > 0 and row["sampling/groups_kept"] > 0, row  # the failing prompt
    assert "actor/pg_loss" in row, row
    # Every failure of the step is counted by kind, those of the dropped groups too (critic/ counts the kept ones).
    # A failed response has no metric; metric_missing also counts those cut at the length limit (overlong filtering).
    assert row["sampling/metric_missing"] >= row["reward/failed"] == row["reward/failed_error"], row
    assert row["reward/failed"] > row["critic/reward_failed"] and row["reward/failed_timeout"] == 0, row
    # Without dynamic sampling a step draws train_batch_size (8) prompts, not gen_batch_size (24), and trains on
    # them all, the failed responses masked out.
    run_dir = _linked_run_dir(toy_run, tmp_path, "unfiltered")
    proc = subprocess.run([*command, "algorithm.filter_groups.enable=false", "trainer.total_training_steps=2",
                           f"trainer.run_dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = _rows(run_dir)[-1]
    assert row["step"] == 2 and row["sampling/gen_batches"] == 1 and row["sampling/groups_generated"] == 8, row
    assert row["sampling/groups_kept"] == 8 and row["sampling/groups_trimmed"] == 0, row
    assert "actor/pg_loss" in row and row["critic/reward_failed"] > 0, row


BROKEN_REWARD = '''
def score(response, ground_truth, extra_info):
    return {"reward": 1.0}  # neither a number, a RewardResult nor a mapping with "score": every sample fails
'''


def test_a_reward_function_failing_on_every_response_stops_the_run_naming_it(toy_run, tmp_path):
    """A reward function that fails on every one of a generation batch's responses is broken, not strict: the run
    stops with the failure named instead of dropping every group, step after step."""
    (tmp_path / "broken.py").write_text(BROKEN_REWARD)
    run_dir = _linked_run_dir(toy_run, tmp_path)
    proc = subprocess.run([*_toy_command(run_dir), "trainer.total_training_steps=1", "trainer.val_before_train=false",
                           "reward.functions.math_dapo=broken.py:score"], cwd=tmp_path,
                          env={**os.environ, "MASTER_PORT": _free_port()}, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    # After its first 16 failures the rest of the batch is not sent to it.
    assert re.search(r"the reward function of data_source 'math_dapo' failed on every one of its 192 responses scored "
                     r"here \(bad_return 1\d, not_scored 1\d\d\); the first \([\w.-]+ (line|row) \d+\): bad_return: returned a mapping without "
                     r"'score' \(keys: reward\)", proc.stderr), proc.stderr[-4000:]


ONES_ONLY_REWARD = '''
from megatron_dapo.reward.math_dapo import compute_score


def score(response, ground_truth, extra_info):
    """The toy's verifier for numbers ending in 1; every other group scores alike and is dropped."""
    return compute_score(response, ground_truth).score if ground_truth == "1" else -1.0
'''


def test_checkpoints_with_a_hugging_face_copy(toy_run, tmp_path):
    """checkpoint.save_hf: each checkpoint has an hf folder that transformers loads with the run's tokenizer
    (here from a tokenizer-only model.tokenizer_path; the generation config stays model.path's). Its weights are
    the step-2 checkpoint's, as the converter writes them, not model.path's, and it goes with its checkpoint when
    keep_last deletes that. The same run decays its learning rate linearly to min_lr at its last optimizer step,
    the schedule moving by a full batch's 2 optimizer steps each training step whatever dynamic sampling kept:
    its reward varies only for numbers ending in 1, so a step keeps a few groups, one mini-batch's worth."""
    from megatron_dapo.actor.actor import learning_rate
    from megatron_dapo.actor.config import OptimConfig

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_dapo.convert.mcore_to_hf import mcore_to_hf

    run_dir = _linked_run_dir(toy_run, tmp_path)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (toy_run / "tokenizer" / name).is_file():
            (tokenizer_dir / name).write_text((toy_run / "tokenizer" / name).read_text())
    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 77}))
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 12345}))
    (tmp_path / "ones_only.py").write_text(ONES_ONLY_REWARD)
    command = [*_toy_command(run_dir), "trainer.total_training_steps=2", "trainer.val_before_train=false",
               "checkpoint.save_freq=1", "checkpoint.keep_last=1", "checkpoint.save_hf=true", "checkpoint.hf_dtype=fp32",
               f"model.tokenizer_path={tokenizer_dir}", "actor.optim.lr_decay_style=linear", "actor.optim.min_lr=1e-4",
               "actor.optim.lr_warmup_steps=1", "reward.functions.math_dapo=ones_only.py:score",
               "algorithm.filter_groups.max_num_gen_batches=1"]
    proc = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002"]
    hf = run_dir / "checkpoints" / "step_000002" / "hf"
    assert f"wrote {hf}" in proc.stdout, proc.stdout[-2000:]
    assert json.loads((hf / "generation_config.json").read_text()).get("eos_token_id") != 12345

    # the toy's batch of 8 groups makes 2 mini-batches of 4: schedule steps 0-1 in step 1, 2-3 in step 2 (the last)
    optim = OptimConfig(lr=1e-3, lr_warmup_steps=1, lr_decay_style="linear", min_lr=1e-4)
    schedule = [learning_rate(optim, i, last_step=3) for i in range(4)]
    assert schedule == pytest.approx([1e-3, 1e-3, 5.5e-4, 1e-4])  # warm-up of 1, then a line from step 1 to 3
    trained_steps = [row for row in _rows(run_dir) if "actor/lr" in row]
    assert trained_steps, "no step trained"
    assert any(row["sampling/groups_kept"] <= 4 for row in trained_steps), trained_steps  # a short step came first
    assert re.search(r"step \d: dynamic sampling kept \d of 8 groups after 1 generation batches .*; the step trains "
                     r"on those \(algorithm\.filter_groups\.max_num_gen_batches=1, on_exhausted=train\)", proc.stderr), \
        proc.stderr[-4000:]  # said on the console, not only in metrics.jsonl
    for row in trained_steps:
        minis = -(-int(row["sampling/groups_kept"]) // 4)  # fewer groups kept: fewer mini-batches
        first = (row["step"] - 1) * 2
        assert row["actor/lr"] == pytest.approx(sum(schedule[first:first + minis]) / minis), row
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(toy_run / "base", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    assert tokenizer.model_max_length == 77  # model.tokenizer_path's, over model.path's
    assert tokenizer.apply_chat_template([{"role": "user", "content": "472"}], add_generation_prompt=True,
                                         tokenize=False) == "Q:472\nA:"
    trained, started = model.state_dict(), base.state_dict()
    assert any(not torch.equal(trained[k], started[k]) for k in started)
    mcore_to_hf(run_dir / "checkpoints" / "step_000002", tmp_path / "direct", dtype=torch.float32, progress=False)
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "direct", dtype=torch.float32).state_dict()
    assert all(torch.equal(trained[k], direct[k]) for k in direct)

    # Killed between the checkpoint and its copy: the next start writes the copy, though nothing is left to train.
    shutil.rmtree(hf)
    again = subprocess.run(command, cwd=tmp_path, env={**os.environ, "MASTER_PORT": _free_port()},
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"{hf.parent} has no Hugging Face copy" in again.stdout and f"wrote {hf}" in again.stdout, again.stdout
    copied = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert all(torch.equal(copied[k], direct[k]) for k in direct)

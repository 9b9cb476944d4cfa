"""The toy sbatch script under a real one-node Slurm (Debian's slurmctld, slurmd, munge on localhost).

Submitted with 2 tasks it trains (DP 2), writes metrics and checkpoints; a second submission told
to stop mid-run (the signal Slurm sends ahead of a time limit) saves, requeues itself, and the
requeued job resumes from that checkpoint and finishes; a job cancelled mid-run is not requeued.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.required import unavailable
from tests.slurm.cluster import LocalSlurm, missing_programs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "toy.sbatch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_programs()
    if missing:
        unavailable("slurm", f"Slurm is not installed here (no {', '.join(missing)}); CI installs Debian's "
                             "slurmctld slurmd slurm-client munge (see .ci/run)")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm


def _submit(cluster: LocalSlurm, run_dir: Path, log_dir: Path, *overrides: str, env_run_dir: Path | None = None,
            options: tuple[str, ...] = ()) -> int:
    env = {"RUN_DIR": str(env_run_dir or run_dir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return cluster.sbatch(SCRIPT, *overrides, options=(f"--output={log_dir}/%x-%j.out", *options), env=env, cwd=ROOT)


def _log(log_dir: Path, job: int) -> str:
    path = log_dir / f"megatron-dapo-toy-{job}.out"
    return path.read_text() if path.exists() else "(no log)"


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in _rows(run_dir) if "critic/acc_mean" in row]


@pytest.fixture(scope="module")
def first_run(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("toy slurm #1")  # the paths the script hands on hold a space and a "#"
    run_dir = work / "run"
    job = _submit(cluster, run_dir, work, "trainer.total_training_steps=4", "trainer.test_freq=4",
                  "checkpoint.save_freq=2")
    state = cluster.wait_state(job, ENDED, timeout_s=900)
    return job, state, run_dir, work


def _linked_run_dir(first_run, tmp_path: Path) -> Path:
    """A fresh run folder sharing the first run's warm start, tokenizer and data (it must have completed)."""
    _, state, first_dir, _ = first_run
    assert state == "COMPLETED"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for made_once in ("base", "tokenizer", "data"):  # skip the warm start: the first run made it
        (run_dir / made_once).symlink_to(first_dir / made_once)
    return run_dir


def test_toy_sbatch_trains_with_two_tasks(first_run):
    job, state, run_dir, work = first_run
    log = _log(work, job)
    assert state == "COMPLETED", log[-4000:]
    assert "2 task(s) x 1 rank(s)" in log and "TP1 x PP1 x DP2 = 2 ranks" in log, log[-4000:]
    assert "task 0 on" in log and "task 1 on" in log and "gloo / NCCL over lo" in log
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert any("val/acc_avg@4" in row and row["step"] == 4 for row in _rows(run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert all((run_dir / "checkpoints" / name / "COMPLETE.json").is_file() for name in ("step_000002", "step_000004"))


def test_job_stopped_mid_run_requeues_and_resumes_from_its_checkpoint(cluster, first_run, tmp_path):
    run_dir = _linked_run_dir(first_run, tmp_path)
    # No periodic checkpoint: the only one before the end is the one the stop request makes. The run folder is
    # an argument, over the RUN_DIR variable, as a trainer mapping with the folder quoted (YAML, as the run reads
    # it): the stop request must still reach it.
    job = _submit(cluster, run_dir, tmp_path, "trainer.total_training_steps=10", "trainer.test_freq=0",
                  "trainer.val_before_train=false", "checkpoint.save_freq=0", f'trainer={{run_dir: "{run_dir}"}}',
                  env_run_dir=tmp_path / "not-the-run")
    deadline = time.monotonic() + 600
    while len(_steps(run_dir)) < 2 and cluster.state(job) not in ENDED and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_steps(run_dir)) >= 2, _log(tmp_path, job)[-4000:]
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))  # what Slurm sends ahead of a time limit

    # Requeued: pending again, and the node is done with the first run. Starting it within the second of
    # the requeue makes slurmd refuse it ("credential revoked": revocations have one-second resolution).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING" and cluster.node_idle():
            break
        time.sleep(0.5)
    assert cluster.job(job).get("Restarts") == "1", _log(tmp_path, job)[-4000:]
    time.sleep(2)
    cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now")  # skip Slurm's wait before a requeued start
    state = cluster.wait_state(job, ENDED, timeout_s=900)
    log = _log(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]

    stopped = [line for line in log.splitlines() if line.startswith("stopping after step")]
    assert len(stopped) == 1 and "STOP exists" in stopped[0], log[-4000:]
    step = int(stopped[0].split()[3])
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:06d}'} at step {step}" in log, log[-4000:]
    assert "requeueing job" in log and "(restart 1)" in log
    assert _steps(run_dir) == list(range(1, 11)), "every step trained exactly once across the requeue"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{step:06d}", "step_000010"]
    assert not (run_dir / "STOP").exists() and not (tmp_path / "not-the-run").exists()


def _sleeping_job(cluster: LocalSlurm, tmp_path: Path) -> int:
    """A one-task job that only sleeps: another job, running beside the one under test."""
    sleeper = tmp_path / "sleep.sbatch"
    sleeper.write_text("#!/bin/bash\nsleep 600\n")
    return cluster.sbatch(sleeper, options=("--ntasks=1", f"--output={tmp_path}/other-%j.out"))


def test_a_cancelled_job_is_not_requeued(cluster, first_run, tmp_path):
    """`scancel JOB` sends SIGTERM to the batch shell too, which asks the run to stop: the job must end as
    cancelled, not put itself back in the queue. Before that, a STOP file naming another job's attempt (what the
    batch script of a second job submitted into the folder writes when cancelled) does not stop the run; and the
    signalled batch shell replaces it, though that job still runs: this job's training holds the folder (one task
    each here, so that a sleeping job stands in for the other one beside the run)."""
    run_dir = _linked_run_dir(first_run, tmp_path)
    other = _sleeping_job(cluster, tmp_path)
    job = _submit(cluster, run_dir, tmp_path, "trainer.total_training_steps=50", "trainer.test_freq=0",
                  "trainer.val_before_train=false", "checkpoint.save_freq=0", options=("--ntasks=1",))
    try:
        deadline = time.monotonic() + 600
        while not _steps(run_dir) and cluster.state(job) not in ENDED and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _steps(run_dir), _log(tmp_path, job)[-4000:]
        assert cluster.state(other) == "RUNNING"
        (run_dir / "STOP").write_text(f"{other}.0\n")
        seen = len(_steps(run_dir))
        while len(_steps(run_dir)) < seen + 2 and cluster.state(job) not in ENDED and time.monotonic() < deadline:
            time.sleep(0.5)
        log = _log(tmp_path, job)
        assert len(_steps(run_dir)) >= seen + 2 and "stopping after" not in log, log[-4000:]
        assert f"names Slurm job attempt {other}.0, not this job's ({job}.0)" in log, log[-4000:]
        cluster.run("scancel", str(job))
        assert cluster.wait_state(job, ENDED, timeout_s=300) == "CANCELLED", _log(tmp_path, job)[-4000:]
        time.sleep(5)  # a requeue would come from the batch shell after the run ended
        info = cluster.job(job)
        log = _log(tmp_path, job)
        assert info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", (info, log[-4000:])
        assert "requeueing job" not in log, log[-4000:]
        assert "got SIGTERM: asking the run to save a checkpoint and stop" in log, log[-4000:]
    finally:
        cluster.run("scancel", str(other), check=False)


def test_the_stop_request_of_the_job_holding_the_folder_is_left_as_it_is(cluster, first_run, tmp_path):
    """A second job submitted into a run folder, signalled while its rank waits for the folder: the STOP file the
    job holding the folder wrote (its time-limit warning) stays as it is, or that run would not stop. Here a sleeping
    job holds the folder, RUNNING naming it on another host (the rank waits 45 s for its heartbeat)."""
    run_dir = _linked_run_dir(first_run, tmp_path)
    other = _sleeping_job(cluster, tmp_path)
    (run_dir / "RUNNING").write_text(json.dumps({
        "host": "another-node", "boot_id": "", "pid_ns": "", "pid": 4242, "pid_start": None,
        "slurm_job_id": str(other), "started": "2026-01-01T00:00:00+00:00", "token": "0" * 32, "beats": 1,
        "beat_at": "2026-01-01T00:00:00+00:00"}))
    (run_dir / "STOP").write_text(f"{other}.0\n")
    job = _submit(cluster, run_dir, tmp_path, "trainer.total_training_steps=4", options=("--ntasks=1",))
    try:
        deadline = time.monotonic() + 300
        while ("names a training on another host" not in _log(tmp_path, job) and cluster.state(job) not in ENDED
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert "names a training on another host" in _log(tmp_path, job), _log(tmp_path, job)[-4000:]
        cluster.run("scancel", "--batch", "--signal=USR1", str(job))
        while "left as it is" not in _log(tmp_path, job) and time.monotonic() < deadline:
            time.sleep(0.2)
        log = _log(tmp_path, job)
        assert (f"STOP is the request of job {other}, whose training holds the folder: left as it is (this job's "
                "ranks do not train there)") in log, log[-4000:]
        assert (run_dir / "STOP").read_text() == f"{other}.0\n"
    finally:
        cluster.run("scancel", str(job), check=False)
        cluster.run("scancel", str(other), check=False)
        cluster.wait_state(job, ENDED, timeout_s=300)


def test_a_run_with_nothing_left_to_train_is_not_requeued(cluster, first_run, tmp_path):
    """A stop asked for once the run has nothing left to train (here: started again on a finished run folder; on a
    cluster, a time-limit warning in the seconds a finished run takes to shut down) leaves the STOP file there:
    the job must still end, not put itself back in the queue to start, find nothing to do, and end."""
    import shutil

    run_dir = _linked_run_dir(first_run, tmp_path)
    first_dir = first_run[2]
    shutil.copytree(first_dir / "checkpoints", run_dir / "checkpoints")
    shutil.copy(first_dir / "config.yaml", run_dir / "config.yaml")
    job = _submit(cluster, run_dir, tmp_path, "trainer.total_training_steps=4", "trainer.test_freq=4",
                  "checkpoint.save_freq=2")
    deadline = time.monotonic() + 600
    # Once rank 0 has started (its first line names the layout): a STOP from before is taken for a stale one.
    while ", layout TP" not in _log(tmp_path, job) and cluster.state(job) not in ENDED and time.monotonic() < deadline:
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    assert cluster.wait_state(job, ENDED, timeout_s=600) == "COMPLETED", _log(tmp_path, job)[-4000:]
    time.sleep(5)  # a requeue would come from the batch shell after the run ended
    info, log = cluster.job(job), _log(tmp_path, job)
    assert "got SIGUSR1" in log and f"resumed from {run_dir / 'checkpoints' / 'step_000004'} at step 4" in log, log
    assert info.get("Restarts") == "0" and "requeueing job" not in log, (info, log[-4000:])
    assert "the run has finished (its last checkpoint is its last step)" in log and not (run_dir / "STOP").exists()


def test_a_stop_this_attempt_asked_for_before_its_ranks_started_is_kept(cluster, first_run, tmp_path):
    """A STOP file naming this job attempt ("JOB_ID.RESTART_COUNT", as the batch script writes it when signalled)
    but older than the ranks (asked for while srun and torchrun started them) stops the run after its first
    step; one naming the attempt before would be cleared (tests/trainer/test_stop.py). Written here while the
    job is held, so that it is older than the ranks whatever the timing."""
    run_dir = _linked_run_dir(first_run, tmp_path)
    job = _submit(cluster, run_dir, tmp_path, "trainer.total_training_steps=4", "trainer.test_freq=0",
                  "trainer.val_before_train=false", "checkpoint.save_freq=0", options=("--hold",))
    (run_dir / "STOP").write_text(f"{job}.0\n")
    time.sleep(1.1)  # file times in whole seconds on some file systems
    cluster.run("scontrol", "release", str(job))
    state = cluster.wait_state(job, ENDED, timeout_s=900)
    log = _log(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    stopped = [line for line in log.splitlines() if line.startswith("stopping after step")]
    assert len(stopped) == 1 and stopped[0].startswith("stopping after step 1 ") and "STOP exists" in stopped[0], \
        log[-4000:]
    assert _steps(run_dir) == [1], log[-4000:]

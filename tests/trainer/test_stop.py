"""Stop requests: a signal or a STOP file in the run folder (collective agreement is in tests/slurm)."""
import os
import signal

import pytest
import torch

from megatron_dapo.trainer.stop import SIGNALS, StopRequest


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_asks_to_stop_instead_of_killing(tmp_path, restore_handlers, sig):
    stop = StopRequest(tmp_path, torch.device("cpu"))
    assert stop.reason() is None and not stop.requested()
    os.kill(os.getpid(), sig)  # the default action would end this process
    assert stop.reason() == f"received {sig.name}" and stop.requested()


def test_a_run_that_never_polls_leaves_the_signals_alone(tmp_path, restore_handlers):
    """trainer.val_only: SIGTERM must end it, not set a flag nobody reads."""
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    StopRequest(tmp_path, torch.device("cpu"), catch_signals=False)
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before
    StopRequest(tmp_path, torch.device("cpu"))
    assert all(signal.getsignal(sig) != before[sig] for sig in SIGNALS)


def test_stop_file_asks_to_stop_and_clear_forgets_it(tmp_path, restore_handlers):
    stop = StopRequest(tmp_path, torch.device("cpu"))
    (tmp_path / "STOP").touch()
    assert stop.reason() == f"{tmp_path / 'STOP'} exists" and stop.requested()
    stop.clear()
    assert stop.reason() is None and not (tmp_path / "STOP").exists()


def test_a_stop_file_another_slurm_jobs_script_wrote_asks_nothing(tmp_path, restore_handlers, monkeypatch, capsys):
    """A second job submitted into the run folder, cancelled while its ranks start, has its batch script write
    STOP naming its own attempt: the run in the folder (another job) goes on, and says why once. Its own job's
    attempts, text written by hand, and any attempt outside Slurm still stop it."""
    stop, path = StopRequest(tmp_path, torch.device("cpu")), tmp_path / "STOP"
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    path.write_text("200.0\n")
    assert stop.reason() is None and not stop.requested() and stop.reason() is None
    shown = capsys.readouterr().out
    assert shown.count("names Slurm job attempt 200.0, not this job's (100.1)") == 1, shown
    for text in ("100.1\n", "100.0\n", "", "stop please\n", "200\n"):
        path.write_text(text)
        assert stop.reason() == f"{path} exists" and stop.requested(), text
    monkeypatch.delenv("SLURM_JOB_ID")
    path.write_text("200.0\n")
    assert stop.requested()
    path.unlink()
    path.mkdir()  # there, but no text to read: a request
    assert stop.reason() == f"{path} exists"


def test_a_stop_file_a_run_stopped_on_is_cleared_one_no_run_has_stopped_on_kept(tmp_path, monkeypatch):
    """At start: a STOP file an earlier attempt stopped on is deleted; one written since this process started (a
    stop asked for during start-up) is kept, and so is an older one written by hand that no run has stopped on
    (a stop asked for before the ranks started): the run stops after its first step."""
    import time

    from megatron_dapo.trainer.stop import clear_stale_stop, mark_honoured, process_started

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # the mark names no job attempt
    started = process_started()
    assert started <= time.time() and time.time() - started < 24 * 3600  # this test process, from /proc
    stop = tmp_path / "STOP"
    stop.touch()
    mark_honoured(stop, 7)  # the attempt this one resumes stopped on it
    assert stop.read_text() == "honoured: the run stopped on this file after step 7\n"
    os.utime(stop, (started - 60, started - 60))
    assert clear_stale_stop(stop, started) and not stop.exists()
    mark_honoured(stop, 8)  # a stop asked for by a signal: no file to mark, none made
    assert not stop.exists()
    for text in ("", "please stop\n"):  # by hand, before this process started
        stop.write_text(text)
        os.utime(stop, (started - 60, started - 60))
        assert not clear_stale_stop(stop, started) and stop.exists()
    stop.write_text("honoured: the run stopped on this file after step 7\n")  # marked while this process started
    assert not clear_stale_stop(stop, started) and stop.exists()
    assert not clear_stale_stop(tmp_path / "none", started)


def test_an_older_stop_file_of_this_slurm_attempt_is_kept(tmp_path, monkeypatch):
    """The sbatch scripts write the job attempt into STOP: one written by this attempt's batch script before the
    ranks started (Slurm's warning, an early scancel --batch) is kept, one of an earlier attempt (whose run
    crashed before stopping on it) is cleared; outside Slurm, any attempt's is an earlier one."""
    from megatron_dapo.trainer.stop import clear_stale_stop, mark_honoured, process_started, slurm_attempt

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_attempt() is None
    started, stop = process_started(), tmp_path / "STOP"
    stop.write_text("4242.3\n")
    os.utime(stop, (started - 60, started - 60))
    assert clear_stale_stop(stop, started, slurm_attempt()) and not stop.exists()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert slurm_attempt() == "4242.0"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert slurm_attempt() == "4242.3"
    for written, kept in (("4242.3\n", True), ("4242.2\n", False), ("17.0\n", False), ("", True)):
        stop.write_text(written)
        os.utime(stop, (started - 60, started - 60))
        assert clear_stale_stop(stop, started, slurm_attempt()) != kept and stop.exists() == kept, written
    stop.write_text("4242.3\n")
    mark_honoured(stop, 5)
    assert stop.read_text() == "honoured: the run stopped on this file after step 5 (Slurm job attempt 4242.3)\n"


def test_a_process_start_is_when_it_began():
    """A process started now says it began now (the boot time has a 1 s grain), whatever its uptime clock says."""
    import subprocess
    import sys
    import time

    before = time.time()
    out = subprocess.run([sys.executable, "-c", "from megatron_dapo.trainer.stop import process_started; "
                          "print(repr(process_started()))"], capture_output=True, text=True, check=True).stdout
    after = time.time()
    assert before - 1.5 <= float(out) <= after

"""Stop requests: the run saves a checkpoint after the step in progress and exits cleanly.

A request is a file named STOP in the run folder, which the sbatch scripts write when their own
shell is signalled (`--signal=B:USR1@SECONDS` ahead of the time limit, or SIGTERM): the file reaches
every node through the shared file system. SIGTERM and SIGUSR1 sent to a rank itself count too,
for ranks started without torchrun; under torchrun a SIGTERM gives the ranks only 30 s before it
kills them, and a SIGUSR1 to torchrun ends it, so the STOP file is the way there. Any rank's
request stops all of them.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = "STOP"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def process_started() -> float:
    """When this process began, in wall-clock seconds: the kernel's boot time plus the process's start after it
    (/proc/stat's btime and /proc/self/stat's starttime), never later than now; now where /proc has neither."""
    now = time.time()
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return min(now, boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return now


def slurm_attempt() -> str | None:
    """This Slurm job attempt as "JOB_ID.RESTART_COUNT" (what the sbatch scripts write into a STOP file), from the
    variables Slurm sets; None outside a Slurm job."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT') or 0}" if job else None


HONOURED = "honoured:"
"""How a STOP file a run has stopped on begins (`mark_honoured`): the next attempt deletes it."""

_ATTEMPT = re.compile(r"\d+\.\d+")
"""A job attempt as the sbatch scripts write it into STOP ("JOB_ID.RESTART_COUNT")."""


def _other_jobs_attempt(text: str) -> bool:
    """Whether a STOP file's text names an attempt of another Slurm job than the one this process runs in."""
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job and _ATTEMPT.fullmatch(text) and text.split(".")[0] != job)


def clear_stale_stop(path: Path, started: float, attempt: str | None = None) -> bool:
    """Delete a STOP file that asks nothing of this run: one a run has stopped on (`mark_honoured`), or one an
    earlier Slurm job attempt's batch script wrote (a run that crashed before it could stop on it). Kept: one
    written since `started` (a stop asked for while this process starts), one that names `attempt`
    (`slurm_attempt()`: this attempt's batch script wrote it, maybe while srun and torchrun were starting the
    ranks), and one written by hand that no run has stopped on yet. Whether it was deleted."""
    try:
        if path.stat().st_mtime >= started:
            return False
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not (text.startswith(HONOURED) or (_ATTEMPT.fullmatch(text) and text != attempt)):
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def mark_honoured(path: Path, step: int) -> None:
    """Rank 0 of a run stopping on the STOP file `path`: its text says so, for the next attempt to delete it. The
    file stays (the batch script requeues the job only while it is there); replaced whole, never read half
    written. Nothing when there is no STOP file (a stop asked for by a signal to a rank)."""
    if not path.is_file():
        return
    partial, attempt = path.with_name(path.name + ".partial"), slurm_attempt()
    partial.write_text(f"{HONOURED} the run stopped on this file after step {step}"
                       f"{f' (Slurm job attempt {attempt})' if attempt else ''}\n")
    partial.replace(path)


class StopRequest:
    def __init__(self, run_dir: Path, device: torch.device, catch_signals: bool = True):
        """catch_signals: SIGTERM and SIGUSR1 ask for a stop after the step instead of ending the process (False for
        a run that never polls, trainer.val_only: the signals then end it as usual)."""
        self.file = run_dir / STOP_FILE
        self.device = device
        self.signal: str | None = None
        self._ignored_shown = False
        if catch_signals and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)

    def clear(self) -> None:
        """Delete the STOP file (rank 0, after the run's last step: a request that came during it has nothing left
        to stop)."""
        self.file.unlink(missing_ok=True)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def reason(self) -> str | None:
        """Why this rank wants to stop, if it does. A STOP file another Slurm job's batch script wrote asks nothing
        of this run: a second job submitted into the run folder (which its ranks refuse) wrote it when it was
        cancelled or timed out while starting."""
        if self.signal:
            return f"received {self.signal}"
        try:
            text = self.file.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError:  # there but unreadable (a folder, no permission): a request all the same
            return f"{self.file} exists"
        if _other_jobs_attempt(text):
            if not self._ignored_shown and (not dist.is_initialized() or dist.get_rank() == 0):
                print(f"{self.file} names Slurm job attempt {text}, not this job's ({slurm_attempt()}): another "
                      "job's batch script wrote it (a second job started into this run folder); not stopping on it",
                      flush=True)
            self._ignored_shown = True
            return None
        return f"{self.file} exists"

    def requested(self) -> bool:
        """True on every rank when any rank has a request (collective)."""
        flag = torch.tensor([1.0 if self.reason() else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

"""A one-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd from Debian's packages.

The cluster lives in one folder (config, state, spool, logs); only the daemons this helper started
are stopped, by their PIDs. An already running munged (a developer's machine) is used as it is.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    def __init__(self, folder: Path, cpus: int | None = None):
        self.folder = folder
        self.cpus = cpus or os.cpu_count() or 2
        self.node = socket.gethostname()
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, timeout_s: float = 60.0) -> None:
        for sub in ("state", "spool", "logs"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        if not MUNGE_SOCKET.exists():
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
            self._spawn("munged", [_program("munged"), "--foreground", "--force"], user="munge")
            self._wait(lambda: MUNGE_SOCKET.exists(), "munged to open its socket", timeout_s)
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_program("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self.node_idle, f"node {self.node} to be idle", timeout_s)

    def stop(self) -> None:
        for name, proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.started.clear()

    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- commands -----------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True,
                              check=check, timeout=60, **kwargs)

    def sbatch(self, script: Path, *args: str, options: tuple[str, ...] = (), env: dict | None = None,
               cwd: Path | None = None) -> int:
        """Submit `script` with `args` (sbatch `options` first); returns the job id."""
        out = self.run("sbatch", "--parsable", *options, str(script), *args, env=env or {}, cwd=cwd, check=False)
        if out.returncode:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        out = self.run("scontrol", "show", "job", str(job), "-o", check=False)
        fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
        return fields.get("JobState", "UNKNOWN")

    def job(self, job: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", str(job), "-o")
        return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)

    def wait_state(self, job: int, states: set[str], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state(job)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout_s:.0f} s (wanted {sorted(states)}); "
                           f"logs in {self.folder / 'logs'}")

    # ---- internals ----------------------------------------------------------------------------

    def _config(self) -> str:
        f = self.folder
        return "\n".join([
            "ClusterName=megatron-dapo-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'logs' / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'logs' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "KillWait=30",
            "MinJobAge=600",
            "SchedulerParameters=sched_interval=2",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ])

    def _spawn(self, name: str, command: list[str], user: str | None = None) -> None:
        log = open(self.folder / "logs" / f"{name}.out", "ab")
        proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, user=user,
                                start_new_session=True)
        self.started.append((name, proc))

    def node_idle(self) -> bool:
        """The node runs nothing (and every daemon this helper started is alive)."""
        for name, proc in self.started:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.folder / 'logs'}")
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    @staticmethod
    def _wait(condition, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
            time.sleep(0.2)

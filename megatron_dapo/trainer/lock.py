"""One training per run folder: a RUNNING file that rank 0 holds and keeps fresh.

Two trainings in one folder (the same sbatch submitted twice, a run started by hand next to its
queued job) would each resume the same checkpoint, overwrite each other's config.yaml, append to one
metrics.jsonl, clear each other's STOP file, and each delete the other's half-written checkpoint as a
crashed save. The file names its holder (host, pid, SLURM job) and is rewritten every HEARTBEAT_S.

A new run takes the folder over when the holder is gone:
- on the holder's machine (same host name, boot and pid namespace: two clusters or containers may share a
  host name), at once when its pid no longer runs the process that wrote the file;
- from another host, when the file has not changed for STALE_S (read through a fresh open each time,
  which NFS revalidates, so attribute caching cannot make a live holder look stale).
A clean exit, a stop request and a Python error delete the file; SIGKILL and lost nodes leave it to
the rules above. A holder whose file was taken over (its job was suspended past STALE_S, say) finds
out at its next step, or before it names a checkpoint it was saving, and stops without saving.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = "RUNNING"
HEARTBEAT_S = 10.0
"""How often the holder rewrites the file."""
STALE_S = 45.0
"""How long a file from another host must stay unchanged before its holder counts as gone."""


class RunFolderInUse(RuntimeError):
    """Another live training holds the run folder."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat; tells a reused pid apart), or None when
    no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc: whether the pid runs at all
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    except OSError:
        return ""  # exists, unreadable: alive as far as we can tell
    return stat.rsplit(")", 1)[1].split()[19]  # the name in parentheses may hold spaces


def _machine() -> dict:
    """What tells this machine's pids apart from another's with the same host name: the kernel's boot and this
    process's pid namespace (empty where /proc does not say)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return {"boot_id": boot, "pid_ns": namespace}


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:  # a fresh open: NFS's close-to-open rule revalidates the file
            return f.read()
    except FileNotFoundError:
        return None


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def _describe(owner: dict) -> str:
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"host {owner.get('host')}, pid {owner.get('pid')}{job}, started {owner.get('started')}"


class RunLock:
    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 host: str | None = None):
        """host: this process's host name as the file records it (default: socket.gethostname())."""
        self.path = Path(run_dir) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.owner = {"host": host or socket.gethostname(), **_machine(), "pid": os.getpid(),
                      "pid_start": _process_start(os.getpid()),
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "token": uuid.uuid4().hex}
        self.held = False
        self.lost: str | None = None
        """Set by the heartbeat when another run has taken the file over: who did."""
        self._beats = 0
        self._beat_at = time.monotonic()
        """When the file was last written by this run (monotonic clock)."""
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, say=print) -> None:
        """Take the folder, or raise RunFolderInUse naming the live holder. `say` reports a wait for a holder
        on another host to prove itself alive."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            seen = _read(self.path)
            if seen is None:
                continue  # its holder just let go
            try:
                owner = json.loads(seen)
            except ValueError:
                owner = None  # half-written by a holder that died writing it, or not ours: stale if it stays so
            if self._same_machine(owner):
                pid = owner.get("pid")
                started = _process_start(pid) if isinstance(pid, int) and pid > 0 else None
                if started is not None and started in ("", owner.get("pid_start")):
                    raise self._in_use(owner, "its process is running on this host")
            elif self._changes(seen, owner, say):
                raise self._in_use(owner if isinstance(owner, dict) else {},
                                   f"its {LOCK_FILE} file changed within {self.stale_s:g} s")
            self._take_over(seen)
        self.held = True
        self._beat_at = time.monotonic()
        self._thread = threading.Thread(target=self._heartbeat, name="run-folder-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _same_machine(self, owner) -> bool:
        """Whether the file's holder ran where this process can look its pid up (a file without the machine's
        identity, from an earlier version, counts as another machine's: its heartbeat decides)."""
        return isinstance(owner, dict) and all(owner.get(key) == self.owner[key]
                                               for key in ("host", "boot_id", "pid_ns"))

    def _take_over(self, seen: bytes) -> None:
        """Remove the file of a holder found gone, whose bytes were `seen`, unless another newcomer has replaced it
        since: the file is moved aside in one step and checked there, so that a file another newcomer has just
        made is never deleted (reading, then deleting, could delete one made in between); such a file is put
        back, unless a third has made one meanwhile, whose run then goes on alone."""
        aside = self.path.with_name(f"{LOCK_FILE}.taken-{self.owner['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # its holder, or another newcomer, removed it first
        if _read(aside) != seen:
            try:
                os.link(aside, self.path)  # creates only where no file is
            except OSError:  # one is (or links are not supported here): that holder's heartbeat will say so
                pass
        aside.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def _record(self) -> dict:
        return {**self.owner, "beats": self._beats, "beat_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _changes(self, seen: bytes, owner: dict | None, say) -> bool:
        """Whether the file changes within stale_s (its holder on another host is alive)."""
        who = _describe(owner) if isinstance(owner, dict) else "an unreadable holder"
        say(f"{self.path} names a training on another host ({who}); waiting up to {self.stale_s:g} s for a sign of "
            "life before taking the folder over")
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.stale_s / 10))
            now = _read(self.path)
            if now != seen:
                return now is not None
        return False

    def _in_use(self, owner: dict, why: str) -> RunFolderInUse:
        return RunFolderInUse(
            f"trainer.run_dir={self.path.parent} is in use by a training that is still running ({_describe(owner)}; "
            f"{why}): two trainings in one folder would overwrite each other's checkpoints and metrics. Stop that "
            f"one (touch {self.path.parent / 'STOP'}) or choose another trainer.run_dir; a hung holder must be "
            f"killed, after which its {LOCK_FILE} file is taken over")

    def _heartbeat(self) -> None:
        warned = False
        unreadable = None  # the file's bytes at the last beat, when they were not JSON
        while not self._done.wait(self.heartbeat_s):
            try:
                unreadable = self._beat(unreadable)
                if self.lost is not None:
                    return
                warned = False
            except OSError as err:  # a file-system hiccup: try again next beat
                if not warned:
                    print(f"warning: could not refresh {self.path}: {err}", flush=True)
                    warned = True

    def _beat(self, unreadable: bytes | None) -> bytes | None:
        """Rewrite the file if it is still this run's (else set `lost`). The file is read and written through one
        open: a newcomer that takes the folder over makes a new file, which a beat that stalled between its read
        and its write (a hung file system, a suspended job) can then not write over, as one that opened the file
        again by its name would. Returns the file's bytes when they were not JSON (`unreadable` the last beat's)."""
        try:
            f = open(self.path, "r+b")  # a fresh open: NFS's close-to-open rule revalidates the file
        except FileNotFoundError:  # a newcomer may have moved it aside this instant to check it, and puts it back
            time.sleep(0.5)
            try:
                f = open(self.path, "r+b")
            except FileNotFoundError:
                self.lost = self._other_holder(None)
                return None
        with f:
            now = f.read()
            if not _parses(now) and now != unreadable:
                # A newcomer's file half-written (it is whole a moment later), or our own beat torn by a file
                # system error (it stays as it is): the next beat tells, and rewrites only the latter.
                return now
            if (other := self._other_holder(now)) is not None:
                self.lost = other
                return None
            if self._done.is_set():  # released meanwhile: the file may be a requeued job's by the time of a write
                return None
            self._beats += 1
            f.seek(0)  # in place: a rename would be a new file that NFS caches miss
            f.write(json.dumps(self._record()).encode())
            f.truncate()
        self._beat_at = time.monotonic()
        return None

    def _other_holder(self, now: bytes | None) -> str | None:
        """Who holds the folder instead of this run, by the file's bytes `now` (None: the file is gone); None while
        it is this run's, or half-written (a newcomer's, whole a moment later, or a beat of ours torn)."""
        if now is not None and (not _parses(now) or self._token_of(now) == self.owner["token"]):
            return None
        other = json.loads(now) if now is not None else None
        return _describe(other) if isinstance(other, dict) else "its file was deleted"

    @staticmethod
    def _token_of(raw: bytes) -> str | None:
        try:
            owner = json.loads(raw)
        except ValueError:
            return None  # a newcomer's file half-written: not ours either
        return owner.get("token") if isinstance(owner, dict) else None

    def check(self, look: bool = False) -> None:
        """RunFolderInUse when another run has taken the folder over since this one took it. look: read the file
        now rather than go by the last heartbeat (before a checkpoint is made the newest, and before stale saves
        are swept: a job suspended during its save finds out before it changes anything there)."""
        if look and self.lost is None:
            try:
                now = _read(self.path)
                if now is None:  # a newcomer may have moved it aside this instant to check it, and puts it back
                    time.sleep(0.5)
                    now = _read(self.path)
                self.lost = self._other_holder(now)
            except OSError as err:  # a file-system hiccup (NFS's ESTALE): the heartbeat's word stands, if recent
                silent = time.monotonic() - self._beat_at
                if silent < self.stale_s / 2:  # no run can have taken it over yet, nor while this one finishes
                    print(f"warning: could not read {self.path}: {err}; going by its last heartbeat", flush=True)
                else:  # beats have not landed for long enough that a run on another host may have taken over
                    raise RunFolderInUse(
                        f"{self.path} cannot be read ({err}) and this run last refreshed it {silent:.0f} s ago: "
                        f"after {self.stale_s:g} s another training may take the folder over, so this run stops "
                        "without saving rather than write over its checkpoints") from None
        if self.lost is not None:
            raise RunFolderInUse(
                f"{self.path} was taken over by another training ({self.lost}) while this one held it (was this job "
                f"suspended for more than {self.stale_s:g} s?): this run stops without saving, so as not to write "
                "over the other's checkpoints")

    def release(self) -> None:
        """Delete the file if it is still this run's (idempotent; a no-op in a forked child, which inherits the
        atexit hook but not the folder)."""
        if not self.held or os.getpid() != self.owner["pid"]:
            return
        self.held = False
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a beat stuck in a hung file system must not hold up the exit
        try:
            now = _read(self.path)
            if now is not None and self._token_of(now) == self.owner["token"]:
                self.path.unlink(missing_ok=True)
        except OSError as err:  # the run itself ended well: the next one takes the file over as a stale holder's
            print(f"warning: could not remove {self.path}: {err}", flush=True)

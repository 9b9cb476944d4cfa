"""What every conversion shares: an output folder that only appears once complete, and a progress line."""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from megatron_dapo.models.arch import ModelError

CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", ".metadata", "COMPLETE.json",
                    "metadata.json")


class ConversionError(ModelError):
    """Input that cannot be converted, or an output folder that must not be written; the message says why."""


PARTIAL = ".partial"
"""How the folder a save or a conversion writes first is named: `<out>.partial`, renamed to `<out>` once complete."""


def unfinished(path: str | Path, what: str) -> str | None:
    """Why `path` (given as `what`) must not be read, when it is a `.partial` folder: what a save or a conversion
    writes before it is complete, left by a process that was killed (a conversion killed while it verified its
    output leaves one that holds every file); None otherwise."""
    if not Path(path).name.endswith(PARTIAL):
        return None
    return (f"{what} {path} is an unfinished save or conversion (a {PARTIAL} folder: the process writing it stopped "
            f"before it was put in place, maybe before it was verified); run the conversion again, or point to a "
            "complete folder")


@contextmanager
def output_folder(out: str | Path, overwrite: bool, sources: tuple[str | Path | None, ...] = ()):
    """Yield a fresh `<out>.partial` folder; on success it replaces `out`, on failure it is removed.

    An `out` that already holds a checkpoint is refused unless `overwrite`; one that holds something else
    (no checkpoint's or model's file at its top: `--out ~/models` meant for `~/models/qwen-hf`) always; and so is
    one that is or holds one of the `sources` read (replacing it would delete them), or whose `<out>.partial` is
    (it is cleared first). A second conversion into the same `out` while one runs is refused (`<out>.partial.lock`,
    locked while it writes): it would clear and write the first one's folder. A process killed mid-conversion
    leaves only the `.partial` folder, which no loader takes for a checkpoint.
    """
    out = Path(out).resolve()  # `--out .` has a name, and a symbolic link's target is written, the link kept
    if out.name.endswith(PARTIAL):
        raise ConversionError(f"--out {out}: a name ending in {PARTIAL} is what unfinished saves are called, and "
                              "no loader reads one; choose another name")
    partial = out.with_name(out.name + PARTIAL)
    for source in sources:
        if source is None:
            continue
        if Path(source).resolve().is_relative_to(out):
            raise ConversionError(f"output folder {out} holds the input {source}: replacing it would delete what "
                                  "it is converted from; choose another --out")
        if Path(source).resolve().is_relative_to(partial):
            raise ConversionError(f"the input {source} is in {partial}, the folder this conversion writes first "
                                  "(and clears): choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(out.with_name(out.name + PARTIAL + ".lock"), out)  # before the checks: they hold while it writes
    try:
        if out.exists() and not out.is_dir():
            raise ConversionError(f"output {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            held = [name for name in CHECKPOINT_FILES if (out / name).exists()]
            if not held and not _holds_weights(out):
                names = sorted(p.name for p in out.iterdir())
                raise ConversionError(f"output folder {out} holds {len(names)} entries ({', '.join(names[:5])}"
                                      f"{', ...' if len(names) > 5 else ''}) and none of a checkpoint's or a model's "
                                      f"files ({', '.join(CHECKPOINT_FILES)}, weight files): not replaced, even with "
                                      "--overwrite; give the folder to write, e.g. a new one inside it")
            if not overwrite:
                raise ConversionError(f"output folder {out} is not empty (holds {', '.join(held or ['weight files'])}); "
                                      "pass --overwrite to replace it, or choose another folder")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _sync(partial)  # on disk before the rename makes it look complete: a power cut leaves no empty shards there
        if out.exists():
            for marker in ("COMPLETE.json", "config.json"):  # first: a removal cut short leaves no complete-looking
                (out / marker).unlink(missing_ok=True)        # folder
            shutil.rmtree(out)
        partial.rename(out)
        _sync_entry(out.parent)
    finally:
        lock()


WEIGHT_FILES = ("*.safetensors", "*.distcp", "common.pt", "*.bin")
"""What else shows a folder is a checkpoint or a model (one whose overwrite was cut short after its marker and
config.json were deleted, say)."""


def _holds_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_FILES)


def _lock(path: Path, out: Path) -> Callable[[], None]:
    """Hold an exclusive lock on the file `path` (made when missing) for this process; ConversionError naming `out`
    when another process holds it. Returns the release, which deletes the file: the lock dies with a killed
    process, and the file it leaves is locked afresh by the next conversion. Where the file system has no
    flock (some Lustre, FUSE or CIFS mounts), a warning and no lock."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConversionError(f"another conversion is writing {out} (it holds {path}): wait for it to end, or "
                                  "choose another --out") from None
        except OSError as err:  # ENOSYS, ENOLCK, EOPNOTSUPP: no locks there
            os.close(fd)
            path.unlink(missing_ok=True)
            print(f"warning: {path.parent} takes no file locks ({err.strerror}): a second conversion into {out} "
                  "started meanwhile would not be refused", file=sys.stderr, flush=True)
            return lambda: None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not a file its last holder deleted as we opened it
                break
        except FileNotFoundError:
            pass
        os.close(fd)

    def release() -> None:
        try:
            path.unlink(missing_ok=True)  # while locked: no one else holds this file
        finally:
            os.close(fd)

    return release


def _sync(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (their entries), deepest first."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _sync_entry(path)
    _sync_entry(folder)


def _sync_entry(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a file system that does not open folders: the files themselves are synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Progress:
    """`label: done/total tensors, GB done, GB/s` on stderr: redrawn in place on a terminal, a line every
    `every_s` seconds otherwise (logs of batch jobs)."""

    def __init__(self, label: str, total_tensors: int, total_bytes: int, *, every_s: float = 10.0, quiet: bool = False):
        self.label, self.total_tensors, self.total_bytes, self.quiet = label, total_tensors, total_bytes, quiet
        self.stream = sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = 0.2 if self.tty else every_s
        self.tensors = self.bytes = 0
        self.start = self.last = time.perf_counter()

    def update(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self._draw(final=False)

    def close(self) -> float:
        """Draw the final line; returns the throughput in GB/s."""
        self._draw(final=True)
        return self.rate()

    def rate(self) -> float:
        return self.bytes / 1e9 / max(time.perf_counter() - self.start, 1e-9)

    def _draw(self, final: bool) -> None:
        if self.quiet:
            return
        line = (f"{self.label}: {self.tensors}/{self.total_tensors} tensors, "
                f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, {self.rate():.2f} GB/s")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)

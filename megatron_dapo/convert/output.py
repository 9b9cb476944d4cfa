"""What every conversion shares: an output folder that only appears once complete, and a progress line."""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from megatron_dapo.models.arch import ModelError

CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", ".metadata", "COMPLETE.json",
                    "metadata.json")


class ConversionError(ModelError):
    """Input that cannot be converted, or an output folder that must not be written; the message says why."""


@contextmanager
def output_folder(out: str | Path, overwrite: bool, sources: tuple[str | Path | None, ...] = ()):
    """Yield a fresh `<out>.partial` folder; on success it replaces `out`, on failure it is removed.

    An `out` that already holds a checkpoint (or anything else) is refused unless `overwrite`, and so is one
    that is or holds one of the `sources` read (replacing it would delete them), or whose `<out>.partial` is
    (it is cleared first). A process killed mid-conversion leaves only the `.partial` folder, which no loader
    takes for a checkpoint.
    """
    out = Path(out).resolve()  # `--out .` has a name, and a symbolic link's target is written, the link kept
    partial = out.with_name(out.name + ".partial")
    for source in sources:
        if source is None:
            continue
        if Path(source).resolve().is_relative_to(out):
            raise ConversionError(f"output folder {out} holds the input {source}: replacing it would delete what "
                                  "it is converted from; choose another --out")
        if Path(source).resolve().is_relative_to(partial):
            raise ConversionError(f"the input {source} is in {partial}, the folder this conversion writes first "
                                  "(and clears): choose another --out")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = [name for name in CHECKPOINT_FILES if (out / name).exists()] or sorted(p.name for p in out.iterdir())[:5]
        raise ConversionError(f"output folder {out} is not empty (holds {', '.join(held)}); "
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
        for marker in ("COMPLETE.json", "config.json"):  # first: a removal cut short leaves no complete-looking folder
            (out / marker).unlink(missing_ok=True)
        shutil.rmtree(out)
    partial.rename(out)
    _sync_entry(out.parent)


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

"""Where step metrics go: a line on the console, metrics.jsonl in the run folder, TensorBoard, W&B."""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Collection, TextIO

from megatron_dapo.metrics.config import LoggingConfig

CONSOLE_KEYS = {"critic/acc_mean": "acc", "critic/score_mean": "score", "response_length/mean": "response_len",
                "actor/entropy": "entropy", "actor/pg_clipfrac_high": "clipfrac_high",
                "sampling/gen_batches": "gen_batches", "sampling/groups_kept": "groups_kept",
                "rollout/probe_logp_mean_diff": "probe_diff", "timing/step": "step_s", "timing/validate": "validate_s"}
"""The figures of a step's console line, under their labels there."""


JSONL = "metrics.jsonl"
"""The JSON-rows file in the run folder, and the name of its sink."""


class SinkError(RuntimeError):
    """The row of a step that some sinks could not write: `failed` maps each of them to its error."""

    def __init__(self, step: int, failed: dict[str, Exception]):
        self.step, self.failed = step, failed
        super().__init__(f"step {step}'s metrics row could not be written to "
                         + "; ".join(f"{name} ({type(err).__name__}: {err})" for name, err in failed.items()))


WANDB_STEP = "trainer/step"
"""The W&B field that holds the training step, every figure's x axis there."""


OPTIONAL_SINKS = {"tensorboard": ("logging.tensorboard=true", "tensorboard"),
                  "wandb": ("logging.wandb_project", "wandb")}
"""Sink -> (the setting that asks for it, the package it needs: pip install megatron-dapo[SINK])."""


def check_sink_packages(config: LoggingConfig) -> None:
    """ConfigError naming the setting and the package when a sink the config asks for cannot be imported."""
    import importlib.util

    from megatron_dapo.config.loader import ConfigError

    wanted = {"tensorboard": config.tensorboard, "wandb": bool(config.wandb_project)}
    missing = [sink for sink, on in wanted.items() if on and importlib.util.find_spec(OPTIONAL_SINKS[sink][1]) is None]
    if missing:
        raise ConfigError([f"{OPTIONAL_SINKS[sink][0]} needs the {OPTIONAL_SINKS[sink][1]} package, which is not "
                           f"installed: pip install 'megatron-dapo[{sink}]', or turn the setting off"
                           for sink in missing])


def open_rows(path: Path, repair: bool = True) -> tuple[TextIO, bool]:
    """`path` opened to append JSON rows, and whether it held any already. A last row cut short by a crash is
    ended first, so that the next row starts on a line of its own; a character the crash cut in half is dropped
    (its first bytes would leave the file unreadable as UTF-8). Only the file's end is read.

    repair=False (trainer.val_only, which may run beside the training that writes the file): nothing is cut, since
    the end may be a row the training is writing now; a row cut short is only ended, for ours to start a line."""
    size = path.stat().st_size if path.is_file() else 0
    tail = b""
    if size:
        with open(path, "rb") as f:
            f.seek(max(size - 4096, 0))
            tail = f.read()
    if tail and not tail.endswith(b"\n") and repair:
        cut = _cut_character(tail)
        if cut:
            os.truncate(path, size - cut)
    file = open(path, "a", encoding="utf-8")
    if tail and not tail.endswith(b"\n"):
        file.write("\n")
    return file, size > len(tail) or bool(tail.strip())


def sync_rows(file: TextIO | None) -> None:
    """The rows written to `file` so far made durable (flushed, then fsynced): called before a checkpoint is saved,
    since the attempt that resumes from it writes no row again up to its step. An error is only reported: rows
    are not worth stopping a run for, and a file system that fails here fails the checkpoint's save next."""
    if file is None or file.closed:
        return
    try:
        file.flush()
        os.fsync(file.fileno())
    except OSError as err:
        print(f"warning: could not sync {file.name} to disk: {err}", file=sys.stderr, flush=True)


def _cut_character(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character without finishing it (0 when none do)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last character's first byte (or an ASCII one)
            need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
            return back if back < need else 0
    return 0


class MetricSinks:
    def __init__(self, config: LoggingConfig, run_dir: Path, total_steps: int, training: bool = True):
        """training: False for trainer.val_only, whose row gets a W&B run of its own (a standalone evaluation's
        row is not charted among the training's)."""
        self.config, self.total, self.run_dir = config, total_steps, run_dir
        self.jsonl = None
        self.earlier_rows = False
        """metrics.jsonl held rows of an earlier attempt when this one opened it."""
        if config.jsonl:
            self.jsonl, self.earlier_rows = open_rows(run_dir / JSONL, repair=training)
        self.tensorboard = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = None
        if config.wandb_project:
            import wandb

            # One W&B run for the training in a run folder: a restarted job (a requeue, a resume) continues it.
            id_file = run_dir / "wandb_run_id"
            if training and not id_file.is_file():
                partial = id_file.with_name(id_file.name + ".partial")
                partial.write_text(uuid.uuid4().hex[:16])
                partial.replace(id_file)  # whole or not at all: an empty id would start a new W&B run each time
            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_run_name or run_dir.name,
                                    dir=str(run_dir), id=id_file.read_text().strip() if training else None,
                                    resume="allow" if training else None)
            # Every figure is charted against the training step, a field of the row: W&B's own step only counts
            # rows and must rise, so rows of a step logged again (trained again after a resume, or a validation
            # a stop skipped) would be dropped if it were given the training step.
            self.wandb.define_metric(WANDB_STEP)
            self.wandb.define_metric("*", step_metric=WANDB_STEP)

    def training_starts(self, step: int, checkpoint: Path | None) -> None:
        """Training starts after `step`, from `checkpoint` (None: from the starting weights). Rows an earlier attempt
        logged for later steps (all of them on a start from scratch) are superseded by the ones to come: a marker
        row says so to read_metrics, the file keeps them; TensorBoard purges its events after `step`."""
        if self.jsonl and self.earlier_rows:
            start_marker(self.jsonl, step, checkpoint)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.tensorboard.log_dir
            self.tensorboard.close()
            # From scratch (no checkpoint) step 0's validation is logged again too.
            self.tensorboard = SummaryWriter(log_dir, purge_step=step + 1 if checkpoint else 0)

    def sync(self) -> None:
        """metrics.jsonl's rows on disk (before a checkpoint; see sync_rows)."""
        sync_rows(self.jsonl)

    def _sinks(self) -> list[tuple[str, Callable[[int, dict[str, float]], None], Callable[[], object] | None]]:
        """Each sink this run writes to, in writing order: its name (as SinkError gives it), what writes a row into
        it, and what closes it (None: nothing to close)."""
        table = ((JSONL, self.jsonl, self._jsonl_row, lambda: self.jsonl.close()),
                 ("tensorboard", self.tensorboard, self._tensorboard_row, lambda: self.tensorboard.close()),
                 ("wandb", self.wandb, self._wandb_row, lambda: self.wandb.finish()),
                 ("console", self.config.console or None, self._console_row, None))
        return [(name, write, close) for name, handle, write, close in table if handle is not None]

    def log(self, step: int, metrics: dict[str, float], only: Collection[str] | None = None) -> None:
        """The row of `step` into every sink (into those named in `only`: the ones an earlier attempt could not
        write it to). A sink that fails does not keep the others from the row: SinkError names each that failed."""
        failed: dict[str, Exception] = {}
        for name, write, _ in self._sinks():
            if only is None or name in only:
                try:
                    write(step, metrics)
                except Exception as err:
                    failed[name] = err
        if failed:
            raise SinkError(step, failed) from next(iter(failed.values()))

    def _jsonl_row(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.jsonl.flush()

    def _tensorboard_row(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()

    def _wandb_row(self, step: int, metrics: dict[str, float]) -> None:
        self.wandb.log({**metrics, WANDB_STEP: step})

    def _console_row(self, step: int, metrics: dict[str, float]) -> None:
        done = step / max(self.total, 1)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        shown = " ".join(f"{label}={metrics[k]:.4g}" for k, label in CONSOLE_KEYS.items() if k in metrics)
        val = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                       if k.startswith("val/") and k.count("/") == 1)  # not the per-data_source ones
        print(f"[{bar}] step {step}/{self.total} {shown} {val}".rstrip(), file=sys.stderr, flush=True)

    def has_row(self, step: int, metrics: dict[str, float]) -> bool:
        """Whether metrics.jsonl holds the row of `step` with these figures' keys already (an attempt wrote it)."""
        path = self.run_dir / JSONL
        if not self.jsonl or not path.is_file():
            return False
        self.jsonl.flush()
        return any(row["step"] == step and set(metrics) <= set(row) for row in read_history(path))

    def enabled(self) -> list[str]:
        """The sinks this run writes to, by the names SinkError gives them."""
        return [name for name, _, _ in self._sinks()]

    def close(self) -> None:
        """Every sink closed; one that fails keeps no other open (its error is raised after)."""
        failed: dict[str, Exception] = {}
        for name, _, close in self._sinks():
            if close is not None:
                try:
                    close()
                except Exception as err:
                    failed[name] = err
        if failed:
            raise next(iter(failed.values()))

def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl as the run's history. Where an attempt started again (after a crash or a
    stop), the rows an earlier attempt logged for the steps it trains again are left out, and so are the start
    markers themselves and a row a crash cut short."""
    path = Path(run_dir) / JSONL
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder?")
    return read_history(path)


def read_history(path: Path) -> list[dict]:
    """The rows of a JSONL file that start markers (`{"step": N, "resumed_from": ...}`) divide into attempts:
    each marker drops the earlier rows after step N (all of them when it resumed from nothing), and is dropped
    itself, as is a row a crash cut short."""
    rows: list[dict] = []
    # A character a crash cut in half, left in place when trainer.val_only opened the file next (it repairs
    # nothing), only spoils the row it was in: that row is dropped below as cut short.
    # Rows end at "\n" only: splitlines() would also cut a response at U+2028, U+0085 and the like, which
    # samples.jsonl holds as they are (ensure_ascii=False).
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # empty, or the end of a row cut short by a crash
            continue
        if "resumed_from" in row:
            rows = [r for r in rows if r["step"] <= row["step"]] if row["resumed_from"] else []
        else:
            rows.append(row)
    return rows


def start_marker(file: TextIO, step: int, checkpoint: Path | None) -> None:
    """The row that tells read_history an attempt starts after `step`, from `checkpoint` (None: from scratch)."""
    file.write(json.dumps({"step": step, "time": time.time(),
                           "resumed_from": str(checkpoint) if checkpoint else None}) + "\n")
    file.flush()

"""Run-folder checkpoints: step_NNNNNN folders (actor + trainer state), the latest complete one wins."""
from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.actor.checkpoint import (MARKER, CheckpointError, check_complete, is_complete, load_actor,
                                           read_marker, save_actor)
from megatron_dapo.parallel.init import stop_together

_STEP = re.compile(r"^step_(\d+)$")
_SAVED = re.compile(r"^step_\d+(\.partial)?$")
"""What a save writes: the sweep of crashed saves' folders touches nothing else (a conversion put beside them)."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a `.partial` folder from a crash mid-save is ignored)."""
    folder = run_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := _STEP.match(p.name)) and is_complete(p)]
    return max(found)[1] if found else None


@dataclass(frozen=True)
class HFCopy:
    """A Hugging Face copy of each checkpoint, in its step_N/hf (checkpoint.save_hf)."""

    dtype: torch.dtype
    template: Path
    """The Hugging Face folder the run started from (model.path): its config, generation config and tokenizer."""
    tokenizer: Path | None = None
    """model.tokenizer_path, whose tokenizer files replace the template's."""


def save(run_dir: Path, step: int, actor, trainer_state: dict, keep_last: int, hf: HFCopy | None = None,
         wait_group: dist.ProcessGroup | None = None, guard: Callable[[], None] | None = None) -> Path:
    """Save step_N, then on rank 0 delete the complete checkpoints beyond the newest `keep_last` and what crashed
    saves left, and write step_N's Hugging Face copy (when asked): in that order, so that a copy that fails (a full
    disk) has the space freed, and the next attempt's copy too. An error on rank 0 stops every rank; the
    checkpoint itself is complete by then.

    wait_group: a CPU (gloo) group whose timeout covers the conversion, for the other ranks to wait on rank 0
    in: a 32B model takes rank 0 minutes to convert at 0.24 GB/s (docs/performance.md), and a large one
    could outlast the default group's 30-minute timeout. None: the default group.
    guard: called on rank 0 before the checkpoint is named step_N and again before the deletions; its error
    stops every rank there (the trainer's: is the run folder still this run's?)."""
    path = save_actor(actor, run_dir / "checkpoints" / f"step_{step:06d}", extra={"trainer": trainer_state},
                      before_commit=guard)
    failure = None
    if dist.get_rank() == 0:
        try:
            if guard is not None:
                guard()
            complete = sorted((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*")
                              if (m := _STEP.match(p.name)) and is_complete(p))
            for _, old in complete[:-keep_last]:
                (old / MARKER).unlink(missing_ok=True)  # first: a prune cut short leaves no complete-looking folder
                shutil.rmtree(old, ignore_errors=True)
            # What crashed saves left (a .partial folder, a folder never marked complete): never loadable, and
            # keep_last, counting complete checkpoints only, would leave them there for good.
            for stale in (run_dir / "checkpoints").glob("step_*"):
                if _SAVED.match(stale.name) and stale.is_dir() and not is_complete(stale):
                    shutil.rmtree(stale, ignore_errors=True)
            if hf is not None:
                _write_hf_copy(path, hf)
        except Exception as err:
            failure = err
    # The other ranks wait here for rank 0; on its failure they stop with its message.
    stop_together(failure, group=wait_group)
    return path


def _write_hf_copy(path: Path, hf: HFCopy) -> None:
    """`path`'s Hugging Face copy in path/hf; a failure says that the checkpoint is complete, and how to go on."""
    from megatron_dapo.convert.mcore_to_hf import mcore_to_hf

    start = time.perf_counter()
    try:
        summary = mcore_to_hf(path, path / "hf", dtype=hf.dtype, hf_template=hf.template, overwrite=True,
                              progress=False, tokenizer=hf.tokenizer)
    except Exception as err:
        raise RuntimeError(f"the Hugging Face copy of {path} failed ({type(err).__name__}: {err}); the checkpoint "
                           "itself is complete. Start again once the cause is gone (a full disk, say): the copy is "
                           "written then; or set checkpoint.save_hf=false to train on without copies, and write it "
                           f"with `megatron-dapo convert mcore-to-hf --mcore {path} --out {path / 'hf'}`") from err
    print(f"wrote {path / 'hf'} ({summary['bytes'] / 1e9:.2f} GB, {time.perf_counter() - start:.1f} s)", flush=True)


def complete_hf_copy(path: Path, hf: HFCopy, wait_group: dist.ProcessGroup | None = None) -> None:
    """Write the Hugging Face copy of the checkpoint at `path` when it has none (collective; rank 0 writes): the
    attempt that saved it was stopped or killed between the checkpoint and its copy, or ran without
    checkpoint.save_hf (`<path>/hf` appears whole or not at all). An error on rank 0 stops every rank."""
    failure = None
    if dist.get_rank() == 0 and not (path / "hf").is_dir():
        print(f"{path} has no Hugging Face copy (checkpoint.save_hf): writing it", flush=True)
        try:
            _write_hf_copy(path, hf)
        except Exception as err:
            failure = err
    stop_together(failure, group=wait_group)


def saved_trainer_state(path: Path) -> dict | None:
    """The trainer state a training saved with the complete checkpoint at `path` (None in one it did not save),
    read without loading anything."""
    return read_marker(path).get("trainer")


def load(path: Path, actor) -> dict:
    """The trainer state saved with the checkpoint at `path`, its actor state loaded into `actor` (collective)."""
    # Rank 0 chose it: a rank that cannot see it (a lagging file system) stops every rank. Its files are checked
    # by load_actor, after the marker says whether a training saved it.
    marker = check_complete(path, whole=False)
    if "trainer" not in marker:
        raise CheckpointError(f"{path} is a checkpoint without a training's state (step, data order): not one a "
                              "training saved. To start from its weights, set model.megatron_checkpoint to it in a "
                              "fresh run folder, and keep it out of RUN_DIR/checkpoints")
    return load_actor(actor, path)["trainer"]

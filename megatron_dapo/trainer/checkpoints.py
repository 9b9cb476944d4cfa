"""Run-folder checkpoints: step_NNNNNN folders (actor + trainer state), the latest complete one wins."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_dapo.actor.checkpoint import is_complete, load_actor, save_actor

_STEP = re.compile(r"^step_(\d+)$")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a `.partial` folder from a crash mid-save is ignored)."""
    folder = run_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := _STEP.match(p.name)) and is_complete(p)]
    return max(found)[1] if found else None


def save(run_dir: Path, step: int, actor, trainer_state: dict, keep_last: int) -> Path:
    path = save_actor(actor, run_dir / "checkpoints" / f"step_{step:06d}", extra={"trainer": trainer_state})
    if dist.get_rank() == 0:
        complete = sorted((int(m.group(1)), p) for p in (run_dir / "checkpoints").glob("step_*")
                          if (m := _STEP.match(p.name)) and is_complete(p))
        for _, old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(path: Path, actor) -> dict:
    return load_actor(actor, path)["trainer"]

"""Actor checkpoints through megatron-core's dist_checkpointing: written atomically, loadable at any layout.

A checkpoint is written into `<dir>.partial` and renamed to `<dir>` only after every rank has
finished and rank 0 has written the marker file `COMPLETE.json`; a crash mid-save leaves only a
`.partial` folder, which is never taken for a checkpoint. Optimizer state is stored in model
space ("fully_reshardable"), so a checkpoint saved at one TP x PP x DP loads at another.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

MARKER = "COMPLETE.json"


def _metadata() -> dict:
    """A fresh dict per call: megatron-core adds process groups to it, which must not outlive a layout."""
    return {"distrib_optim_sharding_type": "fully_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded; the message says why."""


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def save_actor(actor, directory: str | Path, extra: dict | None = None) -> Path:
    """Save model, optimizer and step count of every rank into `directory` (collective)."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    metadata = _metadata()
    model_sd = actor.model.module.sharded_state_dict(metadata=metadata)
    state = {
        "model": model_sd,
        "optimizer": actor.optimizer.sharded_state_dict(model_sd, metadata=metadata),
        "actor_steps": actor.steps,
    }
    dist_checkpointing.save(state, str(partial), content_metadata=_metadata())
    dist.barrier()
    if dist.get_rank() == 0:
        marker = {"actor_steps": actor.steps, "layout": actor.layout.describe(), **(extra or {})}
        (partial / MARKER).write_text(json.dumps(marker, indent=1))
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    dist.barrier()
    return directory


def _materialize_adam_state(optimizer) -> None:
    """Give every parameter of a fresh torch AdamW its state (step, exp_avg, exp_avg_sq), to be
    overwritten by the load. megatron-core reads the step count off the state it is about to replace;
    with Transformer Engine's or apex's fused Adam (no per-parameter step) this is already so."""
    import torch

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state and isinstance(inner, torch.optim.AdamW):
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))


def load_actor(actor, directory: str | Path) -> dict:
    """Load a complete checkpoint into the actor (any layout); returns the marker's contents."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not is_complete(directory):
        raise CheckpointError(
            f"checkpoint {directory} is incomplete (no {MARKER}: the save did not finish); "
            "delete it or point to an earlier checkpoint"
        )
    _materialize_adam_state(actor.optimizer)
    metadata = _metadata()
    model_sd = actor.model.module.sharded_state_dict(metadata=metadata)
    request = {
        "model": model_sd,
        "optimizer": actor.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata),
        "actor_steps": 0,
    }
    state = dist_checkpointing.load(request, str(directory))
    # The optimizer first: loading its state may rewrite model params from its main params; the model's
    # own checkpointed weights are then the last word.
    actor.optimizer.load_state_dict(state["optimizer"])
    actor.model.module.load_state_dict(state["model"])
    actor.steps = int(state["actor_steps"])
    return json.loads((directory / MARKER).read_text())

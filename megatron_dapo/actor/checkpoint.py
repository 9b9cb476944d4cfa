"""Actor checkpoints through megatron-core's dist_checkpointing: written atomically, loadable at any layout.

A checkpoint is written into `<dir>.partial`, renamed to `<dir>` once every rank has finished, and only
then given the marker file `COMPLETE.json` (itself written under another name and renamed); a crash
mid-save leaves a `.partial` folder or a folder without the marker, neither ever taken for a checkpoint,
also on file systems whose folder rename is not atomic. Optimizer state is stored in model
space ("fully_reshardable"), so a checkpoint saved at one TP x PP x DP loads at another.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch.distributed as dist

from megatron_dapo.parallel.init import stop_together

MARKER = "COMPLETE.json"


def _metadata() -> dict:
    """A fresh dict per call: megatron-core adds process groups to it, which must not outlive a layout."""
    return {"distrib_optim_sharding_type": "fully_reshardable", "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


@contextmanager
def _optimizer_state_in_buffer_space(optimizer):
    """Correct megatron-core 0.16's "fully_reshardable" save of a buffer with several buckets.

    DistributedOptimizer.get_parameter_state_dp_zero packs the buckets of a grad buffer one after
    the other, leaving out the padding at each bucket's end, but sharded_param_state_fully_reshardable
    then slices that packed tensor with the parameters' offsets in the padded buffer. Every parameter
    after the first padded bucket end is saved shifted (it logs "param range exceeds unpadded buffer").
    With PP > 1 and tied embeddings the shared embedding always has a bucket of its own, so its Adam
    moments and master weights were saved wrong. For the duration of a save, this puts each bucket
    back at its offset in the buffer, so the offsets match.
    """
    patched = []
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(chained, "get_parameter_state_dp_zero"):
            continue
        gather = chained.get_parameter_state_dp_zero

        def in_buffer_space(*args, _opt=chained, _gather=gather, **kwargs):
            state = _gather(*args, **kwargs)
            if state is None:
                return None
            for gbuf_idx, buffer in enumerate(_opt.buffers):
                for world in state[gbuf_idx].values():
                    for key in ("param", "exp_avg", "exp_avg_sq"):
                        packed, spread, start = world[key], world[key].new_zeros(buffer.numel), 0
                        for bucket in buffer.buckets:
                            n = bucket.numel_unpadded
                            spread[bucket.offset:bucket.offset + n] = packed[start:start + n]
                            start += n
                        world[key] = spread
            return state

        chained.get_parameter_state_dp_zero = in_buffer_space
        patched.append(chained)
    try:
        yield
    finally:
        for chained in patched:
            del chained.get_parameter_state_dp_zero


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be loaded; the message says why."""


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def save_actor(actor, directory: str | Path, extra: dict | None = None,
               before_commit: Callable[[], None] | None = None) -> Path:
    """Save model, optimizer and step count of every rank into `directory` (collective).
    before_commit: called on rank 0 once every rank has written its share, before the folder is named
    `directory`; its error stops every rank with nothing renamed (the trainer checks there that the run
    folder is still its own)."""
    from megatron.core import dist_checkpointing

    actor.check_resident()
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    failure = None
    if dist.get_rank() == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)  # a leftover rmtree could not remove (an NFS .nfs file)
            (partial / MARKER).unlink(missing_ok=True)  # never a leftover marker in the folder to be renamed
        except OSError as err:  # every rank stops on it, none waits for rank 0
            failure = CheckpointError(f"checkpoint {directory}: could not make {partial}: {err}")
    stop_together(failure, CheckpointError)
    _materialize_adam_state(actor.optimizer)  # a checkpoint before the first step holds zero moments
    metadata = _metadata()
    model_sd = actor.model.module.sharded_state_dict(metadata=metadata)
    state = {
        "model": model_sd,
        "actor_steps": actor.steps,
    }
    with _optimizer_state_in_buffer_space(actor.optimizer):
        state["optimizer"] = actor.optimizer.sharded_state_dict(model_sd, metadata=metadata)
    dist_checkpointing.save(state, str(partial), sharded_strategy=_spread_over_data_parallel(),
                            content_metadata=_metadata())
    dist.barrier()
    failure = None
    if dist.get_rank() == 0:
        marker = {"actor_steps": actor.steps, "layout": actor.layout.describe(),
                  "distributed_optimizer": actor.layout.distributed_optimizer, **(extra or {}),
                  "hf_config": actor.hf_config}  # what `convert mcore-to-hf` rebuilds the model from
        try:
            text = json.dumps(marker, indent=1)  # before any folder is touched: a value JSON cannot hold stops here
            if before_commit is not None:
                before_commit()
            # An earlier attempt's, or the same step saved again: unmarked first, so that an rmtree cut short
            # (an NFS .nfs file held open) leaves no complete-looking folder with shards missing.
            _sync_written(partial)  # before the earlier copy goes: a file system that refuses it keeps that one
            (directory / MARKER).unlink(missing_ok=True)
            shutil.rmtree(directory, ignore_errors=True)
            partial.rename(directory)
            written = directory / (MARKER + ".partial")
            with open(written, "w") as f:  # on disk before it is named: a power cut leaves no empty marker
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            written.rename(directory / MARKER)  # the last act: the folder is whole by now
            _sync_folder(directory)
            _sync_folder(directory.parent)
        except OSError as err:  # every rank stops on it, none waits for rank 0
            failure = CheckpointError(f"checkpoint {directory}: could not complete it from {partial}: {err}")
        except Exception as err:  # before_commit's, or the marker's
            failure = err
    stop_together(failure, CheckpointError)
    return directory


def _sync_written(folder: Path) -> None:
    """Put what megatron-core wrote into `folder` without syncing it on disk before the marker names the folder
    complete: its rank 0 writes common.pt (the step count, the optimizer's settings) and metadata.json without an
    fsync, and a power cut after the marker could leave them empty in a checkpoint that looks whole. The data
    files (*.distcp, .metadata) are synced by the ranks that wrote them."""
    for path in folder.iterdir():
        if path.suffix != ".distcp" and path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """Make the renames in `folder` durable (where the file system lets a folder be synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse it; their renames are on the server already
        pass
    finally:
        os.close(fd)


def _spread_over_data_parallel():
    """megatron-core's default save strategy, with every tensor written by one rank of its data-parallel group
    chosen to even out the bytes (FullyParallelSaveStrategyWrapper; only metadata is exchanged). Without it the
    first data-parallel replica writes the whole checkpoint: all on the first node of a multi-node run."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _materialize_adam_state(optimizer) -> None:
    """Give every parameter of an optimizer that has not stepped yet its Adam state, so that a save before the
    first step writes zero moments and a load has state to overwrite. torch's AdamW gets (step, exp_avg,
    exp_avg_sq): megatron-core reads the step count off the state it is about to replace. Transformer Engine's
    and apex's fused Adam keep no per-parameter step; megatron-core's own init_state_fn gives them their moments
    (its DistributedOptimizer reads exp_avg of every parameter when it saves, and does not make them itself)."""
    import torch

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        if not isinstance(inner, torch.optim.AdamW):
            init_state = getattr(chained, "init_state_fn", None)
            if init_state is not None:  # fills only the parameters without state
                init_state(inner, getattr(chained, "config", None))
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                 exp_avg_sq=torch.zeros_like(param))


@contextmanager
def _adam_steps_kept(optimizer):
    """Let megatron-core 0.16's DistributedOptimizer load a "fully_reshardable" checkpoint into torch's AdamW
    (its optimizer without Transformer Engine or apex, on GPUs too).

    load_state_dict restores AdamW's per-parameter `step` from the param groups, then
    _set_main_param_and_optimizer_states copies every state entry from the checkpoint's tensors, which hold only
    param / exp_avg / exp_avg_sq: a KeyError on "step". While the load runs, each distributed optimizer keeps the
    restored step instead. TE's and apex's fused Adam keep no per-parameter step: nothing changes for them.
    """
    patched = []
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(chained, "_set_main_param_and_optimizer_states"):  # not a DistributedOptimizer
            continue
        set_states = chained._set_main_param_and_optimizer_states

        def set_states_keeping_step(model_param, tensors, chained=chained, set_states=set_states):
            group_index, group_order = chained.model_param_group_index_map[model_param]
            state = chained.optimizer.state[chained.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"].clone()}
            return set_states(model_param, tensors)

        chained._set_main_param_and_optimizer_states = set_states_keeping_step
        patched.append(chained)
    try:
        yield
    finally:
        for chained in patched:
            del chained._set_main_param_and_optimizer_states  # the class's method again


def _zero_step_where_left_out(loaded: dict) -> None:
    """megatron-core's FP32Optimizer and Float16Optimizer (parallel.use_distributed_optimizer=false) save Adam's step
    count only when it is not 0: a checkpoint saved before the first step holds moments without one, which torch's
    AdamW refuses to load (a bare KeyError: 'step'). Its count is put back, 0. `loaded`: the optimizer's share of a
    dist_checkpointing.load result: torch's state dict (FP32Optimizer), one under "optimizer" (Float16Optimizer),
    or one of those per optimizer, by index (a chained optimizer's)."""
    import torch

    if "state" in loaded and "param_groups" in loaded:
        if loaded["state"] and "common_step" not in loaded["state"]:
            loaded["state"]["common_step"] = torch.tensor(0.0)
        return
    for part in ([loaded["optimizer"]] if isinstance(loaded.get("optimizer"), dict) else loaded.values()):
        if isinstance(part, dict):
            _zero_step_where_left_out(part)


def _unshare_adam_steps(optimizer) -> None:
    """Give each parameter its own Adam step counter after a load.

    Without Transformer Engine or apex, megatron-core's DistributedOptimizer.load_state_dict puts one
    and the same `step` tensor into every parameter's state; torch's AdamW then increments that shared
    tensor once per parameter, so after one step the bias correction of every parameter is wrong.
    """
    import torch

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        seen: set[int] = set()
        for state in chained.optimizer.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                if id(step) in seen:
                    state["step"] = step.detach().clone()
                seen.add(id(state["step"]))


def load_model_weights(model, directory: str | Path, arch=None) -> dict:
    """Load only the weights of a complete checkpoint (a run's, or one from `megatron-dapo convert
    hf-to-mcore`) into this rank's stage of a GPTModel, at any layout; returns the marker's contents.
    `arch` (a ModelArch): the model's, refused with the differences named when the checkpoint's is another.

    Call it before the optimizer is built: the optimizer copies the weights it starts from.
    """
    directory = Path(directory)
    marker, held = _check_complete(directory)
    if arch is not None:
        _check_same_model(directory, marker, arch)
    sharded = model.sharded_state_dict(metadata=_metadata())
    absent = _absent_extra_states(sharded, held)
    state = _load(directory, {"model": {k: v for k, v in sharded.items() if k not in absent}})
    _into_module(model, state["model"], absent, directory)
    return marker


def _load(directory: Path, request: dict) -> dict:
    """dist_checkpointing.load of `request` from `directory` (collective): what it raises on any rank (a shard that
    cannot be read, a tensor the checkpoint lacks) as a CheckpointError naming the folder on every rank."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    failure, state = None, None
    try:
        state = dist_checkpointing.load(request, str(directory))
    except (Exception, CheckpointException) as err:  # the latter a BaseException
        cause = err
        if isinstance(err, CheckpointException):  # torch's gathered failures: the first rank's own
            cause = next((f[0] if isinstance(f, tuple) else f for f in err.failures.values()), err)
        failure = CheckpointError(f"checkpoint {directory} could not be loaded: {type(cause).__name__}: {cause}")
    stop_together(failure, CheckpointError)
    return state


def _into_module(module, state: dict, absent: set[str], directory: Path) -> None:
    """Load `state` (a dist_checkpointing.load result) into `module`; only the `absent` extra states may be left.
    Collective: a pipeline stage whose tensors do not fit stops every rank."""
    loaded = module.load_state_dict(state, strict=False)
    unloaded = [k for k in loaded.missing_keys if k not in absent] + list(loaded.unexpected_keys)
    failure = None
    if unloaded:  # megatron-core's load would have named a missing tensor already: this is a model of another make
        failure = CheckpointError(f"checkpoint {directory} did not load into the model: {', '.join(unloaded[:5])}"
                                  + (f" and {len(unloaded) - 5} more" if len(unloaded) > 5 else ""))
    stop_together(failure, CheckpointError)


def _absent_extra_states(sharded: dict, held: set[str]) -> set[str]:
    """The keys of `sharded` that are a module's `_extra_state` (FP8 scaling metadata) the checkpoint does not hold.
    Transformer Engine's modules have one, megatron-core's local ones do not all: a checkpoint converted from Hugging
    Face or saved without Transformer Engine lacks some that a Transformer Engine model asks for (its norms'), and
    the model keeps its own, fresh ones (no FP8 history, which a bf16 or fp32 run does not use)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {key for key, value in sharded.items()
            if key.endswith("._extra_state") and isinstance(value, ShardedObject) and value.unique_key not in held}


class _Complete(NamedTuple):
    marker: dict
    """COMPLETE.json's contents."""
    objects: set[str]
    """The keys of the non-tensor entries the checkpoint holds (modules' `_extra_state`)."""


def check_complete(directory: Path, whole: bool = True) -> dict:
    """The marker's contents of the complete checkpoint at `directory` (collective). CheckpointError on every rank
    when any rank cannot see it whole (a node whose shared file system has not caught up, a folder on one node's
    local disk), not on that rank alone; the message names the folder or file at fault.
    whole: False checks the folder and its marker only, not the files a load reads."""
    return _check_complete(directory, whole).marker


def _check_complete(directory: Path, whole: bool = True) -> _Complete:
    failure, found = None, None
    try:
        found = _inspect(directory, whole)
    except CheckpointError as err:
        failure = err
    stop_together(failure, CheckpointError)
    return found


def _inspect(directory: Path, whole: bool) -> _Complete:
    """What a load needs of the checkpoint at `directory`, each part checked before megatron-core reads it (whose
    errors for a missing or cut-short file name none); CheckpointError naming what is missing or damaged."""
    from megatron.core.dist_checkpointing.core import CONFIG_FNAME

    from megatron_dapo.convert.dcp_io import COMMON, CheckpointFormatError, CheckpointReader

    from megatron_dapo.convert.output import unfinished

    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is a file, not a checkpoint folder")
    if directory.resolve() not in _UNFINISHED_READS and (problem := unfinished(directory, "checkpoint")):
        raise CheckpointError(problem)
    if not is_complete(directory):
        if (directory / "config.json").is_file():
            raise CheckpointError(f"{directory} is a Hugging Face model folder, not a megatron-core checkpoint: give it "
                                  "as model.path, or convert it with `megatron-dapo convert hf-to-mcore`")
        raise CheckpointError(f"checkpoint {directory} is incomplete (no {MARKER}: the save did not finish, or no "
                              f"megatron-dapo save made it); {_advice(directory)}")
    marker = read_marker(directory)
    if not whole:
        return _Complete(marker, set())
    common = directory / COMMON
    if not zipfile.is_zipfile(common):  # torch.save's format; a file cut short loses the zip's closing directory
        raise CheckpointError(f"{common} is {'missing' if not common.exists() else 'damaged (not a whole torch.save file)'}"
                              f"; {_advice(directory)}")
    try:
        json.loads((directory / CONFIG_FNAME).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG_FNAME} cannot be read ({type(err).__name__}: {err}); "
                              f"{_advice(directory)}") from None
    try:
        objects = CheckpointReader(directory).objects
    except (CheckpointFormatError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory} cannot be loaded: {err}; {_advice(directory)}") from None
    return _Complete(marker, objects)


_UNFINISHED_READS: set[Path] = set()
"""`.partial` folders this process may load (`reading_unfinished`)."""


@contextmanager
def reading_unfinished(directory: Path):
    """Within: this process may load the `.partial` folder `directory` (a conversion verifying what it wrote
    before putting it in place); every other load refuses a `.partial` folder, which a killed conversion may
    have left whole but unverified."""
    directory = Path(directory).resolve()
    _UNFINISHED_READS.add(directory)
    try:
        yield
    finally:
        _UNFINISHED_READS.discard(directory)


def read_marker(directory: Path) -> dict:
    """The COMPLETE.json of the checkpoint at `directory`; CheckpointError naming it, and what to do, when it does
    not read as a JSON object (cut short by a full disk, say)."""
    try:
        marker = json.loads((directory / MARKER).read_text())
        if not isinstance(marker, dict):
            raise ValueError(f"a JSON {type(marker).__name__}, not an object")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / MARKER} cannot be read ({type(err).__name__}: {err}); "
                              f"{_advice(directory)}") from None
    return marker


def _advice(directory: Path) -> str:
    """What to do about a checkpoint that cannot be loaded. Only a run's own step folder is the trainer's to
    delete; any other may be someone's only copy of something."""
    if re.fullmatch(r"step_\d+", directory.name):
        return f"delete {directory} or point to an earlier checkpoint"
    return "point to a checkpoint a training or `megatron-dapo convert hf-to-mcore` completed"


SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "tie_word_embeddings", "qkv_bias", "qk_norm")
"""What makes two models' tensors differ (ModelArch fields)."""


def _check_same_model(directory: Path, marker: dict, arch) -> None:
    """CheckpointError on every rank when the checkpoint's model (its marker's hf_config) is not `arch`'s:
    megatron-core loads embedding and output rows without checking their count, so a checkpoint of a model with
    another vocabulary would load with rows cut off or left as they were."""
    from megatron_dapo.models.arch import ModelArch

    failure = None
    saved_config = marker.get("hf_config")
    if saved_config is not None:
        saved = ModelArch.from_hf_config(saved_config, source=str(directory / MARKER))
        differ = [f"{name}: checkpoint {getattr(saved, name)}, model {getattr(arch, name)}" for name in SHAPE_FIELDS
                  if getattr(saved, name) != getattr(arch, name)]
        if differ:
            failure = CheckpointError(f"checkpoint {directory} holds another model than model.path's config.json "
                                      f"({'; '.join(differ)}): point model.path at the model the checkpoint was "
                                      "made from")
    stop_together(failure, CheckpointError)


def load_actor(actor, directory: str | Path) -> dict:
    """Load a complete checkpoint into the actor (any layout); returns the marker's contents."""
    directory = Path(directory)
    marker, held = _check_complete(directory)
    _check_same_model(directory, marker, actor.arch)
    saved = marker.get("distributed_optimizer")
    if saved is not None and saved != actor.layout.distributed_optimizer:  # megatron-core: a KeyError deep inside
        stop_together(CheckpointError(
            f"checkpoint {directory} was saved with parallel.use_distributed_optimizer={str(saved).lower()}, whose "
            f"optimizer state this run (={str(actor.layout.distributed_optimizer).lower()}) cannot load: set "
            f"parallel.use_distributed_optimizer={str(saved).lower()}, or start from its weights alone "
            f"(model.megatron_checkpoint={directory} in a fresh run folder)"), CheckpointError)
    _materialize_adam_state(actor.optimizer)
    metadata = _metadata()
    model_sd = actor.model.module.sharded_state_dict(metadata=metadata)
    with _optimizer_state_in_buffer_space(actor.optimizer):  # the same layout as the save's
        optimizer_sd = actor.optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=metadata)
    absent = _absent_extra_states(model_sd, held)  # saved without Transformer Engine, resumed with it
    request = {"model": {k: v for k, v in model_sd.items() if k not in absent}, "optimizer": optimizer_sd,
               "actor_steps": 0}
    state = _load(directory, request)
    # The optimizer first: loading its state may rewrite model params from its main params; the model's
    # own checkpointed weights are then the last word.
    if not actor.layout.distributed_optimizer:
        _zero_step_where_left_out(state["optimizer"])
    with _adam_steps_kept(actor.optimizer):
        actor.optimizer.load_state_dict(state["optimizer"])
    _unshare_adam_steps(actor.optimizer)
    # The loaded param groups hold the saved run's settings: the config's betas and eps are this run's (lr and
    # weight decay are set before every step).
    for group in actor.optimizer.param_groups:
        group["betas"], group["eps"] = tuple(actor.config.optim.betas), actor.config.optim.eps
    _into_module(actor.model.module, state["model"], absent, directory)
    actor.steps = actor.scheduled = int(state["actor_steps"])
    return marker

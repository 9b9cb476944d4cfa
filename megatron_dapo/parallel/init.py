"""Bring up torch.distributed and megatron-core's model-parallel groups for one layout."""
from __future__ import annotations

import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist

from megatron_dapo.parallel.config import ParallelConfig, ParallelLayout


def init_distributed(config: ParallelConfig, seed: int, timeout_s: float = 1800.0) -> ParallelLayout:
    """NCCL when there is a GPU, gloo (with the CPU shims) otherwise; env:// rendezvous as torchrun sets it.

    A single process without torchrun's variables runs as a world of one.
    """
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
            # A world of one without torchrun: a port of its own, so that two such runs on a host (a validation
            # beside a training, the toy twice) do not take the same one.
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("MASTER_PORT", "29511")  # WORLD_SIZE given without a port
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    layout = config.layout(dist.get_world_size())
    init_model_parallel(layout, seed)
    return layout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_device() -> torch.device:
    """This rank's device, the one the default process group's collectives take tensors on (NCCL: the rank's
    GPU; gloo: the CPU)."""
    nccl = torch.cuda.is_available() and (not dist.is_initialized() or dist.get_backend() == "nccl")
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def stop_together(failure: BaseException | None, kind: type[Exception] = RuntimeError,
                  group: dist.ProcessGroup | None = None) -> None:
    """Collective over `group` (default: every rank) after a part that may fail on some ranks only: one rank's
    failure must not leave the others waiting in their next collective. When a rank has a `failure`, it raises
    it (its own type and traceback) and every other rank raises `kind` with the first failing rank's message.
    Costs one scalar all-reduce when no rank failed. Without a process group this process is every rank."""
    if not dist.is_initialized():
        if failure is not None:
            raise failure
        return
    gloo = group is not None and dist.get_backend(group) == "gloo"
    found = torch.tensor(float(failure is not None), device="cpu" if gloo else default_device())
    dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    if not found.item():
        return
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if failure is None else str(failure), group=group)
    if failure is not None:
        raise failure
    index, message = next((i, m) for i, m in enumerate(messages) if m is not None)
    rank = dist.get_global_rank(group, index) if group is not None else index
    raise kind(f"{message} [found on rank {rank}; every rank stops]")


def init_model_parallel(layout: ParallelLayout, seed: int) -> None:
    """megatron-core's TP/PP/DP groups on an initialised process group, and its seeded RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    if not torch.cuda.is_available():
        from megatron_dapo.parallel.cpu_shims import apply_cpu_shims

        apply_cpu_shims()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        _destroy_groups_of_previous_layout()
    before = set(_process_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
    )
    _LAYOUT_GROUPS.extend(group for group in _process_groups() if group not in before)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown_distributed(*, failed: bool = False) -> None:
    """Close megatron-core's groups and every process group at the end of a run, so that no gloo worker
    thread is left to the interpreter's teardown (which can abort the process with "terminate called
    without an active exception" instead of exiting with the run's code). After a failure on GPUs only
    the gloo groups are closed: closing an NCCL group could wait on a collective a peer never joins."""
    if not dist.is_initialized():
        return
    if failed and torch.cuda.is_available():
        for group in _process_groups():
            if group is not dist.group.WORLD and dist.get_backend(group) == "gloo":
                dist.destroy_process_group(group)
        return
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _LAYOUT_GROUPS.clear()
    dist.destroy_process_group()  # the default group and every other


_LAYOUT_GROUPS: list = []
"""Process groups created by the last `init_model_parallel`."""


def _process_groups() -> list:
    return list(getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", {}))


def _destroy_groups_of_previous_layout() -> None:
    """megatron-core's destroy_model_parallel forgets its groups but does not close them; every gloo
    group keeps its own polling threads, so a process that changes layout many times (a test, a
    checkpoint conversion) would slow to a crawl. Close the groups the previous layout created."""
    for group in _LAYOUT_GROUPS:
        try:
            dist.destroy_process_group(group)
        except (ValueError, RuntimeError):  # already closed
            pass
    _LAYOUT_GROUPS.clear()
    # A destroyed gloo group's threads end only when its last reference goes, and the models and optimizers of
    # earlier layouts hold theirs in reference cycles, which only the collector frees (one still in use, the
    # previous actor while the next is built, is freed at the next change). Measured: without it each TP2 actor
    # built after another left ~50 threads running, and a test building a few dozen crawled.
    gc.collect()

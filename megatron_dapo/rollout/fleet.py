"""More than one rollout engine: where they live, and how a generation batch is shared among them.

Engine i lives on the first rank (tensor-parallel rank 0, first pipeline stage) of data-parallel
replica i x (DP / engines). After every update it takes its weights from that replica (reshard.py),
so pushes to different engines run side by side and never cross replicas. Each engine samples a
contiguous share of every generation batch and each host finishes its share (the trainer scores the
rewards there); rank 0 gathers the results over a CPU group of the hosts alone. Rank 0 always hosts
engine 0, and with one engine everything happens there as before.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.rollout.engine import Completion, RolloutEngine, RolloutError, SamplingParams


@dataclass(frozen=True)
class Placement:
    """Which ranks host the rollout engines (the same answer on every rank)."""

    hosts: tuple[int, ...]
    """Global rank hosting each engine; hosts[0] == 0."""
    replicas: tuple[int, ...]
    """The data-parallel replica each engine takes its weights from."""
    local_ranks: tuple[int, ...]
    """Each host's rank within its node (LOCAL_RANK): SGLang's GPUs are counted from its node's first GPU."""
    group: object = field(default=None, compare=False)
    """A gloo group of the hosts alone (with more than one engine): completions are gathered over it."""

    @property
    def hosts_engine(self) -> bool:
        """Whether this rank hosts an engine."""
        return dist.get_rank() in self.hosts


def place_engines(engines: int, timeout_s: float = 14400.0) -> Placement:
    """Spread `engines` over the data-parallel replicas (collective; megatron-core's groups must exist).
    `timeout_s`: how long rank 0 waits for the slowest host's share of a generation batch."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    if not 1 <= engines <= dp:
        raise ConfigError(f"rollout.engines ({engines}) must be between 1 and the {dp} data-parallel replicas: "
                          "each engine takes its weights from a replica of its own")
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    me = (dist.get_rank(), ps.get_data_parallel_rank(), first, int(os.environ.get("LOCAL_RANK", "0")))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    firsts = {dp_rank: (rank, local) for rank, dp_rank, is_first, local in everyone if is_first}
    # In host rank order, whatever megatron-core's rank order: a group's gather returns its members' parts in
    # rank order, and generate_shared puts the shares back together in the order of `hosts`.
    placed = sorted((firsts[r][0], r, firsts[r][1]) for r in (i * (dp // engines) for i in range(engines)))
    hosts, replicas, local_ranks = (tuple(column) for column in zip(*placed))
    group = rollout_group(timeout_s, list(hosts)) if engines > 1 else None  # every rank must call it
    return Placement(hosts=hosts, replicas=replicas, local_ranks=local_ranks, group=group)


def rollout_group(timeout_s: float, ranks: list[int] | None = None):
    """A gloo group of `ranks` (every rank when None) whose collectives wait up to `timeout_s`: a generation
    batch can outlast torch's default 30 minutes. Collective: every rank calls it, members or not."""
    return dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def shares(count: int, parts: int) -> list[range]:
    """`count` items cut into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


Finish = Callable[[range, list[list[Completion]]], list[Any]]
"""(the share's prompt indices, their completions) -> one result per prompt, made on the share's host."""


def generate_shared(engine: RolloutEngine | None, placement: Placement, prompts: list[list[int]],
                    params: SamplingParams, finish: Finish | None = None,
                    generated_in: Callable[[float], None] | None = None) -> list | None:
    """Every engine samples its share of `prompts` and its host applies `finish` to it; the results (the
    completions when `finish` is None), one per prompt in prompt order, on rank 0 (None elsewhere).
    `generated_in(seconds)`, on rank 0: the slowest engine's generation alone (its host's `finish` after it,
    and the other hosts', overlap the engines still generating).

    Collective over the hosts (ranks without an engine return at once). `prompts` must be the same on
    every host. Engine i of E seeds its share with params.seed x E + i, so no two engines, and no
    engine in two generation batches, draw from the same seed; one engine keeps params.seed. An
    error on any host, in generation or in `finish`, is raised on rank 0 with the host named; the
    other hosts carry on, to be stopped by rank 0.
    """
    if engine is None:
        return None
    hosts = placement.hosts
    index = hosts.index(dist.get_rank())
    share = shares(len(prompts), len(hosts))[index]
    seed = None if params.seed is None else (params.seed * len(hosts) + index) % 2**63  # a valid seed stays one
    started = time.perf_counter()
    try:
        mine = engine.generate(prompts[share.start:share.stop], dataclasses.replace(params, seed=seed)) \
            if len(share) else []
        seconds = time.perf_counter() - started
        if finish is not None:
            mine = finish(share, mine)
    except Exception as err:
        if len(hosts) == 1:
            raise
        # The engine numbers the prompts of its share from 0: the message says where the share starts.
        mine = RolloutError(f"rollout engine {index} (rank {dist.get_rank()}; its share: the batch's prompts "
                            f"{share.start} to {share.stop - 1}): {type(err).__name__}: {err}")
        mine.__cause__ = err  # rank 0 raises its own failure with the traceback (a gathered copy has none)
    if len(hosts) == 1:
        if generated_in is not None and index == 0:
            generated_in(seconds)
        return mine if index == 0 else None
    gathered: list | None = [None] * len(hosts) if index == 0 else None
    dist.gather_object(mine if isinstance(mine, RolloutError) else (seconds, mine), gathered, dst=0,
                       group=placement.group)
    if gathered is None:
        return None
    for i, part in enumerate(gathered):
        if isinstance(part, RolloutError):
            raise mine if i == index else part
    if generated_in is not None:
        generated_in(max(seconds for seconds, _ in gathered))
    return [result for _, part in gathered for result in part]

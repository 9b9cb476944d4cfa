"""More than one rollout engine: where they live, and how a generation batch is shared among them.

Engine i lives on the first rank (tensor-parallel rank 0, first pipeline stage) of data-parallel
replica i x (DP / engines). After every update it takes its weights from that replica (reshard.py),
so pushes to different engines run side by side and never cross replicas. Each engine samples a
contiguous share of every generation batch; rank 0 gathers the completions. Rank 0 always hosts
engine 0, and with one engine everything happens there as before.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch.distributed as dist

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.rollout.engine import Completion, RolloutEngine, SamplingParams


@dataclass(frozen=True)
class Placement:
    """Which ranks host the rollout engines (the same answer on every rank)."""

    hosts: tuple[int, ...]
    """Global rank hosting each engine; hosts[0] == 0."""
    replicas: tuple[int, ...]
    """The data-parallel replica each engine takes its weights from."""
    local_ranks: tuple[int, ...]
    """Each host's rank within its node (LOCAL_RANK): SGLang's GPUs are counted from its node's first GPU."""

    @property
    def hosts_engine(self) -> bool:
        """Whether this rank hosts an engine."""
        return dist.get_rank() in self.hosts


def place_engines(engines: int) -> Placement:
    """Spread `engines` over the data-parallel replicas (collective; megatron-core's groups must exist)."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    if not 1 <= engines <= dp:
        raise ConfigError(f"rollout.engines ({engines}) must be between 1 and the {dp} data-parallel replicas: "
                          "each engine takes its weights from a replica of its own")
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    me = (dist.get_rank(), ps.get_data_parallel_rank(), first, int(os.environ.get("LOCAL_RANK", "0")))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    replicas = tuple(i * (dp // engines) for i in range(engines))
    firsts = {dp_rank: (rank, local) for rank, dp_rank, is_first, local in everyone if is_first}
    return Placement(hosts=tuple(firsts[r][0] for r in replicas), replicas=replicas,
                     local_ranks=tuple(firsts[r][1] for r in replicas))


def shares(count: int, parts: int) -> list[range]:
    """`count` items cut into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def generate_shared(engine: RolloutEngine | None, placement: Placement, prompts: list[list[int]],
                    params: SamplingParams) -> list[list[Completion]] | None:
    """Collective: every engine samples its share of `prompts`; all completions, in prompt order, on rank 0.

    `prompts` must be the same on every host. Engine i seeds its share with params.seed + i (engine 0
    samples exactly what a single engine would for its share). None on ranks other than 0.
    """
    mine: list[list[Completion]] = []
    if engine is not None:
        index = placement.hosts.index(dist.get_rank())
        share = shares(len(prompts), len(placement.hosts))[index]
        seed = None if params.seed is None else params.seed + index
        if len(share):
            mine = engine.generate(prompts[share.start:share.stop], dataclasses.replace(params, seed=seed))
    if len(placement.hosts) == 1:
        return mine if dist.get_rank() == 0 else None
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if gathered is None:
        return None
    return [completions for host in placement.hosts for completions in gathered[host]]

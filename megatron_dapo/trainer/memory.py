"""Who holds the GPUs in colocated mode: the rollout engine while it generates, the actor while it trains.

A step walks the phases generation -> training -> push -> generation:

- training: the engine releases its memory (SGLang: weights and KV cache; embedded: KV cache) and
  every rank waits for that; with actor.offload the actor's weights and optimizer state come back
  from host memory;
- push: every rank hands its cached blocks back to the device and waits for the others, then the
  engine takes back its weights for the push (everything, when the actor stays resident);
- generation: with actor.offload the actor moves to host memory, and once every rank has done so
  the engine takes back its KV cache.

A checkpoint needs the actor on the device in the generation phase too, and room beside it: `actor_resident`
brings it back while the engine frees only its KV cache (so its weights, which SGLang does not keep through a
release, need no push after); for a save the KV cache is freed without offload too.

Every rank calls each phase at the same point (there are barriers); a phase already reached is a no-op.
A hand-off that fails on one rank (an engine that cannot take its memory back, a host out of memory for the
offloaded actor) stops every rank there, instead of leaving the others in their next collective.
In disaggregated mode the engine has GPUs of its own and the phases do nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager, Literal

import torch
import torch.distributed as dist

from megatron_dapo.parallel.init import stop_together

Timer = Callable[[str], ContextManager]


def _untimed(name: str) -> ContextManager:
    return contextlib.nullcontext()


class ColocatedMemory:
    def __init__(self, actor, *, colocated: bool, offload: bool):
        """Call `before_engine_start`, start the engine, then set `engine` (this rank's engine or None)."""
        self.actor, self.colocated, self.offload = actor, colocated, offload
        self.engine = None
        self.phase: Literal["generation", "training", "push"] = "generation"
        self.offloaded_bytes = 0
        """Bytes of weights and optimizer state the last offload copied to host memory."""

    def before_engine_start(self) -> None:
        """SGLang sizes its KV cache from the memory free when it starts, for the whole run: with offload the
        actor leaves the device on every rank first, and in any colocated run the blocks PyTorch keeps cached go
        back to the device (megatron-core's DDP copies each weight into its buffer and frees the original: 2 bytes
        per parameter of the rank's shard that SGLang would otherwise not see free)."""
        if self.colocated:
            if self.offload:
                self._offload()
            _empty_cache()
            dist.barrier()

    def to_training(self, timer: Timer = _untimed) -> None:
        if not self.colocated or self.phase == "training":
            return
        with timer("engine_memory"):
            _together(self.engine and self.engine.release_memory)  # every rank waits for the engine's memory
        if self.offload:
            with timer("actor_offload"):
                _together(self.actor.reload)
        self.phase = "training"

    def to_push(self, timer: Timer = _untimed) -> None:
        if not self.colocated or self.phase == "push":
            return
        if self.phase == "generation":
            self.to_training(timer)
        with timer("engine_memory"):
            _empty_cache()
            dist.barrier()
            if self.engine is None:
                _together(None)
            else:  # with offload the KV cache waits for the actor to leave
                _together(self.engine.resume_weights if self.offload else self.engine.resume_memory)
        self.phase = "push"

    def to_generation(self, timer: Timer = _untimed) -> None:
        if not self.colocated or self.phase == "generation":
            return
        if self.phase == "training":
            self.to_push(timer)
        if self.offload:
            with timer("actor_offload"):
                self._offload()
        with timer("engine_memory"):
            if self.offload:
                _empty_cache()
                dist.barrier()
            _together(self.engine and self.engine.resume_memory)
        self.phase = "generation"

    @contextlib.contextmanager
    def actor_resident(self, timer: Timer = _untimed, make_room: bool = False):
        """The actor on the device inside whatever the phase. In the generation phase with offload the engine
        meanwhile frees its KV cache only: its weights keep their values. make_room (a checkpoint's save): the
        engine frees its KV cache in the generation phase without offload too, where the actor is on the device
        already: megatron-core's save of the distributed optimizer gathers each state over the data-parallel
        group on the device, a whole gradient buffer's worth in float32 at a time (8 bytes per parameter of the
        rank's shard: the shards received and the flat buffer they are gathered into), which the KV cache would
        leave no room for."""
        if not (self.colocated and self.phase == "generation" and (self.offload or make_room)):
            yield
            return
        with timer("engine_memory"):
            _together(self.engine and (lambda: self.engine.release_memory(weights=False)))
        if self.offload:
            with timer("actor_offload"):
                _together(self.actor.reload)
        yield
        if self.offload:
            with timer("actor_offload"):
                self._offload()
        with timer("engine_memory"):
            _empty_cache()
            dist.barrier()
            _together(self.engine and self.engine.resume_memory)

    def _offload(self) -> None:
        """The actor to host memory on every rank (collective)."""
        def offload():
            self.offloaded_bytes = self.actor.offload().copied_bytes

        _together(offload)


def _together(part: Callable[[], object] | None) -> None:
    """`part()` (nothing when None) on this rank, then every rank stops if it failed on any (collective, and so
    also a barrier)."""
    failure = None
    try:
        if part is not None:
            part()
    except Exception as err:
        failure = err
    stop_together(failure)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

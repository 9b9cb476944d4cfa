"""Who holds the GPUs in colocated mode: the rollout engine while it generates, the actor while it trains.

A step walks the phases generation -> training -> push -> generation:

- training: the engine releases its memory (SGLang: weights and KV cache; embedded: KV cache) and
  every rank waits for that; with actor.offload the actor's weights and optimizer state come back
  from host memory;
- push: every rank hands its cached blocks back to the device and waits for the others, then the
  engine takes back its weights for the push (everything, when the actor stays resident);
- generation: with actor.offload the actor moves to host memory, and once every rank has done so
  the engine takes back its KV cache.

Every rank calls each phase at the same point (there are barriers); a phase already reached is a no-op.
In disaggregated mode the engine has GPUs of its own and the phases do nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager, Literal

import torch
import torch.distributed as dist

Timer = Callable[[str], ContextManager]


def _untimed(name: str) -> ContextManager:
    return contextlib.nullcontext()


class ColocatedMemory:
    def __init__(self, actor, engine, *, colocated: bool, offload: bool):
        """`actor` is already offloaded when `offload` (before the engine started, so that SGLang sized its
        KV cache with the actor's memory free); `engine` is this rank's engine or None."""
        self.actor, self.engine, self.colocated, self.offload = actor, engine, colocated, offload
        self.phase: Literal["generation", "training", "push"] = "generation"
        self.offloaded_bytes = 0
        """Bytes of weights and optimizer state the last offload copied to host memory."""

    def to_training(self, timer: Timer = _untimed) -> None:
        if not self.colocated or self.phase == "training":
            return
        with timer("engine_memory"):
            if self.engine is not None:
                self.engine.release_memory()
            dist.barrier()
        if self.offload:
            with timer("actor_offload"):
                self.actor.reload()
        self.phase = "training"

    def to_push(self, timer: Timer = _untimed) -> None:
        if not self.colocated or self.phase == "push":
            return
        if self.phase == "generation":
            self.to_training(timer)
        with timer("engine_memory"):
            _empty_cache()
            dist.barrier()
            if self.engine is not None:
                if self.offload:
                    self.engine.resume_weights()  # the KV cache waits for the actor to leave
                else:
                    self.engine.resume_memory()
        self.phase = "push"

    def to_generation(self, timer: Timer = _untimed) -> None:
        if not self.colocated or self.phase == "generation":
            return
        if self.phase == "training":
            self.to_push(timer)
        if self.offload:
            with timer("actor_offload"):
                self.offloaded_bytes = self.actor.offload().copied_bytes
        with timer("engine_memory"):
            if self.offload:
                _empty_cache()
                dist.barrier()
            if self.engine is not None:
                self.engine.resume_memory()
        self.phase = "generation"


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

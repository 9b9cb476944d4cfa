"""Megatron -> rollout engine: stream the actor's weights as full Hugging Face tensors after every step.

An engine takes its weights from one data-parallel replica (rank 0's, and with several engines one
replica each, see fleet.py). Inside that replica each pipeline stage gathers its tensor-parallel
shards inside its TP group (`stage_hf_tensors`); the first rank of every later stage sends its
stage's tensors to the replica's first rank, one tensor at a time, and that rank, which hosts the
engine, pushes them in buckets of `bucket_mb`. Replicas with engines push side by side. A bucket is
a fresh list of fresh tensors (gathered or received ones as they come, a parameter's own storage
copied), handed to the engine and dropped: its memory is never reused while the engine may still
read it. After the push, a parity probe compares every engine's log-probs of
fixed sequences with the trainer's.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from megatron_dapo.actor.export import stage_hf_tensors
from megatron_dapo.parallel.init import default_device, stop_together
from megatron_dapo.rollout.engine import RolloutError


@dataclass
class PushStats:
    tensors: int
    bytes: int
    seconds: float
    buckets: int

    def metrics(self) -> dict[str, float]:
        return {
            "reshard/seconds": self.seconds,
            "reshard/gb_per_s": self.bytes / max(self.seconds, 1e-9) / 1e9,
            "reshard/buckets": float(self.buckets),
        }


def _hf_tensors_for_engine(actor, replicas: tuple[int, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, yielded on the first rank of each replica in `replicas`; the other
    ranks of those replicas take part and yield nothing, the ranks of other replicas do nothing."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() not in replicas:
        return
    stage = ps.get_pipeline_model_parallel_rank()
    first_tp = ps.get_tensor_model_parallel_rank() == 0
    pipeline = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    local = stage_hf_tensors(actor.model, actor.arch)
    if stage == 0:
        for item in local:
            if first_tp:
                yield item
        if first_tp:
            for source in pipeline[1:]:
                while True:
                    header = [None]
                    dist.recv_object_list(header, src=source)
                    if header[0] is None:
                        break
                    name, shape, dtype = header[0]
                    tensor = torch.empty(shape, dtype=dtype, device=default_device())
                    dist.recv(tensor, src=source)
                    yield name, tensor
    else:
        for name, tensor in local:
            if first_tp:
                dist.send_object_list([(name, tuple(tensor.shape), tensor.dtype)], dst=pipeline[0])
                dist.send(tensor.contiguous(), dst=pipeline[0])
        if first_tp:
            dist.send_object_list([None], dst=pipeline[0])


def push_weights(actor, engine, version: int, bucket_mb: int, replicas: tuple[int, ...] = (0,)) -> PushStats | None:
    """Push the actor's weights into `engine` (on the first rank of each replica in `replicas`; None elsewhere).

    Collective over every rank. Returns the push's figures where an engine is, None elsewhere. An engine that
    refuses a call (a bucket's names or shapes, an incomplete push, SGLang's answer) is left stale and called no
    more; its host keeps taking part in the gathers and sends of the rest of the push, and then every rank
    raises RolloutError with the engine's message, none is left waiting in a collective. So does a copy into a
    bucket that fails (out of memory). A rank that cannot take part in a tensor's own gather or send (out of memory
    for the gathered or received tensor) raises its error alone: its partners wait in that collective until
    torchrun, seeing the rank exit, ends them.
    """
    actor.check_resident()  # the same answer on every rank: all refuse, none waits
    start = time.perf_counter()
    limit = bucket_mb * 2**20
    bucket: list[tuple[str, torch.Tensor]] = []
    size = count = total = buckets = 0
    own = {p.untyped_storage().data_ptr() for p in actor.model.parameters()}
    """The parameters' storage (megatron-core's DDP keeps them in a few large buffers): a tensor in one is copied."""
    failure: RolloutError | None = None

    def call(method, *args) -> None:
        nonlocal failure
        if failure is None:
            try:
                method(*args)
            except Exception as err:
                failure = RolloutError(f"the weight push into the rollout engine failed ({method.__name__}): "
                                       f"{type(err).__name__}: {err}")
                failure.__cause__ = err

    def flush() -> None:
        nonlocal total, buckets, bucket, size
        call(engine.update_weights, bucket)
        total, buckets, bucket, size = total + size, buckets + 1, [], 0

    def add(name: str, tensor: torch.Tensor) -> None:
        nonlocal size, count
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > limit:  # a bucket outgrows the limit only by a tensor larger than it
            flush()
        if tensor.untyped_storage().data_ptr() in own:  # the engine may keep it: never a parameter's own storage
            tensor = tensor.detach().clone()
        bucket.append((name, tensor))  # a gathered or received tensor is already fresh: no second copy
        size += nbytes
        count += 1
        if size >= limit:
            flush()

    if engine is not None:
        call(engine.begin_weight_update)
    for name, tensor in _hf_tensors_for_engine(actor, replicas):
        if failure is not None:  # the engine is out of this push: only the collectives go on
            continue
        if engine is None:
            failure = RolloutError(f"rank {dist.get_rank()} was handed {name} to push but hosts no rollout engine")
            continue
        try:  # a copy that runs out of memory here stops every rank below, not this one alone mid-collective
            add(name, tensor)
        except Exception as err:
            failure = RolloutError(f"the weight push into the rollout engine failed at {name}: "
                                   f"{type(err).__name__}: {err}")
            failure.__cause__ = err
            bucket, size = [], 0
    if engine is not None:
        if bucket:
            call(engine.update_weights, bucket)
            total, buckets = total + size, buckets + 1
        call(engine.end_weight_update, version)
    stop_together(failure, RolloutError)
    if engine is None:
        return None
    return PushStats(tensors=count, bytes=total, seconds=time.perf_counter() - start, buckets=buckets)


class ProbeDiff(NamedTuple):
    """|engine log-prob - trainer log-prob| over the probe's scored tokens, both for the engine that differs most
    (by its mean)."""

    max: float
    """The largest difference at one token."""
    mean: float
    """The mean difference over the tokens (what rollout.parity_threshold bounds: one token's bf16 rounding can
    move its log-prob by ~0.1 while a wrong tensor moves all of them)."""
    rank: int = -1
    """The global rank that hosts that engine (-1 when no rank has one)."""


def probe_parity(actor, engine, probe: torch.Tensor) -> ProbeDiff:
    """The probe sequences [B, S] scored by every rank's engine (None where a rank has none) against the
    trainer; all ranks get the result."""
    return engine_probe_diff(engine, probe, trainer_probe_logprobs(actor, probe))


PROBE_TEMPERATURE = 1.0
"""The probe compares plain log_softmax(logits): SGLang scores a prompt's tokens at temperature 1 whatever the
request's temperature, and the weights are what the probe checks, not the sampling."""


def trainer_probe_logprobs(actor, probe: torch.Tensor) -> torch.Tensor:
    """The actor's log-probs of the probe sequences [B, S] -> [B, S] (column 0 is 0), at PROBE_TEMPERATURE;
    collective."""
    from megatron_dapo.actor.batch import ActorBatch

    lengths = torch.full((probe.shape[0],), probe.shape[1])
    batch = ActorBatch(tokens=probe, lengths=lengths, loss_mask=torch.zeros_like(probe))
    return actor.compute_logprobs(batch, temperature=PROBE_TEMPERATURE)[0]


def engine_probe_diff(engine, probe: torch.Tensor, trainer: torch.Tensor) -> ProbeDiff:
    """|engine log-prob - `trainer`| over the probe sequences [B, S], largest and mean, for the rank's engine
    (None where a rank has none); all ranks get the worst engine's. NaN from an engine counts as infinitely far
    off; an engine that cannot score the probe at all stops every rank with its error."""
    diff = torch.zeros(3, dtype=torch.float64, device=default_device())  # max, mean, the engine's rank
    diff[2] = -1
    failure = None
    if engine is not None:
        diff[2] = dist.get_rank() if dist.is_initialized() else 0
        try:
            scored = engine.score(probe.tolist(), PROBE_TEMPERATURE)
            shapes = [tuple(s.shape) for s in scored]
            if shapes != [(probe.shape[1] - 1,)] * probe.shape[0]:  # a broadcast would compare the wrong tokens
                raise RolloutError(f"score() gave log-probs of shapes {shapes} for {probe.shape[0]} sequences of "
                                   f"{probe.shape[1]} tokens (expected {probe.shape[1] - 1} each)")
            gaps = torch.cat([(s.double().cpu() - trainer[i, 1:].double()).abs() for i, s in enumerate(scored)])
            diff[0], diff[1] = gaps.max(), gaps.mean()
        except Exception as err:
            failure = RolloutError(f"the rollout engine could not score the weight-parity probe: "
                                   f"{type(err).__name__}: {err}")
            failure.__cause__ = err
        diff[:2][~torch.isfinite(diff[:2])] = float("inf")  # NaN compares false with any threshold
    stop_together(failure, RolloutError)
    if dist.get_world_size() > 1:  # both figures of one engine, the one whose mean is largest
        rows = [torch.empty_like(diff) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, diff)
        diff = max(rows, key=lambda row: (float(row[1]), float(row[0]), float(row[2]) >= 0))
    return ProbeDiff(max=float(diff[0]), mean=float(diff[1]), rank=int(diff[2]))

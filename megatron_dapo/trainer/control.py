"""Rank 0's words to every rank during rollout, over a process group whose timeout covers a rollout.

While the engines generate, the ranks without one wait for rank 0's next word ("more", "done", an
error, the kept groups). A generation batch can outlast torch's default 30-minute collective
timeout (the 32B recipe samples 1536 responses of up to 20k tokens per engine), which would stop
the waiting ranks with a timeout in the middle of a healthy run. The words therefore travel over a
gloo group of their own with trainer.rollout_timeout_s; training collectives keep the default, so
a rank that is really stuck there is still found in 30 minutes.

The actor batch built from the kept groups is sent once every rank has had the word "done", as
unpadded tensors (`ActorBatch.pack`, 9 bytes a token: 0.5 GB for 8192 responses of 7k tokens). The
kept groups pickled took 12.8 bytes a token and about 79 once unpickled, 4.5 GB of Python objects on each
rank, and a receiving rank was ready 1.3x later, after 4x the work of its own (tools/bench_batch_transfer.py).
It goes over the default group (NCCL on GPUs), because gloo's broadcast sends the whole payload from rank 0 to each rank in turn.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dapo.actor.batch import ActorBatch
from megatron_dapo.rollout.fleet import rollout_group


class ControlChannel:
    def __init__(self, timeout_s: float):
        """Collective: every rank builds it at the same point."""
        self.group = rollout_group(timeout_s) if dist.get_world_size() > 1 else None

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a word or another small picklable object; what other ranks pass is
        ignored), waiting up to the rollout timeout."""
        return self._broadcast(obj, self.group)

    def share_batch(self, batch: ActorBatch | None, device: torch.device,
                    packed: tuple[dict, list[torch.Tensor]] | None = None) -> ActorBatch | None:
        """Rank 0's actor batch (or None) on every rank, through `device` (the default group's: CUDA for NCCL),
        over the default group: call it when every rank is there. packed: rank 0's `batch.pack()`, made before
        the word "done" while an error there can still reach the waiting ranks (the default: packed here)."""
        if dist.get_world_size() == 1:
            return batch
        if dist.get_rank() == 0 and batch is not None:
            header, tensors = packed or batch.pack()
        else:
            header, tensors = None, None
        header = self._broadcast(header, None)
        if header is None:
            return None
        if dist.get_rank() == 0:
            for tensor in tensors:
                dist.broadcast(tensor.to(device), src=0)
            return batch
        buffers = ActorBatch.receive_buffers(header, device)
        for buffer in buffers:
            dist.broadcast(buffer, src=0)
        return ActorBatch.unpack(header, buffers)

    def _broadcast(self, obj, group):
        if dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

"""Rank 0's words to every rank during rollout, over a process group whose timeout covers a rollout.

While the engines generate, the ranks without one wait for rank 0's next word ("more", "done", an
error, the kept groups). A generation batch can outlast torch's default 30-minute collective
timeout (the 32B recipe samples 1536 responses of up to 20k tokens per engine), which would stop
the waiting ranks with a timeout in the middle of a healthy run. The words therefore travel over a
gloo group of their own with trainer.rollout_timeout_s; training collectives keep the default, so
a rank that is really stuck there is still found in 30 minutes.

The kept groups themselves (about 1 GB pickled for 8192 responses of 7k tokens) are sent once every
rank has had the word "done": over the default group (NCCL on GPUs), because gloo's broadcast sends
the whole payload from rank 0 to each rank in turn.
"""
from __future__ import annotations

import torch.distributed as dist

from megatron_dapo.rollout.fleet import rollout_group


class ControlChannel:
    def __init__(self, timeout_s: float):
        """Collective: every rank builds it at the same point."""
        self.group = rollout_group(timeout_s) if dist.get_world_size() > 1 else None

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a word or another small picklable object; what other ranks pass is
        ignored), waiting up to the rollout timeout."""
        return self._broadcast(obj, self.group)

    def share(self, obj):
        """Rank 0's large `obj` on every rank, over the default group: call it when every rank is there."""
        return self._broadcast(obj, None)

    def _broadcast(self, obj, group):
        if dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

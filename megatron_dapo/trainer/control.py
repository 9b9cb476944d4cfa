"""Rank 0's words to every rank during rollout, over a process group whose timeout covers a rollout.

While the engines generate, the ranks without one wait for rank 0's next word ("more", "done", an
error, the kept groups). A generation batch can outlast torch's default 30-minute collective
timeout (the 32B recipe samples 1536 responses of up to 20k tokens per engine), which would stop
the waiting ranks with a timeout in the middle of a healthy run. The words therefore travel over a
gloo group of their own with trainer.rollout_timeout_s; training collectives keep the default, so
a rank that is really stuck there is still found in 30 minutes.
"""
from __future__ import annotations

import torch.distributed as dist

from megatron_dapo.rollout.fleet import rollout_group


class ControlChannel:
    def __init__(self, timeout_s: float):
        """Collective: every rank builds it at the same point."""
        self.group = rollout_group(timeout_s) if dist.get_world_size() > 1 else None

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object; what other ranks pass is ignored)."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

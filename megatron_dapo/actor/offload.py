"""The actor's device memory moved to host memory while a colocated rollout engine generates.

What the actor holds between two updates lives in a few large storages: megatron-core's parameter
buffers (every weight is a view into one), its gradient buffers (`main_grad` views), the
optimizer's fp32 master weights and its Adam moments. Offloading works on those storages, not on
tensors: each one is copied to host memory and its device allocation is shrunk to nothing, so every
view (a parameter, a bucket, an optimizer shard) stays the same object and sees its data again after
`reload`. Gradients are not copied: every update starts by zeroing them, so they come back as zeros.

Arithmetic for a 32B model at TP8 with the distributed optimizer over DP16, per GPU: bf16 weights
8 GB, fp32 gradients 16 GB, fp32 master weights and moments 3 GB. Offloading hands those 27 GB to
the rollout engine and moves 11 GB each way over PCIe per step.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch


@dataclass
class OffloadStats:
    copied_bytes: int
    """Weights and optimizer state copied to host memory (and back on reload)."""
    dropped_bytes: int
    """Gradient buffers freed without a copy."""
    seconds: float


def _storages(actor) -> tuple[list[torch.UntypedStorage], list[torch.UntypedStorage]]:
    """The device storages of the actor's state: (to copy: weights, master weights, optimizer state;
    to drop: gradients). A storage shared by both kinds is copied."""
    device = actor.device
    keep: list[torch.Tensor] = list(actor.model.parameters())
    drop: list[torch.Tensor] = [g for p in keep for g in (getattr(p, "main_grad", None), p.grad) if g is not None]
    optimizers = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    for wrapper in optimizers:
        inner = wrapper.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                keep.append(p)
                with warnings.catch_warnings():  # the distributed optimizer's shards are views, given .grad by hand
                    warnings.simplefilter("ignore", UserWarning)
                    grad = p.grad
                if grad is not None:
                    drop.append(grad)
        keep.extend(v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor))

    def unique(tensors: list[torch.Tensor]) -> dict[int, torch.UntypedStorage]:
        found = {}
        for t in tensors:
            if t.device.type != device.type:  # e.g. Adam's step counters live on the host already
                continue
            storage = t.untyped_storage()
            if storage.nbytes() > 0:
                found.setdefault(storage.data_ptr(), storage)
        return found

    kept = unique(keep)
    dropped = {ptr: s for ptr, s in unique(drop).items() if ptr not in kept}
    return list(kept.values()), list(dropped.values())


def _bytes_view(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over the whole of `storage`."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,), (1,))


class HostOffload:
    """Moves an actor's weights and optimizer state to host memory (`offload`) and back (`reload`)."""

    def __init__(self, actor):
        self.actor = actor
        self._copied: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        """(device storage, host copy) while offloaded."""
        self._dropped: list[tuple[torch.UntypedStorage, int]] = []
        """(device storage, its size) of the gradients freed while offloaded."""
        self._host: list[torch.Tensor] = []
        """Host buffers kept from one offload to the next (pinned allocations are slow)."""

    @property
    def offloaded(self) -> bool:
        return bool(self._copied or self._dropped)

    def offload(self) -> OffloadStats:
        """Copy the state to host memory and free its device memory; nothing to do when already offloaded."""
        if self.offloaded:
            return OffloadStats(0, 0, 0.0)
        start = time.perf_counter()
        keep, drop = _storages(self.actor)
        sizes = [s.nbytes() for s in keep]
        if [h.numel() for h in self._host] != sizes:
            pin = keep[0].device.type == "cuda" if keep else False
            self._host = [torch.empty(n, dtype=torch.uint8, pin_memory=pin) for n in sizes]
        for storage, host in zip(keep, self._host):
            host.copy_(_bytes_view(storage, host.numel()), non_blocking=True)
        _synchronize(keep)
        for storage in keep:
            storage.resize_(0)
        self._copied = list(zip(keep, self._host))
        self._dropped = [(s, s.nbytes()) for s in drop]
        for storage, _ in self._dropped:
            storage.resize_(0)
        return OffloadStats(copied_bytes=sum(sizes), dropped_bytes=sum(n for _, n in self._dropped),
                            seconds=time.perf_counter() - start)

    def reload(self) -> OffloadStats:
        """Allocate the device memory again and copy the state back (gradients as zeros); nothing to do
        when not offloaded."""
        if not self.offloaded:
            return OffloadStats(0, 0, 0.0)
        start = time.perf_counter()
        for storage, host in self._copied:
            storage.resize_(host.numel())
            _bytes_view(storage, host.numel()).copy_(host, non_blocking=True)
        for storage, nbytes in self._dropped:
            storage.resize_(nbytes)
            _bytes_view(storage, nbytes).zero_()
        _synchronize([s for s, _ in self._copied])
        stats = OffloadStats(copied_bytes=sum(h.numel() for _, h in self._copied),
                             dropped_bytes=sum(n for _, n in self._dropped), seconds=time.perf_counter() - start)
        self._copied, self._dropped = [], []
        return stats


def _synchronize(storages: list[torch.UntypedStorage]) -> None:
    """Wait for the non-blocking copies: the host copy must be whole before the device memory goes."""
    if storages and storages[0].device.type == "cuda":
        torch.cuda.synchronize(storages[0].device)

"""Disaggregated weight sync: the engine's host rank broadcasts each bucket to the SGLang engine's GPUs.

The engine's TP workers and its host form a process group of their own (rank 0 = the host, ranks
1..tp = SGLang, as `init_weights_update_group(rank_offset=1)` places them). A bucket travels as one
flat byte tensor in SGLang's FlattenedTensorBucket layout (`load_format="flattened_bucket"`): one
broadcast per bucket, not one per tensor.

SGLang's calls block until its workers have taken part in the collective, so each collective runs
on a daemon thread while the calling thread talks to the engine. When the engine refuses a bucket
(it answers (False, message) before joining the broadcast), the error is printed and raised at once
and the run stops; the broadcast left waiting ends with the group's timeout (`timeout_s`): gloo
raises in its thread, NCCL's watchdog aborts the process. When the trainer's side fails first (its end
of the group or of a broadcast), its error is printed at once, and the engine's call returns only once
SGLang's side gives up (its group's own timeout); its error then names the trainer's as its cause. A
CUDA bucket is broadcast on a stream of its own, which the device's current stream waits for only once
the engine has loaded the bucket:
a broadcast the engine never joined holds up nothing else (the rest of the push's collectives, the
all-ranks stop), as NCCL's wait on the current stream would.
"""
from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_dapo.rollout.engine import RolloutError
from megatron_dapo.rollout.sglang.wire import dtype_name, expect_success, flatten

GROUP_NAME = "megatron_dapo_weights"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _InBackground:
    """`fn(*args, **kwargs)` on a daemon thread; `result()` waits for it and re-raises its error, which is also
    printed when it happens (`what` failed): the calling thread may be held in an engine call until SGLang's side
    gives up, minutes later."""

    def __init__(self, what: str, fn: Callable, *args, **kwargs):
        self._box: dict = {}

        def run():
            try:
                self._box["value"] = fn(*args, **kwargs)
            except BaseException as err:  # said now, and handed to the caller of result()
                print(f"weight broadcast to SGLang: the trainer's side of {what} failed ({type(err).__name__}: "
                      f"{err}); SGLang's side waits for it until its own timeout", file=sys.stderr, flush=True)
                self._box["error"] = err

        self._thread = threading.Thread(target=run, name="weight-broadcast", daemon=True)
        self._thread.start()

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the weight broadcast did not finish within {timeout:g} s")
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("value")

    def error(self) -> BaseException | None:
        """Its error, if it has failed by now."""
        return self._box.get("error")


def _broadcast(tensor: torch.Tensor, group, stream) -> None:
    """`tensor` from rank 0 of `group`; on `stream` (and the tensor's device) when one is given."""
    if stream is None:
        dist.broadcast(tensor, src=0, group=group)
        return
    with torch.cuda.device(tensor.device), torch.cuda.stream(stream):  # a new thread starts on device 0
        dist.broadcast(tensor, src=0, group=group)


class BroadcastSender:
    """The host's side of SGLang's `update_weights_from_distributed` (flattened buckets)."""

    def __init__(self, engine, tp_size: int, *, timeout_s: float = 600.0):
        self.engine, self.tp_size, self.timeout_s = engine, tp_size, timeout_s
        self.group = None

    def connect(self, backend: str) -> None:
        """Form the group with the engine's workers (once, before the first bucket)."""
        from sglang.srt.utils import init_custom_process_group

        port, world = _free_port(), 1 + self.tp_size
        joining = _InBackground("forming the group", init_custom_process_group, backend=backend,
                                init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=0,
                                group_name=GROUP_NAME, timeout=timedelta(seconds=self.timeout_s))
        try:
            expect_success(self.engine.init_weights_update_group(
                master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=world,
                group_name=GROUP_NAME, backend=backend), "init_weights_update_group")
        except RolloutError as err:
            if (cause := joining.error()) is not None:  # the trainer's side, where it failed first
                raise err from cause
            raise
        self.group = joining.result(timeout=self.timeout_s)

    def close(self) -> None:
        """The group taken down on both sides, before the engine shuts down (a communicator left to the end of the
        process would be torn down after its peers are gone). Nothing when none was formed."""
        if self.group is None:
            return
        group, self.group = self.group, None
        # Both sides at once, as the group was formed and each bucket is sent (the trainer's end in the background,
        # the engine's call here, on its event loop's thread): NCCL's teardown of a communicator may wait for every
        # member, so neither side may wait for the other's first.
        leaving = _InBackground("taking the group down", dist.destroy_process_group, group)
        try:
            expect_success(self.engine.destroy_weights_update_group(group_name=GROUP_NAME),
                           "destroy_weights_update_group")
        finally:
            leaving.result(timeout=self.timeout_s)

    def send(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Broadcast one bucket; returns when the engine has loaded it."""
        bucket = flatten(named_tensors)
        if self.group is None:  # the buckets' device decides: NCCL between GPUs, gloo for CPU tensors
            self.connect("nccl" if bucket.get_flattened_tensor().is_cuda else "gloo")
        metadata = bucket.get_metadata()
        tensor, side = bucket.get_flattened_tensor(), None
        if tensor.is_cuda:
            side = torch.cuda.Stream(device=tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))  # the bucket is written
            tensor.record_stream(side)
        sending = _InBackground("a bucket's broadcast", _broadcast, tensor, self.group, side)
        try:
            expect_success(self.engine.update_weights_from_distributed(
                names=[m.name for m in metadata], dtypes=[dtype_name(m.dtype) for m in metadata],
                shapes=[list(m.shape) for m in metadata], group_name=GROUP_NAME, flush_cache=False,
                load_format="flattened_bucket"), "update_weights_from_distributed")
        except RolloutError as err:  # said now: the broadcast left waiting may end the process before a raise
            print(f"weight broadcast to SGLang: {err}", file=sys.stderr, flush=True)
            if (cause := sending.error()) is not None:
                raise err from cause
            raise
        sending.result(timeout=self.timeout_s)  # the bucket's memory stays referenced until here
        if side is not None:
            torch.cuda.current_stream(tensor.device).wait_stream(side)

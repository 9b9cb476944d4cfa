"""Disaggregated weight sync against SGLang's own receiving code, over gloo on CPU.

SGLang's engine cannot run here, but the code its TP workers run for a push can:
`WeightUpdater.init_weights_update_group` (which forms the group with SGLang's
`init_custom_process_group`) and `receive_weights_from_distributed(load_format="flattened_bucket")`.
Each worker process below runs exactly that code. `_RelayEngine` stands in for sglang.Engine's
front end (tokenizer manager and scheduler sockets, which need a GPU): it binds every call the
adapter makes against the real `sglang.Engine` signature, forwards it to the workers and merges
their replies as SGLang does. The adapter's push must arrive in every worker as exactly the
tensors, names and dtypes that were sent.
"""
from __future__ import annotations

import datetime
import inspect
import io
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.required import unavailable


def _sglang_engine_class():
    try:
        from sglang.srt.entrypoints.engine import Engine
    except ImportError as err:
        unavailable("sglang", f"sglang does not import here ({err}); CI's kernel environment installs it")
    return Engine


def _sglang_worker(tp_rank: int, requests, replies) -> None:
    """One SGLang TP worker's side of a weight push, run by SGLang's WeightUpdater."""
    import torch.distributed as dist
    from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

    with socket.socket() as sock:  # SGLang's workers always have a default group; the updater asserts it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    updater = WeightUpdater(tp_rank=tp_rank, device="cpu", gpu_id=0, model_config=None, custom_weight_loaders={},
                            get_model=lambda: None, update_model_fields=None, recapture_cuda_graph=None,
                            get_model_runner=None)
    received = []
    while True:
        method, kwargs = requests.get()
        if method == "stop":
            buffer = io.BytesIO()
            torch.save(received, buffer)
            replies.put(buffer.getvalue())
            return
        if method == "init_weights_update_group":
            replies.put(updater.init_weights_update_group(**kwargs))
        elif method == "destroy_weights_update_group":
            replies.put(updater.destroy_weights_update_group(**kwargs))
        elif method == "update_weights_from_distributed":  # what SGLang's scheduler does with the request
            try:
                weights = updater.receive_weights_from_distributed(
                    names=kwargs["names"], dtypes=kwargs["dtypes"], shapes=kwargs["shapes"],
                    group_name=kwargs["group_name"], load_format=kwargs["load_format"])
            except Exception as err:
                replies.put((False, f"Failed to receive weights: {err}"))
            else:
                received.append([(name, tensor.clone()) for name, tensor in weights])
                replies.put((True, "Succeeded to update parameter online."))
        else:
            replies.put((True, f"{method}: nothing to do here"))


class _RelayEngine:
    """sglang.Engine's front end for the push calls: signature-checked, forwarded to the workers."""

    def __init__(self, tp_size: int):
        self.engine_class = _sglang_engine_class()
        ctx = mp.get_context("spawn")
        self.requests = [ctx.Queue() for _ in range(tp_size)]
        self.replies = ctx.Queue()
        self.workers = [ctx.Process(target=_sglang_worker, args=(rank, queue, self.replies), daemon=True)
                        for rank, queue in enumerate(self.requests)]
        for worker in self.workers:
            worker.start()
        self.calls: list[str] = []

    def _call(self, method: str, **kwargs):
        inspect.signature(getattr(self.engine_class, method)).bind(self, **kwargs)  # TypeError: not SGLang's API
        self.calls.append(method)
        for queue in self.requests:
            queue.put((method, kwargs))
        replies = [self.replies.get(timeout=120) for _ in self.requests]
        return all(ok for ok, _ in replies), "; ".join(sorted({message for _, message in replies}))

    def init_weights_update_group(self, **kwargs):
        return self._call("init_weights_update_group", **kwargs)

    def update_weights_from_distributed(self, **kwargs):
        return self._call("update_weights_from_distributed", **kwargs)

    def begin_weight_update(self, **kwargs):
        return self._call("begin_weight_update", **kwargs)

    def end_weight_update(self, **kwargs):
        return self._call("end_weight_update", **kwargs)

    def flush_cache(self, **kwargs):
        return self._call("flush_cache", **kwargs)

    def destroy_weights_update_group(self, **kwargs):
        return self._call("destroy_weights_update_group", **kwargs)

    def shutdown(self):
        inspect.signature(self.engine_class.shutdown).bind(self)
        self.calls.append("shutdown")

    def received(self) -> list[list[list[tuple[str, torch.Tensor]]]]:
        """Per worker, the buckets it received."""
        for queue in self.requests:
            queue.put(("stop", {}))
        out = [torch.load(io.BytesIO(self.replies.get(timeout=60))) for _ in self.requests]
        for worker in self.workers:
            worker.join(timeout=30)
        return out


def _buckets():
    gen = torch.Generator().manual_seed(0)
    first = [("model.embed_tokens.weight", torch.randn(13, 7, generator=gen).to(torch.bfloat16)),  # 182 bytes
             ("model.layers.0.self_attn.q_proj.bias", torch.randn(7, generator=gen)),
             ("model.layers.0.mlp.down_proj.weight", torch.randn(7, 5, generator=gen).t())]  # not contiguous
    second = [("model.norm.weight", torch.randn(7, generator=gen).to(torch.bfloat16)),
              ("lm_head.weight", torch.randn(13, 7, generator=gen).to(torch.bfloat16))]
    return [first, second]


def test_broadcast_push_arrives_in_every_sglang_worker():
    from megatron_dapo.rollout.engine import SamplingParams, StaleWeightsError
    from megatron_dapo.rollout.sglang import SGLangEngine

    relay = _RelayEngine(tp_size=2)
    engine = SGLangEngine(relay, tp_size=2, weight_sync="broadcast")
    sent = _buckets()
    engine.begin_weight_update()
    with pytest.raises(StaleWeightsError):  # no generation from half-pushed weights
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    for bucket in sent:
        engine.update_weights(bucket)
    engine.end_weight_update(version=3)
    assert engine.weight_version == 3
    # a second push reuses the group
    engine.begin_weight_update()
    engine.update_weights(sent[1])
    engine.end_weight_update(version=4)

    assert relay.calls == ["begin_weight_update", "init_weights_update_group", "update_weights_from_distributed",
                           "update_weights_from_distributed", "end_weight_update", "flush_cache",
                           "begin_weight_update", "update_weights_from_distributed", "end_weight_update",
                           "flush_cache"]
    # Closing takes the group down on SGLang's side (its workers say it existed), then on the trainer's, then stops
    # the engine.
    engine.close()
    assert relay.calls[-2:] == ["destroy_weights_update_group", "shutdown"]
    assert engine._sender.group is None
    for worker_buckets in relay.received():
        assert len(worker_buckets) == 3
        for got, want in zip(worker_buckets, [*sent, sent[1]]):
            got = dict(got)
            assert sorted(got) == sorted(name for name, _ in want)
            for name, tensor in want:
                assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
                assert torch.equal(got[name], tensor), name


def test_the_trainers_side_failing_is_said_when_it_fails_and_raised_when_asked(capfd):
    """The trainer's side of the group or of a broadcast runs on a thread while the engine's call holds the
    calling thread (until SGLang's side gives up, minutes later): its failure is printed when it happens, and
    raised by result()."""
    import time

    from megatron_dapo.rollout.sglang.broadcast import _InBackground

    def fail():
        raise RuntimeError("the port was taken")

    failing = _InBackground("forming the group", fail)
    deadline = time.monotonic() + 30
    while failing.error() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(failing.error(), RuntimeError)  # recorded once it is printed
    assert ("weight broadcast to SGLang: the trainer's side of forming the group failed (RuntimeError: the port was "
            "taken); SGLang's side waits for it until its own timeout") in capfd.readouterr().err
    with pytest.raises(RuntimeError, match="the port was taken"):
        failing.result(timeout=5)
    assert _InBackground("a bucket's broadcast", lambda: 7).result(timeout=5) == 7

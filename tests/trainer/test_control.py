"""Rank 0's words during rollout outlast the default collective timeout, and its actor batch reaches
every rank (2 gloo processes).

The world is started with a 3 s collective timeout standing in for torch's 30 minutes; rank 0 then
takes 6 s before its next word, as it does while its engine generates a long batch.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.distributed import run_checks

DEFAULT_TIMEOUT_S = 3.0
WAIT_S = 6.0


def check_the_control_channel_waits_out_a_long_generation(rank: int, world: int, workdir: Path) -> None:
    import torch.distributed as dist

    from megatron_dapo.rollout.fleet import rollout_group
    from megatron_dapo.trainer.control import ControlChannel

    channel = ControlChannel(timeout_s=60.0)
    hosts = rollout_group(60.0, [0, 1])  # as place_engines makes it for the engines' hosts
    if rank == 0:
        time.sleep(WAIT_S)
    assert channel.broadcast({"word": "more"} if rank == 0 else None) == {"word": "more"}

    if rank == 1:
        time.sleep(WAIT_S)  # the slowest host's share arrives late at rank 0
    gathered = [None, None] if rank == 0 else None
    dist.gather_object(f"share of rank {rank}", gathered, dst=0, group=hosts)
    if rank == 0:
        assert gathered == ["share of rank 0", "share of rank 1"]


def check_a_shorter_timeout_gives_up(rank: int, world: int, workdir: Path) -> None:
    """The same wait over a channel of 3 s, and over the default group, gives up: the channel's own
    timeout is what lets the wait above outlast the default (and the wait is long enough to show it)."""
    import torch.distributed as dist

    from megatron_dapo.trainer.control import ControlChannel

    short = ControlChannel(timeout_s=DEFAULT_TIMEOUT_S)

    def default_group(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    for name, broadcast in (("a 3 s channel", short.broadcast), ("the default group", default_group)):
        if rank == 0:
            time.sleep(WAIT_S)
            try:  # rank 1 has given up by now; whether this send fails too depends on timing
                broadcast({"word": "more"})
            except RuntimeError:
                pass
            continue
        with pytest.raises(RuntimeError, match="(?i)timed out|timeout"):
            broadcast(None)
            raise AssertionError(f"a {WAIT_S} s wait over {name} did not time out")


def check_the_actor_batch_reaches_every_rank(rank: int, world: int, workdir: Path) -> None:
    """Rank 0's actor batch arrives bit for bit on rank 1 (as unpadded tensors); no batch arrives as None."""
    import torch

    from megatron_dapo.trainer.control import ControlChannel
    from tests.actor.test_batch import _batch_from

    channel = ControlChannel(timeout_s=60.0)
    batch = _batch_from([(4, [3, 9, 1, 6]), (7, [2, 2, 15, 5])], seed=3)
    received = channel.share_batch(batch if rank == 0 else None, torch.device("cpu"))
    for name in ("tokens", "lengths", "loss_mask", "advantages", "rollout_logp"):
        a, b = getattr(batch, name), getattr(received, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert received.old_logp is None
    assert channel.share_batch(None, torch.device("cpu")) is None


def check_a_checkpoint_one_rank_cannot_see_stops_every_rank(rank: int, world: int, workdir: Path) -> None:
    """Rank 0 picks the checkpoint to resume from; a node whose file system has not caught up sees no marker
    there. Every rank stops with that named, instead of rank 1 alone failing to read the marker (and rank 0
    waiting for it in the next collective)."""
    import json

    from megatron_dapo.actor.checkpoint import MARKER, CheckpointError
    from megatron_dapo.trainer.checkpoints import load

    path = workdir / f"as_rank_{rank}_sees_it" / "step_000003"
    path.mkdir(parents=True)
    if rank == 0:
        (path / MARKER).write_text(json.dumps({"trainer": {"step": 3}}))
    with pytest.raises(CheckpointError, match=r"step_000003 is incomplete \(no COMPLETE.json"):
        load(path, actor=None)
    # A marker a power cut left empty is named too, on every rank.
    (path / MARKER).write_text("" if rank == 1 else json.dumps({"trainer": {"step": 3}}))
    with pytest.raises(CheckpointError, match=r"step_000003/COMPLETE.json cannot be read \(JSONDecodeError"):
        load(path, actor=None)


class _EngineOutOfMemory:
    """A colocated engine whose memory hand-offs fail (the device is full): what every rank must hear of."""

    def release_memory(self):
        raise RuntimeError("release_memory: the engine's memory could not be freed")

    def resume_memory(self):
        raise RuntimeError("resume_memory: out of device memory for the KV cache")


def check_a_memory_hand_off_that_fails_on_one_rank_stops_every_rank(rank: int, world: int, workdir: Path) -> None:
    """Colocated mode: the engine on rank 0 fails to free, then to take back, its memory; rank 1, which hosts none,
    raises the same message instead of waiting for rank 0 in its next collective; the phase stays where it was."""
    from megatron_dapo.trainer.memory import ColocatedMemory

    memory = ColocatedMemory(None, colocated=True, offload=False)
    memory.engine = _EngineOutOfMemory() if rank == 0 else None
    said = "" if rank == 0 else r" \[found on rank 0; every rank stops\]"
    with pytest.raises(RuntimeError, match=f"^release_memory: the engine's memory could not be freed{said}$"):
        memory.to_training()
    assert memory.phase == "generation"
    memory.phase = "training"
    with pytest.raises(RuntimeError, match=f"^resume_memory: out of device memory for the KV cache{said}$"):
        memory.to_push()
    assert memory.phase == "training"


class _Recording:
    """An engine's or actor's memory methods, each call written to `log` as (who, method, keyword arguments)."""

    def __init__(self, who: str, log: list):
        self.who, self.log = who, log

    def __getattr__(self, method: str):
        def call(**kwargs):
            self.log.append((self.who, method, kwargs))
            if method == "offload":
                return SimpleNamespace(copied_bytes=7)

        return call


def check_the_memory_hand_offs_come_in_the_order_they_need(rank: int, world: int, workdir: Path) -> None:
    """With actor.offload the engine takes back its weights for the push while the actor is still on the device,
    and its KV cache only once the actor has left; a checkpoint in the generation phase frees the KV cache only
    (SGLang would need a push after freeing its weights), without offload too (the save's gathers need the room),
    and the actor on the device for anything else (the probe at the start) needs no hand-off without offload.
    Without offload the engine takes everything back for the push. Rank 1 hosts no engine: its actor moves at the
    same points."""
    from megatron_dapo.trainer.memory import ColocatedMemory

    for offload in (True, False):
        log: list = []
        memory = ColocatedMemory(_Recording("actor", log), colocated=True, offload=offload)
        memory.before_engine_start()
        memory.engine = _Recording("engine", log) if rank == 0 else None
        memory.to_push()
        memory.to_generation()
        with memory.actor_resident(make_room=True):
            log.append(("checkpoint", "save", {}))
        with memory.actor_resident():
            log.append(("actor", "probe", {}))
        memory.to_training()
        engine = [
            ("engine", "release_memory", {}),
            ("engine", "resume_weights" if offload else "resume_memory", {}),
            ("engine", "resume_memory", {}),
            ("engine", "release_memory", {"weights": False}),
            ("engine", "resume_memory", {}),
            ("engine", "release_memory", {}),
        ]
        if offload:
            expected = [("actor", "offload", {}),  # before any engine starts: SGLang sizes its cache then
                        engine[0], ("actor", "reload", {}), engine[1],  # to_push, through training
                        ("actor", "offload", {}), engine[2],  # to_generation: the KV cache once the actor is gone
                        engine[3], ("actor", "reload", {}), ("checkpoint", "save", {}), ("actor", "offload", {}),
                        engine[4],
                        engine[3], ("actor", "reload", {}), ("actor", "probe", {}), ("actor", "offload", {}),
                        engine[4],
                        engine[5], ("actor", "reload", {})]
            assert memory.offloaded_bytes == 7
        else:  # the actor stays: the save frees the KV cache, the probe needs no hand-off
            expected = [engine[0], engine[1], engine[2], engine[3], ("checkpoint", "save", {}), engine[4],
                        ("actor", "probe", {}), engine[5]]
        if rank != 0:
            expected = [call for call in expected if call[0] != "engine"]
        assert log == expected, (offload, log)
        assert memory.phase == "training"


CHECKS = [check_the_control_channel_waits_out_a_long_generation, check_the_actor_batch_reaches_every_rank,
          check_a_checkpoint_one_rank_cannot_see_stops_every_rank,
          check_a_memory_hand_off_that_fails_on_one_rank_stops_every_rank,
          check_the_memory_hand_offs_come_in_the_order_they_need,
          check_a_shorter_timeout_gives_up]  # the last leaves the default group timed out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(2, CHECKS, tmp_path_factory.mktemp("control"), timeout_s=120,
                      collective_timeout_s=DEFAULT_TIMEOUT_S)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_control(results, check):
    assert not results[check.__name__], "\n".join(results[check.__name__])


def test_an_update_whose_loss_or_grad_norm_is_not_finite_stops_the_run(tmp_path):
    from megatron_dapo.trainer.loop import check_update

    check_update({"actor/pg_loss": 0.3, "actor/grad_norm": 1.2, "actor/entropy": float("nan")}, 4, tmp_path)
    for bad in ({"actor/grad_norm": float("nan")}, {"actor/pg_loss": float("inf")}):
        update = {"actor/pg_loss": 0.3, "actor/grad_norm": 1.2, **bad}
        with pytest.raises(RuntimeError) as err:
            check_update(update, 4, tmp_path)
        key, value = next(iter(bad.items()))
        assert str(err.value).startswith(f"step 4: the actor's update gave {key}={value}: training diverged, so its "
                                         "weights are not saved; the last complete checkpoint in "
                                         f"{tmp_path / 'checkpoints'} is intact")

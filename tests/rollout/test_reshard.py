"""Megatron TP2 x PP2 -> embedded engine: after every update and push, the engine computes what the trainer does.
With two engines (one per data-parallel replica), each one does, and a batch shared among them samples
what the engines would sample alone."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest

from tests.actor.test_actor_parallel import TEMPERATURE, VOCAB, _actor, _batch
from tests.distributed import run_checks
from tests.tiny_models import hf_logprobs, make_tiny_model

FAMILIES = ("qwen2", "qwen3")  # tied embeddings across pipeline stages; q/k norms
SMALL_BUCKET_MB = 0.05
"""52 KB: a tiny model (325-450 KB) goes in several buckets, and the embedding (77 KB) outgrows one alone."""


def _recording(engine) -> list[tuple[int, int, bool]]:
    """Each update_weights call the engine gets: (tensors, bytes, whether it raised)."""
    calls: list[tuple[int, int, bool]] = []
    update = engine.update_weights

    @functools.wraps(update)  # the push names the engine's method in its errors
    def recording(named_tensors):
        named_tensors = list(named_tensors)
        nbytes = sum(t.numel() * t.element_size() for _, t in named_tensors)
        try:
            update(named_tensors)
        except Exception:
            calls.append((len(named_tensors), nbytes, True))
            raise
        calls.append((len(named_tensors), nbytes, False))

    engine.update_weights = recording
    return calls


def check_engine_follows_the_trainer_after_every_push(rank: int, world: int, workdir: Path) -> None:
    import torch.distributed as dist

    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.rollout.embedded import EmbeddedEngine
    from megatron_dapo.rollout.reshard import probe_parity, push_weights

    tokens, lengths, mask, advantages = _batch(groups=4, n=2)
    probe = tokens[:2, :12]
    for family in FAMILIES:
        folder = workdir / family
        actor = _actor(folder, 2, 2, False, ppo_mini_batch_size=4)
        engine = EmbeddedEngine.from_pretrained(folder) if rank == 0 else None
        calls = _recording(engine) if engine is not None else []
        old_logp = hf_logprobs(folder, tokens, TEMPERATURE)
        before = probe_parity(actor, engine, probe).max
        assert before <= 1e-5, f"{family}: engine and trainer disagree before training ({before})"
        for step in range(3):
            batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                               old_logp=old_logp)
            actor.update(batch, group_size=2)
            stale = probe_parity(actor, engine, probe).max
            calls.clear()
            stats = push_weights(actor, engine, version=step + 1, bucket_mb=SMALL_BUCKET_MB)
            diff = probe_parity(actor, engine, probe).max
            assert stale > 1e-4, f"{family} step {step}: the update did not move the probe ({stale})"
            assert diff <= 1e-5, f"{family} step {step}: engine differs from trainer by {diff} after the push"
            if rank == 0:
                assert engine.weight_version == step + 1 and stats.tensors > 0
                # Buckets of at most the limit, but for one tensor larger than it alone; every byte counted.
                limit = SMALL_BUCKET_MB * 2**20
                assert stats.buckets == len(calls) > 2 and not any(raised for *_, raised in calls), calls
                assert all(nbytes <= limit or tensors == 1 for tensors, nbytes, _ in calls), calls
                assert any(nbytes > limit for _, nbytes, _ in calls), calls  # the embedding
                assert stats.tensors == sum(t for t, _, _ in calls) and stats.bytes == sum(b for _, b, _ in calls)
                logged = stats.metrics()  # what the step's row says of the push
                assert logged["reshard/buckets"] == stats.buckets and logged["reshard/seconds"] == stats.seconds > 0
                assert logged["reshard/gb_per_s"] == stats.bytes / stats.seconds / 1e9
            else:
                assert stats is None
        dist.barrier()


def check_two_engines_each_follow_their_replica(rank: int, world: int, workdir: Path) -> None:
    import torch.distributed as dist

    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.config.loader import ConfigError
    from megatron_dapo.rollout.embedded import EmbeddedEngine
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams
    from megatron_dapo.rollout.fleet import generate_shared, place_engines, shares
    from megatron_dapo.rollout.reshard import probe_parity, push_weights

    tokens, lengths, mask, advantages = _batch(groups=4, n=2)
    probe = tokens[:2, :12]
    folder = workdir / "qwen2"
    for tp, pp in ((2, 1), (1, 2)):  # DP2 either way
        actor = _actor(folder, tp, pp, False, ppo_mini_batch_size=4)
        with pytest.raises(ConfigError, match=r"rollout.engines \(3\) must be between 1 and the 2 data-parallel"):
            place_engines(3)
        placement = place_engines(2)
        assert placement.hosts[0] == 0 and len(set(placement.hosts)) == 2 and placement.replicas == (0, 1)
        engine = EmbeddedEngine.from_pretrained(folder) if placement.hosts_engine else None

        prompts = [[3, 1, 4], [1, 5], [9, 2, 6, 5], [3, 5, 8], [9, 7]]
        params = SamplingParams(n=2, max_new_tokens=4, seed=11)
        shared = generate_shared(engine, placement, prompts, params)
        if rank == 0:  # both engines hold model.path's weights: rank 0's engine can redo engine 1's share
            alone = [engine.generate(prompts[share.start:share.stop], SamplingParams(n=2, max_new_tokens=4, seed=seed))
                     for share, seed in zip(shares(len(prompts), 2), (22, 23))]  # 11 x 2 engines + i
            expected = [c for part in alone for c in part]
            assert [[x.token_ids for x in cs] for cs in shared] == [[x.token_ids for x in cs] for cs in expected]
        else:
            assert shared is None
        wrapped = generate_shared(engine, placement, prompts, SamplingParams(max_new_tokens=2, seed=2**63 - 1))
        if rank == 0:  # engine i's seed (2**63 - 1) x 2 + i, taken modulo 2**63: 2**63 - 2 and 2**63 - 1
            alone = [engine.generate(prompts[share.start:share.stop], SamplingParams(max_new_tokens=2, seed=seed))
                     for share, seed in zip(shares(len(prompts), 2), (2**63 - 2, 2**63 - 1))]
            assert [[x.token_ids for x in cs] for cs in wrapped] == [[x.token_ids for x in cs] for part in alone
                                                                     for cs in part]
        else:
            assert wrapped is None

        # Each host finishes its own share (the trainer scores rewards there); rank 0 gets the results in
        # prompt order, and an error in one host's finish is raised on rank 0 with that host named.
        def where(share, outputs):
            return [(dist.get_rank(), i, len(cs)) for i, cs in zip(share, outputs)]

        finished = generate_shared(engine, placement, prompts, params, finish=where)
        if rank == 0:
            owners = [placement.hosts[0]] * 3 + [placement.hosts[1]] * 2  # shares of 5 prompts: 3 + 2
            assert finished == [(owner, i, 2) for i, owner in enumerate(owners)], finished

        # Rank 0 hears the slowest engine's generation time alone: engine 1's finish (1 s here, as a slow
        # scoring) is not generation, though rank 0 waits for it. Each engine's generate is timed here too, and
        # the longest of those is what rank 0 must hear (give or take the call around it; not the second of
        # scoring, and not rank 0's wait, which a busy machine can stretch either way).
        def slow_on_engine_1(share, outputs):
            if dist.get_rank() == placement.hosts[1]:
                time.sleep(1.0)
            return where(share, outputs)

        class Timed:
            def __init__(self, inner):
                self.inner, self.seconds = inner, 0.0

            def generate(self, *args):
                started = time.perf_counter()
                try:
                    return self.inner.generate(*args)
                finally:
                    self.seconds = time.perf_counter() - started

        timed, heard = (Timed(engine) if engine is not None else None), []
        generate_shared(timed, placement, prompts, params, finish=slow_on_engine_1, generated_in=heard.append)
        each = [None] * world
        dist.all_gather_object(each, timed.seconds if timed is not None else None)
        if rank == 0:
            longest = max(seconds for seconds in each if seconds is not None)
            assert len(heard) == 1 and longest <= heard[0] < longest + 0.5, (heard, each)
        else:
            assert heard == []

        def fails_on_engine_1(share, outputs):
            if dist.get_rank() == placement.hosts[1]:
                raise ValueError("no reward for this")
            return outputs

        if rank == 0:
            with pytest.raises(RolloutError, match=rf"rollout engine 1 \(rank {placement.hosts[1]}; its share: the "
                                                   r"batch's prompts 3 to 4\): ValueError: "
                                                   "no reward for this"):
                generate_shared(engine, placement, prompts, params, finish=fails_on_engine_1)
        else:
            assert generate_shared(engine, placement, prompts, params, finish=fails_on_engine_1) is None

        def fails_on_engine_0(share, outputs):
            if dist.get_rank() == placement.hosts[0]:
                raise ValueError("no reward here")
            return outputs

        if rank == 0:  # its own failure keeps its traceback (the gathered copy has none)
            with pytest.raises(RolloutError, match=r"rollout engine 0 .*ValueError: no reward here") as failed:
                generate_shared(engine, placement, prompts, params, finish=fails_on_engine_0)
            assert isinstance(failed.value.__cause__, ValueError) and failed.value.__cause__.__traceback__ is not None
        else:
            assert generate_shared(engine, placement, prompts, params, finish=fails_on_engine_0) is None

        old_logp = hf_logprobs(folder, tokens, TEMPERATURE)
        for step in range(2):
            batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                               old_logp=old_logp)
            actor.update(batch, group_size=2)
            stale = probe_parity(actor, engine, probe).max
            stats = push_weights(actor, engine, version=step + 1, bucket_mb=1, replicas=placement.replicas)
            diff = probe_parity(actor, engine, probe).max
            assert stale > 1e-4, f"TP{tp} PP{pp} step {step}: the update did not move the probe ({stale})"
            assert diff <= 1e-5, f"TP{tp} PP{pp} step {step}: an engine differs from its replica by {diff}"
            assert (stats is not None) == placement.hosts_engine
            if engine is not None:
                assert engine.weight_version == step + 1
        # Both figures are the worst engine's (by its mean): engine 0 is off at one token by 1, engine 1 at every
        # token by 0.1; the max of each figure apart would give (1, 0.1), of no engine.
        from megatron_dapo.rollout.reshard import engine_probe_diff, trainer_probe_logprobs

        trainer = trainer_probe_logprobs(actor, probe).clone()
        if rank == placement.hosts[0]:
            trainer[0, 5] += 1.0
        elif rank == placement.hosts[1]:
            trainer[:, 1:] += 0.1
        worst = engine_probe_diff(engine, probe, trainer)
        assert abs(worst.max - 0.1) < 1e-4 and abs(worst.mean - 0.1) < 1e-4, worst
        assert worst.rank == placement.hosts[1], worst  # the engine that differs is named by its rank
        # NaN at engine 1 is infinitely far off, on every rank, though engine 0 is close (NaN compares false).
        trainer = trainer_probe_logprobs(actor, probe).clone()
        if rank == placement.hosts[1]:
            trainer[1, 3] = float("nan")
        worst = engine_probe_diff(engine, probe, trainer)
        assert worst.max == worst.mean == float("inf") and worst.rank == placement.hosts[1], worst
        # An engine that cannot score the probe (here a token past its vocabulary) stops every rank with its error.
        bad = probe.clone()
        if rank == placement.hosts[1]:
            bad[0, 2] = VOCAB + 5
        with pytest.raises(RolloutError, match="the rollout engine could not score the weight-parity probe"):
            engine_probe_diff(engine, bad, trainer_probe_logprobs(actor, probe))
        dist.barrier()
    # Fewer engines than replicas (DP4, 2 engines): every second replica's first rank hosts one.
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_model_parallel

    init_model_parallel(ParallelConfig().layout(world), seed=1)
    placement = place_engines(2)
    assert (placement.hosts, placement.replicas) == ((0, 2), (0, 2)), placement
    assert placement.hosts_engine == (rank in (0, 2))


def check_a_push_the_engine_refuses_stops_every_rank(rank: int, world: int, workdir: Path) -> None:
    """Qwen2's weights (q/k/v biases) pushed into an engine built for Qwen3 (no biases, q/k norms): the engine
    refuses the bucket with the first q/k/v bias on rank 0 while ranks 1-3 are still gathering and sending the rest
    (small buckets: more follow it). The engine is given no bucket after it, every rank raises the engine's
    message, and the engine stays stale."""
    from megatron_dapo.rollout.embedded import EmbeddedEngine
    from megatron_dapo.rollout.engine import RolloutError, SamplingParams, StaleWeightsError
    from megatron_dapo.rollout.reshard import push_weights

    actor = _actor(workdir / "qwen2", 2, 2, False)
    engine = EmbeddedEngine.from_pretrained(workdir / "qwen3") if rank == 0 else None
    calls = _recording(engine) if engine is not None else []
    refused = (r"(?s)failed \(update_weights\): RolloutError: update_weights\(\) rejected .*"
               r"unknown tensor 'model.layers.0.self_attn.q_proj.bias'"
               + ("" if rank == 0 else r".*\[found on rank 0; every rank stops\]"))  # rank 0 raises its own
    with pytest.raises(RolloutError, match=refused):
        push_weights(actor, engine, version=1, bucket_mb=SMALL_BUCKET_MB)
    if engine is not None:
        # The refused bucket is the engine's last; the model had more (a whole push takes more than this many).
        assert calls and calls[-1][2] and not any(raised for *_, raised in calls[:-1]), calls
        from safetensors import safe_open

        with safe_open(workdir / "qwen2" / "model.safetensors", framework="pt") as pushed:
            whole = len(list(pushed.keys()))  # the tensors of a whole push of this (tied) model
        assert sum(t for t, _, _ in calls) < whole, (calls, whole)
        with pytest.raises(StaleWeightsError):
            engine.generate([[1, 2]], SamplingParams(max_new_tokens=1))


def check_the_engine_never_gets_a_parameters_storage(rank: int, world: int, workdir: Path) -> None:
    """The tensors handed to the engine are fresh: gathered or received ones as they are (a second copy would
    hold two buckets), a parameter's own (norm weights, replicated across TP) copied."""
    from megatron_dapo.rollout.embedded import EmbeddedEngine
    from megatron_dapo.rollout.reshard import push_weights

    actor = _actor(workdir / "qwen3", 2, 2, False)
    engine = EmbeddedEngine.from_pretrained(workdir / "qwen3") if rank == 0 else None
    given: list[int] = []
    if engine is not None:
        update = engine.update_weights

        def recording(named_tensors):
            named_tensors = list(named_tensors)
            given.extend(t.untyped_storage().data_ptr() for _, t in named_tensors)
            return update(named_tensors)

        engine.update_weights = recording
    push_weights(actor, engine, version=1, bucket_mb=1)
    if engine is not None:
        own = {p.untyped_storage().data_ptr() for p in actor.model.parameters()}
        assert given and not own & set(given), "a parameter's own storage reached the engine"


CHECKS = [check_engine_follows_the_trainer_after_every_push, check_two_engines_each_follow_their_replica,
          check_a_push_the_engine_refuses_stops_every_rank, check_the_engine_never_gets_a_parameters_storage]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reshard")
    for family in FAMILIES:
        make_tiny_model(family, workdir / family, vocab_size=VOCAB)
    return run_checks(4, CHECKS, workdir, timeout_s=600)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_reshard(results, check):
    assert not results[check.__name__], "\n".join(results[check.__name__])


def test_shares_are_contiguous_and_even():
    from megatron_dapo.rollout.fleet import shares

    assert shares(5, 2) == [range(0, 3), range(3, 5)]
    assert shares(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    assert [len(r) for r in shares(512, 16)] == [32] * 16

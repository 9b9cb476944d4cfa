"""Megatron TP2 x PP2 -> embedded engine: after every update and push, the engine computes what the trainer does."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.actor.test_actor_parallel import TEMPERATURE, VOCAB, _actor, _batch
from tests.distributed import run_checks
from tests.tiny_models import hf_logprobs, make_tiny_model

FAMILIES = ("qwen2", "qwen3")  # tied embeddings across pipeline stages; q/k norms


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
        old_logp = hf_logprobs(folder, tokens, TEMPERATURE)
        before = probe_parity(actor, engine, probe, TEMPERATURE)
        assert before <= 1e-5, f"{family}: engine and trainer disagree before training ({before})"
        for step in range(3):
            batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                               old_logp=old_logp)
            actor.update(batch, group_size=2)
            stale = probe_parity(actor, engine, probe, TEMPERATURE)
            stats = push_weights(actor, engine, version=step + 1, bucket_mb=1)
            diff = probe_parity(actor, engine, probe, TEMPERATURE)
            assert stale > 1e-4, f"{family} step {step}: the update did not move the probe ({stale})"
            assert diff <= 1e-5, f"{family} step {step}: engine differs from trainer by {diff} after the push"
            if rank == 0:
                assert engine.weight_version == step + 1 and stats.tensors > 0 and stats.buckets >= 1
            else:
                assert stats is None
        dist.barrier()


CHECKS = [check_engine_follows_the_trainer_after_every_push]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reshard")
    for family in FAMILIES:
        make_tiny_model(family, workdir / family, vocab_size=VOCAB)
    return run_checks(4, CHECKS, workdir, timeout_s=600)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_reshard(results, check):
    assert not results[check.__name__], "\n".join(results[check.__name__])

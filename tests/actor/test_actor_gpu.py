"""The Megatron actor in bf16 on one GPU (NCCL world of one): log-probs track transformers, and
actor.offload frees the GPU memory it says and changes no update.

Runs only where CUDA is present (it says why it skips elsewhere). Tolerance, stated and earned:
for each family, the actor's bf16 log-probs may differ from transformers' fp32 log-probs by at most
twice what transformers' own bf16 model differs by, on the same weights and tokens (plus 1e-3 for
the different kernels' rounding), and by no more than 0.1 anywhere.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_checks
from tests.required import unavailable
from tests.tiny_models import FAMILIES, hf_logprobs, make_tiny_model

TEMPERATURE = 0.9


def check_bf16_logprobs_track_transformers(rank: int, world: int, workdir: Path) -> None:
    import transformers

    from megatron_dapo.actor.actor import MegatronActor
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.config import ActorConfig
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_model_parallel

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 211, (4, 48), generator=gen)
    lengths = torch.tensor([48, 40, 33, 17])
    valid = (torch.arange(48)[None] < lengths[:, None]) & (torch.arange(48)[None] > 0)
    failures = []
    for family in FAMILIES:
        folder = workdir / family
        exact = hf_logprobs(folder, tokens, TEMPERATURE)
        hf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda()
        torch_error = ((hf_logprobs(hf16, tokens.cuda(), TEMPERATURE).cpu() - exact).abs() * valid).max().item()
        layout = ParallelConfig().layout(1)
        init_model_parallel(layout, seed=1)
        actor = MegatronActor(ActorConfig(), folder, layout, temperature=TEMPERATURE, bf16=True)
        logp, _ = actor.compute_logprobs(ActorBatch(tokens=tokens, lengths=lengths, loss_mask=valid.long()))
        ours = ((logp.cpu() - exact).abs() * valid).max().item()
        print(f"{family}: max |logp - fp32| actor bf16 {ours:.3g}, transformers bf16 {torch_error:.3g}", flush=True)
        if not (ours <= 2 * torch_error + 1e-3 and ours <= 0.1):
            failures.append(f"{family}: actor bf16 error {ours:.3g} vs transformers bf16 error {torch_error:.3g}")
    assert not failures, "; ".join(failures)


def check_bf16_offload_frees_the_gpu_and_changes_nothing(rank: int, world: int, workdir: Path) -> None:
    folder = workdir / "qwen3"
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 211, (4, 32), generator=gen)
    lengths = torch.tensor([32, 30, 21, 12])
    mask = ((torch.arange(32)[None] < lengths[:, None]) & (torch.arange(32)[None] >= 4)).long()
    advantages = torch.randn(4, generator=gen)
    for distributed_optimizer in (True, False):  # megatron-core's DistributedOptimizer, Float16Optimizer
        runs = []
        for offload in (False, True):
            runs.append(_two_updates(folder, tokens, lengths, mask, advantages, offload, distributed_optimizer))
        (plain, plain_logp), (moved, moved_logp) = runs
        name = "distributed optimizer" if distributed_optimizer else "plain optimizer"
        assert moved == plain, f"{name}: with offload {moved} != without {plain}"
        assert torch.equal(moved_logp, plain_logp), f"{name}: log-probs after the updates differ with offload"


def _two_updates(folder, tokens, lengths, mask, advantages, offload: bool, distributed_optimizer: bool):
    """(loss, grad norm) of two bf16 updates and the log-probs after them; with `offload`, the actor goes
    to host memory and back before each update, and must free at least what it says it copied and dropped."""
    from megatron_dapo.actor.actor import MegatronActor
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.config import ActorConfig
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_model_parallel

    layout = ParallelConfig(use_distributed_optimizer=distributed_optimizer).layout(1)
    init_model_parallel(layout, seed=1)
    actor = MegatronActor(ActorConfig(ppo_mini_batch_size=2), folder, layout, temperature=TEMPERATURE, bf16=True)
    batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages)
    batch.old_logp, _ = actor.compute_logprobs(batch)
    history = []
    for _ in range(2):
        if offload:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            stats = actor.offload()
            freed = before - torch.cuda.memory_allocated()
            assert freed >= stats.copied_bytes + stats.dropped_bytes > 0, (freed, stats)
            actor.reload()
        history.append(actor.update(batch, group_size=1))
    logp, _ = actor.compute_logprobs(batch)
    return [(m["actor/pg_loss"], m["actor/grad_norm"]) for m in history], logp


GPU_CHECKS = [check_bf16_logprobs_track_transformers, check_bf16_offload_frees_the_gpu_and_changes_nothing]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    if not torch.cuda.is_available():
        unavailable("gpu", "needs a CUDA GPU")
    workdir = tmp_path_factory.mktemp("actor_gpu")
    for family in FAMILIES:
        make_tiny_model(family, workdir / family)
    return run_checks(1, GPU_CHECKS, workdir, timeout_s=600, backend="nccl")


@pytest.mark.parametrize("check", GPU_CHECKS, ids=lambda c: c.__name__)
def test_actor_on_one_gpu(gpu_run, check):
    assert not gpu_run[check.__name__], "\n".join(gpu_run[check.__name__])

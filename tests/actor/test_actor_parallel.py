"""The Megatron actor on real megatron-core in 4 gloo processes: layouts never change the maths.

One spawn runs every check. References are computed with transformers' own models in pure torch:
log-probs at every layout must equal transformers'; one DAPO update (loss, grad norm, updated
weights) at every layout and micro-batch cut must equal the same update done on the HF model with
torch's AdamW.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_checks
from tests.tiny_models import FAMILIES, hf_logprobs, hf_logprobs_and_entropy, make_tiny_model

WORLD = 4
VOCAB = 300
TEMPERATURE = 0.9
# (tp, pp, sequence_parallel): DP is what remains of the 4 ranks.
# The key bias's true gradient is exactly 0 (it shifts all scores of a query equally), so what
# backward computes for it is rounding noise; Adam with a tiny eps would turn that noise into
# full-size steps of random sign. eps = 1e-6 keeps noise-level gradients from moving weights.
ADAM_EPS = 1e-6
ENTROPY_COEFF = 0.1
"""actor.entropy_coeff in the update checks that have an entropy bonus."""
LAYOUTS = [(1, 1, False), (2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False), (2, 2, True)]


def _batch(groups: int = 3, n: int = 2, width: int = 14):
    gen = torch.Generator().manual_seed(42)
    rows = groups * n
    tokens = torch.randint(0, VOCAB, (rows, width), generator=gen)
    lengths = torch.randint(6, width + 1, (rows,), generator=gen)
    lengths[0] = width
    prompt = 4
    pos = torch.arange(width)[None]
    for i, length in enumerate(lengths):
        tokens[i, length:] = 0
    mask = ((pos < lengths[:, None]) & (pos >= prompt)).long()
    advantages = torch.randn(rows, generator=gen)
    return tokens, lengths, mask, advantages


def _actor(folder: Path, tp: int, pp: int, sp: bool, weights: Path | None = None, grad_clip: float = 0.5,
           load_weights: bool = True, optim_kwargs: dict | None = None, norm_len: int | None = None,
           distributed_optimizer: bool = True, **actor_kwargs):
    import torch.distributed as dist

    from megatron_dapo.actor.actor import MegatronActor
    from megatron_dapo.actor.config import ActorConfig, OptimConfig
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_model_parallel

    layout = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
                            use_distributed_optimizer=distributed_optimizer).layout(dist.get_world_size())
    init_model_parallel(layout, seed=1)
    optim = OptimConfig(**{"lr": 1e-3, "lr_warmup_steps": 2, "weight_decay": 0.1, "grad_clip": grad_clip,
                           "eps": ADAM_EPS, **(optim_kwargs or {})})
    config = ActorConfig(optim=optim, **actor_kwargs)
    return MegatronActor(config, folder, layout, temperature=TEMPERATURE, bf16=False, weights=weights,
                         load_weights=load_weights, norm_len=norm_len)


def check_logprobs_equal_transformers_at_every_layout(rank: int, world: int, workdir: Path) -> None:
    from megatron_dapo.actor.batch import ActorBatch

    tokens, lengths, mask, _ = _batch(groups=5, n=1)
    valid = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    valid[:, 0] = False
    failures = []
    for family in FAMILIES:
        folder = workdir / family
        reference, reference_entropy = hf_logprobs_and_entropy(folder, tokens, TEMPERATURE)
        for tp, pp, sp in LAYOUTS:
            actor = _actor(folder, tp, pp, sp, ppo_max_token_len_per_gpu=30)  # several micro-batches
            logp, entropy = actor.compute_logprobs(ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask))
            diff = ((logp - reference).abs() * valid).max().item()
            # The entropy of the vocabulary-parallel slices combined (TP), gathered from the last stage (PP).
            entropy_diff = ((entropy - reference_entropy).abs() * valid).max().item()
            if not diff <= 1e-4 or not entropy_diff <= 1e-4:
                failures.append(f"{family} TP{tp} PP{pp} SP={sp}: max |logp - transformers| = {diff:.3g}, "
                                f"max |entropy - transformers| = {entropy_diff:.3g}")
    assert not failures, "; ".join(failures)


def _reference_update(folder: Path, tokens, lengths, mask, advantages, old_logp, steps_cfg, entropy_coeff=0.0,
                      mode="token-mean", rollout_logp=None, tis_cap=None, epochs=1, norm_len=None):
    """The same DAPO update done on transformers' model with torch's AdamW (with an entropy bonus when asked), with
    the package's loss, log-prob op and schedule, which tests/actor/test_loss.py, tests/ops/test_logprob.py and
    tests/actor/test_schedule.py check against hand formulas: what differs from the actor is everything else
    (megatron-core's layers, schedules, parallel layouts, optimizer and gradient reductions, and the counts each
    micro-batch's loss is normalised by, which here come from the whole mini-batch at once). `epochs` passes over
    the batch; `rollout_logp` and `tis_cap`: the truncated importance weight; `norm_len`: seq-mean-token-sum-norm's
    length."""
    import transformers

    from megatron_dapo.actor.actor import learning_rate
    from megatron_dapo.actor.config import OptimConfig
    from megatron_dapo.actor.loss import aggregate_loss, policy_loss
    from megatron_dapo.ops.logprob import vocab_parallel_logprob

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    params = dict(model.named_parameters())
    decay = [p for n, p in params.items() if p.dim() > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in params.items() if not (p.dim() > 1 and not n.endswith(".bias"))]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.999), eps=ADAM_EPS)
    mini, steps = steps_cfg
    history = []
    starts = [start for _ in range(epochs) for start in range(0, tokens.shape[0], mini)]
    for step, start in enumerate(starts):
        rows = slice(start, start + mini)
        for group in optim.param_groups:
            group["lr"] = learning_rate(OptimConfig(lr=1e-3, lr_warmup_steps=2), step)
        optim.zero_grad()
        t = tokens[rows]
        logits = model(t).logits
        logp, entropy = vocab_parallel_logprob(logits[:, :-1], t[:, 1:], temperature=TEMPERATURE)
        logp, entropy = torch.nn.functional.pad(logp, (1, 0)), torch.nn.functional.pad(entropy, (1, 0))
        out = policy_loss(logp, old_logp[rows], advantages[rows], mask[rows], clip_ratio_low=0.2,
                          clip_ratio_high=0.28, clip_ratio_c=10.0, loss_agg_mode=mode,
                          rollout_logp=None if rollout_logp is None else rollout_logp[rows], tis_cap=tis_cap,
                          norm_len=norm_len)
        loss = out.loss
        (loss - entropy_coeff * aggregate_loss(entropy, mask[rows], mode, norm_len=norm_len)).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), 0.5)
        optim.step()
        history.append((loss.item(), norm.item(), out.clip_high.item(), out.clip_high_prob.item(),
                        out.clip_high_prob_max.item()))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return history, state


def check_one_update_is_the_same_at_every_layout(rank: int, world: int, workdir: Path) -> None:
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.export import stage_hf_tensors

    tokens, lengths, mask, advantages = _batch(groups=4, n=2)
    failures = []
    for family in ("qwen2", "llama", "qwen3"):
        folder = workdir / family
        # Stale enough that some tokens are clipped high (ratio past 1.28), so their figures are compared too.
        old_logp = hf_logprobs(folder, tokens, TEMPERATURE) - 0.2 * torch.randn(tokens.shape,
                                                                                  generator=torch.Generator().manual_seed(3))
        # The rollout engine's log-probs, for the truncated importance weight min(exp(old - rollout), 1.1).
        rollout_logp = old_logp + 0.1 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(4))
        plain = (0.0, "token-mean", False, 1, None)
        variants = [plain, (ENTROPY_COEFF, "token-mean", False, 1, None)]
        # Per-sequence means (global sequence counts across micro-batches and ranks); the truncated importance
        # weight with two passes over the batch; sums over a fixed length (Dr. GRPO's), the entropy bonus's too.
        variants += [(ENTROPY_COEFF, "seq-mean-token-mean", False, 1, None), (0.0, "seq-mean-token-sum", True, 2, None),
                     (ENTROPY_COEFF, "seq-mean-token-sum-norm", False, 1, 24)]
        cases = [(tp, pp, sp, budget, plain) for tp, pp, sp in LAYOUTS for budget in (16384,)]
        cases += [(1, 1, False, 20, plain), (2, 2, True, 40, plain)]  # the same batch cut into other micro-batches
        cases += [(1, 1, False, 16384, variants[1]), (2, 2, True, 40, variants[1])]  # with an entropy bonus
        cases += [(1, 1, False, 20, variants[2]), (2, 2, True, 40, variants[2]), (2, 1, False, 30, variants[3])]
        cases += [(2, 2, True, 30, variants[4])]
        if family == "qwen3":  # its q/k norms' gradients are summed over the TP ranks by name; and split into stages
            cases = [(2, 1, True, 16384, plain), (1, 2, False, 16384, plain), (2, 2, False, 16384, plain)]
        references = {v: _reference_update(folder, tokens, lengths, mask, advantages, old_logp, (4, 2), v[0],
                                           mode=v[1], rollout_logp=rollout_logp if v[2] else None,
                                           tis_cap=1.1 if v[2] else None, epochs=v[3], norm_len=v[4])
                      for v in variants if any(case[4] == v for case in cases)}
        if variants[1] in references:
            assert references[plain][0][0][1] != references[variants[1]][0][0][1]  # the bonus changes the gradient
        for tp, pp, sp, budget, variant in cases:
            coeff, mode, tis, epochs, norm_len = variant
            history, state = references[variant]
            ref_loss = sum(h[0] for h in history) / len(history)
            ref_norm = sum(h[1] for h in history) / len(history)
            ref_clipped = sum(h[2] for h in history)
            assert ref_clipped > 0, "the batch must have tokens clipped high"
            ref_prob_mean = sum(h[3] for h in history) / ref_clipped
            ref_prob_max = max(h[4] for h in history)
            # over every token of every pass: the mini-batches hold unlike counts
            ref_clipfrac = ref_clipped / float(mask.sum() * epochs)
            actor = _actor(folder, tp, pp, sp, ppo_mini_batch_size=2, ppo_max_token_len_per_gpu=budget,
                           entropy_coeff=coeff, loss_agg_mode=mode, tis_imp_ratio_cap=1.1 if tis else None,
                           ppo_epochs=epochs, norm_len=norm_len)
            batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                               old_logp=old_logp, rollout_logp=rollout_logp if tis else None)
            metrics = actor.update(batch, group_size=2)
            name = (f"{family} TP{tp} PP{pp} SP={sp} budget={budget} entropy_coeff={coeff} {mode} "
                    f"tis={tis} epochs={epochs} norm_len={norm_len}")
            # Written as "not within" so that a NaN fails too.
            if not abs(metrics["actor/pg_loss"] - ref_loss) <= 1e-5 * abs(ref_loss):
                failures.append(f"{name}: loss {metrics['actor/pg_loss']} != {ref_loss}")
            if not abs(metrics["actor/grad_norm"] - ref_norm) <= 1e-5 * ref_norm:
                failures.append(f"{name}: grad norm {metrics['actor/grad_norm']} != {ref_norm}")
            for key, ref in (("actor/pg_clip_high_prob_mean", ref_prob_mean),
                             ("actor/pg_clip_high_prob_max", ref_prob_max), ("actor/pg_clipfrac_high", ref_clipfrac)):
                if not abs(metrics[key] - ref) <= 1e-5 * ref:
                    failures.append(f"{name}: {key} {metrics[key]} != {ref}")
            for hf_name, tensor in stage_hf_tensors(actor.model, actor.arch):
                expected = state[hf_name]
                rel = ((tensor - expected).norm() / expected.norm()).item()
                if not rel <= 1e-5:
                    failures.append(f"{name}: {hf_name} relative difference {rel:.3g}")
    # DP4 with mini-batches of one group (2 rows): two data-parallel ranks have no row in each optimizer step. They
    # still take part in the step (their gradients are zero), and must not add a row of their own to it.
    folder = workdir / "qwen2"
    drift = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
    old_logp = hf_logprobs(folder, tokens, TEMPERATURE) - 0.2 * drift
    history, state = _reference_update(folder, tokens, lengths, mask, advantages, old_logp, (2, 4))
    assert len(history) == 4  # optimizer steps of one group (2 rows) each
    actor = _actor(folder, 1, 1, False, ppo_mini_batch_size=1)
    assert actor.layout.dp == 4
    metrics = actor.update(ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                                      old_logp=old_logp), group_size=2)
    for key, ref in (("actor/pg_loss", sum(h[0] for h in history) / 4),
                     ("actor/grad_norm", sum(h[1] for h in history) / 4)):
        if not abs(metrics[key] - ref) <= 1e-5 * abs(ref):
            failures.append(f"qwen2 DP4 with idle ranks: {key} {metrics[key]} != {ref}")
    for hf_name, tensor in stage_hf_tensors(actor.model, actor.arch):
        rel = ((tensor - state[hf_name]).norm() / state[hf_name].norm()).item()
        if not rel <= 1e-5:
            failures.append(f"qwen2 DP4 with idle ranks: {hf_name} relative difference {rel:.3g}")
    assert not failures, "\n".join(failures[:20])


def check_checkpoint_saved_at_one_layout_loads_at_another(rank: int, world: int, workdir: Path) -> None:
    import torch.distributed as dist

    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.checkpoint import CheckpointError, load_actor, save_actor

    folder = workdir / "qwen2"  # tied embeddings: split across stages at PP2
    tokens, lengths, mask, advantages = _batch(groups=4, n=2)
    old_logp = hf_logprobs(folder, tokens, TEMPERATURE)

    def batch():
        return ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages, old_logp=old_logp)

    def close(a, b, what):
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5, f"{what}: log-probs differ by {diff}"

    def same_step(resumed, uninterrupted, what):
        for key in ("actor/pg_loss", "actor/grad_norm"):
            a, b = resumed[key], uninterrupted[key]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"{what}: {key} {a} != {b}"

    # Uninterrupted at TP2 x PP2 (tied embeddings split across the stages): step, save, step.
    first = _actor(folder, 2, 2, False, ppo_mini_batch_size=4)
    first.update(batch(), group_size=2)
    save_actor(first, workdir / "ckpt_tp2pp2")
    after_one, _ = first.compute_logprobs(batch())
    if rank == 0:  # for test_mid_run_checkpoint_converts_to_transformers
        torch.save({"tokens": tokens, "lengths": lengths, "logp": after_one}, workdir / "ckpt_tp2pp2_logp.pt")
    second = first.update(batch(), group_size=2)
    after_two, _ = first.compute_logprobs(batch())

    # Resumed at TP1 x DP4 (distributed optimizer): the same weights, the same next step, and after it
    # the same weights again (the optimizer state came along). Built without loading any weights first, as a
    # resumed run builds it: the checkpoint alone gives every weight.
    moved = _actor(folder, 1, 1, False, ppo_mini_batch_size=4, load_weights=False)
    unloaded = (moved.compute_logprobs(batch())[0] - after_one).abs().max().item()
    assert unloaded > 0.1, f"an actor built with load_weights=False holds the trained weights already ({unloaded})"
    marker = load_actor(moved, workdir / "ckpt_tp2pp2")
    assert marker["actor_steps"] == 1 and moved.steps == 1
    close(moved.compute_logprobs(batch())[0], after_one, "after loading the TP2 x PP2 checkpoint at TP1")
    same_step(moved.update(batch(), group_size=2), second, "first step after loading at TP1")
    close(moved.compute_logprobs(batch())[0], after_two, "after one step resumed at TP1")

    # And the other way round: saved at TP1 x DP4, resumed at TP2 x PP2. What megatron-core writes unsynced
    # (common.pt, metadata.json) is synced before the marker names the folder complete.
    synced = _fsynced_files(lambda: save_actor(moved, workdir / "ckpt_tp1"))
    if rank == 0:
        assert {"common.pt", "metadata.json", "COMPLETE.json.partial"} <= synced, synced
    if rank == 0:  # each of the 4 data-parallel ranks wrote a share, not the first replica all of it
        written = {}
        for part in (workdir / "ckpt_tp1").glob("__*_*.distcp"):
            writer = int(part.name.split("_")[2])
            written[writer] = written.get(writer, 0) + part.stat().st_size
        assert len(written) == 4 and min(written.values()) > 0.5 * max(written.values()), written
    third = moved.update(batch(), group_size=2)
    after_three, _ = moved.compute_logprobs(batch())
    back = _actor(folder, 2, 2, False, ppo_mini_batch_size=4, load_weights=False)
    assert load_actor(back, workdir / "ckpt_tp1")["actor_steps"] == 2
    close(back.compute_logprobs(batch())[0], after_two, "after loading the TP1 checkpoint at TP2 x PP2")
    same_step(back.update(batch(), group_size=2), third, "first step after loading at TP2 x PP2")
    close(back.compute_logprobs(batch())[0], after_three, "after one step resumed at TP2 x PP2")

    # Resumed with other Adam betas and eps (a fix for loss spikes): the config's, not the checkpoint's, are used.
    tuned = _actor(folder, 1, 1, False, optim_kwargs={"betas": (0.9, 0.95), "eps": 1e-6}, ppo_mini_batch_size=4,
                   load_weights=False)
    load_actor(tuned, workdir / "ckpt_tp1")
    settings = {(tuple(g["betas"]), g["eps"]) for g in tuned.optimizer.param_groups}
    assert settings == {((0.9, 0.95), 1e-6)}, settings

    # A save that never finished is refused with a clear message.
    if rank == 0:
        (workdir / "ckpt_broken").mkdir()
    dist.barrier()
    try:
        load_actor(back, workdir / "ckpt_broken")
    except CheckpointError as err:
        assert "incomplete" in str(err)
    else:
        raise AssertionError("an incomplete checkpoint was loaded")


def check_checkpoints_of_the_plain_optimizer_load_before_and_after_its_first_step(rank: int, world: int,
                                                                                   workdir: Path) -> None:
    """parallel.use_distributed_optimizer=false (torch's AdamW under megatron-core's FP32Optimizer): a checkpoint
    saved before any step (megatron-core leaves a step count of 0 out of it) and one saved after a step load, and
    the next step is the uninterrupted run's."""
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.checkpoint import load_actor, save_actor

    folder = workdir / "qwen2"
    tokens, lengths, mask, advantages = _batch(groups=4, n=2)
    old_logp = hf_logprobs(folder, tokens, TEMPERATURE)

    def batch():
        return ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages, old_logp=old_logp)

    def plain(**kwargs):
        return _actor(folder, 1, 1, False, ppo_mini_batch_size=4, distributed_optimizer=False, **kwargs)

    uninterrupted = plain()
    save_actor(uninterrupted, workdir / "plain_step0")
    steps, after = [], []
    for saved in (0, 1):
        steps.append(uninterrupted.update(batch(), group_size=2))
        after.append(uninterrupted.compute_logprobs(batch())[0])  # the weights after it: Adam's step count counts
        if saved == 0:
            save_actor(uninterrupted, workdir / "plain_step1")
    for saved in (0, 1):
        resumed = plain(load_weights=False)
        assert load_actor(resumed, workdir / f"plain_step{saved}")["actor_steps"] == saved == resumed.steps
        step = resumed.update(batch(), group_size=2)
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/lr"):
            a, b = step[key], steps[saved][key]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"resumed from step {saved}: {key} {a} != {b}"
        diff = (resumed.compute_logprobs(batch())[0] - after[saved]).abs().max().item()
        assert diff <= 1e-5, f"resumed from step {saved}: log-probs after a step differ by {diff}"


def _fsynced_files(call) -> set[str]:
    """The names of the files os.fsync was given while `call` ran (in this process)."""
    import os
    from unittest import mock

    names, fsync = set(), os.fsync

    def spy(fd):
        names.add(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return fsync(fd)

    with mock.patch("os.fsync", spy):
        call()
    return names


def check_a_damaged_checkpoint_is_named(rank: int, world: int, workdir: Path) -> None:
    """Copies of the TP1 checkpoint, each damaged in one way, are refused with the file at fault named (not
    megatron-core's or torch's error from inside the load, on some ranks); a Hugging Face folder given as a
    checkpoint is named as one, without the advice to delete it. And a checkpoint saved without the modules'
    `_extra_state` (without Transformer Engine, resumed with it) resumes."""
    import shutil

    import torch.distributed as dist

    from megatron_dapo.actor.checkpoint import MARKER, CheckpointError, load_actor
    from megatron_dapo.convert import dcp_io

    source = workdir / "ckpt_tp1"
    shard = sorted(source.glob("__*.distcp"))[-1].name

    def cut(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])

    damages = {
        "no_common": (lambda d: (d / "common.pt").unlink(), r"common.pt is missing"),
        "cut_common": (lambda d: cut(d / "common.pt"), r"common.pt is damaged"),
        "bad_metadata": (lambda d: (d / "metadata.json").write_text("{"), r"metadata.json cannot be read"),
        "no_shard": (lambda d: (d / shard).unlink(), rf"are missing: {shard}"),
        "cut_shard": (lambda d: cut(d / shard), rf"cut short: {shard} \(\d+ bytes of \d+\)"),
        "list_marker": (lambda d: (d / MARKER).write_text("[]"), r"COMPLETE.json cannot be read \(ValueError: a "
                                                                  r"JSON list, not an object\)"),
    }
    if rank == 0:
        for name, (damage, _) in damages.items():
            shutil.copytree(source, workdir / f"damaged_{name}")
            damage(workdir / f"damaged_{name}")
        # Without any _extra_state: every tensor (weights and optimizer state) and common.pt kept.
        reader = dcp_io.CheckpointReader(source)
        chunks = [dcp_io.Chunk(key, tuple(meta.size), (0,) * len(meta.size), tuple(meta.size), meta.properties.dtype,
                               lambda key=key: reader.read(key)) for key, meta in reader.tensors.items()]
        (workdir / "ckpt_tp1_bare").mkdir()
        dcp_io.write_checkpoint(workdir / "ckpt_tp1_bare", chunks, [], common=torch.load(source / "common.pt",
                                                                                        weights_only=False))
        shutil.copy(source / MARKER, workdir / "ckpt_tp1_bare" / MARKER)
    dist.barrier()
    actor = _actor(workdir / "qwen2", 2, 2, False, ppo_mini_batch_size=4, load_weights=False)
    for name, (_, message) in damages.items():
        with pytest.raises(CheckpointError, match=message):
            load_actor(actor, workdir / f"damaged_{name}")
    with pytest.raises(CheckpointError, match=r"qwen2 is a Hugging Face model folder, not a megatron-core checkpoint: "
                                              r"give it as model.path") as refused:
        load_actor(actor, workdir / "qwen2")
    assert "delete" not in str(refused.value)
    with pytest.raises(CheckpointError, match=r"ckpt_broken is incomplete \(no COMPLETE.json.*\); point to a "
                                              r"checkpoint a training or `megatron-dapo convert hf-to-mcore` completed"):
        load_actor(actor, workdir / "ckpt_broken")  # not a step_N folder of a run: no advice to delete it
    # Loaded whole: the same weights and optimizer state as the checkpoint it was made from, so the same
    # log-probs and the same next step (the actor was built without weights: nothing else could give them).
    from megatron_dapo.actor.batch import ActorBatch

    tokens, lengths, mask, advantages = _batch(groups=4, n=2)
    batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                       old_logp=hf_logprobs(workdir / "qwen2", tokens, TEMPERATURE))
    resumed = {}
    for name in ("ckpt_tp1_bare", "ckpt_tp1"):
        assert load_actor(actor, workdir / name)["actor_steps"] == 2
        logp = actor.compute_logprobs(batch)[0]
        resumed[name] = logp, actor.update(batch, group_size=2)
    (bare_logp, bare_step), (logp, step) = resumed["ckpt_tp1_bare"], resumed["ckpt_tp1"]
    assert torch.equal(bare_logp, logp)
    for key in ("actor/pg_loss", "actor/grad_norm"):
        assert bare_step[key] == step[key], f"{key}: {bare_step[key]} resumed without _extra_state, {step[key]} with"


def check_converted_checkpoint_loads_at_tp2_pp2(rank: int, world: int, workdir: Path) -> None:
    """`convert hf-to-mcore` output (made by the fixture) loads at TP2 x PP2 with transformers' log-probs."""
    from megatron_dapo.actor.batch import ActorBatch

    tokens, lengths, mask, _ = _batch(groups=5, n=1)
    valid = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    valid[:, 0] = False
    for family in FAMILIES:
        actor = _actor(workdir / family, 2, 2, False, weights=workdir / f"{family}_mcore")
        logp, _ = actor.compute_logprobs(ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask))
        diff = ((logp - hf_logprobs(workdir / family, tokens, TEMPERATURE)).abs() * valid).max().item()
        assert diff <= 1e-4, f"{family}: converted checkpoint at TP2 x PP2: max |logp - transformers| = {diff:.3g}"
    # A checkpoint without the `_extra_state` a model's modules ask for loads; they keep their own.
    actor = _actor(workdir / "qwen2", 2, 2, False, weights=workdir / "qwen2_mcore_bare")
    logp, _ = actor.compute_logprobs(ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask))
    diff = ((logp - hf_logprobs(workdir / "qwen2", tokens, TEMPERATURE)).abs() * valid).max().item()
    assert diff <= 1e-4, f"checkpoint without _extra_state at TP2 x PP2: max |logp - transformers| = {diff:.3g}"


def _device_state(actor) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the actor's state, named: weights, gradient buffers, the optimizer's master
    weights and moments (megatron-core's own attributes, not the offload module's walk)."""
    found = []
    for name, p in actor.model.named_parameters():
        found += [(name, p), (f"{name}.main_grad", p.main_grad)]
    for i, opt in enumerate(getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])):
        for key in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups", "shard_fp32_groups"):
            for group in getattr(opt, key, None) or []:
                found += [(f"optimizer {i} {key}", t) for t in group]
        for state in opt.optimizer.state.values():
            found += [(f"optimizer {i} {k}", v) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim()]
    return found


def check_offload_between_updates_changes_nothing(rank: int, world: int, workdir: Path) -> None:
    """actor.offload: weights and optimizer state to host memory and back (gradients dropped) between
    updates gives bit-identical losses, grad norms and weights, at DP4 with the distributed optimizer and
    at TP2 x PP2; while offloaded, no state tensor holds device memory, and computing or pushing is refused."""
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.export import stage_hf_tensors
    from megatron_dapo.rollout.reshard import push_weights

    folder = workdir / "qwen2"
    tokens, lengths, mask, advantages = _batch(groups=4, n=2)
    old_logp = hf_logprobs(folder, tokens, TEMPERATURE)
    batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages, old_logp=old_logp)
    for tp, pp in ((1, 1), (2, 2)):
        runs = []
        for offload in (False, True):
            actor = _actor(folder, tp, pp, False, ppo_mini_batch_size=2)
            history = []
            for _ in range(3):
                if offload:
                    stats = actor.offload()
                    held = [name for name, t in _device_state(actor) if t.untyped_storage().nbytes()]
                    assert not held, f"TP{tp} PP{pp}: still on the device after offload: {held[:5]}"
                    assert stats.copied_bytes > 0 and stats.dropped_bytes > 0, stats
                    for what, call in (("computed log-probs", lambda: actor.compute_logprobs(batch)),
                                       ("pushed its weights", lambda: push_weights(actor, None, 1, bucket_mb=1))):
                        try:
                            call()
                        except RuntimeError as err:
                            assert "reload" in str(err), err
                        else:
                            raise AssertionError(f"an offloaded actor {what}")
                    actor.reload()
                metrics = actor.update(batch, group_size=2)
                history.append((metrics["actor/pg_loss"], metrics["actor/grad_norm"]))
            runs.append((history, {n: t.clone() for n, t in stage_hf_tensors(actor.model, actor.arch)}))
        (plain, plain_weights), (moved, moved_weights) = runs
        assert moved == plain, f"TP{tp} PP{pp}: (loss, grad norm) per step with offload {moved} != without {plain}"
        for name, tensor in plain_weights.items():
            assert torch.equal(moved_weights[name], tensor), f"TP{tp} PP{pp}: {name} differs after offloading"


def check_bad_input_on_one_rank_stops_every_rank(rank: int, world: int, workdir: Path) -> None:
    """A non-finite advantage in one row reaches the loss of one data-parallel rank's last pipeline stage only:
    every rank raises its message, which names the row in the whole batch (none is left waiting inside the
    schedule), and no weight moves. A token id past the vocabulary is named by its row in the whole batch too."""
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.export import stage_hf_tensors
    from megatron_dapo.actor.model import ModelError

    from megatron_dapo.actor.batch import data_parallel_shares

    tokens, lengths, mask, advantages = _batch(groups=2, n=2)
    lengths[1], tokens[1, 8:], mask[1, 8:] = 8, 0, 0  # row 3 dealt to the second data-parallel rank both ways:
    assert 3 in data_parallel_shares(lengths.tolist(), 2)[1]  # in the batch's one mini-batch (rows 1 and 3 there)
    assert 1 in data_parallel_shares(lengths[2:].tolist(), 2)[1]  # and in its second of two (rows 2 and 3)
    advantages[3] = float("nan")  # rank 3 at PP2 x DP2 is the second data-parallel rank's last stage
    batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                       old_logp=torch.zeros(tokens.shape))
    for groups_per_step in (2, 1):  # one mini-batch of rows 0-3; two of 2 rows each, the second refused
        actor = _actor(workdir / "qwen2", 1, 2, False, ppo_mini_batch_size=groups_per_step)
        before = {n: t.clone() for n, t in stage_hf_tensors(actor.model, actor.arch)}
        found = "" if rank == 3 else r".*\[found on rank 3; every rank stops\]"  # rank 3 raises its own error
        with pytest.raises(ValueError, match=r"advantages is not finite at sample 3, " + found):
            actor.update(batch, group_size=2)
        if groups_per_step == 2:
            for name, tensor in stage_hf_tensors(actor.model, actor.arch):
                assert torch.equal(tensor, before[name]), f"{name} changed in a refused update"
    # A token past the vocabulary in the second mini-batch's second row: named as row 3 of the whole batch.
    bad_token = ActorBatch(tokens=tokens.clone(), lengths=lengths, loss_mask=mask,
                           advantages=advantages.nan_to_num(1.0), old_logp=torch.zeros(tokens.shape))
    bad_token.tokens[3, 1] = actor.arch.vocab_size
    with pytest.raises(ModelError, match=rf"token id {actor.arch.vocab_size} \(sequence 3, position 1\)"):
        actor.update(bad_token, group_size=2)
    empty = batch.rows(slice(0, 0))  # every rank alike: a clear error, not lengths.max() of nothing
    for call in (lambda: actor.compute_logprobs(empty), lambda: actor.update(empty, group_size=2)):
        with pytest.raises(ValueError, match=r"the actor was given an empty batch \(0 sequences\)"):
            call()
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm needs norm_len"):  # no fixed length to divide by
        _actor(workdir / "qwen2", 1, 2, False, loss_agg_mode="seq-mean-token-sum-norm")


def check_gradient_norm_is_measured_without_clipping(rank: int, world: int, workdir: Path) -> None:
    """actor.optim.grad_clip=0 (no clipping) still reports the gradient norm, the same as with clipping (which
    scales the gradient after measuring it): the trainer's stop on a non-finite norm depends on it. megatron-core's
    ChainedOptimizer measures it whatever clip_grad is; its single optimizers would not."""
    from megatron_dapo.actor.batch import ActorBatch

    tokens, lengths, mask, advantages = _batch(groups=2, n=2)
    batch = ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                       old_logp=hf_logprobs(workdir / "qwen2", tokens, TEMPERATURE))
    norms = [_actor(workdir / "qwen2", 2, 1, False, grad_clip=clip, ppo_mini_batch_size=2).update(
        batch, group_size=2)["actor/grad_norm"] for clip in (0.0, 0.5)]
    assert norms[0] > 0 and abs(norms[0] - norms[1]) <= 1e-6 * norms[1], norms


def check_a_mini_batch_without_loss_tokens_moves_no_weight(rank: int, world: int, workdir: Path) -> None:
    """A mini-batch whose every token is masked (overlong filtering, failed rewards) takes no optimizer step:
    its gradient is zero, but Adam's momentum and the weight decay (0.1 here) would move the weights."""
    from megatron_dapo.actor.batch import ActorBatch

    tokens, lengths, mask, advantages = _batch(groups=2, n=2)
    old_logp = hf_logprobs(workdir / "qwen2", tokens, TEMPERATURE)
    actor = _actor(workdir / "qwen2", 2, 1, False, ppo_mini_batch_size=1)
    actor.update(ActorBatch(tokens=tokens, lengths=lengths, loss_mask=mask, advantages=advantages,
                            old_logp=old_logp), group_size=2)  # Adam now has momentum
    before = [p.detach().clone() for p in actor.model.parameters()]
    masked = mask.clone()
    masked[2:] = 0  # the second mini-batch has no loss token
    metrics = actor.update(ActorBatch(tokens=tokens[2:], lengths=lengths[2:], loss_mask=masked[2:],
                                      advantages=advantages[2:], old_logp=old_logp[2:]), group_size=2)
    assert metrics["actor/update_skipped"] == 1.0 and metrics["actor/grad_norm"] == 0.0, metrics
    assert all(torch.equal(p, b) for p, b in zip(actor.model.parameters(), before))
    _, entropy = actor.compute_logprobs(ActorBatch(tokens=tokens[:2], lengths=lengths[:2], loss_mask=mask[:2]))
    stepped_entropy = float((entropy * mask[:2]).sum() / mask[:2].sum())
    metrics = actor.update(ActorBatch(tokens=tokens, lengths=lengths, loss_mask=masked, advantages=advantages,
                                      old_logp=old_logp), group_size=2)
    assert metrics["actor/update_skipped"] == 0.5, metrics  # the first mini-batch stepped, the second did not
    # An update without schedule_step goes on with the schedule where the last one left it, skipped mini-batches
    # counted (as within an update): 2 + 1 + 2 indices, 2 + 0 + 1 optimizer steps.
    assert (actor.scheduled, actor.steps) == (5, 3), (actor.scheduled, actor.steps)
    # The loss figures are the stepped mini-batch's, not halved by the skipped one's zeros.
    assert abs(metrics["actor/entropy"] - stepped_entropy) <= 1e-5 * stepped_entropy, (metrics, stepped_entropy)
    assert not all(torch.equal(p, b) for p, b in zip(actor.model.parameters(), before))


def check_local_spec_norms_follow_params_dtype_and_sequence_parallel(rank: int, world: int, workdir: Path) -> None:
    """Without Transformer Engine (every CPU, and GPUs without it) the layers' norms are megatron-core's
    WrappedTorchNorm, which refuses sequence parallel and is built in float32: here they build with SP,
    are marked for the TP all-reduce of their gradients, and take the model's dtype (bf16 as on a GPU)."""
    import torch.distributed as dist

    from megatron_dapo.actor.model import build_gpt_model
    from megatron_dapo.models.arch import ModelArch
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_model_parallel

    arch = ModelArch.from_pretrained(workdir / "qwen3")  # q/k norms besides the layer norms
    for sp in (True, False):
        layout = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sp).layout(dist.get_world_size())
        init_model_parallel(layout, seed=1)
        model = build_gpt_model(arch, layout, bf16=True)
        norms = {name: p for name, p in model.named_parameters() if "norm" in name}
        assert len(norms) == 2 * arch.num_layers + 2 * arch.num_layers + 1, sorted(norms)  # per layer 2 + q/k
        assert all(p.dtype == torch.bfloat16 for p in model.parameters()), \
            {n: p.dtype for n, p in model.named_parameters() if p.dtype != torch.bfloat16}
        assert all(getattr(p, "sequence_parallel", False) == sp for p in norms.values()), sp


CHECKS = [check_logprobs_equal_transformers_at_every_layout, check_one_update_is_the_same_at_every_layout,
          check_checkpoint_saved_at_one_layout_loads_at_another,
          check_checkpoints_of_the_plain_optimizer_load_before_and_after_its_first_step,
          check_a_damaged_checkpoint_is_named,
          check_converted_checkpoint_loads_at_tp2_pp2,
          check_offload_between_updates_changes_nothing, check_bad_input_on_one_rank_stops_every_rank,
          check_gradient_norm_is_measured_without_clipping, check_a_mini_batch_without_loss_tokens_moves_no_weight,
          check_local_spec_norms_follow_params_dtype_and_sequence_parallel]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from megatron_dapo.convert.hf_to_mcore import hf_to_mcore

    workdir = tmp_path_factory.mktemp("actor")
    for family in FAMILIES:
        make_tiny_model(family, workdir / family, vocab_size=VOCAB)
        hf_to_mcore(workdir / family, workdir / f"{family}_mcore", progress=False)
    _without_extra_states(workdir / "qwen2_mcore", workdir / "qwen2_mcore_bare")
    return workdir, run_checks(WORLD, CHECKS, workdir, timeout_s=600)


def _without_extra_states(source: Path, out: Path) -> None:
    """`source`'s weights as a checkpoint without any module's `_extra_state` (as one saved without Transformer
    Engine lacks those of the norms a Transformer Engine model has)."""
    import shutil

    from megatron_dapo.actor.checkpoint import MARKER
    from megatron_dapo.convert import dcp_io

    reader = dcp_io.CheckpointReader(source)
    assert reader.objects, "the converter writes the linear layers' _extra_state"
    chunks = [dcp_io.Chunk(key, tuple(meta.size), (0,) * len(meta.size), tuple(meta.size), meta.properties.dtype,
                           lambda key=key: reader.read(key)) for key, meta in reader.tensors.items()]
    out.mkdir()
    dcp_io.write_checkpoint(out, chunks, [], common={"actor_steps": 0})
    shutil.copy(source / MARKER, out / MARKER)
    assert not dcp_io.CheckpointReader(out).objects


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_actor_parallel(run, check):
    _, results = run
    assert not results[check.__name__], "\n".join(results[check.__name__])


def test_mid_run_checkpoint_converts_to_transformers(run, tmp_path):
    """The TP2 x PP2 checkpoint saved after one update, converted to a Hugging Face folder: transformers
    gives the log-probs the actor had when it saved (the architecture comes from the checkpoint itself)."""
    from megatron_dapo.convert.mcore_to_hf import mcore_to_hf

    workdir, results = run
    assert not results["check_checkpoint_saved_at_one_layout_loads_at_another"]
    summary = mcore_to_hf(workdir / "ckpt_tp2pp2", tmp_path / "hf", dtype=torch.float32, progress=False)
    saved = torch.load(workdir / "ckpt_tp2pp2_logp.pt")
    valid = torch.arange(saved["tokens"].shape[1])[None] < saved["lengths"][:, None]
    valid[:, 0] = False
    diff = ((hf_logprobs(tmp_path / "hf", saved["tokens"], TEMPERATURE) - saved["logp"]).abs() * valid).max().item()
    assert diff <= 1e-5, f"converted mid-run checkpoint: max |logp - actor's| = {diff:.3g}"
    assert summary["shards"] == 1 and (tmp_path / "hf" / "model.safetensors").is_file()

"""megatron-core's real TP / SP / PP / DDP + distributed-optimizer code, run on CPU with gloo.

One spawn of 4 CPU processes runs every check against a TP1 reference of the same tiny Llama-like
GPTModel (RMSNorm, SwiGLU, RoPE, GQA). Each rank writes one JSON result per check to tmp_path;
the parent test reports every failure with its rank and traceback.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp

WORLD_SIZE = 4
VOCAB, SEQ, HIDDEN = 128, 16, 64
BATCH, MICRO_BATCH = 4, 2  # global batch of 4 sequences, microbatches of 2
TOL = 1e-5
LR, ADAM_EPS, CLIP_GRAD = 1e-3, 1e-6, 1.0
CHECKS = ("tp2_logits", "tp2_sp_logits", "pp2_tp2_forward_backward", "dp2_tp2_sp_distopt_step")
SPAWN_DEADLINE_S = 300


# ----------------------------------------------------------------------------------------------
# Runs inside the spawned ranks.


def _transformer_config(tp: int = 1, pp: int = 1, sp: bool = False):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sp,
    )


def _build_model(tp: int = 1, pp: int = 1, sp: bool = False, tied: bool = False):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    return GPTModel(
        config=_transformer_config(tp, pp, sp),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
    )


def _local_slice(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's part of `full`, by the same rule as megatron's CPU init (dim, stride)."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim, stride = param.partition_dim, param.partition_stride
    chunks = torch.split(full, full.shape[dim] // (tp * stride), dim=dim)  # stride 2: SwiGLU fc1
    return torch.cat(chunks[rank::tp], dim=dim)


def _global_name(model, name: str) -> str:
    """Name of a (possibly later pipeline stage's) parameter in the PP1 reference."""
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
    offset = model.decoder.layers[0].layer_number - 1
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + offset}.", name)


def _load_reference(model, full_state: dict) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_local_slice(param, full_state[_global_name(model, name)]))


def _batch():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return {
        "tokens": tokens,
        "labels": torch.roll(tokens, -1, dims=1),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
    }


def _forward(model, batch, rows=slice(None), labels=False):
    kwargs = {"labels": batch["labels"][rows]} if labels else {}
    return model(batch["tokens"][rows], batch["position_ids"][rows], attention_mask=None, **kwargs)


def _reference(batch, tied: bool = False) -> dict:
    """TP1/PP1 model: weights, logits, microbatch losses, grads and one clipped AdamW step."""
    model = _build_model(tied=tied)
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    logits = _forward(model, batch).detach()
    token_losses = _forward(model, batch, labels=True)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    assert torch.allclose(token_losses.mean(), expected, atol=TOL), "megatron CE != torch CE at TP1"
    token_losses.mean().backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
    torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS, weight_decay=0.0).step()
    return {
        "state": state,
        "logits": logits,
        "mb_losses": token_losses.detach().reshape(BATCH // MICRO_BATCH, -1).mean(dim=1),
        "grads": grads,
        "grad_norm": grad_norm,
        "stepped": {k: v.detach().clone() for k, v in model.named_parameters()},
    }


def _max_diff_to_reference(model, local: dict, reference: dict) -> float:
    diffs = [
        (local[name] - _local_slice(param, reference[_global_name(model, name)])).abs().max().item()
        for name, param in model.named_parameters()
    ]
    return max(diffs)


def _check_tp2_logits(ref, batch, sp: bool) -> None:
    from megatron.core import tensor_parallel

    model = _build_model(tp=2, sp=sp)
    _load_reference(model, ref["state"])
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(_forward(model, batch))
    diff = (logits - ref["logits"]).abs().max().item()
    assert logits.shape == ref["logits"].shape, f"gathered logits {tuple(logits.shape)}"
    assert diff < TOL, f"TP2 (sequence_parallel={sp}) logits differ from TP1 by {diff:.3g}"


def _loss_func(output_tensor):
    loss = output_tensor.mean()
    return loss, {"loss": loss.detach().clone()}  # clone: the schedule scales `loss` in place


def _microbatches(dp_rank: int = 0, per_rank: int = BATCH):
    """Row slices of the global batch: this DP rank's share, MICRO_BATCH rows at a time."""
    for start in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, MICRO_BATCH):
        yield slice(start, start + MICRO_BATCH)


def _run_schedule(model, batch, rows_iter, num_microbatches: int):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        return _forward(model, batch, rows=next(data_iterator), labels=True), _loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=rows_iter,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )


def _check_pp2_tp2(ref, batch) -> None:
    """1F1B over 2 stages x TP2, tied embeddings, variable_seq_lengths (shapes sent over p2p)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    # Tied embeddings: the last stage's copy is synced in setup_embeddings_and_output_layer.
    model = _build_model(tp=2, pp=2, tied=True)
    _load_reference(model, ref["state"])
    model.config.variable_seq_lengths = True
    model.config.finalize_model_grads_func = finalize_model_grads  # all-reduces the tied-embedding grads
    ddp_model = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    ddp_model.zero_grad_buffer()
    losses = _run_schedule(ddp_model, batch, _microbatches(), num_microbatches=BATCH // MICRO_BATCH)
    if parallel_state.is_pipeline_last_stage():
        got = torch.stack([out["loss"] for out in losses])
        want = ref["mb_losses"]
        assert torch.allclose(got, want, atol=TOL), f"PP2xTP2 microbatch losses {got}, TP1 {want}"
    else:
        assert not losses, "only the last pipeline stage returns losses"
    grads = {name: p.main_grad for name, p in model.named_parameters()}
    diff = _max_diff_to_reference(model, grads, ref["grads"])
    assert diff < TOL, f"PP2xTP2 grads differ from TP1 by {diff:.3g}"


def _check_ddp_distopt(ref, batch) -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _build_model(tp=2, sp=True)
    _load_reference(model, ref["state"])
    config = model.config
    ddp_model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads  # DP reduce-scatter, SP norm-grad all-reduce
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=LR, weight_decay=0.0, adam_eps=ADAM_EPS, clip_grad=CLIP_GRAD,
            use_distributed_optimizer=True, bf16=False, fp16=False,
        ),
        [ddp_model],
    )
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    dp_size = parallel_state.get_data_parallel_world_size()
    rows = _microbatches(parallel_state.get_data_parallel_rank(), BATCH // dp_size)
    _run_schedule(ddp_model, batch, rows, num_microbatches=BATCH // dp_size // MICRO_BATCH)
    success, grad_norm, _ = optimizer.step()
    assert success, "optimizer.step() reported failure"
    assert abs(grad_norm - ref["grad_norm"]) < TOL * max(1.0, ref["grad_norm"]), (
        f"grad norm {grad_norm} != TP1 {ref['grad_norm']}"
    )
    params = {name: p.detach() for name, p in model.named_parameters()}
    moved = _max_diff_to_reference(model, params, ref["state"])
    assert moved > LR / 2, f"params barely moved ({moved:.3g}) after the step"
    diff = _max_diff_to_reference(model, params, ref["stepped"])
    assert diff < TOL, f"DP2xTP2+SP distributed-optimizer step differs from TP1 AdamW by {diff:.3g}"


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dapo.parallel.cpu_shims import apply_cpu_shims

    torch.set_num_threads(1)  # 4 ranks share 2 cores
    apply_cpu_shims()
    apply_cpu_shims()  # idempotent
    # Import before the rendezvous so a slow import cannot run into a peer's collective timeout.
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    batch = _batch()
    ref = tied_ref = None
    checks = {
        "tp2_logits": lambda: _check_tp2_logits(ref, batch, sp=False),
        "tp2_sp_logits": lambda: _check_tp2_logits(ref, batch, sp=True),
        "pp2_tp2_forward_backward": lambda: _check_pp2_tp2(tied_ref, batch),
        "dp2_tp2_sp_distopt_step": lambda: _check_ddp_distopt(ref, batch),
    }
    for name in ("reference", *CHECKS):
        start, error = time.perf_counter(), None
        try:
            if name == "reference":
                ref, tied_ref = _reference(batch), _reference(batch, tied=True)
            else:
                checks[name]()
        except Exception:  # reported to the parent, which fails the test
            error = traceback.format_exc()
        finally:
            parallel_state.destroy_model_parallel()
        seconds = round(time.perf_counter() - start, 2)
        result = {"rank": rank, "check": name, "error": error, "seconds": seconds}
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
        failed = torch.tensor([float(error is not None)])
        dist.all_reduce(failed)  # stop every rank together rather than leave peers in a collective
        if failed.item():
            break
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The parent test.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_megatron_core_parallel_layouts_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the ranks see no GPU, as on a CPU machine, and apply the shims

    init_method = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.start_processes(
        _worker, args=(init_method, str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline, crash = time.monotonic() + SPAWN_DEADLINE_S, None
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                crash = f"ranks still running after {SPAWN_DEADLINE_S}s (a collective hung?)"
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # died outside its checks
        crash = str(e)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()

    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    print("seconds per check on rank 0:", {r["check"]: r["seconds"] for r in results if r["rank"] == 0})
    failures = [f"[rank {r['rank']}] {r['check']}:\n{r['error']}" for r in results if r["error"]]
    failures += [crash] if crash else []
    assert not failures, "\n".join(failures)
    done = {r["check"] for r in results if r["rank"] == 0}
    assert done == {"reference", *CHECKS}, f"checks that did not report: {set(CHECKS) - done}"
    assert len(results) == WORLD_SIZE * (len(CHECKS) + 1)

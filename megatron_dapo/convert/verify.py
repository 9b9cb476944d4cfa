"""`--verify`: the same sequences through both sides of a conversion; the largest log-prob difference.

The Hugging Face side runs in transformers, the megatron-core side in the actor (TP1 x PP1, one
process), both in fp32 from the stored weights, so the difference measures the conversion and not
the precision. Both models are in memory at once: this is the one part of conversion that is not
streamed.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from megatron_dapo.convert.output import ConversionError
from megatron_dapo.models.arch import ModelArch


_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _round(parameters, dtype: torch.dtype | None) -> None:
    """Round weights to `dtype` (kept in fp32), so that both sides compute with the same numbers."""
    if dtype is not None:
        with torch.no_grad():
            for p in parameters:
                p.copy_(p.to(dtype))


def transformers_logprobs(folder: str | Path, tokens: torch.Tensor, round_to: torch.dtype | None = None) -> torch.Tensor:
    """log p(token t | tokens < t) from transformers, [B, S] (column 0 is 0), fp32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _round(model.parameters(), round_to)
    with torch.no_grad():
        logits = model(tokens).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logp, (1, 0))


def megatron_logprobs(hf_folder: str | Path, mcore_dir: str | Path, tokens: torch.Tensor,
                      round_to: torch.dtype | None = None) -> torch.Tensor:
    """The same from the actor, its weights loaded from the megatron-core checkpoint (in a world of one)."""
    import torch.distributed as dist

    from megatron_dapo.actor.actor import MegatronActor
    from megatron_dapo.actor.batch import ActorBatch
    from megatron_dapo.actor.config import ActorConfig
    from megatron_dapo.parallel.config import ParallelConfig
    from megatron_dapo.parallel.init import init_distributed

    started = not dist.is_initialized()
    saved = {key: os.environ.get(key) for key in _RENDEZVOUS}
    if started:
        with socket.socket() as sock:  # a free port: several conversions may verify side by side
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        layout = init_distributed(ParallelConfig(), seed=0)
        actor = MegatronActor(ActorConfig(), hf_folder, layout, temperature=1.0, bf16=False, weights=mcore_dir)
        _round(actor.model.module.parameters(), round_to)
        b, s = tokens.shape
        batch = ActorBatch(tokens=tokens, lengths=torch.full((b,), s), loss_mask=torch.ones(b, s, dtype=torch.long))
        logp, _ = actor.compute_logprobs(batch)
        return logp.cpu()
    finally:
        if started:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
            for key, value in saved.items():  # the caller's environment as it was
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def verify(hf_folder: str | Path, mcore_dir: str | Path, *, sequences: int = 4, length: int = 32,
           seed: int = 0, round_to: torch.dtype | None = None) -> float:
    """max |log p_transformers - log p_megatron| over `sequences` random sequences of `length` tokens.

    round_to: the dtype the conversion wrote; both sides' weights are rounded to it first, so that a
    bf16 output of an fp32 source is compared with the same numbers and not with the rounding."""
    arch = ModelArch.from_pretrained(hf_folder)
    length = min(length, arch.max_position_embeddings)
    tokens = torch.randint(0, arch.vocab_size, (sequences, length), generator=torch.Generator().manual_seed(seed))
    reference = transformers_logprobs(hf_folder, tokens, round_to)
    ours = megatron_logprobs(hf_folder, mcore_dir, tokens, round_to)
    return float((reference[:, 1:] - ours[:, 1:]).abs().max())


def check_logprobs(hf_folder: str | Path, mcore_dir: str | Path, tolerance: float,
                   round_to: torch.dtype | None = None) -> float:
    """`verify`, raising ConversionError when the difference exceeds `tolerance`."""
    diff = verify(hf_folder, mcore_dir, round_to=round_to)
    if not diff <= tolerance:
        raise ConversionError(f"verification failed: log-probs of the Hugging Face and megatron-core sides differ by "
                              f"up to {diff:.3g} (> --tolerance {tolerance:g}); the output was not written")
    return diff

"""EmbeddedEngine: the default rollout engine, a plain-PyTorch decoder that runs on CPU or CUDA."""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_dapo.models.arch import ModelArch
from megatron_dapo.models.hf_io import HFCheckpointReader
from megatron_dapo.rollout.embedded.config import EmbeddedEngineConfig
from megatron_dapo.rollout.embedded.decode import generate_batch, right_padded
from megatron_dapo.rollout.embedded.kv_cache import KVCache
from megatron_dapo.rollout.embedded.model import CausalLM
from megatron_dapo.rollout.weights import WeightPush
from megatron_dapo.rollout.engine import (MIN_TEMPERATURE, Completion, RolloutEngine, RolloutError, SamplingParams,
                                          as_batch, not_token_ids)

TIED_HEAD = "lm_head.weight"


class EmbeddedEngine(RolloutEngine):
    """Qwen2 / Qwen2.5 / Llama 3 / Qwen3 decoder with batched, KV-cached sampling.

    Build it with `from_pretrained(folder)` or `from_state_dict(hf_config, state_dict)`; the
    loaded checkpoint is weight version 0. A model it cannot run raises ModelError (from
    `ModelArch`, the architecture the Megatron actor reads too); bad input raises RolloutError.
    """

    def __init__(
        self,
        arch: ModelArch,
        buckets: Iterable[Iterable[tuple[str, torch.Tensor]]],
        config: EmbeddedEngineConfig | None = None,
    ) -> None:
        """Allocate the model for `arch` and load it from `buckets` of (HF name, tensor), as a weight push."""
        self.arch = arch
        self.config = config or EmbeddedEngineConfig()
        self.device = self.config.torch_device()
        self.dtype = self.config.torch_dtype(self.device)
        limit = self.config.max_seq_len or arch.max_position_embeddings
        self.max_seq_len = min(limit, arch.max_position_embeddings)
        self.model = CausalLM.empty(arch, self.dtype, self.device)
        named = dict(self.model.named_parameters(remove_duplicate=False))
        aliases = {}
        if arch.tie_word_embeddings:  # lm_head.weight *is* the embedding: accepted, never required
            aliases[TIED_HEAD] = "model.embed_tokens.weight"
            del named[TIED_HEAD]
        self.weights = WeightPush(named, aliases)
        self.cache = KVCache(arch, self.dtype, self.device)
        self.released = False
        try:
            self.weights.begin()
            for bucket in buckets:  # a tied checkpoint's lm_head.weight, checked equal to the embedding, is left out
                self.weights.update([(n, t) for n, t in bucket if not (arch.tie_word_embeddings and n == TIED_HEAD)])
            self.weights.end(version=0)
        except RolloutError as err:
            raise RolloutError(f"loading the checkpoint failed: {err}") from err

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: EmbeddedEngineConfig | None = None) -> EmbeddedEngine:
        """Load a local Hugging Face folder (config.json + safetensors, sharded or not), one shard at a time."""
        arch = ModelArch.from_pretrained(folder)
        reader = HFCheckpointReader(folder)
        reader.check_tied_head(arch.tie_word_embeddings)  # else the head would be whichever of the two came last
        return cls(arch, reader.iter_shards(), config)

    @classmethod
    def from_state_dict(
        cls,
        hf_config: Mapping[str, Any] | Any,
        state_dict: Mapping[str, torch.Tensor],
        config: EmbeddedEngineConfig | None = None,
    ) -> EmbeddedEngine:
        """Build from a config.json dict (or a transformers config object) and an HF-named state dict."""
        if not isinstance(hf_config, Mapping):
            hf_config = hf_config.to_dict()
        arch = ModelArch.from_hf_config(hf_config)
        embedding = state_dict.get("model.embed_tokens.weight")
        head = state_dict.get(TIED_HEAD)
        if arch.tie_word_embeddings and isinstance(head, torch.Tensor) and isinstance(embedding, torch.Tensor) \
                and not torch.equal(head, embedding):  # else the head would be whichever of the two came last
            raise RolloutError(f"tensor {TIED_HEAD!r} differs from 'model.embed_tokens.weight' but the config sets "
                               "tie_word_embeddings: true: leave lm_head.weight out of the state dict, or untie the "
                               "config if the model has a head of its own")
        return cls(arch, [state_dict.items()], config)

    # --- generation and scoring -------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample params.n completions per prompt, decoding up to max_batch_size sequences at a time (a prompt
        waiting takes the rows of finished ones)."""
        self._check_ready()
        prompts = as_batch(prompts, "prompt")
        self._check_sequences(prompts, "prompt", extra=params.max_new_tokens)
        outside = [t for t in params.stop_token_ids if t >= self.arch.vocab_size]
        if outside:  # the model cannot draw them: every response would run to max_new_tokens
            raise RolloutError(f"bad input: stop_token_ids {outside} are outside the model's vocab "
                               f"[0, {self.arch.vocab_size}): no response could stop on them")
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        completions = generate_batch(self.model, self.cache, prompts, [params.n] * len(prompts), params, generator,
                                     max_rows=self.config.max_batch_size)
        return [completions[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], temperature: float) -> list[torch.Tensor]:
        """fp32 CPU tensors [L-1]: log_softmax(logits / temperature) of tokens 1..L-1 given their prefix."""
        self._check_ready()
        if not MIN_TEMPERATURE <= temperature < math.inf:
            raise RolloutError(f"temperature must be >= {MIN_TEMPERATURE:g} and finite, got {temperature}")
        sequences = as_batch(sequences, "sequence")
        self._check_sequences(sequences, "sequence", extra=0)
        out = []
        for start in range(0, len(sequences), self.config.max_batch_size):
            chunk = sequences[start : start + self.config.max_batch_size]
            tokens = right_padded(chunk, self.device)  # [B, width]
            width = tokens.shape[1]
            positions = torch.arange(width, device=self.device).expand(len(chunk), width)
            hidden = self.model(tokens, positions, None)  # [B, width, hidden]
            for i, seq in enumerate(chunk):  # one row of logits at a time: [L-1, V] fp32
                logprobs = torch.log_softmax(self.model.logits(hidden[i, : len(seq) - 1]) / temperature, dim=-1)
                targets = tokens[i, 1 : len(seq), None]
                out.append(logprobs.gather(-1, targets).squeeze(-1).cpu())
        return out

    # --- weight push ------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self.weights.version

    def begin_weight_update(self) -> None:
        self.weights.begin()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.weights.update(named_tensors)

    def end_weight_update(self, version: int) -> None:
        self.weights.end(version)

    # --- colocated memory -------------------------------------------------------------------

    def release_memory(self, weights: bool = True) -> None:
        """Drop the KV cache (the weights always stay); generate/score refuse until resume_memory()."""
        self.cache.release()
        self.released = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """Allow generation again; the KV cache is reallocated by the next batch."""
        self.released = False

    # --- input checks -----------------------------------------------------------------------

    def _check_ready(self) -> None:
        self.weights.check_fresh()
        if self.released:
            raise RolloutError("the engine's memory is released: call resume_memory() before generate/score")

    def _check_sequences(self, sequences: list[list[int]], what: str, extra: int) -> None:
        """Each must be non-empty, in the vocab, and fit max_seq_len together with `extra` new tokens."""
        problems = []
        vocab = self.arch.vocab_size
        for i, seq in enumerate(sequences):
            kind = not_token_ids(seq)
            if kind is not None:
                problems.append(f"{what} {i} is {kind}, not a list of token ids (a batch is a list of {what}s)")
                continue
            if len(seq) == 0:
                problems.append(f"{what} {i} is empty")
                continue
            if len(seq) + extra > self.max_seq_len:
                problems.append(
                    f"{what} {i} has {len(seq)} tokens; with max_new_tokens={extra} that is "
                    f"{len(seq) + extra} > the engine's limit of {self.max_seq_len} tokens"
                    if extra
                    else f"{what} {i} has {len(seq)} tokens > the engine's limit of {self.max_seq_len} tokens"
                )
            try:
                if any(isinstance(t, bool) for t in seq):
                    raise TypeError("True and False are not token ids")
                ids = [operator.index(t) for t in seq]
            except TypeError:
                problems.append(f"{what} {i} holds something other than integer token ids")
                continue
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                problems.append(f"{what} {i} has token ids outside the vocab [0, {vocab}): {bad[:5]}")
        if problems:
            raise RolloutError("bad input:\n" + "\n".join(f"  - {p}" for p in problems[:20]))

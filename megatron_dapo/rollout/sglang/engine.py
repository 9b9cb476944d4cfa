"""The SGLang rollout engine: `sglang.Engine` behind the RolloutEngine interface (GPU only).

Each engine host (rank 0, and with rollout.engines > 1 the first rank of other nodes) starts the
engine in-process with `skip_tokenizer_init` on GPUs of its node. Weights arrive as (HF name,
tensor) buckets, sent one of two ways:

- colocated (the engine shares the trainer's GPUs): each bucket is flattened into one byte tensor
  (SGLang's FlattenedTensorBucket layout), serialized once per SGLang TP rank (CUDA IPC handles,
  no copy) and sent with `update_weights_from_tensor(load_format="flattened_bucket")`; the engine's
  KV cache and weights are released while the trainer runs;
- disaggregated (the engine has GPUs of its own): each bucket is broadcast from the host into the
  engine's workers (broadcast.py, NCCL).

Either way a bucket's memory stays referenced until SGLang's call has returned (the calls are
synchronous) and a new bucket is always a new tensor, so no buffer is reused while the engine may
still read it; blocks shared through CUDA IPC are collected after the push. SGLang reports most
failures as (False, message), which become RolloutError here. Every bucket is checked against the model's
HF names and shapes before SGLang sees it, and the push checked complete at its end (SGLang itself only
warns about a name it does not know). SGLang stays optional: it is imported when an engine starts.
"""
from __future__ import annotations

import importlib.util
import math
import os
import random
import signal
import threading
from collections.abc import Iterable
from typing import Literal

import torch

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.models import families
from megatron_dapo.models.arch import ModelArch
from megatron_dapo.rollout.engine import (Completion, RolloutEngine, RolloutError, SamplingParams, StaleWeightsError,
                                          as_batch, not_token_ids)
from megatron_dapo.rollout.sglang.broadcast import BroadcastSender
from megatron_dapo.rollout.sglang.config import SGLangEngineConfig
from megatron_dapo.rollout.sglang.wire import bucket_payloads, expect_success, flatten
from megatron_dapo.rollout.weights import PushLedger

MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
"""What `release_memory` frees while the trainer runs (colocated mode): SGLang's three kinds of GPU memory. The
decode CUDA graphs' pool (1-4 GB per GPU) goes too; SGLang keeps a host copy of it and restores it on resume."""


def leave_sigterm_to_the_trainer(engine) -> None:
    """SGLang's engine takes SIGTERM over at its first call (an asyncio handler whose watchdog shuts SGLang down and
    exits the process with status 0, mid-step, with no checkpoint): its event loop is set up now, before the
    trainer's stop request installs its own handler, and its SIGTERM handler taken out again (the process's handler
    from before is put back). SGLang keeps SIGQUIT, its crash handler.

    The setup runs inside the engine's own loop (`Engine.loop`, which every engine call runs), as the first call
    would run it: outside a running loop SGLang makes a loop of its own for its reply handler (sglang 0.5.23,
    TokenizerManager.auto_create_handle_loop through get_or_create_event_loop), which nothing runs, and every
    engine call would then wait for its reply forever."""
    if threading.current_thread() is not threading.main_thread():
        return  # SGLang adds no signal handler there, and none can be set or taken out
    manager, loop = engine.tokenizer_manager, engine.loop
    before = signal.getsignal(signal.SIGTERM)

    async def set_up() -> None:  # uvloop (SGLang's) removes a handler only while the loop runs
        manager.auto_create_handle_loop()
        if manager.event_loop is loop:
            loop.remove_signal_handler(signal.SIGTERM)

    loop.run_until_complete(set_up())
    if manager.event_loop is not loop:
        raise RolloutError("SGLang's tokenizer manager runs its reply handler on another event loop than its engine's "
                           "calls: every call would wait forever; install the sglang version the adapter is checked "
                           "against (sglang==0.5.23, .ci/sglang-contract.txt)")
    # The loop left the default (exit) in its place; None: a handler set outside Python, which stays lost.
    signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


class SGLangEngine(RolloutEngine):
    """Rollout through an in-process `sglang.Engine` started with `skip_tokenizer_init`."""

    def __init__(self, engine, *, tp_size: int, weight_sync: Literal["tensor", "broadcast"] = "tensor",
                 ledger: PushLedger | None = None):
        """Wrap a started `sglang.Engine` (see `launch`); `weight_sync` says how pushes travel. `ledger`: the
        model's HF tensor names and shapes, against which every push is checked before SGLang sees it, and
        checked complete at its end (SGLang itself only warns about a name it does not know)."""
        self.engine, self.tp_size, self._ledger = engine, tp_size, ledger
        self._sender = BroadcastSender(engine, tp_size) if weight_sync == "broadcast" else None
        self._version, self._open = 0, False
        self._released: set[str] = set()
        """MEMORY_TAGS that SGLang holds paused."""
        self._weights_lost = False
        """The weights were released since the last complete push: SGLang does not keep their values
        (it runs without a CPU backup), so they must be pushed again before the engine generates."""

    @staticmethod
    def check_startable(config: SGLangEngineConfig, mode: Literal["colocated", "disaggregated"], *,
                        local_world_size: int) -> range:
        """The engine's GPUs; ConfigError (naming the fix) when they are not there or sglang is not installed.

        Cheap, and meant for every rank, so that all of them stop alike instead of waiting for rank 0.
        """
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true", "yes", "y", "on"):
            raise ConfigError("SGLANG_RETURN_ORIGINAL_LOGPROB is set: SGLang would report the sampled tokens' "
                              "log-probs at temperature 1, not at rollout.temperature where the trainer computes "
                              "them; unset it")
        gpus = config.gpus(mode, local_world_size=local_world_size, visible_gpus=torch.cuda.device_count())
        if importlib.util.find_spec("sglang") is None:
            raise ConfigError("rollout.name=sglang but sglang is not installed: pip install 'megatron-dapo[sglang]', "
                              "or set rollout.name=embedded")
        return gpus

    @classmethod
    def launch(cls, model_path: str, config: SGLangEngineConfig, mode: Literal["colocated", "disaggregated"],
               *, local_world_size: int) -> SGLangEngine:
        """Start SGLang in this process on the GPUs `check_startable` picks."""
        import sglang

        gpus = cls.check_startable(config, mode, local_world_size=local_world_size)
        colocated = mode == "colocated"
        # The trainer's CUDA_DEVICE_MAX_CONNECTIONS=1 (for megatron-core's overlapped collectives, see
        # examples/slurm/task.sh) would serialise the kernels of SGLang's overlapping streams: its processes,
        # started here, do without it (SGLang's engine sets its own value in this process's environment as it
        # starts them). The trainer's value is put back for what this process starts later; its own CUDA context
        # already has its setting.
        kept = os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
        try:
            engine = sglang.Engine(model_path=model_path, tp_size=config.tp_size, skip_tokenizer_init=True,
                                   base_gpu_id=gpus.start, mem_fraction_static=config.mem_fraction_static,
                                   enable_memory_saver=colocated, **config.server_args)
        finally:
            if kept is not None:
                os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = kept
        leave_sigterm_to_the_trainer(engine)
        if not config.server_args.get("enable_deterministic_inference"):
            print("SGLang samples without the requested seeds unless rollout.sglang.server_args."
                  "enable_deterministic_inference is true: rollouts will not repeat exactly", flush=True)
        return cls(engine, tp_size=config.tp_size, weight_sync="tensor" if colocated else "broadcast",
                   ledger=push_ledger(ModelArch.from_pretrained(model_path)))

    # ---- generation -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._open:
            raise StaleWeightsError("a weight push is open or broke off: finish a complete push before generating")
        if self._released:
            raise RolloutError("the engine's memory is released: call resume_memory() first")
        if self._weights_lost:
            raise StaleWeightsError("the engine's weights were released and have not been pushed since: "
                                    "push the weights before generating (SGLang does not keep them)")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self._check_usable()
        prompts = as_batch(prompts, "prompt")
        for i, prompt in enumerate(prompts):
            kind = not_token_ids(prompt)
            if kind is not None:
                raise RolloutError(f"prompt {i} is {kind}, not a list of token ids (a batch is a list of prompts)")
        if any(len(p) == 0 for p in prompts):
            raise RolloutError("empty prompt: every prompt needs at least one token")
        if not prompts:
            return []  # SGLang refuses an empty batch
        sampling = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, "top_k": params.top_k, "stop_token_ids": list(params.stop_token_ids),
                    "skip_special_tokens": False}
        requests = [list(p) for p in prompts for _ in range(params.n)]
        # No seed is a fresh draw (engine.SamplingParams): one drawn here, as SGLang's deterministic inference would
        # give every unseeded request its one default seed (the n responses to a prompt alike, each call the last's).
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**62)
        per_request = [{**sampling, "sampling_seed": (seed * 1_000_003 + i) % 2**63}  # SGLang keeps it in an int64
                       for i in range(len(requests))]
        outputs = _generate(self.engine, f"the generation batch ({len(prompts)} prompts x {params.n})",
                            input_ids=requests, sampling_params=per_request, return_logprob=True)
        completions = [_completion(out, params.max_new_tokens, params.stop_token_ids) for out in outputs]
        return [completions[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def score(self, sequences: list[list[int]], temperature: float) -> list[torch.Tensor]:
        """As RolloutEngine.score, at temperature 1 only: SGLang's prompt log-probs are log_softmax(logits),
        whatever temperature the request names."""
        self._check_usable()
        if temperature != 1.0:
            raise RolloutError(f"SGLang scores a sequence's tokens at temperature 1 only, got {temperature}")
        sequences = as_batch(sequences, "sequence")
        for i, seq in enumerate(sequences):
            kind = not_token_ids(seq)
            if kind is not None:
                raise RolloutError(f"sequence {i} is {kind}, not a list of token ids (a batch is a list of sequences)")
        outputs = _generate(self.engine, f"the scoring batch ({len(sequences)} sequences)",
                            input_ids=[list(s) for s in sequences],
                            sampling_params={"max_new_tokens": 0, "temperature": temperature},
                            return_logprob=True, logprob_start_len=0)
        scores = []
        for i, out in enumerate(outputs):
            reason = out["meta_info"].get("finish_reason") or {}
            if isinstance(reason, dict) and reason.get("type") == "abort":  # then it has no log-probs
                raise RolloutError(f"SGLang aborted scoring sequence {i}: {reason.get('message', reason)}")
            # input_token_logprobs: (logprob, token id, text) per prompt token; the first has no logprob.
            scores.append(torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]],
                                       dtype=torch.float32))
        return scores

    # ---- weights ----------------------------------------------------------------------------

    def begin_weight_update(self) -> None:
        if "weights" in self._released:
            raise RolloutError("the engine's weights are released: call resume_weights() before a push")
        if self._open and hasattr(self.engine, "end_weight_update"):
            # A push that broke off (a refused bucket, a tensor left out) left SGLang's session open, and SGLang
            # refuses to begin another: close it first. Its reply is not checked: it may not have opened at all.
            self.engine.end_weight_update()
        self._open = True
        if self._ledger is not None:
            self._ledger.begin()
        if hasattr(self.engine, "begin_weight_update"):  # sglang >= 0.5.23 loads weights only inside a session
            expect_success(self.engine.begin_weight_update(), "begin_weight_update")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self._open:
            raise RolloutError("update_weights outside a push: call begin_weight_update() first")
        bucket = list(named_tensors)
        if self._ledger is not None:
            self._ledger.accept(bucket)
        if self._sender is not None:
            self._sender.send(bucket)
        else:
            flat = flatten(bucket)  # referenced until SGLang's call has returned: its workers read it through CUDA IPC
            payloads = bucket_payloads(flat, self.tp_size)
            expect_success(self.engine.update_weights_from_tensor(
                named_tensors=payloads, load_format="flattened_bucket", flush_cache=False), "update_weights_from_tensor")
            del flat, payloads
        if self._ledger is not None:
            self._ledger.record(name for name, _ in bucket)

    def end_weight_update(self, version: int) -> None:
        if self._ledger is not None:
            self._ledger.check_complete()  # every tensor arrived, or the push stays open: stale
        if hasattr(self.engine, "end_weight_update"):
            expect_success(self.engine.end_weight_update(), "end_weight_update")
        expect_success(self.engine.flush_cache(), "flush_cache")
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # free the buckets' blocks that SGLang's workers have let go of
        if self._ledger is not None:
            self._ledger.end(version)
        self._version, self._open, self._weights_lost = version, False, False

    # ---- memory -----------------------------------------------------------------------------

    def release_memory(self, weights: bool = True) -> None:
        tags = [t for t in MEMORY_TAGS if weights or t != "weights"]
        expect_success(self.engine.release_memory_occupation(tags=tags), "release_memory_occupation")
        self._released |= set(tags)
        self._weights_lost |= weights

    def resume_weights(self) -> None:
        self._resume({"weights"} & self._released)

    def resume_memory(self) -> None:
        self._resume(self._released)

    def _resume(self, tags: set[str]) -> None:
        if tags:
            expect_success(self.engine.resume_memory_occupation(tags=[t for t in MEMORY_TAGS if t in tags]),
                           "resume_memory_occupation")
            self._released -= tags

    @property
    def weight_version(self) -> int:
        return self._version

    def close(self) -> None:
        """Stop SGLang's processes (the weight broadcast's group taken down first)."""
        try:
            if self._sender is not None:
                self._sender.close()
        finally:
            self.engine.shutdown()


def _generate(engine, what: str, **kwargs) -> list[dict]:
    """engine.generate(**kwargs), whatever it raises as a RolloutError naming `what`: a request SGLang refuses (one
    past its context length) fails the whole call with a ValueError, one it aborts on its own (out of memory, an
    internal error) with fastapi's HTTPException, whose str() may be empty."""
    try:
        return engine.generate(**kwargs)
    except ValueError as err:
        raise RolloutError(f"SGLang refused {what}: {err}") from err
    except Exception as err:
        detail = getattr(err, "detail", None) or str(err)
        raise RolloutError(f"SGLang failed on {what}: {type(err).__name__}: {detail}") from err


def _completion(out: dict, max_new_tokens: int, stop_token_ids=()) -> Completion:
    """One SGLang output as a Completion; RolloutError for a request SGLang aborted (its reason given), which
    must not pass for a completion cut at max_new_tokens, and for one whose log-probs are not those of its
    tokens: SGLang ends a request that sampled NaN or an id outside the vocabulary as a "stop", with a stop id
    written over the token and the sampled one's log-prob kept. Also for a "length" short of max_new_tokens:
    SGLang lowers a request's max_new_tokens to what its context length (less 2 tokens) and its KV cache leave
    (sglang 0.5.23, Scheduler.init_req_max_new_tokens), and the response would pass for a full-length one.
    A response whose last token, at max_new_tokens, is a stop token ended by itself: it is a "stop", as the
    embedded engine says, whichever check SGLang made first (releases before 0.5.23 looked at the length first),
    so overlong filtering does not take it for a truncated one."""
    meta = out["meta_info"]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind not in ("stop", "length"):
        raise RolloutError(f"SGLang ended a request with finish reason {reason!r}, neither a stop token nor "
                           "max_new_tokens")
    token_ids = [int(t) for t in out["output_ids"]]
    if kind == "length" and len(token_ids) < max_new_tokens:
        raise RolloutError(
            f"SGLang cut a response at {len(token_ids)} of its max_new_tokens={max_new_tokens} (prompt "
            f"{meta.get('prompt_tokens', '?')} tokens): its KV cache holds fewer tokens than a prompt and a full "
            "response (raise rollout.sglang.mem_fraction_static, or lower data.max_response_length), or its "
            "context length does, less the 2 tokens it keeps back")
    scored = meta["output_token_logprobs"]
    logprobs = [float(lp) for lp, _, _ in scored]
    if [int(t) for _, t, _ in scored] != token_ids or not all(math.isfinite(lp) for lp in logprobs):
        raise RolloutError(f"SGLang returned a completion whose log-probs are not finite or not those of its tokens "
                           f"(finish reason {reason!r}): its model produced NaN or an id outside the vocabulary")
    stopped = kind == "stop" or (token_ids and token_ids[-1] in stop_token_ids)
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason="stop" if stopped else "length")


def push_ledger(arch: ModelArch) -> PushLedger:
    """What a push into an engine for `arch` must carry: every HF tensor with its shape. With tied embeddings
    there is no lm_head.weight to push (SGLang's loaders skip one), so a push naming it is refused rather than
    counted as the embedding."""
    return PushLedger(families.hf_tensor_shapes(arch), {})

"""The SGLang rollout engine: `sglang.Engine` behind the RolloutEngine interface (GPU only).

Weights arrive as (HF name, tensor) buckets; each bucket is flattened into one byte tensor with its
metadata (SGLang's FlattenedTensorBucket layout), serialized once per SGLang TP rank and sent with
`update_weights_from_tensor(load_format="flattened_bucket")`. The bucket's memory is referenced by
the payload until SGLang's call returns (the call is synchronous), and a new bucket is always a new
tensor, so no buffer is reused while the engine may still read it. SGLang stays optional: it is
imported when this engine is built.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from megatron_dapo.rollout.engine import Completion, RolloutEngine, RolloutError, SamplingParams, StaleWeightsError

MEMORY_TAGS = ("kv_cache", "weights")
"""What `release_memory` frees while the trainer runs (colocated mode)."""


def bucket_payloads(named_tensors: list[tuple[str, torch.Tensor]], tp_size: int) -> list[bytes]:
    """One bucket as SGLang's "flattened_bucket" payloads, one per SGLang TP rank."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    if not named_tensors:
        raise RolloutError("an empty weight bucket")
    bucket = FlattenedTensorBucket(named_tensors=[(name, t.contiguous()) for name, t in named_tensors])
    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return [MultiprocessingSerializer.serialize(payload, output_str=False) for _ in range(tp_size)]


class SGLangEngine(RolloutEngine):
    """Rollout through an in-process `sglang.Engine` started with `skip_tokenizer_init`."""

    def __init__(self, model_path: str, *, tp_size: int = 1, mem_fraction_static: float = 0.6,
                 base_gpu_id: int = 0, enable_memory_saver: bool = True, engine=None):
        if engine is None:
            import sglang

            engine = sglang.Engine(model_path=model_path, tp_size=tp_size, skip_tokenizer_init=True,
                                   mem_fraction_static=mem_fraction_static, base_gpu_id=base_gpu_id,
                                   enable_memory_saver=enable_memory_saver)
        self.engine, self.tp_size = engine, tp_size
        self._version, self._open, self._released = 0, False, False

    # ---- generation -------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._open:
            raise StaleWeightsError("a weight push is open or broke off: finish a complete push before generating")
        if self._released:
            raise RolloutError("the engine's memory is released: call resume_memory() first")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        self._check_usable()
        if any(len(p) == 0 for p in prompts):
            raise RolloutError("empty prompt: every prompt needs at least one token")
        sampling = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                    "top_p": params.top_p, "top_k": params.top_k, "stop_token_ids": list(params.stop_token_ids),
                    "skip_special_tokens": False}
        requests = [list(p) for p in prompts for _ in range(params.n)]
        per_request = []
        for i in range(len(requests)):
            item = dict(sampling)
            if params.seed is not None:
                item["sampling_seed"] = params.seed * 1_000_003 + i
            per_request.append(item)
        outputs = self.engine.generate(input_ids=requests, sampling_params=per_request, return_logprob=True)
        completions = [_completion(out) for out in outputs]
        return [completions[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def score(self, sequences: list[list[int]], temperature: float) -> list[torch.Tensor]:
        self._check_usable()
        outputs = self.engine.generate(
            input_ids=[list(s) for s in sequences],
            sampling_params={"max_new_tokens": 0, "temperature": temperature},
            return_logprob=True, logprob_start_len=0,
        )
        # input_token_logprobs: (logprob, token id, text) per prompt token; the first has no logprob.
        return [torch.tensor([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float32)
                for out in outputs]

    # ---- weights ----------------------------------------------------------------------------

    def begin_weight_update(self) -> None:
        self._open = True
        if hasattr(self.engine, "begin_weight_update"):  # sglang >= 0.5.23
            self.engine.begin_weight_update()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self._open:
            raise RolloutError("update_weights outside a push: call begin_weight_update() first")
        payloads = bucket_payloads(list(named_tensors), self.tp_size)
        self.engine.update_weights_from_tensor(named_tensors=payloads, load_format="flattened_bucket",
                                               flush_cache=False)

    def end_weight_update(self, version: int) -> None:
        if hasattr(self.engine, "end_weight_update"):
            self.engine.end_weight_update()
        self.engine.flush_cache()
        self._version, self._open = version, False

    # ---- memory -----------------------------------------------------------------------------

    def release_memory(self) -> None:
        self.engine.release_memory_occupation(tags=list(MEMORY_TAGS))
        self._released = True

    def resume_memory(self) -> None:
        self.engine.resume_memory_occupation(tags=list(MEMORY_TAGS))
        self._released = False

    @property
    def weight_version(self) -> int:
        return self._version


def _completion(out: dict) -> Completion:
    meta = out["meta_info"]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    return Completion(token_ids=list(out["output_ids"]),
                      logprobs=[float(lp) for lp, _, _ in meta["output_token_logprobs"]],
                      finish_reason="stop" if kind == "stop" else "length")

"""What crosses over to SGLang: weight buckets in its flattened layout, dtype names, its replies."""
from __future__ import annotations

import torch

from megatron_dapo.rollout.engine import RolloutError


def flatten(named_tensors: list[tuple[str, torch.Tensor]]):
    """One bucket as SGLang's FlattenedTensorBucket (one byte tensor + metadata), widest dtype first.

    SGLang's broadcast receiver refuses a tensor whose byte offset is not a multiple of its element
    size; with the widest elements first every offset is.
    """
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    if not named_tensors:
        raise RolloutError("an empty weight bucket")
    ordered = sorted(named_tensors, key=lambda item: -item[1].element_size())
    return FlattenedTensorBucket(named_tensors=[(name, t.contiguous()) for name, t in ordered])


def bucket_payloads(bucket, tp_size: int) -> list[bytes]:
    """A `flatten`ed bucket as `update_weights_from_tensor(load_format="flattened_bucket")` payloads, one per
    SGLang TP rank. CUDA tensors are serialized as IPC handles: keep `bucket` alive until SGLang's call returns.
    Their device travels as an index (SGLang's receiver takes an index or a device UUID): the engine's processes
    inherit this process's CUDA_VISIBLE_DEVICES, so an index names the same GPU on both sides. SGLang's
    monkey_patch_torch_reductions (UUIDs) is not applied: in this process it would break the pickling of every
    CPU tensor (its patched reducer indexes a CUDA-only argument).
    """
    from sglang.srt.utils import MultiprocessingSerializer

    payload = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
    return [MultiprocessingSerializer.serialize(payload, output_str=False) for _ in range(tp_size)]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: how SGLang's receiver names a dtype (getattr(torch, name))."""
    return str(dtype).removeprefix("torch.")


def expect_success(result, call: str):
    """Raise RolloutError when SGLang answered `call` with a failure; return the result otherwise.

    Weight calls answer (success, message); flush_cache an object with `.success`; others None.
    """
    if isinstance(result, tuple) and len(result) >= 2 and isinstance(result[0], bool):
        success, message = result[0], result[1]
    else:
        success, message = getattr(result, "success", True), getattr(result, "message", "")
    if not success:
        raise RolloutError(f"SGLang's {call} failed: {message or 'no message'}")
    return result

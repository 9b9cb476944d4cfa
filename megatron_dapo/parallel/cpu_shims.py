"""Run megatron-core 0.16's real TP/PP/SP/DP code on CPU with gloo, for tests without a GPU.

`apply_cpu_shims()` redirects the CUDA-only code on the dense-GPT training path to the CPU; it is
idempotent and a no-op when CUDA is available. Every patch is scoped to megatron-core:

1. The module-global `torch` of each module in `_CUDA_MODULES` becomes a stand-in that forwards to
   torch, except: `torch.cuda.current_device()` is "cpu", tensor factories given device="cuda"
   allocate on the CPU, and the CUDA RNG calls use the CPU generator. Everything outside these
   modules (our code, torch itself) still sees the real `torch.cuda`.
2. tensor_parallel/random.py's RNG-state helpers swap the CPU generator's state instead.
3. Checks no module-global can reach: `x.type() == 'torch.cuda.FloatTensor'` and `x.cuda()`
   (torch.Tensor patched only while four megatron functions run), and WrappedTorchNorm's
   refusal of sequence_parallel (the local layer spec's norm; applied on GPUs without Transformer
   Engine too, by actor/model.py).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

_APPLIED = False

# Modules whose global `torch` is replaced, with the CUDA-only code each one runs on our path.
_CUDA_MODULES = (
    # GlobalMemoryBuffer.get_tensor (DotProductAttention's matmul buffer); local_multi_tensor_l2_norm's result
    # (every grad norm without Transformer Engine or apex)
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",  # *Parallel*.__init__ weights, SP all-gather buffer
    "megatron.core.tensor_parallel.mappings",  # _gather_along_* / _reduce_scatter_* out buffers
    "megatron.core.tensor_parallel.random",  # CudaRNGStatesTracker.add, model_parallel_cuda_manual_seed
    "megatron.core.transformer.utils",  # get_default_causal_mask(device="cuda")
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # RotaryEmbedding inv_freq
    "megatron.core.pipeline_parallel.p2p_communication",  # recv/shape buffers, cuda.synchronize()
    "megatron.core.pipeline_parallel.schedules",  # forward_backward_*: total_num_tokens
    "megatron.core.distributed.param_and_grad_buffer",  # _ParamAndGradBuffer param/grad buffers
    # FP32Optimizer.__init__'s _scale (the CPU run's optimizer); MixedPrecisionOptimizer.__init__'s scalars
    "megatron.core.optimizer.optimizer",
    # get_parameter_state_dp_zero's gather buffers and load_state_dict's init_shard (checkpoints)
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # preload_tensors: cuda.synchronize()
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # save/verify flags on device="cuda"
    "megatron.core.dist_checkpointing.strategies.async_utils",  # execute_sync: cuda.synchronize()
    "megatron.core.optimizer.clip_grads",  # get_grad_norm_fp32 / count_zeros_fp32 scalars
)

_FACTORIES = ("empty", "zeros", "ones", "tensor")  # the ones called with device="cuda" there


class _CpuCuda:
    """`torch.cuda` as the shimmed megatron modules see it."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"  # only ever used as a `device=` / `.to()` argument in these modules

    @staticmethod
    def synchronize(device=None):
        pass  # p2p_communication: after batch_isend_irecv (batch_p2p_sync, on by default)

    @staticmethod
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)


class _CpuTorch(types.ModuleType):
    """`torch` as the shimmed megatron modules see it."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        @functools.wraps(attr)
        def factory(*args, **kwargs):
            if str(kwargs.get("device")).startswith("cuda"):  # "cuda", "cuda:0", torch.device
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


_ORIG_TENSOR_TYPE = torch.Tensor.type
_ORIG_TENSOR_CUDA = torch.Tensor.cuda


def _cuda_type_name(self, *args, **kwargs):
    name = _ORIG_TENSOR_TYPE(self, *args, **kwargs)
    if args or kwargs or self.device.type != "cpu":
        return name
    return name.replace("torch.", "torch.cuda.", 1)  # torch.FloatTensor -> torch.cuda.FloatTensor


@contextlib.contextmanager
def _cpu_tensors_pass_as_cuda():
    torch.Tensor.type = _cuda_type_name
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.type = _ORIG_TENSOR_TYPE
        torch.Tensor.cuda = _ORIG_TENSOR_CUDA


def _wrap_as_cuda(owner, name: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_pass_as_cuda():
            return fn(*args, **kwargs)

    setattr(owner, name, wrapper)


def apply_cpu_shims() -> None:
    """Make megatron-core's TP/PP/SP/DP code run on CPU tensors. Idempotent; no-op with CUDA."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return

    # 1. The `torch` stand-in, per module.
    cpu_torch = _CpuTorch("torch")
    for module_name in _CUDA_MODULES:
        importlib.import_module(module_name).torch = cpu_torch

    # 2. tensor_parallel/random.py: _get/_set_cuda_rng_state back CudaRNGStatesTracker.fork and
    # the activation-recompute CheckpointFunction; they index torch.cuda.default_generators.
    from megatron.core.tensor_parallel import random as mp_random

    def get_rng_state(device=-1, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state = get_rng_state, set_rng_state
    # fork() warns when the CPU generator moved inside the context; here the forked generator is
    # the CPU one, so the warning would fire on every forked init/dropout. Drop just that message.
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context"
    )

    # 3a. Tensor-method CUDA checks, made to pass only while these functions run:
    # - DistributedOptimizer.__init__ sorts params by `param.type() == 'torch.cuda.FloatTensor'`
    #   (and Half/BFloat16) and raises TypeError for anything else (distrib_optimizer.py).
    # - clip_grad_by_total_norm_fp32 asserts `param.grad.type() == 'torch.cuda.FloatTensor'`
    #   (clip_grads.py; called through the name imported into optimizer.py).
    # - LanguageModule.setup_embeddings_and_output_layer moves tied embeddings with `.cuda()`
    #   before all-reducing them across the first/last pipeline stage (language_module.py).
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.optimizer import distrib_optimizer, optimizer

    _wrap_as_cuda(distrib_optimizer.DistributedOptimizer, "__init__")
    # - DistributedOptimizer.get_parameter_state_dp_zero moves each shard with `.cuda()` before
    #   gathering it on DP rank 0 (the "fully_reshardable" checkpoint format).
    _wrap_as_cuda(distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero")
    _wrap_as_cuda(optimizer, "clip_grad_by_total_norm_fp32")
    _wrap_as_cuda(LanguageModule, "setup_embeddings_and_output_layer")
    # Not covered: Float16OptimizerWithFloat16Params.__init__'s `param.type()` check (bf16 without the
    # distributed optimizer), a path no CPU run takes (bf16 is the GPU's precision).

    # 3b. WrappedTorchNorm's refusal of sequence_parallel: not CUDA-only, see actor/model.py.
    from megatron_dapo.actor.model import adapt_torch_norm

    adapt_torch_norm()
    _APPLIED = True

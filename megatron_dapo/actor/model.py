"""The actor's megatron-core GPTModel, built from a Hugging Face model folder for one parallel layout."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_dapo.models import families
from megatron_dapo.models.arch import ModelArch, ModelError
from megatron_dapo.models.hf_io import HFCheckpointReader
from megatron_dapo.parallel.config import ParallelLayout


def transformer_config(arch: ModelArch, layout: ParallelLayout, *, bf16: bool, recompute: bool = False):
    """megatron-core's TransformerConfig, derived from the model's architecture and our layout."""
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=layout.sequence_parallel,
        variable_seq_lengths=True,  # micro-batches have their own widths; the pipeline sends shapes
        moe_token_dispatcher_type="alltoall",  # dense model; the default "allgather" refuses variable lengths
        # Our loss is already divided by the global batch's token count: gradients are summed over
        # micro-batches and data-parallel ranks, never averaged again (see MegatronActor._mini_batch_step).
        calculate_per_token_loss=True,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        use_cpu_initialization=not torch.cuda.is_available(),
    )


def layer_spec(arch: ModelArch):
    """Transformer Engine's layer spec when it is importable, megatron-core's local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if _has_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    adapt_torch_norm()
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")


def describe_spec() -> str:
    """One line for logs: which layer implementations `layer_spec` builds the actor's model from."""
    if _has_transformer_engine():
        return "layers: Transformer Engine"
    return "layers: megatron-core's local spec, torch norms and attention (Transformer Engine is not installed)"


def _has_transformer_engine() -> bool:
    try:  # imported, not only found: an install that does not import counts as none, as for megatron-core
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


_TORCH_NORM_ADAPTED = False


def adapt_torch_norm() -> None:
    """Make the local spec's norm serve every layout, on CPU and on GPUs without Transformer Engine.

    megatron-core 0.16's transformer/torch_norm.py WrappedTorchNorm (the local spec's norm without apex)
    asserts `not config.sequence_parallel`, because it does not mark its weights for the tensor-parallel
    all-reduce of sequence-parallel gradients, and builds torch.nn.RMSNorm in float32 whatever
    config.params_dtype says. The norm is built without SP here, its weights marked the way Transformer
    Engine's and apex's norms mark them (finalize_model_grads then all-reduces their gradients over TP),
    and cast to params_dtype (bf16 on GPU, as Transformer Engine makes them; a float32 weight would also
    leave torch's fused RMSNorm kernel for its slow path). Idempotent."""
    global _TORCH_NORM_ADAPTED
    if _TORCH_NORM_ADAPTED:
        return
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build_norm = WrappedTorchNorm.__new__

    def new_norm(cls, config, hidden_size, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False
        norm = build_norm(cls, config, hidden_size, *args, **kwargs).to(dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = staticmethod(new_norm)
    _TORCH_NORM_ADAPTED = True


def build_gpt_model(arch: ModelArch, layout: ParallelLayout, *, bf16: bool, recompute: bool = False):
    """This rank's pipeline stage of the policy as a megatron-core GPTModel (model parallel must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    families.check_layout(arch, layout.tp, layout.pp)
    model = GPTModel(
        config=transformer_config(arch, layout, bf16=bf16, recompute=recompute),
        transformer_layer_spec=layer_spec(arch),
        vocab_size=families.padded_vocab_size(arch.vocab_size, layout.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
    )
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is not None:  # Llama 3 scaling with the model's own factors (megatron-core fixes some of them)
        rotary.inv_freq = arch.rope_inv_freq().to(rotary.inv_freq.device)
    return model


def layer_numbers(model) -> dict[int, int]:
    """Local layer index -> global layer index for this pipeline stage."""
    return {j: layer.layer_number - 1 for j, layer in enumerate(model.decoder.layers)}


def load_hf_weights(model, arch: ModelArch, folder: str | Path) -> None:
    """Copy a Hugging Face checkpoint into this rank's shard of the model, checking every shape."""
    from megatron.core import parallel_state

    reader = HFCheckpointReader(folder)
    reader.check_tied_head(arch.tie_word_embeddings)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = families.padded_vocab_size(arch.vocab_size, tp)
    numbers = layer_numbers(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            rule, layer = families.rule_for(arch, name, numbers)
            tensors = [reader.get(hf) for hf in families.hf_names(rule, layer)]
            expected = families.hf_shapes(rule, arch)
            for hf, tensor, shape in zip(families.hf_names(rule, layer), tensors, expected):
                if tuple(tensor.shape) != shape:
                    raise ModelError(
                        f"{folder}: tensor {hf!r} has shape {tuple(tensor.shape)}, expected {shape} from config.json"
                    )
            local = families.shard(rule, families.fuse(rule, tensors, arch), tp_rank, tp, padded)
            param.copy_(local.to(param.dtype))


def check_sequence_length(arch: ModelArch, length: int) -> None:
    if length > arch.max_position_embeddings:
        raise ModelError(
            f"a sequence of {length} tokens is longer than the model's max_position_embeddings "
            f"({arch.max_position_embeddings}): lower data.max_prompt_length + data.max_response_length"
        )


def check_token_ids(arch: ModelArch, tokens: torch.Tensor, lengths: torch.Tensor, first_row: int = 0) -> None:
    """Every token in use must be one of the model's ids. One past them (a tokenizer with added tokens the
    model's config.json lacks) would embed as a padding row and score a log-prob of nothing, silently.
    `tokens` are rows first_row.. of a larger batch (the error names the row in that)."""
    valid = torch.arange(tokens.shape[1]) < lengths.cpu()[:, None]
    bad = valid & ((tokens.cpu() < 0) | (tokens.cpu() >= arch.vocab_size))
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ModelError(
            f"token id {int(tokens[row, col])} (sequence {first_row + row}, position {col}) is not one of the model's "
            f"{arch.vocab_size} ids (config.json vocab_size): the tokenizer (model.tokenizer_path) does not match "
            "the model"
        )


__all__ = ["ModelError", "build_gpt_model", "load_hf_weights", "transformer_config", "check_sequence_length",
           "check_token_ids"]

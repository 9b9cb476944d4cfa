"""Hugging Face <-> megatron-core name and shape map: one declarative table per family.

A rule says which Hugging Face tensors make one megatron-core parameter, how they are fused
(q/k/v interleaved per query group, gate/up stacked) and how the fused tensor is split across
tensor-parallel ranks. The same tables serve weight loading, checkpoint conversion and the
resharding of trained weights into the rollout engine.

Names are those of megatron-core's local layer spec; `TE_RENAMES` maps the two norms that
Transformer Engine's spec fuses into the following linear layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import torch

from megatron_dapo.models.arch import ModelArch, ModelError


class Fuse(Enum):
    COPY = "copy"
    QKV = "qkv"          # q, k, v -> [groups x (q heads per group + 2) x head_dim, ...]
    GATE_UP = "gate_up"  # gate, up -> [2 x ffn, hidden]


class Split(Enum):
    REPLICATED = "replicated"
    COLUMN = "column"    # dim 0 (output features); for QKV whole query groups per rank
    ROW = "row"          # dim 1 (input features)
    VOCAB = "vocab"      # dim 0 after padding the vocabulary to a multiple of TP
    GATE_UP = "gate_up"  # each rank holds [its gate rows; its up rows]


@dataclass(frozen=True)
class Rule:
    megatron: str
    """Megatron name; layer rules are relative to `decoder.layers.{j}.`."""
    hf: tuple[str, ...]
    """Hugging Face names; `{i}` is the global layer index."""
    fuse: Fuse = Fuse.COPY
    split: Split = Split.REPLICATED


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
_LLAMA_LAYER = (
    Rule("input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",)),
    Rule("self_attention.linear_qkv.weight", (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"),
         Fuse.QKV, Split.COLUMN),
    Rule("self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",), split=Split.ROW),
    Rule("pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",)),
    Rule("mlp.linear_fc1.weight", (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"), Fuse.GATE_UP, Split.GATE_UP),
    Rule("mlp.linear_fc2.weight", (_MLP + "down_proj.weight",), split=Split.ROW),
)
_QKV_BIAS = (
    Rule("self_attention.linear_qkv.bias", (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"),
         Fuse.QKV, Split.COLUMN),
)
_QK_NORM = (
    Rule("self_attention.q_layernorm.weight", (_ATTN + "q_norm.weight",)),
    Rule("self_attention.k_layernorm.weight", (_ATTN + "k_norm.weight",)),
)
LAYER_RULES = {
    "llama": _LLAMA_LAYER,
    "qwen2": _LLAMA_LAYER + _QKV_BIAS,
    "qwen3": _LLAMA_LAYER + _QK_NORM,
}
EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split=Split.VOCAB)
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",))
OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), split=Split.VOCAB)
# With tied embeddings the last pipeline stage still holds a copy of the embedding as output_layer.
TIED_OUTPUT = Rule("output_layer.weight", ("model.embed_tokens.weight",), split=Split.VOCAB)

TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron pads the vocabulary so each TP rank holds an equal, aligned slice."""
    step = multiple * tp
    return -(-vocab_size // step) * step


def rule_for(arch: ModelArch, megatron_name: str, layer_numbers: dict[int, int] | None = None) -> tuple[Rule, int | None]:
    """The rule for one megatron parameter name and the global layer index it belongs to.

    layer_numbers maps a local layer index (as in the name) to the global one; identity if None.
    """
    match = _LAYER_NAME.match(megatron_name)
    if match:
        local, rest = int(match.group(1)), match.group(2)
        rest = {v: k for k, v in TE_RENAMES.items()}.get(rest, rest)
        for rule in LAYER_RULES[arch.family]:
            if rule.megatron == rest:
                return rule, (layer_numbers or {}).get(local, local)
    else:
        output = TIED_OUTPUT if arch.tie_word_embeddings else OUTPUT
        for rule in (EMBEDDING, FINAL_NORM, output):
            if rule.megatron == megatron_name:
                return rule, None
    raise ModelError(f"megatron parameter {megatron_name!r} has no rule in the {arch.family} table")


def hf_names(rule: Rule, layer: int | None) -> list[str]:
    return [name.format(i=layer) for name in rule.hf]


def hf_export_rules(arch: ModelArch) -> list[tuple[Rule, int | None]]:
    """Every (rule, layer) whose Hugging Face tensors make up a full checkpoint, in HF order."""
    rules: list[tuple[Rule, int | None]] = [(EMBEDDING, None)]
    for layer in range(arch.num_layers):
        rules += [(rule, layer) for rule in LAYER_RULES[arch.family]]
    rules.append((FINAL_NORM, None))
    if not arch.tie_word_embeddings:
        rules.append((OUTPUT, None))
    return rules


def hf_tensor_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model's Hugging Face checkpoint by name, with its shape (no lm_head.weight when the
    embeddings are tied)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule, layer in hf_export_rules(arch):
        shapes.update(zip(hf_names(rule, layer), hf_shapes(rule, arch)))
    return shapes


def fuse(rule: Rule, tensors: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """Hugging Face tensors -> the megatron tensor at TP=1 (vocabulary not padded)."""
    if rule.fuse is Fuse.COPY:
        return tensors[0]
    if rule.fuse is Fuse.GATE_UP:
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    groups, per_group = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * arch.head_dim, *tail)
    k = k.reshape(groups, arch.head_dim, *tail)
    v = v.reshape(groups, arch.head_dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def unfuse(rule: Rule, full: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """The megatron tensor at TP=1 -> its Hugging Face tensors (inverse of `fuse`)."""
    if rule.fuse is Fuse.COPY:
        return [full]
    if rule.fuse is Fuse.GATE_UP:
        return list(full.chunk(2, dim=0))
    groups, per_group, hd = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim
    tail = full.shape[1:]
    grouped = full.reshape(groups, (per_group + 2) * hd, *tail)
    q, k, v = grouped.split([per_group * hd, hd, hd], dim=1)
    return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]


def shard(rule: Rule, full: torch.Tensor, tp_rank: int, tp_size: int, padded_vocab: int | None = None) -> torch.Tensor:
    """The TP=1 megatron tensor -> this rank's slice."""
    if rule.split is Split.REPLICATED or (tp_size == 1 and rule.split is not Split.VOCAB):
        return full
    if rule.split is Split.COLUMN:
        return full.chunk(tp_size, dim=0)[tp_rank]
    if rule.split is Split.ROW:
        return full.chunk(tp_size, dim=1)[tp_rank]
    if rule.split is Split.GATE_UP:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    padded = full.new_zeros(padded_vocab, *full.shape[1:])
    padded[: full.shape[0]] = full
    return padded.chunk(tp_size, dim=0)[tp_rank]


def unshard(rule: Rule, shards: list[torch.Tensor], vocab_size: int | None = None) -> torch.Tensor:
    """All TP ranks' slices (in rank order) -> the TP=1 megatron tensor (inverse of `shard`)."""
    if rule.split is Split.REPLICATED:
        return shards[0]
    if rule.split is Split.COLUMN:
        return torch.cat(shards, dim=0)
    if rule.split is Split.ROW:
        return torch.cat(shards, dim=1)
    if rule.split is Split.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)[:vocab_size]


def hf_shapes(rule: Rule, arch: ModelArch) -> list[tuple[int, ...]]:
    """The Hugging Face shapes of a rule's tensors, from the model's config."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv, ffn = arch.num_heads * hd, arch.num_kv_heads * hd, arch.intermediate_size
    shapes = {
        "input_layernorm.weight": [(h,)],
        "pre_mlp_layernorm.weight": [(h,)],
        "self_attention.linear_qkv.weight": [(q, h), (kv, h), (kv, h)],
        "self_attention.linear_qkv.bias": [(q,), (kv,), (kv,)],
        "self_attention.q_layernorm.weight": [(hd,)],
        "self_attention.k_layernorm.weight": [(hd,)],
        "self_attention.linear_proj.weight": [(h, q)],
        "mlp.linear_fc1.weight": [(ffn, h)] * 2,
        "mlp.linear_fc2.weight": [(h, ffn)],
        "embedding.word_embeddings.weight": [(arch.vocab_size, h)],
        "decoder.final_layernorm.weight": [(h,)],
        "output_layer.weight": [(arch.vocab_size, h)],
    }
    return shapes[rule.megatron]


def megatron_shape(rule: Rule, arch: ModelArch) -> tuple[int, ...]:
    """The shape of the fused megatron tensor at TP=1 (vocabulary not padded)."""
    shapes = hf_shapes(rule, arch)
    if rule.fuse is Fuse.COPY:
        return shapes[0]
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def checkpoint_key(rule: Rule) -> str:
    """The key of a rule's tensor in a megatron-core dist checkpoint.

    Layers are stacked along a leading axis under one key (`decoder.layers.<name>`, global shape
    [num_layers, ...]); the norms carry Transformer Engine's names whichever spec saved them.
    """
    if rule.megatron in LAYER_NAMES:
        return "decoder.layers." + TE_RENAMES.get(rule.megatron, rule.megatron)
    return rule.megatron


LAYER_NAMES = frozenset(rule.megatron for rules in LAYER_RULES.values() for rule in rules)
LINEAR_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
"""The layer modules whose `_extra_state` a megatron-core checkpoint holds (None without FP8)."""


def check_layout(arch: ModelArch, tp: int, pp: int) -> None:
    """Refuse a TP x PP layout the model cannot be split into, naming the keys."""
    problems = []
    for what, count in (("num_attention_heads", arch.num_heads), ("num_key_value_heads", arch.num_kv_heads),
                        ("intermediate_size", arch.intermediate_size)):
        if count % tp:
            problems.append(f"the model's {what} ({count}) is not divisible by parallel.tensor_model_parallel_size ({tp})")
    if arch.num_layers % pp:
        problems.append(
            f"the model's num_hidden_layers ({arch.num_layers}) is not divisible by "
            f"parallel.pipeline_model_parallel_size ({pp})"
        )
    if problems:
        raise ModelError("; ".join(problems))

"""This pipeline stage's weights as full Hugging Face tensors (TP shards gathered in the TP group)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_dapo.actor.model import layer_numbers
from megatron_dapo.models import families
from megatron_dapo.models.arch import ModelArch


def stage_hf_tensors(model, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every parameter of this rank's pipeline stage, in model order.

    Collective over the tensor-parallel group: every TP rank of the stage must iterate it. The
    output layer of a model with tied embeddings is a copy of the embedding and is skipped.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    module = getattr(model, "module", model)
    numbers = layer_numbers(module)
    for name, param in module.named_parameters():
        rule, layer = families.rule_for(arch, name, numbers)
        if arch.tie_word_embeddings and rule is families.TIED_OUTPUT:
            continue
        local = param.detach()
        if rule.split is families.Split.REPLICATED or tp == 1 and rule.split is not families.Split.VOCAB:
            full = local
        else:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local.contiguous(), group=group)
            full = families.unshard(rule, shards, vocab_size=arch.vocab_size)
            del shards  # not held while the consumer has the full tensor
        yield from zip(families.hf_names(rule, layer), families.unfuse(rule, full, arch))

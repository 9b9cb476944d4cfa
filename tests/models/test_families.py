"""HF <-> Megatron tables: fuse/split round trips and the layout checks."""
import pytest
import torch

from megatron_dapo.actor.model import check_sequence_length, check_token_ids
from megatron_dapo.models import families as F
from megatron_dapo.models.arch import ModelArch, ModelError

CONFIG = dict(architectures=["Qwen2ForCausalLM"], vocab_size=100, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_qkv_interleaves_whole_query_groups():
    arch = ModelArch.from_hf_config(CONFIG)
    rule = F.LAYER_RULES["qwen2"][1]
    hd = arch.head_dim
    q = torch.arange(4 * hd)[:, None].float()           # heads 0..3
    k = 100 + torch.arange(2 * hd)[:, None].float()     # groups 0..1
    v = 200 + torch.arange(2 * hd)[:, None].float()
    fused = F.fuse(rule, [q, k, v], arch)
    # group 0 = q heads 0,1 then k0 then v0; group 1 = q heads 2,3, k1, v1
    expected = torch.cat([q[:2 * hd], k[:hd], v[:hd], q[2 * hd:], k[hd:], v[hd:]])
    assert torch.equal(fused, expected)
    unfused = F.unfuse(rule, fused, arch)
    assert len(unfused) == 3 and all(torch.equal(a, b) for a, b in zip(unfused, [q, k, v]))
    shards = [F.shard(rule, fused, r, 2) for r in range(2)]
    assert torch.equal(shards[1], expected[len(expected) // 2:]) and torch.equal(F.unshard(rule, shards), fused)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_qkv_interleave_at_one_group_and_at_one_head_a_group(kv_heads):
    """Multi-query (every q head shares one k/v) and plain multi-head (a group per head) attention: each group is
    its q heads, then its k, then its v; TP shards hold whole groups (at one KV head, TP cannot split it)."""
    arch = ModelArch.from_hf_config({**CONFIG, "num_key_value_heads": kv_heads})
    rule, hd, per_group = F.LAYER_RULES["qwen2"][1], arch.head_dim, 4 // kv_heads
    q = torch.arange(4 * hd)[:, None].float()
    k = 100 + torch.arange(kv_heads * hd)[:, None].float()
    v = 200 + torch.arange(kv_heads * hd)[:, None].float()
    fused = F.fuse(rule, [q, k, v], arch)
    expected = torch.cat([torch.cat([q[g * per_group * hd:(g + 1) * per_group * hd], k[g * hd:(g + 1) * hd],
                                     v[g * hd:(g + 1) * hd]]) for g in range(kv_heads)])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(F.unfuse(rule, fused, arch), [q, k, v]))
    if kv_heads > 1:
        shards = [F.shard(rule, fused, r, 2) for r in range(2)]
        assert torch.equal(shards[0], expected[:len(expected) // 2]) and torch.equal(F.unshard(rule, shards), fused)


def test_gate_up_shards_hold_their_slice_of_each():
    arch = ModelArch.from_hf_config(CONFIG)
    rule = F.LAYER_RULES["qwen2"][4]
    gate, up = torch.arange(96.0)[:, None], 1000 + torch.arange(96.0)[:, None]
    full = F.fuse(rule, [gate, up], arch)
    shard1 = F.shard(rule, full, 1, 2)
    assert torch.equal(shard1, torch.cat([gate[48:], up[48:]]))
    assert torch.equal(F.unshard(rule, [F.shard(rule, full, r, 2) for r in range(2)]), full)


def test_vocab_is_padded_and_trimmed():
    rule = F.EMBEDDING
    table = torch.randn(100, 8)
    padded = F.padded_vocab_size(100, 2)
    shards = [F.shard(rule, table, r, 2, padded) for r in range(2)]
    assert padded == 256 and shards[0].shape == shards[1].shape == (128, 8)
    assert torch.equal(shards[0][:100], table) and shards[0][100:].abs().sum() == 0 and shards[1].abs().sum() == 0
    assert torch.equal(F.unshard(rule, shards, vocab_size=100), table)


@pytest.mark.parametrize(("tp", "pp", "message"), [
    (8, 1, "num_attention_heads (4) is not divisible by parallel.tensor_model_parallel_size (8)"),
    (4, 1, "num_key_value_heads (2) is not divisible by parallel.tensor_model_parallel_size (4)"),
    (1, 4, "num_hidden_layers (2) is not divisible by parallel.pipeline_model_parallel_size (4)"),
])
def test_layouts_that_do_not_divide_the_model_are_refused(tp, pp, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        F.check_layout(ModelArch.from_hf_config(CONFIG), tp, pp)


def test_sequence_longer_than_the_positions_is_refused():
    arch = ModelArch.from_hf_config(CONFIG)
    check_sequence_length(arch, 128)
    with pytest.raises(ModelError, match="129 tokens is longer than the model's max_position_embeddings"):
        check_sequence_length(arch, 129)


def test_token_ids_outside_the_vocabulary_are_refused():
    arch = ModelArch.from_hf_config(CONFIG)
    tokens = torch.tensor([[1, 2, arch.vocab_size - 1, 0], [3, 4, 5, 6]])
    lengths = torch.tensor([3, 4])
    check_token_ids(arch, tokens, lengths)
    tokens[0, 3] = arch.vocab_size  # beyond the row's length: padding, never read
    check_token_ids(arch, tokens, lengths)
    tokens[1, 2] = arch.vocab_size
    with pytest.raises(ModelError, match=rf"token id {arch.vocab_size} \(sequence 1, position 2\) is not one of the "
                                         rf"model's {arch.vocab_size} ids"):
        check_token_ids(arch, tokens, lengths)
    tokens[1, 2] = -1
    with pytest.raises(ModelError, match="token id -1"):
        check_token_ids(arch, tokens, lengths)


def test_unknown_megatron_name_is_refused():
    with pytest.raises(ModelError, match="no rule"):
        F.rule_for(ModelArch.from_hf_config(CONFIG), "decoder.layers.0.mlp.router.weight")

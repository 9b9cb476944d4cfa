"""Loading local Hugging Face folders: single file, sharded with an index, or a config + state dict; bad folders."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from megatron_dapo.models.arch import ModelError
from megatron_dapo.models.hf_io import INDEX
from megatron_dapo.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_dapo.rollout.engine import RolloutError
from tests.tiny_models import hf_score

CPU = EmbeddedEngineConfig(device="cpu")  # float32: these compare with transformers in float32

PROBE = [[4, 8, 15, 16, 23, 42], [108, 3, 77]]


def test_sharded_checkpoint_loads(qwen2, tmp_path):
    qwen2.hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values())
    assert len(shards) > 2
    engine = EmbeddedEngine.from_pretrained(tmp_path, CPU)
    for seq, got in zip(PROBE, engine.score(PROBE, 1.0)):
        torch.testing.assert_close(got, hf_score(qwen2.hf, seq, 1.0), rtol=0, atol=1e-5)


def test_scoring_more_sequences_than_a_batch_holds_goes_in_chunks(qwen2):
    """Five sequences of unlike lengths at max_batch_size 2: three chunks, each sequence scored as transformers does,
    in order."""
    import dataclasses

    engine = EmbeddedEngine.from_state_dict(qwen2.hf.config, qwen2.hf.state_dict(),
                                            dataclasses.replace(CPU, max_batch_size=2))
    sequences = PROBE + [[5, 6], [7, 8, 9, 10, 11, 12, 13], [99, 1, 2, 3]]
    batches = []
    engine.model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    scored = engine.score(sequences, 0.7)
    assert batches == [2, 2, 1]
    assert [len(s) for s in scored] == [len(seq) - 1 for seq in sequences]
    for seq, got in zip(sequences, scored):
        torch.testing.assert_close(got, hf_score(qwen2.hf, seq, 0.7), rtol=0, atol=1e-5)


def test_state_dict_and_folder_give_the_same_engine(tiny):
    from_folder = EmbeddedEngine.from_pretrained(tiny.folder, CPU)
    from_state = EmbeddedEngine.from_state_dict(tiny.hf.config, tiny.hf.state_dict(), CPU)
    for a, b in zip(from_folder.score(PROBE, 1.0), from_state.score(PROBE, 1.0)):
        assert torch.equal(a, b)
    if tiny.hf.config.tie_word_embeddings:  # a head that is not the embedding is refused, as from a folder
        state = {**tiny.hf.state_dict(), "lm_head.weight": tiny.hf.state_dict()["model.embed_tokens.weight"] + 1}
        with pytest.raises(RolloutError, match="'lm_head.weight' differs from 'model.embed_tokens.weight'"):
            EmbeddedEngine.from_state_dict(tiny.hf.config, state, CPU)


def test_checkpoint_missing_a_tensor_is_refused(qwen2):
    state = {k: v for k, v in qwen2.hf.state_dict().items() if k != "model.norm.weight"}
    with pytest.raises(RolloutError, match="not received.*model.norm.weight"):
        EmbeddedEngine.from_state_dict(qwen2.hf.config.to_dict(), state)


def test_folder_without_config_or_weights_is_refused(qwen2, tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        EmbeddedEngine.from_pretrained(tmp_path, CPU)
    (tmp_path / "config.json").write_text((qwen2.folder / "config.json").read_text())
    with pytest.raises(ModelError, match=r"no \*.safetensors"):
        EmbeddedEngine.from_pretrained(tmp_path, CPU)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        EmbeddedEngine.from_pretrained(tmp_path, CPU)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for supported in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


def test_a_tied_checkpoint_whose_head_is_not_its_embedding_is_refused(qwen2, tmp_path):
    """config.json ties the embeddings; a stored lm_head.weight equal to the embedding loads, one that differs is
    refused rather than decided by shard order (the actor and the converter read the embedding)."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in qwen2.hf.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "config.json").write_text((qwen2.folder / "config.json").read_text())
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, tmp_path / "model.safetensors")
    engine = EmbeddedEngine.from_pretrained(tmp_path, CPU)
    for seq, got in zip(PROBE, engine.score(PROBE, 1.0)):
        torch.testing.assert_close(got, hf_score(qwen2.hf, seq, 1.0), rtol=0, atol=1e-5)
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="'lm_head.weight' differs from 'model.embed_tokens.weight' but config.json "
                                         "sets tie_word_embeddings: true"):
        EmbeddedEngine.from_pretrained(tmp_path, CPU)

"""Weight pushes: validation before any copy, the stale state, completion, and the new weights in use."""
from __future__ import annotations

import pytest
import torch

from megatron_dapo.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_dapo.rollout.engine import RolloutError, SamplingParams, StaleWeightsError
from tests.tiny_models import hf_score

CPU = EmbeddedEngineConfig(device="cpu")  # float32: these compare with transformers in float32

PROBE = [[4, 8, 15, 16, 23, 42], [108, 3, 77]]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def snapshot(engine: EmbeddedEngine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


def assert_unchanged(engine: EmbeddedEngine, before: dict[str, torch.Tensor]) -> None:
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, before[name]), name


def buckets(state: dict[str, torch.Tensor], count: int) -> list[list[tuple[str, torch.Tensor]]]:
    items = list(state.items())
    return [items[i::count] for i in range(count)]


def test_complete_push_in_buckets_serves_the_new_weights(tiny):
    engine = EmbeddedEngine.from_pretrained(tiny.folder, CPU)
    assert engine.weight_version == 0
    new = tiny.redrawn(seed=1)
    before = engine.score(PROBE, 1.0)

    engine.begin_weight_update()
    for bucket in buckets(new.state_dict(), 3):
        engine.update_weights(bucket)
    engine.end_weight_update(version=5)

    assert engine.weight_version == 5
    after = engine.score(PROBE, 1.0)
    for seq, old, got in zip(PROBE, before, after):
        assert not torch.allclose(old, got)
        torch.testing.assert_close(got, hf_score(new, seq, 1.0), rtol=0, atol=1e-5)
    engine.generate(PROBE, SamplingParams(max_new_tokens=2))  # usable again


def test_unknown_name_is_rejected_with_a_close_match_and_nothing_copied(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    before = snapshot(engine)
    engine.begin_weight_update()
    good = ("model.norm.weight", torch.full_like(before["model.norm.weight"], 3.0))
    with pytest.raises(RolloutError) as err:
        engine.update_weights([good, (Q_PROJ + "s", torch.zeros_like(before[Q_PROJ]))])
    message = str(err.value)
    assert f"'{Q_PROJ}s'" in message and f"did you mean '{Q_PROJ}'" in message
    assert_unchanged(engine, before)


def test_shape_mismatch_names_tensor_and_both_shapes_and_nothing_copied(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    before = snapshot(engine)
    engine.begin_weight_update()
    good = ("model.norm.weight", torch.full_like(before["model.norm.weight"], 3.0))
    with pytest.raises(RolloutError) as err:
        engine.update_weights([good, (Q_PROJ, torch.zeros(64, 63))])
    message = str(err.value)
    shape = tuple(before[Q_PROJ].shape)
    assert Q_PROJ in message and "(64, 63)" in message and str(shape) in message
    assert_unchanged(engine, before)


def test_tensors_without_float_values_are_named_and_nothing_copied(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    before = snapshot(engine)
    engine.begin_weight_update()
    good = ("model.norm.weight", torch.full_like(before["model.norm.weight"], 3.0))
    norm = "model.layers.0.input_layernorm.weight"
    with pytest.raises(RolloutError) as err:
        engine.update_weights([good, (Q_PROJ, torch.ones(before[Q_PROJ].shape, dtype=torch.int64)),
                               (norm, torch.empty(before[norm].shape, device="meta"))])
    message = str(err.value)
    assert f"tensor '{Q_PROJ}' is of dtype torch.int64; the engine takes floating-point values" in message
    assert f"tensor '{norm}' is on the meta device (it holds no values)" in message
    assert_unchanged(engine, before)
    # Under a tied model's second name too (compared with the embedding's value, it could give none).
    embedding = before["model.embed_tokens.weight"]
    with pytest.raises(RolloutError, match="tensor 'lm_head.weight' is on the meta device"):
        engine.update_weights([("model.embed_tokens.weight", embedding.clone()),
                               ("lm_head.weight", torch.empty(embedding.shape, device="meta"))])
    assert_unchanged(engine, before)
    with pytest.raises(StaleWeightsError):
        engine.generate(PROBE, SamplingParams(max_new_tokens=1))


def test_broken_off_push_leaves_the_engine_stale(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    state = qwen2.redrawn(seed=2).state_dict()
    engine.begin_weight_update()
    engine.update_weights(list(state.items())[:3])  # then the trainer dies

    stale = "weights are stale: a push began at version 0 and did not complete"
    with pytest.raises(StaleWeightsError, match=stale):
        engine.generate(PROBE, SamplingParams(max_new_tokens=2))
    with pytest.raises(StaleWeightsError, match=stale):
        engine.score(PROBE, 1.0)
    missing = r"23 of 26 parameters not received since begin_weight_update\(\): model.layers.0.input_layernorm.weight"
    with pytest.raises(RolloutError, match=missing):
        engine.end_weight_update(version=1)
    assert engine.weight_version == 0
    with pytest.raises(StaleWeightsError):  # a failed end keeps it stale
        engine.score(PROBE, 1.0)

    engine.begin_weight_update()  # a new push starts over: the 3 tensors above do not count
    engine.update_weights(list(state.items())[3:])
    with pytest.raises(RolloutError, match="not received"):
        engine.end_weight_update(version=1)
    engine.update_weights(list(state.items())[:3])
    engine.end_weight_update(version=1)
    assert engine.weight_version == 1
    engine.score(PROBE, 1.0)


def test_tied_head_is_optional_and_accepted(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    assert qwen2.hf.config.tie_word_embeddings
    new = qwen2.redrawn(seed=3)
    state = {k: v for k, v in new.state_dict().items() if k != "lm_head.weight"}
    engine.begin_weight_update()
    engine.update_weights(state.items())
    engine.end_weight_update(version=1)  # lm_head.weight not required
    head = torch.randn_like(state["model.embed_tokens.weight"])
    engine.begin_weight_update()
    engine.update_weights([(k, head if k == "model.embed_tokens.weight" else v) for k, v in state.items()])
    engine.update_weights([("lm_head.weight", head)])  # given again under its other name, the same value
    engine.end_weight_update(version=2)
    assert torch.equal(engine.model.lm_head.weight, head)
    assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()


def test_fp32_push_into_bf16_engine_is_converted(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, EmbeddedEngineConfig(dtype="bfloat16", device="cpu"))
    new = qwen2.redrawn(seed=4).state_dict()
    engine.begin_weight_update()
    engine.update_weights(new.items())
    engine.end_weight_update(version=1)
    param = dict(engine.model.named_parameters())[Q_PROJ]
    assert param.dtype == torch.bfloat16
    assert torch.equal(param, new[Q_PROJ].to(torch.bfloat16))


def test_push_protocol_misuse_is_refused(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    norm = ("model.norm.weight", torch.ones(64))
    with pytest.raises(RolloutError, match="call begin_weight_update"):
        engine.update_weights([norm])
    with pytest.raises(RolloutError, match="without begin_weight_update"):
        engine.end_weight_update(version=1)
    engine.begin_weight_update()
    with pytest.raises(RolloutError, match="appears twice"):
        engine.update_weights([norm, norm])
    with pytest.raises(RolloutError, match=r"pass state_dict.items\(\), not the dict"):
        engine.update_weights(dict([norm]))
    with pytest.raises(RolloutError, match=r"1 of the 2 items are not, the first a tuple: \('model.norm.weight', "):
        engine.update_weights([norm, (*norm, "extra")])
    embedding = engine.model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(RolloutError, match=r"tensors 'model.embed_tokens.weight' and 'lm_head.weight' are one "
                                           r"parameter \('model.embed_tokens.weight'\) but differ"):
        engine.update_weights([("model.embed_tokens.weight", embedding), ("lm_head.weight", embedding + 1)])
    assert torch.equal(engine.model.model.embed_tokens.weight, embedding)


def test_tied_head_and_embedding_in_separate_calls_must_agree(qwen2):
    # The later call would otherwise silently replace what the earlier one gave.
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    new = qwen2.redrawn(seed=6).state_dict()
    embedding = new["model.embed_tokens.weight"]
    engine.begin_weight_update()
    engine.update_weights([("model.embed_tokens.weight", embedding)])
    with pytest.raises(RolloutError, match=r"tensor 'lm_head.weight' is parameter 'model.embed_tokens.weight', "
                                           r"given as 'model.embed_tokens.weight' earlier in this push"):
        engine.update_weights([("lm_head.weight", embedding + 1)])
    assert torch.equal(engine.model.model.embed_tokens.weight, embedding)
    engine.update_weights([("lm_head.weight", embedding)])  # the same value under its other name
    engine.update_weights([("model.embed_tokens.weight", embedding + 1)])  # a name resent: the newer value
    engine.update_weights(list(new.items()))  # a whole state dict, tied head included, after all that
    engine.end_weight_update(version=1)
    assert torch.equal(engine.model.model.embed_tokens.weight, embedding)

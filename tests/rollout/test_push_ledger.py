"""What a weight push must carry, from the family tables alone (the SGLang adapter's check): exactly the names
and shapes of the embedded engine's parameters, which tests/rollout/test_reshard.py pushes into. The embedded engine
also takes a tied model's lm_head.weight as its embedding; SGLang's loaders skip one, so its ledger refuses it."""
import pytest
import torch

from megatron_dapo.models.arch import ModelArch
from megatron_dapo.rollout.embedded import EmbeddedEngine
from megatron_dapo.rollout.engine import RolloutError
from megatron_dapo.rollout.sglang.engine import push_ledger
from tests.tiny_models import FAMILIES, make_tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_ledger_matches_the_embedded_engines_parameters(family, tmp_path):
    folder = make_tiny_model(family, tmp_path / family)
    ledger, engine = push_ledger(ModelArch.from_pretrained(folder)), EmbeddedEngine.from_pretrained(folder)
    assert ledger.shapes == engine.weights.shapes
    tied = ModelArch.from_pretrained(folder).tie_word_embeddings
    assert engine.weights.aliases == ({"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    if tied:  # SGLang's loaders would skip it: a push naming it is refused, not counted as the embedding
        ledger.begin()
        embedding = torch.zeros(ledger.shapes["model.embed_tokens.weight"])
        with pytest.raises(RolloutError, match="unknown tensor 'lm_head.weight'"):
            ledger.accept([("lm_head.weight", embedding)])
        ledger.accept([("model.embed_tokens.weight", embedding)])

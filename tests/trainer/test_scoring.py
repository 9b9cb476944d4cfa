"""Completions -> scored groups: each response decoded without special tokens, scored by its data_source's
reward function, its group's n rewards kept together in prompt order, and the overlong punishment added."""
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_dapo.config.root import load_config
from megatron_dapo.data.dataset import Prompt
from megatron_dapo.reward.scorer import RewardScorer
from megatron_dapo.rollout.engine import Completion
from megatron_dapo.trainer.scoring import score_groups

TOY = Path(__file__).resolve().parents[2] / "examples" / "toy" / "config.yaml"
WORDS = ["[UNK]", "Answer:", "3", "4", "5", "so", "<|end|>"]
ID = {word: i for i, word in enumerate(WORDS)}


@pytest.fixture(scope="module")
def tokenizer():
    core = Tokenizer(models.WordLevel(ID, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|end|>")


def _completion(words: str) -> Completion:
    ids = [ID[w] for w in words.split()]
    return Completion(token_ids=ids, logprobs=[-0.1] * len(ids), finish_reason="stop")


@pytest.mark.parametrize("shaping", [True, False])
def test_each_group_gets_its_own_responses_scores_and_overlong_punishment(tokenizer, shaping):
    """max_response_length 8 with a buffer of 4: a response of L > 4 tokens loses (L - 4) / 4 (1 at 8 tokens).
    The end-of-sequence token is left out of the text the verifier reads ("Answer: 3 <|end|>" would not be 3)."""
    cfg = load_config(TOY, ["data.max_response_length=8", f"reward.overlong_buffer.enable={str(shaping).lower()}",
                            "reward.overlong_buffer.len=4", "reward.overlong_buffer.penalty_factor=1.0"])
    prompts = [Prompt(prompt_ids=[1], ground_truth=truth, data_source="math_dapo", extra_info={}, index=i)
               for i, truth in enumerate(("3", "5"))]
    outputs = [[_completion("Answer: 3 <|end|>"), _completion("so so so so so Answer: 4")],  # 3 and 7 tokens
               [_completion("so so so so so so Answer: 5"), _completion("Answer: 5")]]      # 8 and 2 tokens
    with RewardScorer(timeout_s=30.0, num_workers=1) as scorer:
        groups, seconds = score_groups(cfg, scorer, tokenizer, prompts, outputs, n=2)
    assert [g.prompt.ground_truth for g in groups] == ["3", "5"] and seconds >= 0
    assert [g.completions for g in groups] == outputs
    assert [[r.acc for r in g.rewards] for g in groups] == [[1.0, 0.0], [1.0, 1.0]]
    assert [[r.score for r in g.rewards] for g in groups] == [[1.0, -1.0], [1.0, 1.0]]
    punished = [[1.0, -1.75], [0.0, 1.0]] if shaping else [[1.0, -1.0], [1.0, 1.0]]
    assert [s for g in groups for s in g.scores] == pytest.approx([s for group in punished for s in group])

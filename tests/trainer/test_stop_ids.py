"""Where responses end: the tokenizer's end and padding tokens and every eos id of the model folder."""
import json
from types import SimpleNamespace

from megatron_dapo.trainer.loop import stop_token_ids


def test_stop_ids_join_the_tokenizer_config_and_generation_config(tmp_path):
    tokenizer = SimpleNamespace(eos_token_id=9, pad_token_id=None)
    assert stop_token_ids(tokenizer, tmp_path) == (9,)  # a folder with neither file
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 9]}))
    assert stop_token_ids(SimpleNamespace(eos_token_id=9, pad_token_id=3), tmp_path) == (3, 7, 9, 128001, 128008)

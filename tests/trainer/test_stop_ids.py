"""Where responses end: the tokenizer's end and padding tokens and every eos id of the model folder."""
import json

from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from megatron_dapo.trainer.startup import stop_token_ids


def _tokenizer(**special) -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(10)} | {"[UNK]": 10}
    vocab |= {"<pad>": 3, "</s>": 9}
    del vocab["t3"], vocab["t9"]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]", **special)


def test_stop_ids_join_the_tokenizer_config_and_generation_config(tmp_path):
    tokenizer = _tokenizer(eos_token="</s>")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (9, None)
    assert stop_token_ids(tokenizer, tmp_path, vocab_size=10) == ((9,), ())  # a folder with neither file
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 9]}))
    assert stop_token_ids(_tokenizer(eos_token="</s>", pad_token="<pad>"), tmp_path, vocab_size=128256) == \
        ((3, 7, 9, 128001, 128008), ())


def test_stop_ids_the_model_cannot_draw_are_left_out_and_none_at_all_is_refused(tmp_path):
    """A padding token added to a tokenizer past the model's embedding can never be drawn: it is left out. When
    no stop id is inside the vocab, every response would run to the length limit: refused at start-up."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 4]}))
    assert stop_token_ids(_tokenizer(eos_token="</s>"), tmp_path, vocab_size=8) == ((4,), (9,))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    import pytest

    from megatron_dapo.config.loader import ConfigError

    with pytest.raises(ConfigError, match=r"model.path: no stop token inside the model's vocab \[0, 8\).* give \[9\], "
                                          "so no response could end"):
        stop_token_ids(_tokenizer(eos_token="</s>"), tmp_path, vocab_size=8)


def test_a_model_file_that_is_not_a_json_object_is_named(tmp_path):
    import pytest

    from megatron_dapo.models.arch import ModelError

    path = tmp_path / "generation_config.json"
    for text, why in [('{"eos_token_id": ', "not a readable JSON file"), ("[1, 2]", "holds a JSON list, not an object")]:
        path.write_text(text)
        with pytest.raises(ModelError, match=f"{path} \\(model.path\\): {why}"):
            stop_token_ids(_tokenizer(eos_token="</s>"), tmp_path, vocab_size=10)

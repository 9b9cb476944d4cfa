import dataclasses
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_dapo.data.dataset import Prompt, PromptDataset, PromptStream

WORDS = ["[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "what", "is", "one", "plus", "two", "?", "be", "brief"]
ID = {word: i for i, word in enumerate(WORDS)}
# "<|user|> what is one plus two ? <|assistant|>": one token per word (the template puts spaces around contents)
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with a chat template, built here (nothing downloaded)."""
    core = Tokenizer(models.WordLevel(ID, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tok.chat_template = TEMPLATE
    return tok


def user(text):
    return [{"role": "user", "content": text}]


def row(messages, ground_truth="3", source="math_dapo", **extra):
    out = {"prompt": messages, "reward_model": {"ground_truth": ground_truth, "style": "rule-lax"},
           "data_source": source}
    out.update(extra)
    return out


P1 = user("what is one plus two ?")
P2 = user("what is two plus two ?")
P3 = [{"role": "system", "content": "be brief"}] + user("what is one plus one ?")
LONG = user("one " * 20)                                   # 20 words + <|user|> + <|assistant|> = 22 tokens

# rows both file types can hold (parquet needs one type per column)
COMMON_ROWS = [
    row(P1, "3"),                                          # 0 kept
    row(P1, "3"),                                          # 1 duplicate
    row(P2, "4", extra_info={"index": "b"}),               # 2 kept
    row(P2, "5", extra_info={"index": "c"}),               # 3 duplicate with another ground truth
    {"prompt": P1 + user("two"), "data_source": "math_dapo"},   # 4 malformed: no reward_model
    row(LONG, "20"),                                       # 5 too long
    row(P3, "2"),                                          # 6 kept (system message: a different prompt)
    row(P1, "3"),                                          # 7 duplicate
]
P1_IDS = [ID["<|user|>"], ID["what"], ID["is"], ID["one"], ID["plus"], ID["two"], ID["?"], ID["<|assistant|>"]]
P2_IDS = [ID["<|user|>"], ID["what"], ID["is"], ID["two"], ID["plus"], ID["two"], ID["?"], ID["<|assistant|>"]]
P3_IDS = [ID["<|system|>"], ID["be"], ID["brief"]] + P1_IDS[:5] + [ID["one"], ID["?"], ID["<|assistant|>"]]


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def check_common(dataset):
    assert [p.prompt_ids for p in dataset] == [P1_IDS, P2_IDS, P3_IDS]
    assert [p.ground_truth for p in dataset] == ["3", "4", "2"]
    assert [p.index for p in dataset] == [0, 1, 2]
    assert dataset[1] == Prompt(prompt_ids=P2_IDS, ground_truth="4", data_source="math_dapo",
                                extra_info={"index": "b"}, index=1)
    assert dataset[0].extra_info == {}


def test_jsonl_rows_are_checked_deduplicated_and_filtered(tmp_path, tokenizer):
    extra_rows = [
        "{not json",                                       # line 9
        "",                                                # blank: not a row
        row("what is one plus two ?"),                     # line 11: prompt is a string
        row([{"role": "user", "content": 7}]),             # line 12: content is a number
        row(user("one plus one"), source=5),               # line 13
        row(user("one plus one"), ground_truth=7),         # line 14: an integer ground truth is read as "7"
        row([{"role": "robot", "content": "beep"}]),       # line 15: the chat template refuses the role
        row(user("two plus two"), extra_info=[1]),         # line 16
    ]
    path = write_jsonl(tmp_path / "train.jsonl", COMMON_ROWS + extra_rows)
    dataset = PromptDataset.from_files(path, tokenizer, max_prompt_length=16)
    assert [p.prompt_ids for p in dataset][:3] == [P1_IDS, P2_IDS, P3_IDS]
    assert len(dataset) == 4
    assert dataset[3].ground_truth == "7"
    assert dataset[3].prompt_ids == [ID["<|user|>"], ID["one"], ID["plus"], ID["one"], ID["<|assistant|>"]]
    stats = dataset.stats
    assert (stats.rows_read, stats.kept, stats.duplicates, stats.conflicting_duplicates, stats.too_long,
            stats.malformed, stats.longest_prompt) == (15, 4, 3, 1, 1, 7, 22)
    examples = stats.malformed_examples
    assert len(examples) == 5
    assert examples[0] == "train.jsonl line 5: missing 'reward_model'"
    assert examples[1].startswith("train.jsonl line 9: invalid JSON (")
    assert examples[2] == ("train.jsonl line 11: 'prompt' must be a non-empty list of chat messages, "
                           "got str 'what is one plus two ?'")
    assert examples[3] == "train.jsonl line 12: prompt[0].content must be a string, got int 7"
    assert examples[4] == "train.jsonl line 13: 'data_source' must be a non-empty string, got int 5"
    report = dataset.report()
    assert report.startswith("15 rows read from 1 file(s): 4 prompts kept, 3 duplicates removed (1 with another "
                             "ground truth), 1 too long (longest prompt 22 tokens), 7 malformed")
    assert report.endswith("... and 2 more malformed rows\n  another ground truth: train.jsonl line 4: ground truth "
                           "'5', not '4' as at train.jsonl line 3 (kept)")


def test_parquet_in_the_public_layout(tmp_path, tokenizer):
    path = tmp_path / "dapo.parquet"
    columns = ["prompt", "reward_model", "data_source", "extra_info"]   # from_pylist reads names off row 0
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in COMMON_ROWS]), path)
    dataset = PromptDataset.from_files([path], tokenizer, max_prompt_length=16)
    check_common(dataset)
    assert [p.where for p in dataset] == ["dapo.parquet row 0", "dapo.parquet row 2", "dapo.parquet row 6"]
    stats = dataset.stats
    assert (stats.rows_read, stats.kept, stats.duplicates, stats.conflicting_duplicates, stats.too_long,
            stats.malformed) == (8, 3, 3, 1, 1, 1)
    assert stats.malformed_examples == ["dapo.parquet row 4: missing 'reward_model'"]


def test_parquet_map_columns_read_as_objects(tmp_path, tokenizer):
    """reward_model and extra_info written as map<string, string> (as Spark writes a dict column)."""
    path = tmp_path / "spark.parquet"
    to_map = pa.map_(pa.string(), pa.string())
    table = pa.table({
        "prompt": pa.array([P1, P2]),
        "reward_model": pa.array([[("ground_truth", "3"), ("style", "rule")], [("ground_truth", "4")]], type=to_map),
        "data_source": ["math_dapo", "math_dapo"],
        "extra_info": pa.array([[("index", "7")], []], type=to_map),
    })
    pq.write_table(table, path)
    dataset = PromptDataset.from_files([path], tokenizer, max_prompt_length=8)
    assert dataset.stats.malformed_examples == []
    assert [(p.prompt_ids, p.ground_truth, p.extra_info) for p in dataset] == [(P1_IDS, "3", {"index": "7"}),
                                                                                (P2_IDS, "4", {})]


def test_duplicates_across_files(tmp_path, tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [row(P1, "3")])
    second = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([row(P1, "3"), row(P2, "4")]), second)
    dataset = PromptDataset.from_files([first, second], tokenizer, max_prompt_length=8)
    assert [p.prompt_ids for p in dataset] == [P1_IDS, P2_IDS]
    assert (dataset.stats.rows_read, dataset.stats.duplicates) == (3, 1)


def test_files_of_one_name_in_two_folders_are_named_by_their_paths(tmp_path, tokenizer):
    first, second = tmp_path / "d1" / "train.jsonl", tmp_path / "d2" / "train.jsonl"
    first.parent.mkdir(), second.parent.mkdir()
    write_jsonl(first, [row(P1, "3")])
    write_jsonl(second, [row(P1, "4")])
    dataset = PromptDataset.from_files([first, second], tokenizer, max_prompt_length=8)
    assert dataset.stats.conflicting_examples == [f"{second} line 1: ground truth '4', not '3' as at {first} line 1 "
                                                  "(kept)"]


def test_a_parquet_struct_s_null_keys_are_absent(tmp_path, tokenizer):
    """A struct column has every row's keys: row 0 reads back {"index": 0, "split": None}. Null keys are absent,
    so the JSONL copy of the same rows is the same prompts, and a reward function's default for a key holds."""
    rows = [row(P1, "3", extra_info={"index": 0, "task": {"a": 1}, "steps": [{"x": 1}]}),
            row(P2, "4", extra_info={"index": 1, "split": "train", "task": {"b": 2}, "steps": [{"y": 2}, {"x": 3}]})]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    files = [tmp_path / "a.parquet", write_jsonl(tmp_path / "b.jsonl", rows)]
    dataset = PromptDataset.from_files(files, tokenizer, max_prompt_length=8)
    assert [p.extra_info for p in dataset] == [r["extra_info"] for r in rows]  # nested structs' nulls too
    assert dataset.stats.duplicates == 2


def test_the_same_messages_under_another_data_source_are_kept(tmp_path, tokenizer):
    rows = write_jsonl(tmp_path / "a.jsonl", [row(P1, "3"), row(P1, "3", source="other_task"), row(P1, "3")])
    dataset = PromptDataset.from_files([rows], tokenizer, max_prompt_length=8)
    assert [p.data_source for p in dataset] == ["math_dapo", "other_task"]
    assert (dataset.stats.duplicates, dataset.stats.conflicting_duplicates) == (1, 0)


def test_rows_of_one_prompt_with_other_task_data_are_kept(tmp_path, tokenizer):
    """A fixed prompt whose task data is in extra_info (an episode for the reward function) is one prompt per
    episode; rows differing only in extra_info's "index" (a row number) are duplicates."""
    rows = [row(P1, "see extra_info", source="episodes", extra_info={"episode": i, "index": i}) for i in range(3)]
    rows += [row(P1, "see extra_info", source="episodes", extra_info={"index": 9, "episode": 1})]
    dataset = PromptDataset.from_files([write_jsonl(tmp_path / "a.jsonl", rows)], tokenizer, max_prompt_length=8)
    assert [p.extra_info["episode"] for p in dataset] == [0, 1, 2]
    assert dataset.stats.duplicates == 1


def test_max_prompt_length_is_inclusive(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [row(P1), row(P3)])   # 8 and 11 tokens
    dataset = PromptDataset.from_files(path, tokenizer, max_prompt_length=8)
    assert [p.prompt_ids for p in dataset] == [P1_IDS]
    assert dataset.stats.too_long == 1


def test_all_dropped_says_why(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [row(LONG), row(LONG), {"prompt": P1}])
    with pytest.raises(ValueError) as err:
        PromptDataset.from_files(path, tokenizer, max_prompt_length=16)
    message = str(err.value)
    assert "raise data.max_prompt_length (now 16)" in message
    assert ("3 rows read from 1 file(s): 0 prompts kept, 0 duplicates removed (0 with another ground truth), "
            "2 too long (longest prompt 22 tokens), 1 malformed") in message  # a copy of a dropped row: dropped
    assert "train.jsonl line 3: missing 'reward_model'" in message


def test_a_copy_of_a_row_the_template_refused_is_malformed_too(tmp_path, tokenizer):
    bogus = [{"role": "bogus", "content": "one"}]
    path = write_jsonl(tmp_path / "train.jsonl", [row(bogus), row(P1), row(bogus)])
    dataset = PromptDataset.from_files(path, tokenizer, max_prompt_length=16)
    stats = dataset.stats
    assert (stats.kept, stats.duplicates, stats.malformed) == (1, 0, 2)
    assert [e.split(":")[0] for e in stats.malformed_examples] == ["train.jsonl line 1", "train.jsonl line 3"]
    assert "unknown role bogus" in stats.malformed_examples[1]


def test_bad_inputs_are_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        PromptDataset.from_files(tmp_path / "train.csv", tokenizer, max_prompt_length=8)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        PromptDataset.from_files(tmp_path / "missing.jsonl", tokenizer, max_prompt_length=8)
    (tmp_path / "parts.parquet").mkdir()
    with pytest.raises(FileNotFoundError, match="parts.parquet is a folder: name the data files inside it"):
        PromptDataset.from_files(tmp_path / "parts.parquet", tokenizer, max_prompt_length=8)
    path = write_jsonl(tmp_path / "train.jsonl", [row(P1)])
    cut = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([row(P1), row(P2)]), cut)
    cut.write_bytes(cut.read_bytes()[:-20])  # a copy that stopped short
    with pytest.raises(ValueError, match=f"{cut}: not a readable parquet file"):
        PromptDataset.from_files([path, cut], tokenizer, max_prompt_length=8)
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    with pytest.raises(ValueError, match="has no chat template"):
        PromptDataset.from_files(path, bare, max_prompt_length=8)


def prompts(n):
    return [Prompt(prompt_ids=[i], ground_truth=str(i), data_source="math_dapo", extra_info={}, index=i)
            for i in range(n)]


def indices(batch):
    return [p.index for p in batch]


def test_stream_without_shuffle_runs_across_epochs():
    stream = PromptStream(prompts(5), batch_size=3, seed=0, shuffle=False)
    assert [indices(next(stream)) for _ in range(4)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    assert (stream.epoch, stream.position) == (2, 2)
    # a batch larger than the dataset wraps around
    assert indices(next(PromptStream(prompts(2), batch_size=5, seed=0, shuffle=False))) == [0, 1, 0, 1, 0]


def test_stream_shuffles_each_epoch_seeded_by_seed_and_epoch():
    stream = PromptStream(prompts(10), batch_size=5, seed=3)
    drawn = [i for _ in range(6) for i in indices(next(stream))]
    epochs = [drawn[0:10], drawn[10:20], drawn[20:30]]
    for epoch, order in enumerate(epochs):
        expected = list(range(10))
        random.Random(f"3:{epoch}").shuffle(expected)
        assert order == expected
    assert sorted(epochs[0]) == list(range(10))
    assert len({tuple(order) for order in epochs}) == 3    # a new order every epoch
    again = PromptStream(prompts(10), batch_size=5, seed=3)
    assert [i for _ in range(6) for i in indices(next(again))] == drawn


def test_stream_resumes_with_the_same_order():
    stream = PromptStream(prompts(7), batch_size=3, seed=11)
    for _ in range(3):                                     # 9 prompts: into epoch 1
        next(stream)
    state = stream.state_dict()
    assert state == {"epoch": 1, "position": 2, "seed": 11, "shuffle": True, "dataset_size": 7,
                     "fingerprint": stream.fingerprint(), "order": 2, "carried": state["carried"], "fill": 2}
    assert len(state["carried"]) == 1  # epoch 0's last prompt began the batch that crossed into epoch 1
    expected = [indices(next(stream)) for _ in range(5)]
    resumed = PromptStream(prompts(7), batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert [indices(next(resumed)) for _ in range(5)] == expected


def test_a_batch_across_two_epochs_repeats_no_prompt_and_every_epoch_draws_each_once():
    """Batches of 300 from 1000 prompts cross an epoch's end mid-batch: the new epoch's prompts the batch would
    repeat come right after its share; every prompt is still drawn once an epoch. Resumed after any batch, the
    stream goes on with the same batches."""
    stream = PromptStream(prompts(1000), batch_size=300, seed=5)
    batches, states = [], []
    for _ in range(40):  # 12 epochs
        states.append(stream.state_dict())
        batches.append(indices(next(stream)))
    assert all(len(set(batch)) == 300 for batch in batches)
    drawn = [i for batch in batches for i in batch]
    for epoch in range(12):
        assert sorted(drawn[epoch * 1000:(epoch + 1) * 1000]) == list(range(1000)), epoch
    for start in (3, 4, 10, 27):  # 3 and 10 begin with a crossing batch, 4 and 27 inside an epoch
        resumed = PromptStream(prompts(1000), batch_size=300, seed=5)
        resumed.load_state_dict(states[start])
        assert [indices(next(resumed)) for _ in range(40 - start)] == batches[start:], start
    # A dataset smaller than the batch repeats prompts in it whatever the order.
    small = next(PromptStream(prompts(3), batch_size=5, seed=5))
    assert sorted(indices(small)).count(0) >= 1 and len(small) == 5


def test_a_state_saved_before_order_2_goes_on_in_its_order():
    """A run that saved its stream before epochs were seeded by (seed, epoch) continues the order it began: seed +
    epoch; its next epoch leaves out the crossing batch's repeats as new runs do."""
    stream = PromptStream(prompts(10), batch_size=4, seed=3)
    old = {"epoch": 1, "position": 4, "seed": 3, "shuffle": True, "dataset_size": 10,
           "fingerprint": stream.fingerprint()}
    stream.load_state_dict(old)
    expected = list(range(10))
    random.Random(3 + 1).shuffle(expected)
    assert indices(next(stream)) == expected[4:8]
    assert stream.state_dict()["order"] == 1
    with pytest.raises(ValueError, match=r"bad prompt stream state: epoch 1, position 4, order 1, carried over \[2\], "
                                         "fill 10"):
        PromptStream(prompts(10), batch_size=4, seed=3).load_state_dict({**old, "carried": [2], "fill": 10})
    for carried, fill in ((None, 2), (5, 2), ([True], 2), ([2], "2")):
        with pytest.raises(ValueError, match="bad prompt stream state"):
            PromptStream(prompts(10), batch_size=4, seed=3).load_state_dict({**old, "carried": carried, "fill": fill})


def test_stream_refuses_a_state_from_another_run():
    stream = PromptStream(prompts(7), batch_size=3, seed=11)
    state, mark = stream.state_dict(), stream.fingerprint()
    with pytest.raises(ValueError, match=f"dataset_size=7, fingerprint={mark}, shuffle=True, seed=11\\) does not "
                                         "match this one \\(dataset_size=6, fingerprint="):
        PromptStream(prompts(6), batch_size=3, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=12"):
        PromptStream(prompts(7), batch_size=3, seed=12).load_state_dict(state)
    # The same prompts in another order (data.train_files listed the other way round), or as many other prompts
    # (another file, tokenizer or chat template), would continue another order: refused.
    reordered = prompts(7)[::-1]
    other = [dataclasses.replace(p, prompt_ids=[p.prompt_ids[0] + 1]) for p in prompts(7)]
    for dataset in (reordered, other):
        with pytest.raises(ValueError, match=f"fingerprint={mark}, .* does not match this one"):
            PromptStream(dataset, batch_size=3, seed=11).load_state_dict(state)
    # A corrected answer, a renamed data source: no prompt moves, the run goes on.
    fixed = [dataclasses.replace(p, ground_truth="42", data_source="other") for p in prompts(7)]
    PromptStream(fixed, batch_size=3, seed=11).load_state_dict(state)
    # A state saved before fingerprints is checked by its size; without shuffle the seed orders nothing.
    PromptStream(prompts(7), batch_size=3, seed=11).load_state_dict({k: v for k, v in state.items()
                                                                     if k != "fingerprint"})
    plain = PromptStream(prompts(7), batch_size=3, seed=11, shuffle=False).state_dict()
    PromptStream(prompts(7), batch_size=3, seed=12, shuffle=False).load_state_dict(plain)


def test_a_byte_order_mark_is_read_past_and_a_line_not_utf8_is_one_malformed_row(tmp_path, tokenizer):
    lines = [json.dumps(row(P1, "3")).encode(), b'{"prompt": "\xff\xfe"}', json.dumps(row(P2, "4")).encode()]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    dataset = PromptDataset.from_files(path, tokenizer, max_prompt_length=16)
    assert [p.prompt_ids for p in dataset] == [P1_IDS, P2_IDS]
    assert dataset.stats.malformed == 1
    assert dataset.stats.malformed_examples[0].startswith("train.jsonl line 2: not UTF-8 ('utf-8' codec can't decode")

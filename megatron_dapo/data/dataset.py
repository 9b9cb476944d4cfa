"""Training prompts in the DAPO-Math-17k layout, and the seeded epoch stream the trainer draws them from.

A row (one parquet row or one JSONL line):
    prompt:        [{"role": "user", "content": "..."}, ...]   (the column named by data.prompt_key)
    reward_model:  {"ground_truth": "34", ...}
    data_source:   "math_dapo"                                 (selects the reward function)
    extra_info:    {...}                                       (optional; handed to the reward function)

Rows are read in file order; a malformed row is dropped and counted with its location and what is
wrong; a prompt already seen is dropped (the public DAPO-Math-17k copy repeats each prompt ~100
times); the rest go through the tokenizer's chat template and those longer than max_prompt_length
tokens are dropped and counted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5
"""Malformed rows whose location and reason are kept for the report."""


DATA_SUFFIXES = (".parquet", ".jsonl")


def file_problem(path: str | Path) -> str | None:
    """What keeps the data file `path` from being read (a type not read, no such file), or None."""
    path = Path(path)
    if path.suffix not in DATA_SUFFIXES:
        return f"{path}: unsupported data file type {path.suffix!r}; use .parquet or .jsonl"
    if path.is_dir():  # a dataset written in parts (Spark, datasets' to_parquet) is a folder of such files
        return f"data file {path} is a folder: name the data files inside it"
    if not path.is_file():
        return f"data file {path} does not exist"
    return None


class TokenizerError(ValueError):
    """The tokenizer cannot make the prompts (it has no chat template); the message names the setting."""


@dataclass(frozen=True)
class Prompt:
    prompt_ids: list[int]
    """The chat-templated prompt, ending with the generation prompt: [P] token ids, P <= max_prompt_length."""
    ground_truth: str
    """reward_model.ground_truth, for the reward function."""
    data_source: str
    """Selects the reward function (reward/registry.py)."""
    extra_info: dict[str, Any]
    """The row's extra_info ({} when absent)."""
    index: int
    """Position in the PromptDataset (0..len-1)."""
    where: str = field(default="", compare=False)
    """The file and row it was read from ("train.parquet row 17"; "" where it was made otherwise), for messages."""


@dataclass
class DatasetStats:
    files: list[str]
    """The files read, in order."""
    rows_read: int = 0
    """Rows (JSONL lines that are not blank) in all files."""
    malformed: int = 0
    """Rows dropped for a missing key, a wrong type, invalid JSON or a chat template error."""
    malformed_examples: list[str] = field(default_factory=list)
    """The first MAX_EXAMPLES of them: "<file> <row or line>: <what is wrong>"."""
    duplicates: int = 0
    """Rows whose prompt (all messages), data_source and extra_info (but for its "index") equal an earlier row's."""
    conflicting_duplicates: int = 0
    """Of those, rows whose ground truth differs from the kept row's (the first one is kept)."""
    conflicting_examples: list[str] = field(default_factory=list)
    """The first MAX_EXAMPLES of them: "<file> <row or line>: ground truth ..., not ... as at <file> <row or line>"."""
    too_long: int = 0
    """Prompts with more than max_prompt_length tokens after the chat template."""
    longest_prompt: int = 0
    """Tokens in the longest prompt seen, kept or not."""
    kept: int = 0
    """Prompts in the dataset."""

    def report(self) -> str:
        lines = [f"{self.rows_read} rows read from {len(self.files)} file(s): {self.kept} prompts kept, "
                 f"{self.duplicates} duplicates removed ({self.conflicting_duplicates} with another ground truth), "
                 f"{self.too_long} too long (longest prompt {self.longest_prompt} tokens), {self.malformed} malformed"]
        lines += [f"  malformed: {example}" for example in self.malformed_examples]
        if self.malformed > len(self.malformed_examples):
            lines.append(f"  ... and {self.malformed - len(self.malformed_examples)} more malformed rows")
        lines += [f"  another ground truth: {example}" for example in self.conflicting_examples]
        if self.conflicting_duplicates > len(self.conflicting_examples):
            lines.append(f"  ... and {self.conflicting_duplicates - len(self.conflicting_examples)} more duplicates "
                         "with another ground truth")
        return "\n".join(lines)


class PromptDataset(Sequence[Prompt]):
    """Deduplicated, chat-templated, length-filtered prompts; build with `from_files`."""

    def __init__(self, prompts: list[Prompt], stats: DatasetStats):
        self.prompts = prompts
        self.stats = stats

    @classmethod
    def from_files(cls, paths: str | Path | Sequence[str | Path], tokenizer, *, max_prompt_length: int,
                   prompt_key: str = "prompt") -> PromptDataset:
        """Read parquet (.parquet) and JSONL (.jsonl) files; `tokenizer` is a transformers tokenizer with a
        chat template. Raises ValueError if no prompt is left, giving the count for each reason."""
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not paths:
            raise ValueError("no data files given: set data.train_files")
        for path in paths:
            problem = file_problem(path)
            if problem is not None:
                raise (FileNotFoundError if path.suffix in DATA_SUFFIXES else ValueError)(problem)
        if getattr(tokenizer, "chat_template", None) is None:
            raise TokenizerError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template: "
                             "prompts are chat messages and need one: point model.tokenizer_path at a tokenizer "
                             "folder whose tokenizer_config.json (or chat_template.jinja) has one, e.g. the "
                             "instruct model's")
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        stats = DatasetStats(files=[str(p) for p in paths])
        first_copy: dict[tuple, tuple[str, str | None, str]] = {}
        """Each prompt's first row: its ground truth, why it was dropped (None: kept), and where it is."""
        prompts: list[Prompt] = []

        def malformed(where: str, why: str) -> None:
            stats.malformed += 1
            if len(stats.malformed_examples) < MAX_EXAMPLES:
                stats.malformed_examples.append(f"{where}: {why}")

        names = [path.name for path in paths]  # a file is named by its path where another has its name
        label = {path: path.name if names.count(path.name) == 1 else str(path) for path in paths}
        for path in paths:
            unit = "line" if path.suffix == ".jsonl" else "row"
            for number, row in _read_rows(path):
                stats.rows_read += 1
                if isinstance(row, _Unreadable):
                    malformed(f"{label[path]} {unit} {number}", row.reason)
                    continue
                try:
                    messages, ground_truth, data_source, extra_info = _parse_row(row, prompt_key)
                except _Malformed as err:
                    malformed(f"{label[path]} {unit} {number}", str(err))
                    continue
                # The same messages under two data_sources are two tasks (two verifiers), not a duplicate; nor
                # with other task data in extra_info (an episode a fixed prompt refers to), but for its "index",
                # which a row's number fills (DAPO-Math-17k repeats each prompt with a new one).
                where = f"{label[path]} {unit} {number}"
                key = (data_source, tuple((m["role"], m["content"]) for m in messages), _task_data(extra_info))
                if key in first_copy:  # counted as what became of its first copy (tokenized once)
                    first_ground_truth, dropped, first_where = first_copy[key]
                    if dropped == "too long":
                        stats.too_long += 1
                    elif dropped is not None:
                        malformed(where, dropped)
                    else:
                        stats.duplicates += 1
                        if first_ground_truth != ground_truth:
                            stats.conflicting_duplicates += 1
                            if len(stats.conflicting_examples) < MAX_EXAMPLES:
                                stats.conflicting_examples.append(
                                    f"{where}: ground truth {ground_truth!r}, not {first_ground_truth!r} as at "
                                    f"{first_where} (kept)")
                    continue
                first_copy[key] = (ground_truth, None, where)
                try:
                    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
                    ids = [int(t) for t in ids]
                except Exception as err:                    # a template may reject a role or a message order
                    first_copy[key] = (ground_truth, f"chat template failed: {type(err).__name__}: {err}", where)
                    malformed(where, first_copy[key][1])
                    continue
                stats.longest_prompt = max(stats.longest_prompt, len(ids))
                if len(ids) > max_prompt_length:
                    first_copy[key] = (ground_truth, "too long", where)
                    stats.too_long += 1
                    continue
                prompts.append(Prompt(prompt_ids=ids, ground_truth=ground_truth, data_source=data_source,
                                      extra_info=extra_info, index=len(prompts), where=where))
        stats.kept = len(prompts)
        if not prompts:
            hint = (f"; raise data.max_prompt_length (now {max_prompt_length}) to keep long prompts"
                    if stats.too_long else "")
            raise ValueError(f"no prompts left in {stats.files}{hint}\n{stats.report()}")
        logger.info("prompts: %s", stats.report())
        return cls(prompts, stats)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index):
        return self.prompts[index]

    def report(self) -> str:
        return self.stats.report()


class PromptStream:
    """An endless stream of prompt batches, epoch after epoch, each epoch in its own seeded order.

    Epoch e visits every prompt once, in a shuffled order seeded by (seed, e) (dataset order without shuffle);
    a batch that reaches the end of an epoch continues with the next one, so every prompt is drawn equally
    often and a dataset smaller than a batch still works. Such a batch holds no prompt twice when the dataset
    has a batch of prompts: the new epoch's prompts it would repeat come right after its share instead. The
    state is the epoch, the position in it and that batch's last-epoch share: a stream loaded from
    `state_dict()` yields the same batches as the original.
    """

    ORDER = 2
    """How epochs are shuffled: 2 seeds by (seed, epoch) (not seed + epoch, which gave seed s's epoch 1 the order of
    seed s + 1's epoch 0). A state saved without "order" goes on with 1, the order its run began."""

    def __init__(self, dataset: Sequence[Prompt], batch_size: int, *, seed: int, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("PromptStream needs at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.order = self.ORDER
        self.epoch = 0
        """The epoch of the next prompt to be drawn (position == len(dataset) means this one is used up)."""
        self.position = 0
        self.carried: list[int] = []
        """The last epoch's prompts in the batch that began this epoch: its first `fill` prompts leave them out."""
        self.fill = 0
        self._order = self._epoch_order(0)
        self._fingerprint: str | None = None

    def __iter__(self) -> Iterator[list[Prompt]]:
        return self

    def __next__(self) -> list[Prompt]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position == len(self.dataset):
                self.epoch, self.position = self.epoch + 1, 0
                # A dataset smaller than the batch repeats prompts in it whatever the order.
                fits = self.batch_size <= len(self.dataset)
                self.carried, self.fill = (batch[:], self.batch_size - len(batch)) if batch and fits and self.shuffle else ([], 0)
                self._order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(batch), len(self.dataset) - self.position)
            batch += self._order[self.position:self.position + take]
            self.position += take
        return [self.dataset[i] for i in batch]

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                 "dataset_size": len(self.dataset), "fingerprint": self.fingerprint(), "order": self.order}
        if self.carried:
            state.update(carried=list(self.carried), fill=self.fill)
        return state

    def fingerprint(self) -> str:
        """A hash of the prompts' token ids in dataset order: the same files in another order, another file of as
        many prompts, another tokenizer or chat template give another one; a corrected answer or a renamed data
        source (which change no prompt's place) do not."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for prompt in self.dataset:
                digest.update(json.dumps(prompt.prompt_ids).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def mismatch(self, state: dict) -> str | None:
        """Why a saved state cannot be continued by this stream, or None (a state saved without a fingerprint is
        checked by its size alone; the seed matters only to a shuffled order)."""
        saved = {k: state.get(k) for k in ("dataset_size", "fingerprint", "shuffle", "seed")}
        mine = {"dataset_size": len(self.dataset), "fingerprint": self.fingerprint(), "shuffle": self.shuffle,
                "seed": self.seed}
        if saved["fingerprint"] is None:
            del saved["fingerprint"], mine["fingerprint"]
        if not self.shuffle and saved["shuffle"] is False:
            del saved["seed"], mine["seed"]
        if saved == mine:
            return None
        shown = ", ".join(f"{k}={v}" for k, v in saved.items())
        return (f"the saved prompt stream ({shown}) does not match this one "
                f"({', '.join(f'{k}={v}' for k, v in mine.items())}): the data order cannot be continued; use the "
                "same data files in the same order, data.max_prompt_length, tokenizer, trainer.seed and "
                "data.shuffle as the saved run")

    def load_state_dict(self, state: dict) -> None:
        """Continue where the saved stream stopped; refuses a state from different prompts, seed or shuffle."""
        problem = self.mismatch(state)
        if problem is not None:
            raise ValueError(problem)
        size = len(self.dataset)
        carried, fill, order = state.get("carried", []), state.get("fill", 0), state.get("order", 1)

        def whole(value) -> bool:
            return type(value) is int  # not a bool, nor a number in text

        if (not 0 <= state["position"] <= size or state["epoch"] < 0 or order not in (1, 2)
                or not isinstance(carried, list) or not all(whole(i) and 0 <= i < size for i in carried)
                or not (whole(fill) and 0 <= fill <= size and len(carried) + fill <= size)):
            raise ValueError(f"bad prompt stream state: epoch {state['epoch']}, position {state['position']}, "
                             f"order {order}, carried over {carried!r}, fill {fill!r}")
        self.epoch, self.position, self.order = int(state["epoch"]), int(state["position"]), int(order)
        self.carried, self.fill = [int(i) for i in carried], int(fill)
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if not self.shuffle:
            return order  # a batch that began the epoch took the dataset's last prompts: it repeats none
        random.Random(f"{self.seed}:{epoch}" if self.order == 2 else self.seed + epoch).shuffle(order)
        if not self.carried:
            return order
        carried = set(self.carried)
        head = [i for i in order if i not in carried][:self.fill]
        moved = [i for i in order[:order.index(head[-1]) + 1] if i in carried] if head else []
        return head + moved + order[len(head) + len(moved):]


class _Malformed(ValueError):
    """What is wrong with one row."""


@dataclass
class _Unreadable:
    reason: str


def _read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number from 1, row) of a .jsonl file, skipping blank lines, or (row number from 0, row) of a
    .parquet file; a line that is not JSON gives _Unreadable."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if number == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield number, _Unreadable(f"not UTF-8 ({err})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, _Unreadable(f"invalid JSON ({err})")
    elif path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        # A map column (reward_model or extra_info as map<string, string>, as Spark writes them) reads as a dict.
        number = 0
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                for record in batch.to_pylist(maps_as_pydicts="lossy"):
                    yield number, record
                    number += 1
        except pyarrow.ArrowException as err:  # cut short, not parquet at all: which of the files?
            where = f" after row {number - 1}" if number else ""
            raise ValueError(f"{path}: not a readable parquet file{where} ({err})") from None
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .parquet or .jsonl")


def _parse_row(row: Any, prompt_key: str) -> tuple[list[dict[str, str]], str, str, dict[str, Any]]:
    """-> (messages, ground_truth, data_source, extra_info), or raise _Malformed saying what is wrong."""
    if not isinstance(row, dict):
        raise _Malformed(f"row is a {type(row).__name__}, expected an object")
    for key in (prompt_key, "reward_model", "data_source"):
        if row.get(key) is None:
            raise _Malformed(f"missing {key!r}")
    messages = row[prompt_key]
    if not isinstance(messages, list) or not messages:
        raise _Malformed(f"{prompt_key!r} must be a non-empty list of chat messages, got {_describe(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _Malformed(f"{prompt_key}[{i}] must be a message {{role, content}}, got {_describe(message)}")
        for part in ("role", "content"):
            if not isinstance(message.get(part), str):
                raise _Malformed(f"{prompt_key}[{i}].{part} must be a string, got {_describe(message.get(part))}")
    reward_model = row["reward_model"]
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise _Malformed(f"missing 'reward_model.ground_truth' (reward_model is {_describe(reward_model)})")
    ground_truth = reward_model["ground_truth"]
    if isinstance(ground_truth, int) and not isinstance(ground_truth, bool):
        ground_truth = str(ground_truth)
    if not isinstance(ground_truth, str):
        raise _Malformed(f"'reward_model.ground_truth' must be a string, got {_describe(ground_truth)}")
    data_source = row["data_source"]
    if not isinstance(data_source, str) or not data_source:
        raise _Malformed(f"'data_source' must be a non-empty string, got {_describe(data_source)}")
    extra_info = row.get("extra_info")
    extra_info = {} if extra_info is None else extra_info
    if not isinstance(extra_info, dict):
        raise _Malformed(f"'extra_info' must be an object, got {_describe(extra_info)}")
    # A key set to null is absent, at any depth: Parquet gives a struct column (and a struct nested in one, or in
    # a list) the keys of every row, null where a row has none, and the same row read from JSONL would otherwise
    # be another prompt (and its reward function see None for a key it has a default for).
    extra_info = _without_null_keys(extra_info)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return messages, ground_truth, data_source, extra_info


def _without_null_keys(value):
    """`value` with every mapping's null-valued keys left out, in nested mappings and lists too (a list's own null
    items stay: Parquet fills in no list items)."""
    if isinstance(value, dict):
        return {key: _without_null_keys(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_null_keys(item) for item in value]
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _task_data(extra_info: dict[str, Any]) -> str:
    """extra_info as a key, but for its "index" (a row's number, not the task's data)."""
    rest = {k: v for k, v in extra_info.items() if k != "index"}
    try:
        return json.dumps(rest, sort_keys=True, default=repr)
    except TypeError:  # keys of unlike types cannot be sorted
        return repr(rest)

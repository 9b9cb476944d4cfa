"""A few responses of every step, as text, in samples.jsonl: what the policy writes, and how it scored.

One JSON object a line: step, split ("train": kept groups of the step; "val": validation), the
prompt and response decoded, the finish reason, the response's length, the task's accuracy and
score, the reward used for the advantage, and the ground truth. The first completion of each of
the first `count` groups is written, so the same prompts' answers can be followed across steps in
validation. With logging.val_generations, every validation response goes to val_generations/step_NNNNNN.jsonl.
An attempt that starts again in a folder whose samples.jsonl has rows writes the start marker metrics.jsonl
gets; read_samples gives the run's history.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_dapo.metrics.sinks import open_rows, read_history, start_marker, sync_rows


class SampleLog:
    def __init__(self, run_dir: Path, count: int, training: bool = True):
        """training: False for trainer.val_only (see open_rows' repair)."""
        self.count = count
        self.file, self.earlier_rows = (open_rows(run_dir / "samples.jsonl", repair=training) if count
                                        else (None, False))

    def training_starts(self, step: int, checkpoint: Path | None) -> None:
        """As MetricSinks.training_starts: the rows an earlier attempt wrote after `step` are superseded."""
        if self.file is not None and self.earlier_rows:
            start_marker(self.file, step, checkpoint)

    def write(self, step: int, split: str, groups: list, tokenizer) -> None:
        """`groups`: trainer Groups (prompt, completions, rewards, scores)."""
        if self.file is None:
            return
        for group in groups[:self.count]:
            self.file.write(json.dumps({"step": step, "split": split, **response_row(group, 0, tokenizer)},
                                       ensure_ascii=False) + "\n")
        self.file.flush()

    def sync(self) -> None:
        """samples.jsonl's rows on disk (before a checkpoint; see sync_rows)."""
        sync_rows(self.file)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_samples(run_dir: str | Path) -> list[dict]:
    """The rows of RUN_DIR/samples.jsonl as the run's history (see read_metrics)."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder with logging.samples_per_step > 0?")
    return read_history(path)


def response_row(group, index: int, tokenizer) -> dict:
    """Response `index` of a trainer Group as text, with how it scored."""
    completion, reward = group.completions[index], group.rewards[index]
    return {
        "prompt": tokenizer.decode(group.prompt.prompt_ids),
        "response": tokenizer.decode(completion.token_ids),
        "finish_reason": completion.finish_reason, "length": len(completion.token_ids),
        "acc": reward.acc, "score": reward.score, "reward": group.scores[index],
        "ground_truth": group.prompt.ground_truth,
    }


def write_validation(run_dir: Path, step: int, groups: list, tokenizer) -> Path:
    """Every validation response of `step` in RUN_DIR/val_generations/step_NNNNNN.jsonl (logging.val_generations),
    with its data_source, prompt index, the answer the verifier read, the extra figures and any failure. The file
    appears whole or not at all."""
    folder = run_dir / "val_generations"
    folder.mkdir(exist_ok=True)
    path = folder / f"step_{step:06d}.jsonl"
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:  # not the node's locale: the responses may hold any character
        for group in groups:
            for index, reward in enumerate(group.rewards):
                row = {"step": step, "data_source": group.prompt.data_source, "prompt_index": group.prompt.index,
                       "sample": index, **response_row(group, index, tokenizer), "pred": reward.pred,
                       "extra": reward.extra, "failed": reward.reason if reward.failed else None}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path

"""A few responses of every step, as text, in samples.jsonl: what the policy writes, and how it scored.

One JSON object a line: step, split ("train": kept groups of the step; "val": validation), the
prompt and response decoded, the finish reason, the response's length, the task's accuracy and
score, the reward used for the advantage, and the ground truth. The first completion of each of
the first `count` groups is written, so the same prompts' answers can be followed across steps in
validation.
"""
from __future__ import annotations

import json
from pathlib import Path


class SampleLog:
    def __init__(self, run_dir: Path, count: int):
        self.count = count
        self.file = open(run_dir / "samples.jsonl", "a") if count else None

    def write(self, step: int, split: str, groups: list, tokenizer) -> None:
        """`groups`: trainer Groups (prompt, completions, rewards, scores)."""
        if self.file is None:
            return
        for group in groups[:self.count]:
            completion, reward = group.completions[0], group.rewards[0]
            self.file.write(json.dumps({
                "step": step, "split": split,
                "prompt": tokenizer.decode(group.prompt.prompt_ids),
                "response": tokenizer.decode(completion.token_ids),
                "finish_reason": completion.finish_reason, "length": len(completion.token_ids),
                "acc": reward.acc, "score": reward.score, "reward": group.scores[0],
                "ground_truth": group.prompt.ground_truth,
            }, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

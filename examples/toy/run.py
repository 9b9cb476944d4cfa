"""The toy DAPO example: a tiny model learns a verifiable task with DAPO alone, on 2 CPU cores.

Task: answer with the last digit of a 3-digit number, "Q:472" -> "Answer: 2", scored by the
DAPO-Math verifier (+1 / -1). The same command first makes (in about a minute, once per run folder) a
character-level tokenizer with a chat template, the train / validation prompts (disjoint numbers),
and a warm start: the model is fitted to answers that give the last digit only ~40% of the time
and the first digit otherwise, so its first rollouts have a mean reward well between 0 and 1 and
dynamic sampling has work to do. DAPO alone then has to settle on the right digit, also on
numbers it never trained on.

    python examples/toy/run.py [dotted.overrides ...]
    python examples/toy/run.py --prepare-only [dotted.overrides ...]   # make the above, print the overrides
                                                                       # as shell-quoted words
"""
from __future__ import annotations

import json
import random
import shlex
import sys
from pathlib import Path

import torch

from megatron_dapo.data.tiny import fit_tiny_model, make_char_tokenizer
from megatron_dapo.trainer.checkpoints import latest_checkpoint

HERE = Path(__file__).resolve().parent
CHARS = list("0123456789+-=: ?QAnswer\n")
TEMPLATE = "{% for m in messages %}Q:{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
RIGHT_SHARE = 0.4


def make_data(folder: Path, seed: int) -> list[str]:
    numbers = [f"{a}{b}{c}" for a in "123456789" for b in "123456789" for c in "123456789"]
    random.Random(seed).shuffle(numbers)
    val, train = numbers[:64], numbers[64:]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for number in rows:
                f.write(json.dumps({"prompt": [{"role": "user", "content": number}], "data_source": "math_dapo",
                                    "reward_model": {"ground_truth": number[-1]}}) + "\n")
    return train


def warm_start(folder: Path, tokenizer, train: list[str], seed: int, steps: int = 1500) -> None:
    """Fit a tiny Qwen2 to noisy answers: the last digit with probability RIGHT_SHARE, else the first."""
    def sample(rng: random.Random):
        number = rng.choice(train)
        answer = number[-1] if rng.random() < RIGHT_SHARE else number[0]
        return [{"role": "user", "content": number}], f"Answer: {answer}"

    fit_tiny_model(folder, tokenizer, sample, seed=seed, steps=steps, batch_size=64, max_positions=64)


class AnotherSeedsFolder(Exception):
    """The run folder's data and warm start were made with another trainer.seed."""


def prepare(run_dir: Path, seed: int) -> list[str]:
    """Make the tokenizer, data and warm start in run_dir (once); the overrides that point the config at them.

    The tokenizer has its own folder: next to the model's Qwen2 config.json, AutoTokenizer would load it as
    Qwen2's tokenizer class, whose pre-tokenizer drops the prompt's newline and the answer's space, so the
    trainer would see other token ids than the warm start was fitted on."""
    base, tokenizer_dir, data = run_dir / "base", run_dir / "tokenizer", run_dir / "data"
    made_with = data / "made_with.json"  # the seed the data and warm start were made with
    if not ((base / "model.safetensors").is_file() and (tokenizer_dir / "tokenizer.json").is_file()):
        tokenizer = make_char_tokenizer(tokenizer_dir, CHARS, TEMPLATE)
        train = make_data(data, seed)
        warm_start(base, tokenizer, train, seed)
        made_with.write_text(json.dumps({"seed": seed}))
    elif (made_with.is_file() and (made := json.loads(made_with.read_text())["seed"]) != seed
          and latest_checkpoint(run_dir) is None):  # with a checkpoint, the trainer refuses the other data order
        raise AnotherSeedsFolder(f"{run_dir} holds the data and warm start of trainer.seed={made}, not {seed}: give "
                                 "another seed its own trainer.run_dir")
    # Lists in JSON, which YAML reads as written: a path may hold ", " or " #".
    return [f"model.path={base}", f"model.tokenizer_path={tokenizer_dir}",
            f"data.train_files={json.dumps([str(data / 'train.jsonl')])}",
            f"data.val_files={json.dumps([str(data / 'val.jsonl')])}"]


def main(argv: list[str]) -> int:
    from megatron_dapo.cli import main as megatron_dapo
    from megatron_dapo.config.loader import ConfigError
    from megatron_dapo.config.root import load_config

    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    prepare_only = "--prepare-only" in argv  # for launchers that start the training themselves (examples/slurm)
    argv = [a for a in argv if a != "--prepare-only"]
    try:
        config = load_config(HERE / "config.yaml", argv)
    except ConfigError as err:  # named, no traceback (as the trainer's own are)
        print(f"megatron-dapo: config error: {err}", file=sys.stderr)
        return 2
    try:
        overrides = [*prepare(Path(config.trainer.run_dir), config.trainer.seed), *argv]
    except AnotherSeedsFolder as err:
        print(f"megatron-dapo: {err}", file=sys.stderr)
        return 2
    if prepare_only:  # quoted for a shell: a path may hold spaces
        print(shlex.join(overrides))
        return 0
    return megatron_dapo(["train", str(HERE / "config.yaml"), *overrides])  # config errors named, no traceback


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main(sys.argv[1:]))

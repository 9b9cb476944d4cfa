"""Crypto limit-order execution with DAPO: the model reads a market snapshot and works an order.

Each prompt is one execution episode cut from order-book data (side, size, horizon, a recent window
of snapshots); the answer is a schedule of child limit orders in the format documented in
megatron_dapo/reward/trading/task.py; the reward is the simulator's implementation shortfall against
TWAP on the same episode, and `profit_loss` drives dynamic sampling. Validation reports the model's
shortfall against three baselines on the validation episodes (val/vs_twap_bps_mean,
val/vs_market_bps_mean, val/vs_passive_bps_mean; negative is better than the baseline).

    python examples/trading/run.py [dotted.overrides ...]                  # CPU-sized variant, trains
    python examples/trading/run.py --prepare-only [dotted.overrides ...]   # data (+ tiny model), print overrides
    python examples/trading/run.py --config examples/trading/config.yaml --prepare-only \\
        [--books B.csv --trades T.csv [--tick 0.01]]   # the full-size episodes for config.yaml, from files or simulated

The market comes from --books / --trades files (CSV or Parquet, layout in
megatron_dapo/reward/trading/market.py) or, by default, from the synthetic generator; train and
validation episodes come from disjoint stretches of time. The CPU-sized variant also makes a
character-level tokenizer and a tiny Qwen2-shaped model warm-started on varied one-order answers, half of
them ordering more than the episode's size, so that its first rollouts parse and differ and DAPO has
something to choose between.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

import torch

from megatron_dapo.data.tiny import fit_tiny_model, make_char_tokenizer
from megatron_dapo.trainer.checkpoints import latest_checkpoint

HERE = Path(__file__).resolve().parent
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
WINDOW, HORIZON = {True: (4, 4), False: (16, 6)}, {True: 4, False: 6}
WHOLE_SIZE_SHARE = 0.5
"""How often the warm start's answer orders exactly the episode's size (the rest order more: malformed)."""


def make_episodes(folder: Path, *, compact: bool, seed: int, books: str | None, trades: str | None,
                  tick: float | None = None) -> dict:
    """Episodes as JSONL rows (train / val split by time); returns counts. tick: the market's price increment
    (None: the narrowest spread in the data)."""
    from megatron_dapo.reward.trading.market import (cut_episodes, episode_to_dict, load_market, split_by_time,
                                                     synthetic_market, write_market)
    from megatron_dapo.reward.trading.task import DATA_SOURCE, render_prompt

    folder.mkdir(parents=True, exist_ok=True)
    if books is None:  # simulated, written in the file layout and read back through the loader
        books, trades = folder / "books.csv", folder / "trades.csv"
        write_market(synthetic_market(4000 if compact else 20000, seed=seed), books, trades)
    market = load_market(books, trades)
    narrowest = min(b.asks[0][0] - b.bids[0][0] for b in market.books)
    # A spread is a difference of two prices: a float step of theirs off (1.2e-10 at 1e6), which 6 digits drop.
    narrowest = float(f"{narrowest:.6g}")
    if tick is None:  # where the data never shows a one-tick spread, this is a multiple of the tick: --tick
        tick = narrowest
        print(f"tick: {tick} (the narrowest spread in {books}; --tick to give it)", flush=True)
    elif tick > narrowest * (1 + 1e-6):
        raise SystemExit(f"--tick {tick} is wider than the narrowest spread in {books} ({narrowest})")
    gaps = sorted(b - a for a, b in zip(market.timestamps, market.timestamps[1:]))
    interval_s = gaps[len(gaps) // 2] if gaps else 10.0  # the data's usual spacing of snapshots, said in the prompt
    rows = cut_episodes(market, window=WINDOW[compact][0], horizon=HORIZON[compact], stride=3 if compact else 5,
                        seed=seed, tick=round(tick, 10), quantity=(1, 9) if compact else (5, 50))
    split = dict(zip(("train", "val"), split_by_time(rows, val_fraction=0.1)))
    for name, part in split.items():  # each file whole or not at all: written aside, then renamed
        written = folder / f"{name}.jsonl.partial"
        with open(written, "w") as f:
            for row in part:
                prompt = render_prompt(row.history, row.history_trades, row.episode, compact=compact,
                                       interval_s=interval_s)
                f.write(json.dumps({"prompt": [{"role": "user", "content": prompt}], "data_source": DATA_SOURCE,
                                    "reward_model": {"ground_truth": "see extra_info.episode"},
                                    "extra_info": {"episode": episode_to_dict(row.episode)}}) + "\n")
        written.rename(folder / f"{name}.jsonl")
    return {name: len(part) for name, part in split.items()}


def warm_start(folder: Path, tokenizer, train_file: Path, seed: int, steps: int = 1200) -> None:
    """Fit a tiny Qwen2 to random one-order answers (any step, offset and tif) that give the order's size
    WHOLE_SIZE_SHARE of the time and more than the order otherwise (malformed: oversize), so that its first
    rollouts parse, differ, and are often enough wrong in one learnable way for DAPO to have work to do."""
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]

    def sample(rng: random.Random):
        row = rng.choice(rows)
        episode = row["extra_info"]["episode"]
        horizon = len(episode["books"]) - 1
        size = episode["quantity"] + (0 if rng.random() < WHOLE_SIZE_SHARE else rng.randint(1, 3))
        answer = (f"Orders:\nstep={rng.randrange(2)} offset={rng.randint(-2, 3)} size={size:g} "
                  f"tif={rng.randint(1, horizon)}")
        return row["prompt"], answer

    fit_tiny_model(folder, tokenizer, sample, seed=seed, steps=steps, batch_size=32, max_positions=256, lr=3e-3)


class TrainedOnOtherEpisodes(Exception):
    """The run folder's episodes came from other market files (or seed), and a run has trained on them."""


def prepare(config_path: Path, run_dir: Path, seed: int, books: str | None, trades: str | None,
            tick: float | None = None) -> list[str]:
    """Data (and, for the CPU-sized variant, tokenizer and model) in run_dir, once; the overrides to use them."""
    compact = config_path.name == "config_cpu.yaml"
    data = run_dir / "data"
    # What the episodes were cut from: other market files (or a seed) than the folder's episodes' make them again.
    source = {"compact": compact, "seed": seed, "books": books and str(Path(books).resolve()),
              "trades": trades and str(Path(trades).resolve()), "tick": tick}
    made_from = json.loads((data / "source.json").read_text()) if (data / "source.json").is_file() else None
    if made_from is not None and made_from != source and (latest_checkpoint(run_dir) is not None
                                                          or (run_dir / "RUNNING").exists()):
        # Made again, they would change a run's data under it (one that runs now, or resumes later) and drop the
        # warm start it began from: nothing is touched.
        raise TrainedOnOtherEpisodes(
            f"{run_dir} holds a run trained on the episodes of {made_from['books'] or 'the generator'} (seed "
            f"{made_from['seed']}), not {books or 'the generator'} (seed {seed}): give these their own trainer.run_dir")
    if not (data / "val.jsonl").is_file() or made_from != source:
        counts = make_episodes(data, compact=compact, seed=seed, books=books, trades=trades, tick=tick)
        (data / "source.json").write_text(json.dumps(source, indent=1))
        print(f"episodes: {counts['train']} train, {counts['val']} validation (split by time)", flush=True)
        if made_from is not None:  # the warm start was fitted on the earlier episodes
            print(f"episodes made again from {books or 'the generator'} (the folder's came from "
                  f"{made_from['books'] or 'the generator'}, seed {made_from['seed']})", flush=True)
            (run_dir / "base" / "model.safetensors").unlink(missing_ok=True)
    # Lists in JSON, which YAML reads as written: a path may hold ", " or " #".
    overrides = [f"data.train_files={json.dumps([str(data / 'train.jsonl')])}",
                 f"data.val_files={json.dumps([str(data / 'val.jsonl')])}"]
    if compact:
        # The tokenizer has its own folder: next to a Qwen2 config.json, AutoTokenizer would load it as
        # Qwen2's tokenizer class, whose pre-tokenizer drops the spaces and newlines of the answer format.
        base, tokenizer = run_dir / "base", run_dir / "tokenizer"
        if not (base / "model.safetensors").is_file():
            warm_start(base, make_char_tokenizer(tokenizer, CHARS, TEMPLATE), data / "train.jsonl", seed)
        overrides += [f"model.path={base}", f"model.tokenizer_path={tokenizer}"]
    return overrides


def main(argv: list[str]) -> int:
    from megatron_dapo.cli import main as megatron_dapo
    from megatron_dapo.config.loader import ConfigError
    from megatron_dapo.config.root import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(HERE / "config_cpu.yaml"))
    parser.add_argument("--prepare-only", action="store_true", help="make the data (and model), print the overrides")
    parser.add_argument("--books", help="order-book snapshots (CSV or Parquet) instead of the generator")
    parser.add_argument("--trades", help="the trades that go with --books")
    parser.add_argument("--tick", type=float, help="the market's price increment (default: the narrowest spread "
                        "in the data, too wide where it never shows a one-tick spread)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if (args.books is None) != (args.trades is None):
        parser.error("--books and --trades go together")
    if args.tick is not None and not args.tick > 0:
        parser.error(f"--tick must be > 0, got {args.tick}")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:  # named, no traceback (as the trainer's own are)
        print(f"megatron-dapo: config error: {err}", file=sys.stderr)
        return 2
    try:
        overrides = [*prepare(Path(args.config), Path(config.trainer.run_dir), config.trainer.seed, args.books,
                              args.trades, args.tick), *args.overrides]
    except TrainedOnOtherEpisodes as err:
        print(f"megatron-dapo: {err}", file=sys.stderr)
        return 2
    if args.prepare_only:  # quoted for a shell: a path may hold spaces
        print(shlex.join(overrides))
        return 0
    return megatron_dapo(["train", str(args.config), *overrides])  # config errors named, no traceback


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main(sys.argv[1:]))

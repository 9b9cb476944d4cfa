"""The trading example's CPU-sized variant end to end: episodes, warm start, `megatron-dapo train`."""
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_variant_trains_and_reports_shortfall_against_the_baselines(tmp_path):
    run_dir = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(port)}
    prepared = subprocess.run([sys.executable, str(ROOT / "examples" / "trading" / "run.py"), "--prepare-only",
                               f"trainer.run_dir={run_dir}"], capture_output=True, text=True, timeout=900, env=env)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "validation (split by time)" in prepared.stdout
    overrides = shlex.split(prepared.stdout.strip().splitlines()[-1])
    train = subprocess.run([sys.executable, "-m", "megatron_dapo", "train", str(ROOT / "examples" / "trading" /
                            "config_cpu.yaml"), *overrides],
                           capture_output=True, text=True, timeout=900, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {row["step"]: row for row in rows if "val/vs_twap_bps_mean" in row}
    assert sorted(val) == [0, 5, 10]
    for row in val.values():
        for name in ("shortfall_bps", "vs_twap_bps", "vs_market_bps", "vs_passive_bps", "profit_loss"):
            assert isinstance(row[f"val/{name}_mean"], float) and math.isfinite(row[f"val/{name}_mean"]), row
        # profit_loss is the shortfall's opposite (dynamic sampling's figure), over the same responses
        assert row["val/profit_loss_mean"] == pytest.approx(-row["val/shortfall_bps_mean"]), row
    # The warm start answers in the format, ordering more than the episode's size about half the time, and
    # DAPO alone makes the answers valid more often (seed 1: 61% malformed at step 0, 57% oversize; 16% at step
    # 10, 2% oversize).
    first, last = val[0], val[10]
    assert 0.2 < first["val/malformed_mean"] < 0.9 and last["val/malformed_mean"] < first["val/malformed_mean"] - 0.2
    assert last["val/malformed_oversize_mean"] < first["val/malformed_oversize_mean"] - 0.2
    steps = [row for row in rows if "reward/profit_loss_mean" in row]
    assert len(steps) == 10 and all("reward/vs_twap_bps_mean" in row for row in steps)


def test_episodes_are_made_again_from_other_market_files(tmp_path):
    """The full-size variant's data: made once per run folder, and made again (said so) when --books / --trades
    name other files than the folder's episodes came from, instead of training on the old ones."""
    run_dir = tmp_path / "run"
    command = [sys.executable, str(ROOT / "examples" / "trading" / "run.py"), "--config",
               str(ROOT / "examples" / "trading" / "config.yaml"), "--prepare-only", f"trainer.run_dir={run_dir}"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "validation (split by time)" in first.stdout, first.stderr[-3000:]
    assert json.loads((run_dir / "data" / "source.json").read_text())["books"] is None
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "split by time" not in again.stdout, again.stdout  # the folder's, as they are
    books, trades = tmp_path / "books.csv", tmp_path / "trades.csv"
    books.write_bytes((run_dir / "data" / "books.csv").read_bytes())
    trades.write_bytes((run_dir / "data" / "trades.csv").read_bytes())
    other = subprocess.run([*command, "--books", str(books), "--trades", str(trades)], capture_output=True, text=True,
                           timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    assert f"episodes made again from {books} (the folder's came from the generator, seed 1)" in other.stdout
    assert json.loads((run_dir / "data" / "source.json").read_text())["books"] == str(books.resolve())
    assert not list((run_dir / "data").glob("*.partial"))
    # The tick is the narrowest spread unless --tick gives it (data that never shows a one-tick spread); one wider
    # than a spread the data shows is refused.
    narrowest = float(re.search(r"tick: (\S+) \(the narrowest spread in ", other.stdout).group(1))
    wide = subprocess.run([*command, "--books", str(books), "--trades", str(trades), "--tick", str(narrowest * 2)],
                          capture_output=True, text=True, timeout=600)
    assert wide.returncode != 0 and f"--tick {narrowest * 2} is wider than the narrowest spread" in wide.stderr
    given = subprocess.run([*command, "--books", str(books), "--trades", str(trades), "--tick", str(narrowest / 2)],
                           capture_output=True, text=True, timeout=600)
    assert given.returncode == 0 and "episodes made again" in given.stdout, given.stderr[-3000:]
    row = json.loads((run_dir / "data" / "val.jsonl").read_text().splitlines()[0])
    assert row["extra_info"]["episode"]["tick"] == narrowest / 2
    # Once a run has trained on them (a complete checkpoint, or a training holding the folder), the episodes stay:
    # other market files are refused, naming both, and nothing in the folder changes.
    (run_dir / "RUNNING").write_text("{}")
    kept = (run_dir / "data" / "train.jsonl").read_bytes()
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (f"{run_dir} holds a run trained on the episodes of {books.resolve()} (seed 1), not the generator (seed "
            "1): give these their own trainer.run_dir") in refused.stderr, refused.stderr[-3000:]
    assert (run_dir / "data" / "train.jsonl").read_bytes() == kept

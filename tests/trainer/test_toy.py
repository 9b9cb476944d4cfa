"""The README's main job, shortened: the toy example learns with DAPO alone on a CPU."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 0.25
"""Validation avg@4 after 10 steps must beat step 0 by this much (seed 1: about 0.39 -> 0.95)."""


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_toy_example_learns(tmp_path):
    run_dir = tmp_path / "toy"
    env = {**os.environ, "MASTER_PORT": _free_port()}
    cmd = [sys.executable, str(ROOT / "examples" / "toy" / "run.py"), f"trainer.run_dir={run_dir}",
           "trainer.total_training_steps=10", "trainer.test_freq=10", "checkpoint.save_freq=5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {row["step"]: row["val/acc_avg@4"] for row in rows if "val/acc_avg@4" in row}
    assert 0.1 < val[0] < 0.8, f"the warm start should be right sometimes, not always: {val[0]}"
    assert val[10] >= val[0] + MARGIN, f"validation did not rise enough: {val}"
    train = [row for row in rows if "critic/acc_mean" in row]
    assert len(train) == 10 and all(row["rollout/probe_logp_max_diff"] < 1e-4 for row in train)
    assert all(key in train[0] for key in ("actor/pg_clipfrac_high", "actor/entropy", "actor/grad_norm",
                                          "sampling/gen_batches", "timing/update", "perf/tokens_per_s"))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000005", "step_000010"], checkpoints

    plot = subprocess.run([sys.executable, "-m", "megatron_dapo", "plot", str(run_dir)], capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    png = run_dir / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

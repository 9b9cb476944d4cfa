"""tools/bench_refill.py end to end on a tiny model: both ways generate, and the row says what each made."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[3]


def test_the_refill_benchmark_writes_its_row(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_refill", ROOT / "tools" / "bench_refill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = make_tiny_model("qwen2", tmp_path / "model")
    assert bench.main(["--model", str(folder), "--prompts", "6", "--n", "2", "--max-batch-size", "4",
                       "--prompt-len", "5", "--new-tokens", "12", "--stop-ids", "30", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    (row,) = list(csv.DictReader(open(tmp_path / "refill.csv")))
    assert 12 <= int(row["refilled_tokens"]) <= 12 * 12 and 12 <= int(row["chunked_tokens"]) <= 12 * 12, row
    assert float(row["refilled_s"]) > 0 and float(row["speedup"]) > 0, row

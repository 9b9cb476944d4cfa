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
    # 12 responses of 1 to 12 tokens each way (sampled: the two ways' tokens differ)
    assert 12 <= int(row["refilled_tokens"]) <= 12 * 12 and 12 <= int(row["chunked_tokens"]) <= 12 * 12, row
    assert float(row["refilled_s"]) > 0 and float(row["chunked_s"]) > 0, row
    # The rates are the tokens over the seconds, and the speedup their ratio, up to the CSV's rounding (seconds to
    # 0.01, whose relative error is largest for the tiny model's short runs).
    for way in ("refilled", "chunked"):
        seconds = float(row[f"{way}_s"])  # within 0.005 of the time the rate was computed from
        rate, slack = int(row[f"{way}_tokens"]) / seconds, 0.005 / (seconds - 0.005)
        assert abs(float(row[f"{way}_tok_per_s"]) - rate) <= 0.05 + slack * rate, (way, row)
    ratio = float(row["refilled_tok_per_s"]) / float(row["chunked_tok_per_s"])
    assert abs(float(row["speedup"]) - ratio) <= 0.006 + 0.01 * ratio, row

"""metrics.jsonl across a resume: the file keeps every row, read_metrics gives the run's history."""
import json

from megatron_dapo.metrics.config import LoggingConfig
from megatron_dapo.metrics.sinks import MetricSinks, read_metrics


def test_rows_logged_after_the_resumed_checkpoint_are_superseded(tmp_path):
    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=4)
    for step in (1, 2, 3):  # an attempt that saved at step 1, logged 2 and 3, then crashed
        sinks.log(step, {"critic/acc_mean": step / 10})
    sinks.resumed(1, tmp_path / "checkpoints" / "step_000001")
    for step in (2, 3, 4):
        sinks.log(step, {"critic/acc_mean": step / 100})
    sinks.close()
    assert [(row["step"], row["critic/acc_mean"]) for row in read_metrics(tmp_path)] == [
        (1, 0.1), (2, 0.02), (3, 0.03), (4, 0.04)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 7 and lines[3]["resumed_from"].endswith("step_000001")  # nothing deleted from the file

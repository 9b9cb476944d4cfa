"""metrics.jsonl across a resume: the file keeps every row, read_metrics gives the run's history."""
import json

import pytest

from megatron_dapo.metrics.config import LoggingConfig
from megatron_dapo.metrics.sinks import MetricSinks, SinkError, read_metrics


def test_rows_logged_after_the_resumed_checkpoint_are_superseded(tmp_path):
    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=4)
    for step in (1, 2, 3):  # an attempt that saved at step 1, logged 2 and 3, then crashed
        sinks.log(step, {"critic/acc_mean": step / 10})
    sinks.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "critic/acc')  # a row cut short by the crash
    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=4)
    sinks.training_starts(1, tmp_path / "checkpoints" / "step_000001")
    for step in (2, 3, 4):
        sinks.log(step, {"critic/acc_mean": step / 100})
    sinks.close()
    assert [(row["step"], row["critic/acc_mean"]) for row in read_metrics(tmp_path)] == [
        (1, 0.1), (2, 0.02), (3, 0.03), (4, 0.04)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and json.loads(lines[4])["resumed_from"].endswith("step_000001")  # nothing deleted


def test_a_start_from_scratch_supersedes_every_earlier_row_and_a_first_start_writes_no_marker(tmp_path):
    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=2)
    sinks.training_starts(0, None)  # nothing earlier: no marker
    sinks.log(0, {"val/acc_avg@4": 0.5})
    sinks.log(1, {"critic/acc_mean": 0.1})  # crashed before its first checkpoint
    sinks.close()
    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=2)
    sinks.training_starts(0, None)
    sinks.log(0, {"val/acc_avg@4": 0.25})
    sinks.close()
    assert read_metrics(tmp_path) == [row for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text()
                                                         .splitlines()) if "val/acc_avg@4" in row][1:]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


def test_a_samples_row_cut_short_by_a_crash_leaves_the_next_rows_readable(tmp_path):
    from megatron_dapo.metrics.samples import SampleLog

    (tmp_path / "samples.jsonl").write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')
    log = SampleLog(tmp_path, 2)
    log.file.write(json.dumps({"step": 3}) + "\n")
    log.close()
    assert (tmp_path / "samples.jsonl").read_text().splitlines()[1:] == ['{"step": 2, "spl', '{"step": 3}']
    SampleLog(tmp_path, 2).close()  # a whole file gets nothing added
    assert (tmp_path / "samples.jsonl").read_text().endswith('\n{"step": 3}\n')


def test_a_character_cut_in_half_by_a_crash_leaves_the_file_readable(tmp_path):
    from megatron_dapo.metrics.samples import SampleLog

    row = json.dumps({"step": 1, "response": "ответ ✓"}, ensure_ascii=False).encode()
    (tmp_path / "samples.jsonl").write_bytes(b'{"step": 0}\n' + row[:-4])  # cut inside the 3-byte check mark
    log = SampleLog(tmp_path, 2)
    log.file.write(json.dumps({"step": 2, "response": "да"}, ensure_ascii=False) + "\n")
    log.close()
    lines = (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"step": 0}' and lines[1] == row[:-5].decode() and json.loads(lines[2])["response"] == "да"


def test_a_response_holding_a_unicode_line_separator_is_one_row(tmp_path):
    from megatron_dapo.metrics.samples import SampleLog, read_samples

    log = SampleLog(tmp_path, 2)
    for step, response in enumerate(("a\u2028b", "c\x85d", "e\u2029f")):
        log.file.write(json.dumps({"step": step, "response": response}, ensure_ascii=False) + "\n")
    log.close()
    assert [row["response"] for row in read_samples(tmp_path)] == ["a\u2028b", "c\x85d", "e\u2029f"]


def test_samples_an_attempt_wrote_after_the_resumed_checkpoint_are_superseded(tmp_path):
    from megatron_dapo.metrics.samples import SampleLog, read_samples

    log = SampleLog(tmp_path, 2)
    log.training_starts(0, None)  # nothing earlier: no marker
    for step in (1, 2, 3):  # saved at step 2, crashed after writing step 3's samples
        log.file.write(json.dumps({"step": step, "split": "train", "response": f"first {step}"}) + "\n")
    log.close()
    log = SampleLog(tmp_path, 2)
    log.training_starts(2, tmp_path / "checkpoints" / "step_000002")
    log.file.write(json.dumps({"step": 3, "split": "train", "response": "second 3"}) + "\n")
    log.close()
    assert [row["response"] for row in read_samples(tmp_path)] == ["first 1", "first 2", "second 3"]
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 5  # the file keeps every row


def test_a_validation_only_run_leaves_the_training_s_unfinished_row_alone(tmp_path):
    # trainer.val_only may run beside the training writing these files: what looks cut short may be mid-write.
    from megatron_dapo.metrics.samples import SampleLog

    row = json.dumps({"step": 1, "response": "ответ ✓"}, ensure_ascii=False).encode()
    for name in ("metrics.jsonl", "samples.jsonl"):
        (tmp_path / name).write_bytes(b'{"step": 0}\n' + row[:-4])
    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=2, training=False)
    sinks.close()
    SampleLog(tmp_path, 2, training=False).close()
    for name in ("metrics.jsonl", "samples.jsonl"):  # ended, for a row of its own to start a line, and not cut
        assert (tmp_path / name).read_bytes() == b'{"step": 0}\n' + row[:-4] + b"\n", name
    # The half character stays in the file, whoever appends next: it costs its own row only.
    SampleLog(tmp_path, 2).close()
    from megatron_dapo.metrics.samples import read_samples
    assert read_samples(tmp_path) == [{"step": 0}] and read_metrics(tmp_path) == [{"step": 0}]


def test_tensorboard_drops_what_an_attempt_logged_after_the_resumed_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def attempt(start, checkpoint, rows):
        sinks = MetricSinks(LoggingConfig(console=False, jsonl=False, tensorboard=True), tmp_path, total_steps=3)
        sinks.training_starts(start, checkpoint)
        for step, value in rows:
            sinks.log(step, {"val/acc": value})
        sinks.close()

    attempt(0, None, [(0, 0.1), (1, 0.2)])  # crashed before its first checkpoint
    attempt(0, None, [(0, 0.3), (1, 0.4), (2, 0.5)])  # from scratch again: step 0's validation logged again
    attempt(1, tmp_path / "checkpoints" / "step_000001", [(2, 0.6)])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("val/acc")] == [(0, 0.3), (1, 0.4), (2, 0.6)]



def test_a_sync_the_file_system_refuses_is_a_warning_not_a_failure(tmp_path, capsys):
    """Rows are synced to disk before each checkpoint. A file that cannot be synced (here /dev/full, a device:
    fsync refuses it) gets a warning naming it, and the run goes on to the save, which says more about such a
    file system; a regular file syncs silently, a closed one or none is nothing to do."""
    from megatron_dapo.metrics.sinks import sync_rows

    with open("/dev/full", "a", encoding="utf-8") as device, open(tmp_path / "rows.jsonl", "a") as regular:
        sync_rows(device)
        regular.write("{}\n")
        sync_rows(regular)
    assert capsys.readouterr().err == "warning: could not sync /dev/full to disk: [Errno 22] Invalid argument\n"
    assert (tmp_path / "rows.jsonl").read_text() == "{}\n"
    sync_rows(regular)
    sync_rows(None)


def test_the_plot_draws_a_validation_only_row_at_its_own_step(tmp_path):
    from megatron_dapo.metrics.plot import curve, plot_run

    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=3)
    for step in (0, 1, 2, 3):
        sinks.log(step, {"critic/acc_mean": step / 10, **({"val/acc_avg@4": step / 10} if step != 2 else {})})
    sinks.close()
    sinks = MetricSinks(LoggingConfig(console=False), tmp_path, total_steps=3, training=False)
    sinks.log(2, {"val/acc_avg@4": 0.2})  # trainer.val_only on step 2's checkpoint, after the training's step 3
    sinks.close()
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 2]
    assert curve(rows, "val/acc_avg@4") == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 0.3)]
    assert plot_run(tmp_path).is_file()


def test_the_plot_command_names_a_folder_that_is_no_run(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_dapo", "plot", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"megatron-dapo: {tmp_path / 'nowhere' / 'metrics.jsonl'} does not exist: is" in proc.stderr


class _WandbRun:
    """A W&B run as its SDK treats rows (wandb 0.31): a row whose explicit `step` is not above the run's last one is
    dropped with a warning; rows without one are numbered on. define_metric names the x axis of the figures."""

    def __init__(self, history):
        self.history, self.last_step, self.axes = history, -1, {}

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, row, step=None):
        if step is not None and step <= self.last_step:
            return  # "Tried to log to step N that is less than the current step": ignored
        self.last_step = self.last_step + 1 if step is None else step
        self.history.append(dict(row))

    def finish(self):
        pass


def test_w_and_b_gets_the_rows_of_steps_trained_again_after_a_resume(tmp_path, monkeypatch):
    """A resumed attempt logs steps the W&B run was already sent (trained again from an older checkpoint, and the
    validation a stop skipped at the checkpoint's step): each reaches W&B with its training step as its x axis."""
    import sys
    import types

    history, inits = [], []
    stand_in = types.ModuleType("wandb")

    def init(**kwargs):
        inits.append(kwargs)
        return run

    run = _WandbRun(history)
    stand_in.init = init
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    config = LoggingConfig(console=False, jsonl=False, wandb_project="p")
    for start, rows in ((0, [(0, 0.1), (1, 0.2), (2, 0.3)]), (1, [(1, 0.4), (2, 0.5)])):
        sinks = MetricSinks(config, tmp_path, total_steps=3)
        sinks.training_starts(start, None if start == 0 else tmp_path / "checkpoints" / "step_000001")
        for step, value in rows:
            sinks.log(step, {"val/acc": value})
        sinks.close()
    assert run.axes == {"trainer/step": None, "*": "trainer/step"}
    assert [(row["trainer/step"], row["val/acc"]) for row in history] == [(0, 0.1), (1, 0.2), (2, 0.3), (1, 0.4),
                                                                          (2, 0.5)]
    assert inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"  # one W&B run for the run folder


def test_a_failing_sink_keeps_no_other_from_the_row_and_is_named(tmp_path, capsys):
    """metrics.jsonl on a full disk: the console still shows the row, and SinkError names the sink that failed, for
    the trainer to write the row there when the run resumes; a row already in the file is found, not written twice."""
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    sinks = MetricSinks(LoggingConfig(console=True), tmp_path, total_steps=2)
    with pytest.raises(SinkError) as failed:
        sinks.log(1, {"critic/acc_mean": 0.25})
    assert list(failed.value.failed) == ["metrics.jsonl"] and failed.value.step == 1
    assert "step 1's metrics row could not be written to metrics.jsonl (OSError: [Errno 28]" in str(failed.value)
    assert "step 1/2 acc=0.25" in capsys.readouterr().err
    with pytest.raises(OSError, match="No space left on device"):  # its buffer fails again, and is said
        sinks.close()
    (tmp_path / "metrics.jsonl").unlink()
    sinks = MetricSinks(LoggingConfig(console=True), tmp_path, total_steps=2)
    assert not sinks.has_row(1, {"critic/acc_mean": 0.25})
    sinks.log(1, {"critic/acc_mean": 0.25}, only=["metrics.jsonl"])
    assert capsys.readouterr().err == ""  # the console had it
    assert sinks.has_row(1, {"critic/acc_mean": 0.25}) and not sinks.has_row(1, {"val/acc": 0.5})
    sinks.close()
    assert [row["critic/acc_mean"] for row in read_metrics(tmp_path)] == [0.25]

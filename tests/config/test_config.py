"""Config loading: every problem fails before any work starts, naming the key to change."""
import subprocess
import sys

import pytest

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import DAPOConfig, dump_config, load_config

GOOD = """
data: {gen_batch_size: 24, train_batch_size: 8, max_response_length: 512}
rollout: {n: 4, temperature: 1.0}
actor: {clip_ratio_low: 0.2, clip_ratio_high: 0.28, ppo_mini_batch_size: 4, loss_agg_mode: token-mean}
reward: {overlong_buffer: {enable: true, len: 128, penalty_factor: 1.0}}
algorithm: {filter_groups: {enable: true, metric: acc, max_num_gen_batches: 5}}
parallel: {tensor_model_parallel_size: 2, pipeline_model_parallel_size: 2}
"""


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


def _error(path, *overrides, world_size=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides), world_size=world_size)
    return str(err.value)


def test_yaml_and_overrides_resolve(good):
    config = load_config(good, ["actor.clip_ratio_high=0.3", "algorithm.filter_groups.metric=score",
                                "rollout.top_p=0.7", "actor.optim.betas=[0.9, 0.95]"], world_size=8)
    assert isinstance(config, DAPOConfig)
    assert config.actor.clip_ratio_high == 0.3 and config.algorithm.filter_groups.metric == "score"
    assert config.data.gen_batch_size == 24 and config.rollout.n == 4 and config.rollout.top_p == 0.7
    assert config.actor.optim.betas == (0.9, 0.95)
    layout = config.parallel.layout(8)
    assert (layout.tp, layout.pp, layout.dp) == (2, 2, 2)
    assert load_config(None).actor.clip_ratio_high == 0.28  # the paper's defaults


def test_int_is_accepted_for_float(good):
    assert load_config(good, ["actor.clip_ratio_c=3"]).actor.clip_ratio_c == 3.0


def test_exponent_without_a_dot_is_a_float(good, tmp_path):
    """YAML 1.1 reads 1e-6 (no dot) as a string; a float field takes it as the number it means, in the file
    and on the command line, and a string that is no number still names the key."""
    assert load_config(good, ["actor.optim.lr=1e-6", "actor.optim.min_lr=+2E-7"]).actor.optim.min_lr == 2e-7
    path = tmp_path / "lr.yaml"
    path.write_text(GOOD.replace("ppo_mini_batch_size: 4,", "ppo_mini_batch_size: 4, optim: {lr: 5e-7},"))
    assert load_config(path).actor.optim.lr == 5e-7
    assert "actor.optim.lr: expected float, got str '1e-6x'" in _error(good, "actor.optim.lr=1e-6x")


def test_an_empty_text_is_refused_and_none_is_null(good):
    """`model.megatron_checkpoint=$CKPT` with CKPT unset gave '' (the current folder, whose missing COMPLETE.json
    the checkpoint error then asked to delete); `logging.wandb_project=None` gave a W&B project named "None"."""
    for override in ("model.megatron_checkpoint=", "trainer.run_dir=", "data.prompt_key= "):
        key = override.partition("=")[0]
        assert f"override {key}: the value is empty; leave the setting out for its default" in _error(good, override)
    # Quoted, or in the file: an empty text is as empty (run_dir "" put the run's files in the current folder).
    for override in ("trainer.run_dir=''", 'model.megatron_checkpoint=""', "data.prompt_key=''"):
        key = override.partition("=")[0]
        assert f"{key}: the value is empty; leave the setting out for its default" in _error(good, override)
    path = good.parent / "empty_text.yaml"
    path.write_text(GOOD + 'model: {megatron_checkpoint: ""}\n')
    assert "model.megatron_checkpoint: the value is empty" in _error(path)
    config = load_config(good, ["logging.wandb_project=None", "model.megatron_checkpoint=null"])
    assert config.logging.wandb_project is None and config.model.megatron_checkpoint is None
    assert load_config(good, ["logging.wandb_project='None'"]).logging.wandb_project == "None"  # quoted: text


def test_validating_only_without_resuming_is_refused(good):
    """It would score model.path's weights and log them as step 0 of a run folder that holds later checkpoints."""
    assert "checkpoint.resume=false would have it validate model.path's weights" in _error(
        good, "trainer.val_only=true", "data.val_files=[v.jsonl]", "checkpoint.resume=false")
    assert load_config(good, ["trainer.val_only=true", "data.val_files=[v.jsonl]"]).trainer.val_only


def test_the_last_of_a_key_given_twice_on_the_command_line_wins(good):
    """An sbatch script's own overrides come first and the user's "$@" after: the later ones win, also over a
    section given whole between them."""
    config = load_config(good, ["actor.optim.lr=1e-5", "actor.optim={lr: 3e-6, min_lr: 1e-7}", "actor.optim.lr=2e-6"])
    assert (config.actor.optim.lr, config.actor.optim.min_lr) == (2e-6, 1e-7)
    # A section given whole twice: the second merges into the first, as into the file's.
    config = load_config(good, ["actor.optim={lr: 3e-6, weight_decay: 0.0}", "actor.optim={min_lr: 1e-7}"])
    assert (config.actor.optim.lr, config.actor.optim.weight_decay, config.actor.optim.min_lr) == (3e-6, 0.0, 1e-7)


def test_numbers_are_read_as_yaml_1_2_reads_them(good, tmp_path):
    """PyYAML's YAML 1.1 reads 010 as octal 8 and 1:30 as base-60 90, silently: here 010 is ten, a colon makes
    text (which a number setting refuses by name), and 1e-5 is a number in free-form settings too."""
    config = load_config(good, ["trainer.total_training_steps=000500", "trainer.seed=010",
                                "rollout.sglang.server_args={x: 1e-5, y: 0x10}"])
    assert (config.trainer.total_training_steps, config.trainer.seed) == (500, 10)
    assert config.rollout.sglang.server_args == {"x": 1e-5, "y": 16}
    assert "trainer.test_freq: expected int, got str '1:00'" in _error(good, "trainer.test_freq=1:00")
    assert "trainer.rollout_timeout_s: expected float, got str '1:30'" in _error(good, "trainer.rollout_timeout_s=1:30")
    path = tmp_path / "seed.yaml"
    path.write_text(GOOD + "trainer: {seed: 0042}\n")
    assert load_config(path).trainer.seed == 42
    assert load_config(good, ["rollout.sglang.server_args={a: -0x10, b: 0b101, c: -.5}"]).rollout.sglang.server_args \
        == {"a": -16, "b": 5, "c": -0.5}
    assert "'1:30' is not an integer" in _error(good, "trainer.seed=!!int 1:30")
    # A text that reads as a number here is quoted when a config is written, so it reads back as text.
    config = load_config(good, ["trainer.run_dir=1e3", "logging.wandb_run_name=010"])
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config and config.trainer.run_dir == "1e3"
    assert "below 1e9, got 2000000000.0" in _error(good, "trainer.rollout_timeout_s=2e9")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["actor.clip_ratio_hgh=0.3"], "unknown key actor.clip_ratio_hgh (did you mean actor.clip_ratio_high?)"),
        (["trainer.nonsense=1"], "unknown key trainer.nonsense"),
        (["data.gen_batch_size=abc"], "data.gen_batch_size: expected int, got str 'abc'"),
        (["data.gen_batch_size=2.5"], "data.gen_batch_size: expected int, got float 2.5"),
        (["algorithm.filter_groups.enable=1"], "algorithm.filter_groups.enable: expected bool, got int 1"),
        (["rollout.n=true"], "rollout.n: expected int, got bool True"),
        (["actor.loss_agg_mode=mean"], "actor.loss_agg_mode: 'mean' is not one of 'token-mean'"),
        (["rollout=3"], "rollout: expected a section (mapping), got int 3"),
        (["data.gen_batch_size=4"], "set data.gen_batch_size >= data.train_batch_size"),
        (["actor.clip_ratio_high=0.1"], "set actor.clip_ratio_high >= actor.clip_ratio_low"),
        (["reward.overlong_buffer.len=512"], "reward.overlong_buffer.len (512) >= data.max_response_length (512)"),
        (["rollout.n=1"], "rollout.n is 1: algorithm.adv_estimator=grpo"),
        (["rollout.n=1", "algorithm.filter_groups.enable=false"], "set rollout.n >= 2"),
        (["rollout.top_k=1"], "rollout.top_k=1 samples greedily"),
        (["reward.worker_max_rss_gb=0"], "reward.worker_max_rss_gb must be > 0 or null, got 0"),
        (["trainer.seed=-1"], "trainer.seed must be in [0, 2**32), got -1"),
        (["actor.ppo_mini_batch_size=3"], "actor.ppo_mini_batch_size (3) does not divide data.train_batch_size (8)"),
        (["parallel.virtual_pipeline_model_parallel_size=2", "parallel.pipeline_model_parallel_size=1"],
         "parallel.virtual_pipeline_model_parallel_size needs parallel.pipeline_model_parallel_size >= 2"),
        (["parallel.virtual_pipeline_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
         "parallel.virtual_pipeline_model_parallel_size: the actor does not support an interleaved"),
        (["actor.clip_ratio_high"], "is not of the form dotted.key=value"),
        (["reward.overlong_buffer.penalty_factor=.inf"],
         "reward.overlong_buffer.penalty_factor: expected a finite number, got inf"),
        (["actor.optim.grad_clip=.nan"], "actor.optim.grad_clip: expected a finite number, got nan"),
        (["trainer.rollout_timeout_s=1" + "0" * 400], "trainer.rollout_timeout_s: expected a finite number"),
        (["actor.optim.betas=[0.9, 1.0]"], "actor.optim.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
        (["actor.optim.weight_decay=-0.1"], "actor.optim.weight_decay must be >= 0, got -0.1"),
        (["actor.optim.eps=0"], "actor.optim.eps must be > 0, got 0"),
        (["actor.clip_ratio_c=-.inf"], "actor.clip_ratio_c: expected a finite number, got -inf"),
        (["data.gen_batch_size.x=1"], "override data.gen_batch_size.x: data.gen_batch_size is a setting (int), not a "
                                      "section"),
        (["trainer.seed.x=1"], "override trainer.seed.x: trainer.seed is a setting (int), not a section"),
        (["data.train_files.0=a.jsonl"], "data.train_files is a setting (list[str]), not a section"),
        (["actor.tis_imp_ratio_cap.x=1"], "actor.tis_imp_ratio_cap is a setting (float | None), not a section"),
        (["reward.functions.a.b=m.x:f"], "reward.functions.a: expected str, got dict {'b': 'm.x:f'}"),
    ],
)
def test_each_problem_names_the_key(good, overrides, expected):
    assert expected in _error(good, *overrides)


def test_an_unknown_key_keeps_no_other_problem_of_its_section_from_being_said(good):
    """Every problem at once: a section with an unknown key still checks its known values' ranges; a value of
    the wrong type is said alone for its section (its checks would trip on it)."""
    message = _error(good, "actor.clip_ratio_low=2", "actor.bogus=1", "data.gen_batch_size=0", "trainer.seed=abc")
    for problem in ("unknown key actor.bogus", "actor.clip_ratio_low must be in [0, 1), got 2.0",
                    "data.gen_batch_size must be >= 1, got 0", "trainer.seed: expected int, got str 'abc'"):
        assert problem in message, message
    assert _error(good, "actor.bogus=1") == "unknown key actor.bogus"  # and nothing more of a valid section
    # Within a nested section too: the values its parent checks, and the checks across sections, still run.
    message = _error(good, "actor.optim.bogus=1", "actor.optim.lr=-1", "actor.clip_ratio_low=5")
    for problem in ("unknown key actor.optim.bogus", "actor.optim.lr must be > 0, got -1.0",
                    "actor.clip_ratio_low must be in [0, 1), got 5.0"):
        assert problem in message, message
    message = _error(good, "data.bogus=1", "rollout.n=1")
    assert "unknown key data.bogus" in message and "set rollout.n >= 2" in message, message


def test_all_problems_are_reported_together(good):
    message = _error(good, "actor.clip_ratio_hgh=0.3", "data.gen_batch_size=abc")
    assert message.startswith("2 config problems")
    assert "actor.clip_ratio_hgh" in message and "data.gen_batch_size" in message
    message = _error(good, "algorithm.filter_groups.max_num_gen_batches=-1", "algorithm.filter_groups.metric=''")
    assert message == "algorithm.filter_groups.metric: the value is empty; leave the setting out for its default " \
        "(null unsets an optional one)"  # the loader's: the section is not built with it
    from megatron_dapo.sampling.config import FilterGroupsConfig

    with pytest.raises(ConfigError) as err:  # built in code: the section's own checks, all at once
        FilterGroupsConfig(max_num_gen_batches=-1, metric="")
    assert str(err.value).startswith("2 config problems") and "max_num_gen_batches" in str(err.value)


def test_layout_must_divide_the_world_size(good):
    message = _error(good, world_size=6)
    assert "parallel.tensor_model_parallel_size (2) x parallel.pipeline_model_parallel_size (2) = 4" in message
    assert "world size 6" in message


def test_sequence_parallel_is_off_without_tensor_parallel(good):
    config = load_config(good, ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=true"])
    assert not config.parallel.layout(4).sequence_parallel


def test_text_settings_take_the_command_line_text(good):
    """YAML would read these as a number, a date, a bool, null or a comment; a text setting means the text."""
    config = load_config(good, ["trainer.run_dir=2024-01-01", "logging.wandb_run_name=42", "logging.wandb_project=on",
                                "model.path=/models/a #1", "model.tokenizer_path='007'"])
    assert config.trainer.run_dir == "2024-01-01" and config.logging.wandb_run_name == "42"
    assert config.logging.wandb_project == "on" and config.model.path == "/models/a #1"
    assert config.model.tokenizer_path == "007"
    assert load_config(good, ["model.tokenizer_path=null"]).model.tokenizer_path is None
    assert load_config(good, ["trainer.seed=0x10"]).trainer.seed == 16  # other settings read YAML as before
    for text in ("@exp", "a: b", "- a", "%d", "[1]"):  # not YAML, or YAML of another type: still the text
        assert load_config(good, [f"logging.wandb_run_name={text}"]).logging.wandb_run_name == text
    assert "override trainer.seed: value '@x' is not valid YAML (found character '@' that cannot start any token)" \
        in _error(good, "trainer.seed=@x")
    assert "trainer.seed is a setting (int), not a section" in _error(good, "trainer.seed=3", "trainer.seed.x=1")
    assert "reward.functions.a: expected str, got int 3" in _error(good, "reward.functions={a: 3}")
    assert "reward.functions.a must be 'package.module:function'" in _error(good, "reward.functions.a=3")


def test_a_section_on_the_command_line_is_merged_into_the_files(good):
    config = load_config(good, ["actor.optim.lr=2e-6", "actor.optim={weight_decay: 0.0}",
                                "algorithm.filter_groups={max_num_gen_batches: 0}"])
    assert config.actor.optim.lr == 2e-6 and config.actor.optim.weight_decay == 0.0
    assert config.algorithm.filter_groups.metric == "acc" and config.algorithm.filter_groups.max_num_gen_batches == 0
    assert config.actor.clip_ratio_high == 0.28 and config.actor.ppo_mini_batch_size == 4
    # A mapping setting is replaced, not merged: the command line can drop an entry.
    functions = load_config(good, ["reward.functions={a: m.x:f, b: m.y:f}", "reward.functions={a: m.z:f}"])
    assert functions.reward.functions == {"a": "m.z:f"}
    assert load_config(good, ["rollout.sglang.server_args={x: 1}", "rollout.sglang={server_args: {}}"]) \
        .rollout.sglang.server_args == {}
    # A section given whole, then one of its keys (here sections the file leaves out): both apply.
    config = load_config(good, ["logging={console: false}", "logging.samples_per_step=3",
                                "checkpoint={keep_last: 5}", "checkpoint.save_freq=7"])
    assert not config.logging.console and config.logging.samples_per_step == 3
    assert (config.checkpoint.keep_last, config.checkpoint.save_freq) == (5, 7)
    assert load_config(good, ["reward.functions={a: m.x:f}", "reward.functions.b=m.y:f"]).reward.functions == {
        "a": "m.x:f", "b": "m.y:f"}
    # A section given whole, then its parent section given whole: merged, the earlier keys kept.
    config = load_config(good, ["actor.optim={lr: 2e-6}", "actor={optim: {weight_decay: 0.0}}"])
    assert (config.actor.optim.lr, config.actor.optim.weight_decay) == (2e-6, 0.0)


def test_a_mapping_s_keys_must_be_text(tmp_path):
    """YAML reads `2024:` as a number and `yes:` as true; a data_source is text, so such a key would never match
    the rows it was meant for."""
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("reward:\n  functions:\n    2024: m.x:f\n    yes: m.y:f\n    '2025': m.z:f\n")
    message = _error(numbers)
    assert message.startswith("2 config problems"), message
    assert "reward.functions: key 2024 (int) is not text" in message and "key True (bool) is not text" in message
    assert "quote it in the YAML file" in message


def test_a_key_given_twice_is_refused(good, tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text(GOOD + "actor: {optim: {lr: 1e-6}}\n")
    message = _error(twice)
    assert "key 'actor' appears twice" in message and "line 4" in message and "line 8" in message
    assert "key 'lr' appears twice" in _error(good, "actor.optim={lr: 1e-6, lr: 2e-6}")
    assert "found unhashable key" in _error(good, "reward.functions={[a]: 1}")
    merged = tmp_path / "merged.yaml"  # a YAML merge key's entries may be overridden, as YAML means
    merged.write_text(GOOD.replace("rollout: {n: 4, temperature: 1.0}",
                                   "base: &base {n: 4, temperature: 1.0}\nrollout: {<<: *base, n: 8}")
                      .replace("base: &base", "x-base: &base"))
    assert "unknown key x-base" in _error(merged)


def test_a_section_left_empty_takes_its_defaults(good, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text(GOOD + "checkpoint:\n  # save_freq: 10\n")
    assert load_config(empty).checkpoint == load_config(good).checkpoint
    assert load_config(empty, ["checkpoint.save_freq=7"]).checkpoint.save_freq == 7


def test_missing_and_malformed_files(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in _error(bad)


def test_dump_round_trips(good, tmp_path):
    config = load_config(good, ["actor.clip_ratio_high=0.3"])
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_cli_prints_the_resolved_config(good):
    cmd = [sys.executable, "-m", "megatron_dapo", "config", str(good), "actor.clip_ratio_high=0.3", "--world-size", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "clip_ratio_high: 0.3" in out and "# layout: TP2 x PP2 x DP2 = 8 ranks" in out


def test_cli_gives_one_setting_as_the_run_reads_it(good):
    """`config --get KEY`, what the sbatch scripts take the run folder from: the last override wins, read as YAML
    (quotes and a section's mapping included); a key that is no setting, or a section, is named."""
    def get(*args):
        return subprocess.run([sys.executable, "-m", "megatron_dapo", "config", "--get", *args], capture_output=True,
                              text=True)

    quoted = get("trainer.run_dir", str(good), "trainer.run_dir=runs/a", 'trainer.run_dir="runs/b c"')
    assert quoted.stdout == "runs/b c\n", quoted.stderr
    assert get("trainer.run_dir", str(good), "trainer.run_dir=runs/a", "trainer={run_dir: runs/d}").stdout == "runs/d\n"
    # Anything but text as JSON: null, true, a list.
    assert get("model.megatron_checkpoint", str(good)).stdout == "null\n"
    assert get("trainer.val_before_train", str(good), "trainer.val_before_train=true").stdout == "true\n"
    assert get("data.val_files", str(good), "data.val_files=[a.jsonl, b c.jsonl]").stdout == '["a.jsonl", "b c.jsonl"]\n'
    for key, said in (("trainer.rundir", "'trainer.rundir': no such setting"), ("", "'': no such setting"),
                      ("trainer", "trainer: a section; name one of its settings")):
        proc = get(key, str(good))
        assert proc.returncode == 2 and f"config error: --get {said}" in proc.stderr, proc.stderr


def test_cli_reports_config_errors_without_a_traceback(good):
    cmd = [sys.executable, "-m", "megatron_dapo", "config", str(good), "actor.clip_ratio_hgh=0.3"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config error: unknown key actor.clip_ratio_hgh" in proc.stderr and "Traceback" not in proc.stderr


def test_config_changes_name_each_setting(good):
    from megatron_dapo.config.root import config_changes, dump_config

    before = load_config(good)
    after = load_config(good, ["actor.optim.lr=2e-6", "rollout.n=8", "data.val_files=[a.jsonl]"])
    assert config_changes(dump_config(before), before) == []
    assert config_changes(dump_config(before), after) == [
        f"actor.optim.lr: {before.actor.optim.lr} -> 2e-06",
        f"data.val_files: {before.data.val_files} -> ['a.jsonl']", "rollout.n: 4 -> 8"]
    changes = config_changes("trainer: {seed: 1}\nold_section: {x: 1}\n", before)
    assert changes[0] == "actor.clip_ratio_c: (unset) -> 10.0" and "old_section.x: 1 -> (unset)" in changes


HIDE_PACKAGE = """
import sys
sys.modules["{package}"] = None  # this interpreter has no {package} (import fails, find_spec finds none)
from megatron_dapo.config.loader import ConfigError
from megatron_dapo.metrics.config import LoggingConfig
from megatron_dapo.metrics.sinks import check_sink_packages
check_sink_packages(LoggingConfig())  # no sink asked for: nothing needed
try:
    check_sink_packages(LoggingConfig({setting}))
except ConfigError as err:
    print(err)
else:
    print("accepted")
"""


@pytest.mark.parametrize(("package", "setting"), [("wandb", "wandb_project='p'"), ("tensorboard", "tensorboard=True")])
def test_a_sink_without_its_package_is_refused_naming_both(package, setting):
    proc = subprocess.run([sys.executable, "-c", HIDE_PACKAGE.format(package=package, setting=setting)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"needs the {package} package, which is not installed: pip install 'megatron-dapo[{package}]', or turn "
            "the setting off") in proc.stdout, proc.stdout
    if package == "tensorboard":  # installed with the test extras: accepted where it is there
        from megatron_dapo.metrics.config import LoggingConfig
        from megatron_dapo.metrics.sinks import check_sink_packages

        check_sink_packages(LoggingConfig(tensorboard=True))

"""The root config: composes one config per concern and checks the rules that span stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from megatron_dapo.actor.config import ActorConfig
from megatron_dapo.checkpoint.config import CheckpointConfig
from megatron_dapo.config.loader import (ConfigDumper, ConfigError, apply_overrides, from_dict, load_yaml, parse_overrides,
                                         to_dict)
from megatron_dapo.data.config import DataConfig
from megatron_dapo.metrics.config import LoggingConfig
from megatron_dapo.models.config import ModelConfig
from megatron_dapo.parallel.config import ParallelConfig
from megatron_dapo.reward.config import RewardConfig
from megatron_dapo.rollout.config import RolloutConfig
from megatron_dapo.sampling.config import FilterGroupsConfig


@dataclass(kw_only=True)
class AlgorithmConfig:
    adv_estimator: Literal["grpo"] = "grpo"
    """Group-normalized advantages over the rollout.n responses of one prompt."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide by the group's standard deviation (False: subtract the group mean only)."""
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    """Dynamic sampling."""
    overlong_filtering: bool = True
    """Mask the loss of truncated responses (the paper's overlong filtering), and leave them out of their group's
    mean and std and of dynamic sampling's test (trainer/groups.py, Group.counted)."""


@dataclass(kw_only=True)
class TrainerConfig:
    run_dir: str = "runs/dapo"
    """Run folder: metrics, checkpoints, plots. Training again in the same folder resumes; one training at a time
    (a second is refused while the first holds its RUNNING file, trainer/lock.py)."""
    total_training_steps: int = 100
    """Rollout steps to train for."""
    test_freq: int = 10
    """Validate every this many steps and after the last one (a stop request skips a validation that is due);
    0: no validation while training (trainer.val_before_train still validates before it)."""
    val_before_train: bool = True
    """Validate once before the first step."""
    val_only: bool = False
    """Validate the run folder's latest checkpoint (the starting weights when there is none) once, log it
    at that step, and exit without training."""
    seed: int = 1
    """Seed for data order, sampling and initialisation."""
    rollout_timeout_s: float = 14400.0
    """How long a rank waits on rollout (rank 0's next word, the slowest engine's share of a generation batch)
    or on rank 0's Hugging Face copy of a checkpoint before it gives up; training collectives keep torch's
    30 minutes."""

    def __post_init__(self) -> None:
        if not 0 < self.rollout_timeout_s < 1e9:  # NaN and infinity fail too
            raise ConfigError(f"trainer.rollout_timeout_s must be a number of seconds > 0 and below 1e9, got "
                              f"{self.rollout_timeout_s}")
        if self.total_training_steps < 0:
            raise ConfigError(f"trainer.total_training_steps must be >= 0, got {self.total_training_steps}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"trainer.seed must be in [0, 2**32), got {self.seed}")
        if self.test_freq < 0:
            raise ConfigError(f"trainer.test_freq must be >= 0 (0 disables), got {self.test_freq}")


@dataclass(kw_only=True)
class DAPOConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Run folder, length and seed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and batch sizes."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward shaping."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages, dynamic sampling, overlong filtering."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Policy loss and optimizer."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Megatron parallel layout."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks."""

    def __post_init__(self) -> None:
        problems = []
        buffer = self.reward.overlong_buffer
        if buffer.enable and buffer.len >= self.data.max_response_length:
            problems.append(
                f"reward.overlong_buffer.len ({buffer.len}) >= data.max_response_length "
                f"({self.data.max_response_length}): the buffer must leave room for unpunished responses; "
                "lower reward.overlong_buffer.len or raise data.max_response_length"
            )
        data = self.data
        if self.algorithm.filter_groups.enable and data.train_batch_size > data.gen_batch_size:
            problems.append(
                f"data.train_batch_size ({data.train_batch_size}) > data.gen_batch_size ({data.gen_batch_size}): "
                "set data.gen_batch_size >= data.train_batch_size (dynamic sampling over-samples, it never "
                "under-samples)"
            )
        if self.rollout.n < 2:
            problems.append(
                f"rollout.n is {self.rollout.n}: algorithm.adv_estimator={self.algorithm.adv_estimator} compares "
                "each response with the others to the same prompt, so a group of one has advantage 0 and never "
                "trains (nor does it vary, as dynamic sampling needs); set rollout.n >= 2"
            )
        if self.actor.offload and self.rollout.mode != "colocated":
            problems.append(
                f"actor.offload frees the actor's GPU memory for a colocated rollout engine, but rollout.mode is "
                f"{self.rollout.mode!r}: set actor.offload=false"
            )
        if self.parallel.virtual_pipeline_model_parallel_size is not None:
            problems.append("parallel.virtual_pipeline_model_parallel_size: the actor does not support an interleaved "
                            "(virtual) pipeline yet; set it to null")
        if self.trainer.val_only and not self.data.val_files:
            problems.append("trainer.val_only validates, but data.val_files is empty: name the validation files")
        if self.trainer.val_only and not self.checkpoint.resume:  # it would score model.path and log it as step 0
            problems.append("trainer.val_only validates the run folder's latest checkpoint, but "
                            "checkpoint.resume=false would have it validate model.path's weights instead: set "
                            "checkpoint.resume=true (a folder without checkpoints validates the starting weights)")
        mini, train = self.actor.ppo_mini_batch_size, self.data.train_batch_size
        if train % mini:
            problems.append(
                f"actor.ppo_mini_batch_size ({mini}) does not divide data.train_batch_size ({train}): "
                "each rollout batch must split into whole mini-batches"
            )
        if problems:
            raise ConfigError(problems)

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps of a training step (a full rollout batch): the learning-rate schedule moves by this much
        every training step."""
        return self.data.train_batch_size // self.actor.ppo_mini_batch_size * self.actor.ppo_epochs

    def unreached_decay(self) -> str | None:
        """Why the learning-rate decay the config asks for never starts, or None. A decay over the run
        (actor.optim.lr_decay_steps=0) starts after the warm-up; a run whose optimizer steps all fall within the
        warm-up (a short test of a recipe) trains at the warm-up's rates alone. Not an error: the run is still
        what it says, and a later run with more steps decays."""
        optim = self.actor.optim
        steps = self.trainer.total_training_steps * self.updates_per_step
        if optim.lr_decay_style == "constant" or optim.lr_decay_steps or steps > optim.lr_warmup_steps + 1:
            return None
        return (f"actor.optim.lr_decay_style={optim.lr_decay_style} decays over the run (lr_decay_steps=0), but the "
                f"run's {steps} optimizer steps ({self.trainer.total_training_steps} x {self.updates_per_step}) "
                f"end before the decay starts, after lr_warmup_steps ({optim.lr_warmup_steps}): the learning rate "
                "never decays; set actor.optim.lr_decay_steps or shorten the warm-up")


def load_config(path: str | Path | None, overrides: list[str] = (), world_size: int | None = None) -> DAPOConfig:
    """YAML file (or defaults when None) + dotted overrides -> validated DAPOConfig.

    With `world_size`, the parallel layout is also checked against it.
    """
    raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, parse_overrides(list(overrides)), root=DAPOConfig)
    config = from_dict(DAPOConfig, raw)
    if world_size is not None:
        config.parallel.layout(world_size)
    return config


def dump_config(config: DAPOConfig) -> str:
    return yaml.dump(_plain(to_dict(config)), Dumper=ConfigDumper, sort_keys=False)


def config_changes(before: str, after: DAPOConfig) -> list[str]:
    """'key: old -> new' for each setting of `after` that differs from the YAML `before` (dump_config's form);
    keys only one side has count too."""
    def flat(node, prefix=""):
        if not isinstance(node, dict):
            return {prefix[:-1]: node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    try:
        old = flat(yaml.safe_load(before) or {})
    except yaml.YAMLError:
        return ["(the earlier config.yaml does not parse)"]
    new = flat(yaml.safe_load(dump_config(after)))
    missing = object()
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in sorted(old.keys() | new.keys())
            if old.get(key, missing) != new.get(key, missing)]


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

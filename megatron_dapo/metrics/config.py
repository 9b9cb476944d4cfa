from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class LoggingConfig:
    console: bool = True
    """Progress bar and a metrics line per step on the console."""
    jsonl: bool = True
    """metrics.jsonl in the run folder, one line per step."""
    tensorboard: bool = False
    """TensorBoard event files under the run folder's tensorboard/."""
    wandb_project: str | None = None
    """Weights & Biases project; None disables it."""
    wandb_run_name: str | None = None
    """Weights & Biases run name; defaults to the run folder's name."""
    progress_interval_s: float = 30.0
    """In a step, a console line after a generation batch (groups kept so far, dropped, seconds) once this long has
    passed since the step began or since the last line, and one as a phase (update, reshard, ...) ends that took
    this long; 0: after every generation batch and phase."""
    samples_per_step: int = 2
    """Responses written as text to samples.jsonl each step and each validation (metrics/samples.py); 0: none."""
    val_generations: bool = False
    """Every validation response as text (with score, answer read, data_source) in
    RUN_DIR/val_generations/step_NNNNNN.jsonl."""

    def __post_init__(self) -> None:
        if self.progress_interval_s < 0:
            from megatron_dapo.config.loader import ConfigError

            raise ConfigError(f"logging.progress_interval_s must be >= 0, got {self.progress_interval_s}")
        if self.samples_per_step < 0:
            from megatron_dapo.config.loader import ConfigError

            raise ConfigError(f"logging.samples_per_step must be >= 0, got {self.samples_per_step}")

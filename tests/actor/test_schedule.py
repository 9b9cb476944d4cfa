"""The learning-rate schedule: linear warm-up, then constant or a cosine / linear decay to min_lr."""
import math

import pytest

from megatron_dapo.actor.actor import learning_rate
from megatron_dapo.actor.config import ActorConfig, OptimConfig
from megatron_dapo.config.loader import ConfigError


def test_warm_up_then_constant():
    optim = OptimConfig(lr=1.0, lr_warmup_steps=4)
    assert [learning_rate(optim, s, last_step=9) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(OptimConfig(lr=0.5, lr_warmup_steps=0), 0) == 0.5


def test_cosine_decay_worked_out():
    # warm-up 2 steps, decay from step 2 (progress 0) to step 6 (progress 1): lr = 0.1 + 0.9 * (1 + cos(pi p)) / 2
    optim = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_steps=2, lr_decay_style="cosine", lr_decay_steps=6)
    got = [learning_rate(optim, s) for s in range(9)]
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55,
                0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1, 0.1, 0.1]
    assert got == pytest.approx(expected, abs=1e-12)


def test_linear_decay_ends_at_the_runs_last_step_by_default():
    optim = OptimConfig(lr=1.0, min_lr=0.2, lr_warmup_steps=0, lr_decay_style="linear")
    assert [learning_rate(optim, s, last_step=4) for s in range(6)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    assert learning_rate(optim, 3) == 1.0  # no run length given and none configured: nothing to decay over


@pytest.mark.parametrize("optim, key", [
    (dict(lr=1e-6, min_lr=2e-6), "actor.optim.min_lr"),
    (dict(lr_decay_steps=-1), "actor.optim.lr_decay_steps"),
    (dict(lr_decay_style="cosine", lr_warmup_steps=20, lr_decay_steps=10), "actor.optim.lr_decay_steps (10) must be >"),
])
def test_bad_schedules_name_the_key(optim, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        ActorConfig(optim=OptimConfig(**optim))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_a_decay_over_a_run_that_ends_within_its_warm_up_is_pointed_out(steps):
    """toy config: 2 optimizer steps per training step, warm-up 2: a decay over the run needs > 3 of them."""
    from pathlib import Path

    from megatron_dapo.config.root import load_config

    toy = Path(__file__).resolve().parents[2] / "examples" / "toy" / "config.yaml"
    config = load_config(toy, [f"trainer.total_training_steps={steps}", "actor.optim.lr_decay_style=cosine",
                               "actor.optim.min_lr=0"])
    assert config.updates_per_step == 2
    last = steps * config.updates_per_step - 1
    rates = [learning_rate(config.actor.optim, s, last_step=last) for s in range(last + 1)]
    decays = rates[-1] < config.actor.optim.lr
    note = config.unreached_decay()
    assert (note is None) == decays, (rates, note)
    if note:
        assert note.startswith("actor.optim.lr_decay_style=cosine decays over the run (lr_decay_steps=0), but the "
                               f"run's {2 * steps} optimizer steps ({steps} x 2) end before the decay starts")
    assert load_config(toy, [f"trainer.total_training_steps={steps}"]).unreached_decay() is None  # constant
    assert load_config(toy, [f"trainer.total_training_steps={steps}", "actor.optim.lr_decay_style=cosine",
                             "actor.optim.lr_decay_steps=5"]).unreached_decay() is None  # a decay of its own

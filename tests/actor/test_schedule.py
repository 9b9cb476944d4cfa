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

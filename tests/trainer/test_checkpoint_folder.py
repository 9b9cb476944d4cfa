"""A complete checkpoint in RUN_DIR/checkpoints that no training wrote is named, not a bare KeyError."""
import json

import pytest

from megatron_dapo.actor.checkpoint import CheckpointError
from megatron_dapo.trainer import checkpoints


def test_a_converted_checkpoint_in_the_run_folder_is_named(tmp_path):
    step = tmp_path / "checkpoints" / "step_000000"
    step.mkdir(parents=True)
    (step / "COMPLETE.json").write_text(json.dumps({"actor_steps": 0}))  # as `convert hf-to-mcore` writes it
    assert checkpoints.latest_checkpoint(tmp_path) == step
    with pytest.raises(CheckpointError, match=r"step_000000 is a checkpoint without a training's state .* set "
                                              r"model.megatron_checkpoint to it in a fresh run folder"):
        checkpoints.load(step, actor=None)  # refused before the actor is touched

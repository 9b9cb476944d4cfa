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


def test_a_trainer_state_that_cannot_be_read_is_named(tmp_path):
    """Read at start-up to check the data order before the model is built: a marker that is not JSON (a disk that
    filled while it was written) names its file and what to do, not a bare JSONDecodeError."""
    step = tmp_path / "checkpoints" / "step_000005"
    step.mkdir(parents=True)
    (step / "COMPLETE.json").write_text('{"trainer": {"step": 5')
    with pytest.raises(CheckpointError, match=r"step_000005/COMPLETE.json cannot be read \(JSONDecodeError: .*\); "
                                              r"delete .*step_000005 or point to an earlier checkpoint"):
        checkpoints.saved_trainer_state(step)
    (step / "COMPLETE.json").write_text(json.dumps({"trainer": {"step": 5, "data": {"epoch": 0}}}))
    assert checkpoints.saved_trainer_state(step) == {"step": 5, "data": {"epoch": 0}}


def test_a_hugging_face_copy_that_fails_says_the_checkpoint_is_complete_and_how_to_go_on(tmp_path):
    """The copy of a checkpoint whose shards cannot be converted (here: none): the error names the checkpoint, says
    it is complete, and gives the two ways on (start again once the cause is gone, or train on without copies)."""
    import torch

    step = tmp_path / "checkpoints" / "step_000003"
    step.mkdir(parents=True)
    (step / "COMPLETE.json").write_text(json.dumps({"actor_steps": 3, "trainer": {"step": 3}}))
    copy = checkpoints.HFCopy(dtype=torch.bfloat16, template=tmp_path / "base")
    with pytest.raises(RuntimeError, match=rf"the Hugging Face copy of {step} failed \(\w+: .*\); the checkpoint "
                                           r"itself is complete\. Start again once the cause is gone .* set "
                                           r"checkpoint\.save_hf=false .* convert mcore-to-hf --mcore "):
        checkpoints._write_hf_copy(step, copy)
    assert not (step / "hf").exists()

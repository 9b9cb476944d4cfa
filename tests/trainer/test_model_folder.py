"""A training without a usable model.path stops at once, naming the key (before any process group or lock)."""
import dataclasses

import pytest

from megatron_dapo.config.loader import ConfigError, from_dict
from megatron_dapo.config.root import DAPOConfig
from megatron_dapo.trainer.loop import Trainer


def _config(run_dir, model_path):
    config = from_dict(DAPOConfig, {"trainer": {"run_dir": str(run_dir)}})
    return dataclasses.replace(config, model=dataclasses.replace(config.model, path=model_path))


def test_an_unset_or_wrong_model_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.path is not set"):
        Trainer(_config(tmp_path / "run", ""))
    with pytest.raises(ConfigError, match=f"model.path={tmp_path}: no config.json there"):
        Trainer(_config(tmp_path / "run", str(tmp_path)))
    assert not (tmp_path / "run").exists()  # nothing written

"""Start-up settings checked or made before any process group: model.path, and NCCL settings for SGLang."""
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


def test_an_sglang_rollout_takes_sglang_s_nccl_setting_unless_one_is_set(tmp_path, monkeypatch):
    import os

    from megatron_dapo.trainer.startup import match_sglang_nccl_settings

    monkeypatch.delenv("NCCL_CUMEM_ENABLE", raising=False)
    match_sglang_nccl_settings({})
    assert os.environ["NCCL_CUMEM_ENABLE"] == "0"
    monkeypatch.delenv("NCCL_CUMEM_ENABLE")
    match_sglang_nccl_settings({"enable_symm_mem": True})  # SGLang forces 1 for its symmetric memory
    assert os.environ["NCCL_CUMEM_ENABLE"] == "1"
    monkeypatch.setenv("NCCL_CUMEM_ENABLE", "1")  # the user's choice, for both sides
    match_sglang_nccl_settings({})
    assert os.environ["NCCL_CUMEM_ENABLE"] == "1"

"""rollout.embedded in the run config: loaded, round-tripped through the dump, and checked naming its keys."""
from __future__ import annotations

import pytest

from megatron_dapo.config.loader import ConfigError
from megatron_dapo.config.root import dump_config, load_config
from megatron_dapo.rollout.embedded import EmbeddedEngineConfig


def test_embedded_section_loads_and_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout: {n: 4, embedded: {device: cpu, dtype: bfloat16, max_batch_size: 8, max_seq_len: 256}}\n")
    config = load_config(path)
    assert config.rollout.embedded == EmbeddedEngineConfig(device="cpu", dtype="bfloat16", max_batch_size=8,
                                                           max_seq_len=256)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped) == config
    assert load_config(None).rollout.embedded == EmbeddedEngineConfig()  # max_seq_len null: the model's limit


def test_bad_embedded_values_name_their_keys():
    overrides = ["rollout.embedded.device=gpu", "rollout.embedded.max_batch_size=0", "rollout.embedded.max_seq_len=1"]
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "rollout.embedded.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in message
    assert "rollout.embedded.max_batch_size must be >= 1, got 0" in message
    assert "rollout.embedded.max_seq_len must be >= 2 or null, got 1" in message
    with pytest.raises(ConfigError, match="rollout.embedded.dtype: 'fp8' is not one of"):
        load_config(None, ["rollout.embedded.dtype=fp8"])


def test_bad_sampling_values_name_their_keys_validation_too():
    """rollout.val is checked like rollout (a zero temperature used to divide the logits by zero at the first
    validation, hours in); NaN is refused as it is read, for every float setting, reward.timeout_s's too."""
    for overrides, expected in (
        (["rollout.val.n=0", "rollout.val.temperature=0", "rollout.val.top_p=0", "rollout.val.top_k=0"],
         ["rollout.val.n must be >= 1, got 0", "rollout.val.temperature must be >= 0.001", "rollout.val.top_p",
          "rollout.val.top_k must be -1 (off) or >= 1, got 0"]),
        (["rollout.parity_threshold=-1"], ["rollout.parity_threshold must be >= 0, got -1"]),
        (["rollout.temperature=.nan", "reward.timeout_s=.nan"],
         ["rollout.temperature: expected a finite number, got nan", "reward.timeout_s: expected a finite number"]),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(None, overrides)
        for line in expected:
            assert line in str(err.value), str(err.value)


def test_parity_threshold_defaults_to_the_precision_of_trainer_and_engine():
    """None (the default) resolves to the float32 bound only where the trainer and the embedded engine both run
    float32; a bf16 side, or SGLang, gets the bound for bf16 rounding; a given value is kept."""
    from megatron_dapo.rollout.config import PARITY_FLOAT32, PARITY_HALF

    cpu = load_config(None, ["rollout.embedded.device=cpu"]).rollout
    assert cpu.parity_threshold is None
    assert cpu.parity_threshold_for(trainer_float32=True) == PARITY_FLOAT32
    assert cpu.parity_threshold_for(trainer_float32=False) == PARITY_HALF
    bf16 = load_config(None, ["rollout.embedded.device=cpu", "rollout.embedded.dtype=bfloat16"]).rollout
    assert bf16.parity_threshold_for(trainer_float32=True) == PARITY_HALF
    assert load_config(None, ["rollout.name=sglang"]).rollout.parity_threshold_for(trainer_float32=True) == PARITY_HALF
    given = load_config(None, ["rollout.parity_threshold=0.2", "rollout.embedded.dtype=bfloat16"]).rollout
    assert given.parity_threshold_for(trainer_float32=False) == 0.2
    assert load_config(None, ["rollout.parity_threshold=null"]).rollout.parity_threshold is None

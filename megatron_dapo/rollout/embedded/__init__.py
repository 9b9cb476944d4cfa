"""The embedded PyTorch rollout engine (the default engine; runs on CPU and CUDA).

The architecture comes from `models/arch.py` (`ModelArch`, Qwen2/2.5, Llama 3, Qwen3) and the
checkpoint from `models/hf_io.py`, the same code the Megatron actor reads its model with.

config.py      EmbeddedEngineConfig (rollout.embedded in the run config)
model.py       the decoder, parameters under their Hugging Face names
kv_cache.py    the preallocated per-sequence key/value cache
sampling.py    temperature / top-k / top-p sampling and the reported log-probs
decode.py      one batch: prefill, fan out n samples, decode, drop finished rows
engine.py      EmbeddedEngine, the RolloutEngine built from the above, its weight pushes a transaction
               of rollout/weights.py (validate, copy, check completeness)
"""
from megatron_dapo.rollout.embedded.config import EmbeddedEngineConfig
from megatron_dapo.rollout.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine", "EmbeddedEngineConfig"]

"""SGLang as the rollout engine (optional; GPU only). Imports sglang only when an engine starts.

config.py      SGLangEngineConfig (rollout.sglang in the run config) and the engine's GPUs
wire.py        buckets in SGLang's flattened layout, dtype names, SGLang's (success, message) replies
broadcast.py   disaggregated weight sync: the host rank broadcasts buckets to its engine's workers
engine.py      SGLangEngine, the RolloutEngine around an in-process sglang.Engine
"""
from megatron_dapo.rollout.sglang.config import SGLangEngineConfig
from megatron_dapo.rollout.sglang.engine import SGLangEngine

__all__ = ["SGLangEngine", "SGLangEngineConfig"]

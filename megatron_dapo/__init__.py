"""megatron-dapo: DAPO reinforcement learning for LLMs on megatron-core."""

__version__ = "0.1.0"

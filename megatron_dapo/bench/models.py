"""Random models of published shapes for the benchmarks (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch


def qwen25_05b_config():
    """Qwen2.5-0.5B's shape: 494M parameters, tied embeddings, 24 layers, 14 heads / 2 KV heads."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, rope_theta=1e6)


def save_random_qwen25_05b(folder: str | Path, dtype: torch.dtype = torch.float32,
                           max_shard_size: str = "5GB") -> None:
    """Seeded random weights in Qwen2.5-0.5B's shape, saved as a Hugging Face folder."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(qwen25_05b_config()).to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)

"""Tiny random Hugging Face models of each supported family, made from configs (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen2", "llama", "qwen3")


def make_tiny_model(family: str, folder: Path, *, seed: int = 0, vocab_size: int = 211,
                    max_positions: int = 128) -> Path:
    """Save a 2-layer model with GQA (4 heads, 2 KV heads) to `folder`. qwen2 ties its embeddings,
    llama uses llama3 rope scaling, qwen3 has q/k norms and a head_dim unlike hidden / heads."""
    import transformers

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-6)
    if family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)
        cls = transformers.Qwen2ForCausalLM
    elif family == "llama":
        scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
        config = transformers.LlamaConfig(**common, rope_scaling=scaling, rope_theta=50000.0,
                                          tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # larger than the default init so that log-probs vary and biases/norms matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * 0.08)
    model.save_pretrained(folder)
    return folder


def hf_logprobs(folder: Path, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """transformers' log p(token t | < t), [B, S] aligned with tokens (column 0 is 0), fp32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(tokens).logits.float() / temperature
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logp, (1, 0))

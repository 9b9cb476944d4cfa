"""Tiny random Hugging Face models of each supported family, made from configs (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("qwen2", "llama", "qwen3")


def tiny_hf_model(family: str, *, seed: int = 0, vocab_size: int = 211, max_positions: int = 128,
                  init_std: float = 0.08, tie: bool | None = None):
    """A 2-layer fp32 transformers model in eval mode, with GQA (4 heads, 2 KV heads). qwen2 ties its
    embeddings, llama uses llama3 rope scaling, qwen3 has q/k norms and a head_dim unlike hidden / heads.

    Every parameter is redrawn from `seed` (biases and norm weights too, which transformers sets to 0
    and 1), weights with std `init_std`: larger than the default init so that log-probs vary and
    biases/norms matter; 0.25 makes next-token distributions peaked enough for greedy decoding to be
    unambiguous and for top-k / top-p to cut the vocabulary. tie: tie_word_embeddings other than the
    family's here (an untied qwen2 is Qwen2.5-32B's shape: q/k/v biases and an output layer of its own).
    """
    import transformers

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-6)
    if family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=10000.0)
        cls = transformers.Qwen2ForCausalLM
    elif family == "llama":
        # original context 32 < max_positions: the scaling changes the frequencies in use
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
    if tie is not None:
        config.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * init_std)
    return model


def make_tiny_model(family: str, folder: Path, *, seed: int = 0, vocab_size: int = 211,
                    max_positions: int = 128, init_std: float = 0.08) -> Path:
    """Save `tiny_hf_model(family, ...)` to `folder` (config.json + model.safetensors)."""
    model = tiny_hf_model(family, seed=seed, vocab_size=vocab_size, max_positions=max_positions, init_std=init_std)
    model.save_pretrained(folder)
    return folder


def hf_logprobs(model, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """transformers' log p(token t | < t), [B, S] aligned with tokens (column 0 is 0), fp32.

    model: a transformers model, or the folder to load one from (in fp32).
    """
    return hf_logprobs_and_entropy(model, tokens, temperature)[0]


def hf_logprobs_and_entropy(model, tokens: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`hf_logprobs`, and the entropy of the distribution each token t was drawn from, [B, S] aligned alike."""
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        logits = model(tokens).logits.float() / temperature
    logprobs = torch.log_softmax(logits[:, :-1], -1)
    logp = logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return torch.nn.functional.pad(logp, (1, 0)), torch.nn.functional.pad(entropy, (1, 0))


def hf_score(model, sequence: list[int], temperature: float = 1.0) -> torch.Tensor:
    """`hf_logprobs` of one sequence shaped like `RolloutEngine.score`'s result: tokens 1..L-1, [L-1] fp32."""
    return hf_logprobs(model, torch.tensor([sequence]), temperature)[0, 1:]

"""The examples' tiny models: a character-level tokenizer and a supervised warm start, no download."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path


def make_char_tokenizer(folder: str | Path, chars: list[str], chat_template: str):
    """Save (and return) a transformers fast tokenizer with <pad>, <eos>, <unk> and one token per char.

    Keep it in a folder without a model's config.json: next to one, AutoTokenizer loads the model
    family's tokenizer class instead, whose pre-tokenizer splits (and drops) whitespace differently.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *dict.fromkeys(chars)])}  # a repeat: one id
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return tokenizer


def fit_tiny_model(folder: str | Path, tokenizer, sample: Callable[[random.Random], tuple[list[dict], str]], *,
                   seed: int, steps: int, batch_size: int, max_positions: int, lr: float = 1e-3,
                   warmup_steps: int = 50) -> None:
    """Fit a tiny Qwen2 (hidden 64, 2 layers, tied embeddings) to `sample(rng)` -> (chat messages, answer)
    pairs, the loss on the answer and its EOS only, and save it to `folder`.

    The learning rate warms up over `warmup_steps` and decays to zero along a cosine, so that the fit ends
    converged on the answers' distribution: a fit cut off at a constant rate ends wherever the last batches
    left it, and that differs between CPUs (AVX2 or AVX-512 kernels round differently), seeds and versions."""
    import torch
    import transformers

    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.Qwen2ForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda i: min(1.0, (i + 1) / max(warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    pad = tokenizer.pad_token_id
    for _ in range(steps):
        rows = []
        for _ in range(batch_size):
            messages, answer = sample(rng)
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            rows.append((tokenizer(prompt)["input_ids"], tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.tensor([p + r + [pad] * (width - len(p) - len(r)) for p, r in rows])
        labels = torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in rows])
        loss = model(input_ids=ids, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        schedule.step()
    model.save_pretrained(folder)
    print(f"warm start: {steps} steps, final loss {loss.item():.3f}, saved to {folder}", flush=True)

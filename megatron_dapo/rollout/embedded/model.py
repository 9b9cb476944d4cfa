"""The decoder in plain PyTorch, its parameters held under their Hugging Face names.

`CausalLM(arch).named_parameters()` yields exactly the names of the checkpoint
(`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`),
so loading a checkpoint or taking a weight push is a copy into the tensor of that name.

Numerics follow transformers' Llama/Qwen2/Qwen3: RMSNorm in fp32 then cast back before the
weight multiply; RoPE cos/sin computed in fp32 and cast to the activation dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dapo.rollout.embedded.kv_cache import LayerCache
from megatron_dapo.models.arch import ModelArch


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, normalized in fp32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq: [D/2] fp32, positions: [B, S] -> cos, sin: [B, 1, S, D] in `dtype` (broadcast over heads)."""
    angles = positions[..., None].to(torch.float32) * inv_freq  # [B, S, D/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, S, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, H, S, D] by the angles in cos/sin: [B, 1, S, D] (halves paired: i with i + D/2)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    """GQA self-attention with RoPE; optional q/k/v biases and per-head q/k RMSNorm."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        hq, hkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
        self.q_proj = nn.Linear(arch.hidden_size, hq * d, bias=arch.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(arch.hidden_size, hkv * d, bias=arch.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(arch.hidden_size, hkv * d, bias=arch.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(hq * d, arch.hidden_size, bias=False, dtype=dtype)
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps, dtype)
        self.qk_norm = arch.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """x: [B, S, hidden] -> [B, S, hidden]. Causal over x itself, or over the cache when decoding."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None or cache.lengths is None:
            if cache is not None:  # prefill: keep the keys/values for decoding
                cache.k[:, :, :s] = k
                cache.v[:, :, :s] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # decode one token per row at index cache.lengths[row]
            rows = torch.arange(b, device=x.device)
            cache.k[rows, :, cache.lengths] = k[:, :, 0]
            cache.v[rows, :, cache.lengths] = v[:, :, 0]
            span = cache.key_mask.shape[-1]
            keys, values = cache.k[:, :, :span], cache.v[:, :, :span]
            # The query heads of each key/value head as that head's query rows ([B, Hkv, G, D]; query head h
            # reads key/value head h // G): with a mask, SDPA's own GQA runs only in its math kernel, which
            # copies the keys and values once per query head; folded, the memory-efficient kernel reads them once.
            hkv = self.num_kv_heads
            folded = q.reshape(b, hkv, self.num_heads // hkv, self.head_dim)
            out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=cache.key_mask)
            out = out.reshape(b, self.num_heads, 1, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        h, i = arch.hidden_size, arch.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(h, i, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(i, h, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(arch, dtype)
        self.mlp = MLP(arch, dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm (the `model.` prefix of the checkpoint names)."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(arch, dtype) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)


class CausalLM(nn.Module):
    """The whole model. Build it with `CausalLM.empty(arch, dtype, device)`: weights are uninitialized."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        self.arch = arch
        self.model = Backbone(arch, dtype)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False, dtype=dtype)
        self.register_buffer("inv_freq", torch.empty(arch.head_dim // 2, dtype=torch.float32), persistent=False)

    @classmethod
    def empty(cls, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> CausalLM:
        """Allocate (without initializing) on `device`; ties lm_head to the embedding when the arch says so."""
        with torch.device("meta"):
            module = cls(arch, dtype)
        module = module.to_empty(device=device).requires_grad_(False).eval()
        module.inv_freq.copy_(arch.rope_inv_freq())
        if arch.tie_word_embeddings:  # tie after to_empty, which would give each name its own storage
            module.lm_head.weight = module.model.embed_tokens.weight
        return module

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list[LayerCache] | None) -> torch.Tensor:
        """tokens, positions: [B, S] -> final hidden states [B, S, hidden] (call `logits` on the rows needed)."""
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., hidden] -> fp32 logits [..., V] (the matmul runs in the model dtype, as in transformers)."""
        return self.lm_head(hidden).to(torch.float32)

"""A preallocated key/value cache, one row per sequence, positions stored left-aligned.

Row r holds the keys and values of sequence r at cache index == token position, so RoPE
positions never need offsets for padding: prompts of different lengths are prefilled
right-padded (the pad slots past a prompt's end are overwritten by its first decoded tokens
before anything attends to them), and a decode step masks keys past each row's own length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dapo.models.arch import ModelArch


@dataclass
class LayerCache:
    """One layer's view of the cache for one forward pass.

    Prefill (`lengths` None): the new keys/values [B, Hkv, S, D] are written at indices 0..S-1.
    Decode (`lengths` [B]): row b's one new key/value is written at index lengths[b], and the
    query attends to indices 0..lengths[b] (`key_mask` [B, 1, 1, span]).
    """

    k: torch.Tensor  # [B, Hkv, capacity, D]
    v: torch.Tensor  # [B, Hkv, capacity, D]
    lengths: torch.Tensor | None = None  # [B] tokens already cached per row (decode only)
    key_mask: torch.Tensor | None = None  # [B, 1, 1, span] bool, True = attend (decode only)


class KVCache:
    """Keys and values of every layer: k, v: [layers, rows, kv_heads, capacity, head_dim].

    Allocated once for a batch (and kept for the next one when it is large enough); finished
    sequences are dropped by moving the live rows to the front (`select_rows`), and new ones are
    prefilled into the rows after them (a row's slots past its own length, left by an earlier
    sequence, are masked until overwritten).
    """

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> None:
        self.arch, self.dtype, self.device = arch, dtype, device
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def allocated_bytes(self) -> int:
        """Bytes held by the key and value buffers (0 when released)."""
        if self.k is None or self.v is None:
            return 0
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, rows: int, capacity: int) -> None:
        """Make room for `rows` sequences of up to `capacity` tokens, all zeros; reuses the buffers when they fit.

        Zeros, not whatever was there: a decode step multiplies masked slots by a 0 attention weight, and
        uninitialized memory, or an earlier batch's overflowed half-precision values, may hold NaN (0 * NaN = NaN).
        Reused, the part this batch can use is cleared (one write over it, a small cost next to the batch).
        Outgrown in either dimension, the new buffers keep the larger of the old and new sizes in both: batches
        of many short and of few long sequences (a generation batch's last chunk, validation) then share one
        allocation instead of replacing it at every switch (the engine's limits bound both sizes)."""
        if self.k is not None and self.v is not None:
            if self.k.shape[1] >= rows and self.k.shape[3] >= capacity:
                self.k[:, :rows, :, :capacity].zero_()
                self.v[:, :rows, :, :capacity].zero_()
                return
            rows, capacity = max(rows, self.k.shape[1]), max(capacity, self.k.shape[3])
        self.release()
        a = self.arch
        shape = (a.num_layers, rows, a.num_kv_heads, capacity, a.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)  # out of memory here: k is freed, none is held
        self.k, self.v = k, v

    def release(self) -> None:
        """Drop the buffers."""
        self.k = self.v = None

    def select_rows(self, src: torch.Tensor, span: int, dst: int = 0) -> None:
        """Row dst + i <- row src[i] for i < len(src), for the first `span` positions (expand n samples, drop
        finished)."""
        k, v = self._buffers()
        n = src.numel()
        for layer in range(k.shape[0]):  # one layer at a time: the gather's temporary is one layer's rows
            k[layer, dst:dst + n, :, :span] = k[layer, src, :, :span]
            v[layer, dst:dst + n, :, :span] = v[layer, src, :, :span]

    def prefill_view(self, layer: int, rows: int, start: int = 0) -> LayerCache:
        """Layer `layer`'s cache for prefilling rows start..start+rows-1."""
        k, v = self._buffers()
        return LayerCache(k=k[layer, start:start + rows], v=v[layer, start:start + rows])

    def decode_views(self, lengths: torch.Tensor, span: int) -> list[LayerCache]:
        """Every layer's cache for one decode step of rows 0..B-1.

        lengths: [B] tokens cached per row; span = max(lengths) + 1 (known on the host, no sync).
        """
        k, v = self._buffers()
        rows = lengths.numel()
        key_mask = torch.arange(span, device=lengths.device)[None, :] <= lengths[:, None]  # [B, span]
        key_mask = key_mask[:, None, None, :]
        return [LayerCache(k=k[i, :rows], v=v[i, :rows], lengths=lengths, key_mask=key_mask) for i in range(k.shape[0])]

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.v is None:
            raise RuntimeError("the KV cache is not allocated; call reserve() first")
        return self.k, self.v

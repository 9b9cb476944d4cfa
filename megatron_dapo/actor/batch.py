"""The actor's input: token sequences with per-token masks and log-probs, and its micro-batching."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class ActorBatch:
    """B sequences (prompt + response), right-padded to S. Per-token tensors are aligned with `tokens`:
    entry [b, t] is about token t given tokens 0..t-1 (entry t = 0 is unused)."""

    tokens: torch.Tensor
    """[B, S] int64."""
    lengths: torch.Tensor
    """[B] tokens in use per row."""
    loss_mask: torch.Tensor
    """[B, S] 1 where token t is a response token whose loss counts."""
    advantages: torch.Tensor | None = None
    """[B] one advantage per sequence (or [B, S])."""
    old_logp: torch.Tensor | None = None
    """[B, S] log-probs under the policy that generated the batch, as the trainer computes them."""
    rollout_logp: torch.Tensor | None = None
    """[B, S] log-probs reported by the rollout engine."""

    def __post_init__(self) -> None:
        b, s = self.tokens.shape
        if self.lengths.shape != (b,) or self.loss_mask.shape != (b, s):
            raise ValueError(
                f"batch shapes disagree: tokens {tuple(self.tokens.shape)}, lengths {tuple(self.lengths.shape)}, "
                f"loss_mask {tuple(self.loss_mask.shape)}"
            )

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: torch.Tensor | slice) -> ActorBatch:
        """The sub-batch of these rows, trimmed to its longest sequence."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        picked = {k: (v[index] if v is not None else None) for k, v in picked.items()}
        width = int(picked["lengths"].max()) if picked["lengths"].numel() else 1
        for key in ("tokens", "loss_mask", "old_logp", "rollout_logp"):
            if picked[key] is not None:
                picked[key] = picked[key][:, :width]
        if picked["advantages"] is not None and picked["advantages"].dim() == 2:
            picked["advantages"] = picked["advantages"][:, :width]
        return replace(self, **picked)

    def pack(self) -> tuple[dict, list[torch.Tensor]]:
        """The batch without its padding, for sending to other ranks: (a small picklable header, tensors).
        Per-token fields are the rows' tokens laid end to end, the token ids as int32 and the mask as uint8,
        so a token costs 9 bytes with the rollout log-probs (a padded batch costs 20 per padded position; the
        groups it was built from, pickled, 12.8, and about 90 once unpickled). `ActorBatch.unpack` restores it bit
        for bit (padding is zero, as `build_actor_batch` makes it)."""
        width = self.tokens.shape[1]
        valid = torch.arange(width) < self.lengths[:, None]
        header: dict = {"width": width, "fields": []}
        tensors = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            per_token = value.dim() == 2
            sent = (value[valid] if per_token else value).to(_SENT_AS.get(f.name, value.dtype)).contiguous()
            header["fields"].append((f.name, per_token, _dtype_name(value.dtype), _dtype_name(sent.dtype),
                                     tuple(sent.shape)))
            tensors.append(sent)
        return header, tensors

    @staticmethod
    def receive_buffers(header: dict, device: torch.device) -> list[torch.Tensor]:
        """Empty tensors on `device` to receive a packed batch's tensors into."""
        return [torch.empty(shape, dtype=getattr(torch, sent), device=device)
                for _, _, _, sent, shape in header["fields"]]

    @classmethod
    def unpack(cls, header: dict, tensors: list[torch.Tensor]) -> ActorBatch:
        """A packed batch (see `pack`) whole again, on the CPU."""
        received = {name: (t.cpu(), per_token, getattr(torch, dtype))
                    for (name, per_token, dtype, _, _), t in zip(header["fields"], tensors, strict=True)}
        lengths = received["lengths"][0].to(received["lengths"][2])
        valid = torch.arange(header["width"]) < lengths[:, None]
        values = {}
        for name, (t, per_token, dtype) in received.items():
            if per_token:
                values[name] = torch.zeros(valid.shape, dtype=dtype)
                values[name][valid] = t.to(dtype)
            else:
                values[name] = t.to(dtype)
        return cls(**values)


_SENT_AS = {"tokens": torch.int32, "loss_mask": torch.uint8}
"""Narrower types for sending (vocabularies stay below 2**31; the mask is 0 or 1)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def data_parallel_shares(lengths: list[int], ranks: int) -> list[list[int]]:
    """Rows dealt to `ranks` data-parallel ranks so that their token counts are close: longest first, each to the
    rank with the fewest tokens so far (the lower rank on a tie); each rank's rows in batch order. Every rank
    computes the same deal from the lengths. Contiguous blocks of rows would give one rank a prompt's n responses
    at once, whose lengths go together: the longest group's rank would set the step's time. A rank may get no
    row when there are fewer rows than ranks."""
    shares: list[list[int]] = [[] for _ in range(ranks)]
    tokens = [0] * ranks
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        rank = min(range(ranks), key=lambda k: (tokens[k], k))
        shares[rank].append(row)
        tokens[rank] += lengths[row]
    return [sorted(share) for share in shares]


def split_by_token_budget(lengths: list[int], budget: int, multiple: int = 1) -> list[list[int]]:
    """Rows grouped into micro-batches whose padded size (rows x longest row, rounded up to `multiple`)
    stays within `budget` tokens; a row longer than the budget goes alone. `multiple`: sequence
    parallelism needs the padded length to divide by TP.

    Rows are taken longest first, so that rows of similar length share a micro-batch: RL responses
    run from a few tokens to the maximum, and grouping them in arrival order pads short rows to a
    long neighbour's length. Each group lists its rows in their original order.
    """
    def padded(length: int) -> int:
        return -(-length // multiple) * multiple

    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        if current and width * (len(current) + 1) > budget:  # the group's first row is its longest
            groups.append(sorted(current))
            current = []
        if not current:
            width = padded(lengths[row])
        current.append(row)
    if current:
        groups.append(sorted(current))
    return groups

"""Settings of the embedded PyTorch rollout engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_dapo.config.loader import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(kw_only=True)
class EmbeddedEngineConfig:
    """Where and how the embedded engine runs (`rollout.embedded` in the run config)."""

    device: str = "auto"
    """"cpu", "cuda", "cuda:N", or "auto" (the current CUDA device when there is one, else CPU)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations; "auto" is float32 on CPU, bfloat16 on CUDA. Log-probs are always fp32."""
    max_batch_size: int = 64
    """Sequences decoded together (prompts x n; a waiting prompt takes the rows of finished ones); the KV cache
    holds this many x (prompt + max_new_tokens) tokens."""
    max_seq_len: int | None = None
    """Longest prompt + completion accepted; None uses the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        problems = []
        if self.device != "auto" and _device_type(self.device) not in ("cpu", "cuda"):
            problems.append(f"rollout.embedded.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_batch_size < 1:
            problems.append(f"rollout.embedded.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            problems.append(f"rollout.embedded.max_seq_len must be >= 2 or null, got {self.max_seq_len}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            problems.append(f"rollout.embedded.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if problems:
            raise ConfigError(problems)

    def torch_device(self) -> torch.device:
        """The device to run on."""
        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The weight/activation dtype on `device`."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


def _device_type(device: str) -> str | None:
    try:
        return torch.device(device).type
    except RuntimeError:
        return None

"""Session-wide tiny models (see tests/tiny_models.py), saved once per test session."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from tests.tiny_models import FAMILIES, make_tiny_model, tiny_hf_model

SHAPE = dict(max_positions=64, init_std=0.25)
"""Peaked next-token distributions: greedy decoding is unambiguous and top-k / top-p cut the vocab."""


@dataclass
class TinyModel:
    family: str
    hf: transformers.PreTrainedModel  # fp32, eval mode, loaded back from `folder`
    folder: Path  # save_pretrained output: config.json + model.safetensors

    @property
    def vocab_size(self) -> int:
        return self.hf.config.vocab_size

    def redrawn(self, seed: int) -> transformers.PreTrainedModel:
        """A model of the same shapes with every parameter drawn from `seed` (new weights to push)."""
        return tiny_hf_model(self.family, seed=seed, **SHAPE)


def save_tiny(family: str, folder: Path) -> TinyModel:
    make_tiny_model(family, folder, **SHAPE)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return TinyModel(family=family, hf=hf, folder=folder)


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """Tiny models run thousands of microsecond-sized ops; thread hand-offs dominate them.

    Measured on the 2-core CI machine while loaded: linear [3, 64] x [64, 96] takes 13 us on
    one thread and 160-400 us on two. Restored afterwards for the rest of the suite.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request, tmp_path_factory) -> TinyModel:
    """One tiny model per supported family (the test runs once for each)."""
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def qwen2(tmp_path_factory) -> TinyModel:
    """The tiny Qwen2 (tied embeddings, q/k/v bias), for tests that need only one family."""
    return save_tiny("qwen2", tmp_path_factory.mktemp("qwen2-one"))

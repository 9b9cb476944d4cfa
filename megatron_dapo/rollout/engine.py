"""The interface every rollout engine implements, and the data it takes and returns.

An engine turns token-id prompts into sampled completions with the log-prob of every sampled
token, scores given sequences (the weight-sync parity probe), and takes weight pushes from the
trainer as a transaction:

    engine.begin_weight_update()                 # engine is stale from here
    engine.update_weights(bucket) ...            # any number of buckets, HF names
    engine.end_weight_update(version=step)       # every parameter arrived -> usable again

While a push is open (or broke off), `generate` and `score` refuse: sampling from half-updated
weights would silently corrupt the rollout.
"""
from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Literal

import torch

MIN_TEMPERATURE = 1e-3
"""The lowest sampling temperature. Near it the log-probs magnify the smallest difference between the trainer's and
the engine's logits (0.01 becomes 10 nats at 1e-3), and far below it logits / temperature overflows float32 (NaN
log-probs). For greedy decoding use top_k=1."""


class RolloutError(ValueError):
    """Bad input to a rollout engine (prompt, sampling parameters, weight push)."""


class StaleWeightsError(RolloutError):
    """`generate` or `score` was called while a weight push is open or broke off."""


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample completions for one `generate` call."""

    max_new_tokens: int
    """Most tokens generated per completion; reaching it ends the completion with "length"."""
    n: int = 1
    """Completions sampled per prompt."""
    temperature: float = 1.0
    """Logits are divided by this before softmax; reported log-probs use the same scaling."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens with probability >= top_p; 1.0 is off."""
    top_k: int = -1
    """Sample from the k most likely tokens; -1 is off, 1 is greedy."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end a completion (finish_reason "stop"); the stop token is part of the completion."""
    seed: int | None = None
    """Seed of this call's generator: same seed, prompts and engine settings -> same completions (SGLang only with
    its deterministic inference on: docs/rollout.md); None: fresh."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_new_tokens", "n", "top_k", "seed"):  # numpy integers are taken as Python ints
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise RolloutError(f"bad SamplingParams: {name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise RolloutError(f"bad SamplingParams: {name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        stops = self.stop_token_ids
        if isinstance(stops, numbers.Integral) and not isinstance(stops, bool):
            stops = (stops,)
        elif isinstance(stops, Iterable) and not isinstance(stops, (str, bytes)):
            stops = tuple(stops)  # a generator is read once, here
        if not isinstance(stops, tuple) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in stops):
            raise RolloutError(f"bad SamplingParams: stop_token_ids must be token ids (integers), got {stops!r}")
        self.stop_token_ids = tuple(int(t) for t in stops)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if not MIN_TEMPERATURE <= self.temperature < math.inf:
            problems.append(f"temperature must be >= {MIN_TEMPERATURE:g} and finite (use top_k=1 for greedy), "
                            f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if problems:
            raise RolloutError("bad SamplingParams: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (top_k == 1)."""
        return self.top_k == 1


def not_token_ids(seq) -> str | None:
    """What `seq` is when it cannot be one prompt's token ids (a str, a number, a tensor that is not 1-D, a set or
    mapping, whose order is not the prompt's), else None: a flat list of ids passed as the batch makes each id a
    "prompt"."""
    if isinstance(seq, (str, bytes)) or not (hasattr(seq, "__len__") and hasattr(seq, "__iter__")):
        return f"a {type(seq).__name__}"
    if isinstance(seq, (Set, Mapping)):
        return f"a {type(seq).__name__} (unordered)"
    if getattr(seq, "ndim", 1) != 1:
        return f"a {type(seq).__name__} of {seq.ndim} dimensions"
    return None


def as_batch(batch, what: str) -> list:
    """The batch given to generate or score as a list (a generator is read once, here), or a RolloutError naming
    what it is when it is no batch (a str, a set, a mapping)."""
    if isinstance(batch, (str, bytes, Set, Mapping)) or not isinstance(batch, Iterable):
        raise RolloutError(f"bad input: the batch is a {type(batch).__name__}, not a list of {what}s "
                           "(each a list of token ids)")
    return list(batch)


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    token_ids: list[int] = field(default_factory=list)
    """Generated tokens only, [L]; includes the stop token when one ended the completion."""
    logprobs: list[float] = field(default_factory=list)
    """[L] log-prob of each sampled token: log_softmax(logits / temperature), before top-k/top-p."""
    finish_reason: Literal["stop", "length"] = "length"
    """"stop": a stop token ended it; "length": max_new_tokens was reached."""


class RolloutEngine(abc.ABC):
    """What the trainer needs from a rollout engine (embedded PyTorch, SGLang, ...)."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample `params.n` completions for each prompt: result[i][j] is prompt i's j-th completion."""

    @abc.abstractmethod
    def score(self, sequences: list[list[int]], temperature: float) -> list[torch.Tensor]:
        """Log-probs of tokens 1..L-1 of each sequence given its prefix: one float32 [L-1] tensor each.

        log_softmax(logits / temperature) gathered at the next token; the parity probe compares
        these with the trainer's log-probs after a weight push.
        """

    @abc.abstractmethod
    def begin_weight_update(self) -> None:
        """Open a weight push; the engine is stale until `end_weight_update` succeeds."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy one bucket of (Hugging Face name, full tensor) pairs into the engine's weights."""

    @abc.abstractmethod
    def end_weight_update(self, version: int) -> None:
        """Close the push: check every parameter arrived since `begin`, then serve `version`."""

    @abc.abstractmethod
    def release_memory(self, weights: bool = True) -> None:
        """Free what can be freed while the trainer uses the device (colocated mode); `weights=False` keeps
        the weights where they are (only the KV cache goes), so no push is needed before generating again."""

    def resume_weights(self) -> None:
        """Take back only the weights' memory, so that a push can land while the KV cache is still free
        (with actor.offload the actor leaves the device in between); an engine that keeps its weights
        through `release_memory` has nothing to do. `generate` still refuses until `resume_memory`."""

    @abc.abstractmethod
    def resume_memory(self) -> None:
        """Take back everything `release_memory` freed (what `resume_weights` took stays), before the next `generate`."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """Version passed to the last successful `end_weight_update` (0 for the loaded checkpoint)."""

    def close(self) -> None:
        """Stop what the engine started (processes, threads); nothing to do for an in-process engine."""

"""Sampling: the top-k / top-p rule by hand, then the engine's sampled support, seeds, stops and n."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_dapo.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_dapo.rollout.embedded.sampling import allowed_tokens
from megatron_dapo.rollout.engine import SamplingParams

CPU = EmbeddedEngineConfig(device="cpu")  # float32: these compare with transformers in float32

PROMPTS = [[5, 9, 2, 6], [31], [41, 59, 26]]


@pytest.fixture(scope="module")
def engine(qwen2):
    return EmbeddedEngine.from_pretrained(qwen2.folder, CPU)


@pytest.mark.parametrize(
    ("top_k", "top_p", "expected"),
    [
        # probabilities by token id: [0.15, 0.5, 0.05, 0.3]; most likely first: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
        (-1, 1.0, {0, 1, 2, 3}),
        (-1, 0.4, {1}),  # 0.5 alone reaches 0.4
        (-1, 0.75, {1, 3}),  # 0.5 + 0.3 = 0.8 >= 0.75
        (-1, 0.9, {0, 1, 3}),  # 0.95 >= 0.9
        (-1, 0.99, {0, 1, 2, 3}),
        (2, 1.0, {1, 3}),
        (3, 1.0, {0, 1, 3}),
        (1, 1.0, {1}),
        (2, 0.6, {1}),  # top-2 renormalized: 1 -> 0.625 >= 0.6
        (2, 0.7, {1, 3}),  # 0.625 < 0.7, so 3 (0.375) joins
        (10, 1.0, {0, 1, 2, 3}),  # k larger than the vocab
    ],
)
def test_allowed_tokens_by_hand(top_k, top_p, expected):
    logprobs = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    mask = allowed_tokens(logprobs, top_k, top_p)
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == expected


def reference_support(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Allowed next tokens from one row of transformers' logits, by a plain loop over the sorted vocab."""
    probs = torch.softmax(logits.double() / temperature, dim=-1).tolist()
    ranked = sorted(range(len(probs)), key=lambda t: -probs[t])
    if top_k > 0:
        ranked = ranked[:top_k]
    total = sum(probs[t] for t in ranked)
    kept, mass = [], 0.0
    for t in ranked:
        kept.append(t)
        mass += probs[t] / total
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (-1, 0.6), (12, 0.8)])
def test_sampled_tokens_stay_in_the_top_k_top_p_support(engine, qwen2, top_k, top_p):
    temperature = 1.3
    params = SamplingParams(max_new_tokens=12, n=6, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    sizes = []
    for prompt, completions in zip(PROMPTS, engine.generate(PROMPTS, params)):
        for c in completions:
            with torch.no_grad():
                logits = qwen2.hf(torch.tensor([prompt + c.token_ids])).logits[0]
            for step, token in enumerate(c.token_ids):
                support = reference_support(logits[len(prompt) - 1 + step], temperature, top_k, top_p)
                assert token in support
                sizes.append(len(support))
    assert max(sizes) < qwen2.vocab_size  # the restriction did cut the vocab
    assert max(sizes) > 1  # and sampling had a choice to make


def _chi_square(counts: dict[int, int], probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic of token counts against `probs` [V] (tokens expected fewer than 5 times pooled), and
    the value it stays below but once in about 30,000 draws of the true distribution (Wilson-Hilferty, z = 4)."""
    draws = sum(counts.values())
    observed = torch.tensor([counts.get(t, 0) for t in range(len(probs))], dtype=torch.float64)
    expected = probs.double() * draws
    big = expected >= 5
    observed = torch.cat([observed[big], observed[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    seen = expected > 0
    statistic = float(((observed - expected) ** 2 / expected.clamp(min=1e-300))[seen].sum())
    if (observed[~seen] > 0).any():  # a token drawn that may not be: no distribution of this support fits
        return math.inf, 0.0
    dof = int(seen.sum()) - 1
    return statistic, dof * (1 - 2 / (9 * dof) + 4 * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.6, -1, 1.0), (1.4, 8, 1.0), (1.0, -1, 0.7)])
def test_tokens_are_drawn_as_often_as_the_temperature_scaled_truncated_distribution_says(engine, qwen2, temperature,
                                                                                        top_k, top_p):
    """20,000 first tokens of one prompt, counted: they follow softmax(logits / T) of transformers' logits, cut to
    the top-k / top-p set and renormalised (a sampler that drew at temperature 1, or from the untruncated set,
    passed the support test above); the same counts are far from the temperature-1 untruncated distribution."""
    prompt, draws = PROMPTS[2], 20000
    out = engine.generate([prompt], SamplingParams(max_new_tokens=1, n=draws, temperature=temperature, top_k=top_k,
                                                   top_p=top_p, seed=5))
    counts: dict[int, int] = {}
    for completion in out[0]:
        counts[completion.token_ids[0]] = counts.get(completion.token_ids[0], 0) + 1
    with torch.no_grad():
        logits = qwen2.hf(torch.tensor([prompt])).logits[0, -1].double()
    support = torch.zeros_like(logits, dtype=torch.bool)
    support[sorted(reference_support(logits, temperature, top_k, top_p))] = True
    probs = torch.softmax(logits / temperature, -1) * support
    statistic, bound = _chi_square(counts, probs / probs.sum())
    assert statistic < bound, (statistic, bound)
    plain, plain_bound = _chi_square(counts, torch.softmax(logits, -1))
    assert plain > 5 * plain_bound, (plain, plain_bound)


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    def sample(seed):
        out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=3, seed=seed))
        return [[(c.token_ids, c.logprobs) for c in cs] for cs in out]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    first_prompt = [tokens for tokens, _ in sample(7)[0]]
    assert len({tuple(t) for t in first_prompt}) > 1  # the n samples of one prompt differ


def test_top_k_1_is_greedy(engine, qwen2):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, top_k=1, temperature=1.7, seed=1))
    for prompt, (c,) in zip(PROMPTS, out):
        expected = qwen2.hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0
        )
        assert c.token_ids == expected[0, len(prompt) :].tolist()
        assert all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)


def test_stop_token_ends_with_stop_and_is_included(engine):
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, top_k=1))
    stop = free[0][0].token_ids[3]
    first = free[0][0].token_ids.index(stop)
    (c,) = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=10, top_k=1, stop_token_ids=(stop,)))[0]
    assert c.token_ids == free[0][0].token_ids[: first + 1]
    assert c.token_ids[-1] == stop and c.finish_reason == "stop"
    assert len(c.logprobs) == len(c.token_ids)


def test_max_new_tokens_gives_length_and_n_completions(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=7, n=4, seed=0))
    assert [len(cs) for cs in out] == [4, 4, 4]
    for cs in out:
        for c in cs:
            assert c.finish_reason == "length"
            assert len(c.token_ids) == len(c.logprobs) == 7


def test_a_stop_on_the_last_allowed_token_counts_as_stop(engine):
    greedy = SamplingParams(max_new_tokens=4, top_k=1)
    outs = [cs[0].token_ids for cs in engine.generate(PROMPTS, greedy)]
    # a prompt whose 4th greedy token does not occur earlier: stopping on it ends exactly at step 4
    prompt, tokens = next((p, t) for p, t in zip(PROMPTS, outs) if t[-1] not in t[:-1])
    (c,) = engine.generate([prompt], SamplingParams(max_new_tokens=4, top_k=1, stop_token_ids=(tokens[-1],)))[0]
    assert c.token_ids == tokens and c.finish_reason == "stop"

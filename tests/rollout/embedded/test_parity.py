"""The embedded engine against transformers on the same weights, for every supported family."""
from __future__ import annotations

import torch

from megatron_dapo.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_dapo.rollout.engine import SamplingParams
from tests.tiny_models import hf_score

CPU = EmbeddedEngineConfig(device="cpu")  # float32: these compare with transformers in float32

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32], [7], [26, 53, 58, 97], [84, 62]]
TOL = 1e-5  # fp32 on both sides; measured max |diff| ~1e-6


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_generate(tiny):
    """Batched prompts of different lengths, n=2, a stop token ending one early: HF's tokens, prompt by prompt."""
    engine = EmbeddedEngine.from_pretrained(tiny.folder, CPU)
    free_run = [hf_greedy(tiny.hf, p, 12, eos=None) for p in PROMPTS]
    stop = free_run[0][5]  # ends prompt 0 at step 6 at the latest; the others decode on without it
    expected = [hf_greedy(tiny.hf, p, 12, eos=stop) for p in PROMPTS]
    assert len(expected[0]) <= 6 and any(len(e) == 12 for e in expected)

    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, top_k=1, n=2, stop_token_ids=(stop,)))
    assert [len(cs) for cs in out] == [2] * len(PROMPTS)
    for completions, want in zip(out, expected):
        for c in completions:
            assert c.token_ids == want
            assert c.finish_reason == ("stop" if want[-1] == stop else "length")
            assert len(c.logprobs) == len(c.token_ids)


def test_score_matches_transformers_log_softmax(tiny):
    engine = EmbeddedEngine.from_pretrained(tiny.folder, CPU)
    sequences = [p + [11, 12, 13, 14] for p in PROMPTS] + [[5]]
    for temperature in (1.0, 0.6):
        scores = engine.score(sequences, temperature)
        for seq, got in zip(sequences, scores):
            assert got.dtype == torch.float32 and got.shape == (len(seq) - 1,)
            if len(seq) > 1:
                torch.testing.assert_close(got, hf_score(tiny.hf, seq, temperature), rtol=0, atol=TOL)


def test_sampled_logprobs_are_untruncated_and_match_transformers(tiny):
    """With top-k and top-p cutting the vocab, the reported log-prob is still log_softmax(logits / T).

    Ten stop tokens make the completions end at different steps, so rows leave the batch
    mid-decode: this also checks that the KV cache of the rows that stay is intact.
    """
    engine = EmbeddedEngine.from_pretrained(tiny.folder, CPU)
    temperature = 0.8
    params = SamplingParams(
        max_new_tokens=10, n=3, temperature=temperature, top_k=20, top_p=0.9, seed=1,
        stop_token_ids=tuple(range(0, tiny.vocab_size, tiny.vocab_size // 10)),
    )
    out = engine.generate(PROMPTS, params)
    lengths = {len(c.token_ids) for cs in out for c in cs}
    assert len(lengths) > 1  # rows did finish at different steps
    for prompt, completions in zip(PROMPTS, out):
        for c in completions:
            expected = hf_score(tiny.hf, prompt + c.token_ids, temperature)[len(prompt) - 1 :]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=0, atol=TOL)


def test_batch_size_does_not_change_greedy_output(qwen2):
    wide_engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    narrow_engine = EmbeddedEngine.from_pretrained(qwen2.folder, EmbeddedEngineConfig(device="cpu", max_batch_size=3))
    for n in (2, 5):  # 3 rows at a time: a prompt's 2 samples wait for 2 free rows; 5 are decoded 3, then 2
        params = SamplingParams(max_new_tokens=8, top_k=1, n=n)
        wide, narrow = wide_engine.generate(PROMPTS, params), narrow_engine.generate(PROMPTS, params)
        assert [[c.token_ids for c in cs] for cs in wide] == [[c.token_ids for c in cs] for cs in narrow]


def test_finished_rows_are_refilled_from_the_waiting_prompts(qwen2):
    """Two rows at a time, prompt 1's response long and the others' short: prompts 2 and 3 take the row prompt 0
    left, one after the other, while prompt 1 goes on, instead of waiting for the pair to end. The responses are
    those of one wide batch; the engine decodes in prompt 1's steps alone, one step fewer than pairs decoded one
    after the other, and never more than two rows at once."""
    wide = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    greedy = [cs[0].token_ids for cs in wide.generate(PROMPTS, SamplingParams(max_new_tokens=8, top_k=1))]
    stops = tuple({greedy[p][1] for p in (0, 2, 3)} - set(greedy[1]))  # every prompt but 1 stops at 2 tokens
    params = SamplingParams(max_new_tokens=8, top_k=1, stop_token_ids=stops)
    expected = [[c.token_ids for c in cs] for cs in wide.generate(PROMPTS, params)]
    assert [len(cs[0]) for cs in expected] == [2, 8, 2, 2], expected  # else the check below shows nothing

    narrow = EmbeddedEngine.from_pretrained(qwen2.folder, EmbeddedEngineConfig(device="cpu", max_batch_size=2))
    rows, forward = [], narrow.model.forward

    def counting(tokens, positions, caches):
        rows.append((tokens.shape[0], caches[0].lengths is not None))  # (rows, a decode step)
        return forward(tokens, positions, caches)

    narrow.model.forward = counting
    assert [[c.token_ids for c in cs] for cs in narrow.generate(PROMPTS, params)] == expected
    assert sum(decode for _, decode in rows) == 7  # pairs one after the other: 7 + 1
    assert max(n for n, _ in rows) <= 2

"""The embedded engine's input checks, colocated memory release, and dtypes."""
from __future__ import annotations

import copy

import pytest
import torch

from megatron_dapo.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_dapo.rollout.engine import RolloutError, SamplingParams
from tests.required import unavailable
from tests.tiny_models import hf_score, make_tiny_model

CPU = EmbeddedEngineConfig(device="cpu")  # float32: these compare with transformers in float32

GREEDY = SamplingParams(max_new_tokens=4, top_k=1)


@pytest.fixture(scope="module")
def engine(qwen2):
    return EmbeddedEngine.from_pretrained(qwen2.folder, CPU)


def test_empty_prompt_is_refused(engine):
    with pytest.raises(RolloutError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], GREEDY)
    with pytest.raises(RolloutError, match="sequence 0 is empty"):
        engine.score([[]], 1.0)


def test_a_flat_prompt_is_refused_by_what_it_is(engine):
    with pytest.raises(RolloutError, match=r"prompt 0 is a int, not a list of token ids \(a batch is a list of prompts\)"):
        engine.generate([1, 2, 3], GREEDY)
    with pytest.raises(RolloutError, match="sequence 0 is a str, not a list of token ids"):
        engine.score(["12"], 1.0)
    with pytest.raises(RolloutError, match="prompt 0 is a Tensor of 0 dimensions, not a list of token ids"):
        engine.generate(torch.tensor([1, 2, 3]), GREEDY)
    # A set's or a dict's order is not the prompt's: sampling would continue tokens in another order.
    with pytest.raises(RolloutError, match=r"prompt 0 is a set \(unordered\), not a list of token ids"):
        engine.generate([{5, 1, 200}], GREEDY)
    with pytest.raises(RolloutError, match=r"sequence 0 is a dict \(unordered\)"):
        engine.score([{3: 0, 1: 0}], 1.0)
    with pytest.raises(RolloutError, match="the batch is a set, not a list of prompts"):
        engine.generate({(1, 2), (3, 4)}, GREEDY)
    with pytest.raises(RolloutError, match="the batch is a str, not a list of sequences"):
        engine.score("1234", 1.0)


def test_a_batch_read_once_is_the_batch_given_as_a_list(engine):
    prompts = [[1, 2, 3], [4, 5]]
    assert engine.generate((p for p in prompts), GREEDY) == engine.generate(prompts, GREEDY)
    for got, want in zip(engine.score((p for p in prompts), 1.0), engine.score(prompts, 1.0), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_temperature_that_would_overflow_the_logits_is_refused(engine):
    with pytest.raises(RolloutError, match="temperature must be >= 0.001 and finite, got 1e-39"):
        engine.score([[3, 1, 4, 1]], 1e-39)  # logits / 1e-39 is inf in float32: NaN log-probs
    assert torch.isfinite(engine.score([[3, 1, 4, 1]], 1e-3)[0]).all()


def test_prompt_plus_max_new_tokens_past_the_context_is_refused(engine, qwen2):
    limit = qwen2.hf.config.max_position_embeddings  # 64 (conftest.SHAPE)
    engine.generate([[1] * (limit - 4)], GREEDY)  # exactly fits
    too_long = (
        f"prompt 0 has {limit - 3} tokens; with max_new_tokens=4 that is {limit + 1} > the engine's limit of {limit}"
    )
    with pytest.raises(RolloutError, match=too_long):
        engine.generate([[1] * (limit - 3)], GREEDY)
    with pytest.raises(RolloutError, match=f"sequence 0 has {limit + 1} tokens > the engine's limit of {limit}"):
        engine.score([[1] * (limit + 1)], 1.0)


def test_configured_limit_is_enforced(qwen2):
    short = EmbeddedEngine.from_pretrained(qwen2.folder, EmbeddedEngineConfig(device="cpu", max_seq_len=10))
    with pytest.raises(RolloutError, match="11 > the engine's limit of 10"):
        short.generate([[1] * 7], GREEDY)


def test_token_ids_outside_the_vocab_are_refused(engine, qwen2):
    vocab = qwen2.vocab_size
    outside = rf"prompt 0 has token ids outside the vocab \[0, {vocab}\): \[{vocab}, -1\]"
    with pytest.raises(RolloutError, match=outside):
        engine.generate([[1, vocab, 2, -1]], GREEDY)


def test_true_and_false_are_not_token_ids(engine):
    with pytest.raises(RolloutError, match="prompt 1 holds something other than integer token ids"):
        engine.generate([[1, 2], [True, False]], GREEDY)


def test_stop_tokens_outside_the_vocab_are_refused(engine, qwen2):
    vocab = qwen2.vocab_size
    with pytest.raises(RolloutError, match=rf"stop_token_ids \[{vocab}\] are outside the model's vocab \[0, {vocab}\)"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=4, stop_token_ids=(2, vocab)))


def test_logits_that_are_not_finite_name_their_prompt(tmp_path):
    """A broken weight (here token 7's input embedding; Llama's output layer is its own) makes NaN logits: greedy
    decoding's argmax would take token 0 with a NaN log-prob without a word, and sampling would fail inside
    torch.multinomial. Either way the error names the caller's prompt and its new token, also when the prompt
    joins a batch under way (max_batch_size 2: prompt 2 takes the row of one that ended)."""
    make_tiny_model("llama", tmp_path)
    engine = EmbeddedEngine.from_pretrained(tmp_path, EmbeddedEngineConfig(device="cpu", max_batch_size=2))
    with torch.inference_mode():
        dict(engine.model.named_parameters())["model.embed_tokens.weight"][7] = float("nan")
    prompts = [[3, 1], [4, 1, 5], [9, 7]]
    for params in (GREEDY, SamplingParams(max_new_tokens=4, seed=3)):
        with pytest.raises(RolloutError, match=r"NaN or an infinity at new token 0 of 1 sequence\(s\), from "
                                               r"prompt\(s\) \[2\]"):
            engine.generate(prompts, params)
    assert len(engine.generate(prompts[:2], GREEDY)) == 2  # the other prompts never read token 7


def test_no_prompts_no_completions(engine):
    assert engine.generate([], GREEDY) == [] and engine.score([], 1.0) == []


def test_release_and_resume(qwen2):
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    before = engine.generate([[3, 1, 4]], GREEDY)
    assert engine.cache.allocated_bytes > 0
    engine.release_memory()
    assert engine.cache.allocated_bytes == 0
    with pytest.raises(RolloutError, match="call resume_memory"):
        engine.generate([[3, 1, 4]], GREEDY)
    engine.resume_memory()  # the weights stayed
    assert engine.generate([[3, 1, 4]], GREEDY)[0][0].token_ids == before[0][0].token_ids
    scored = engine.score([[3, 1, 4, 1, 5]], 1.0)[0]
    engine.release_memory()
    new = qwen2.redrawn(seed=3)
    engine.begin_weight_update()  # and can be pushed while released: the new ones serve after resume
    engine.update_weights(new.state_dict().items())
    engine.end_weight_update(version=1)
    engine.resume_memory()
    after = engine.score([[3, 1, 4, 1, 5]], 1.0)[0]
    assert not torch.allclose(after, scored)
    torch.testing.assert_close(after, hf_score(new, [3, 1, 4, 1, 5], 1.0), rtol=0, atol=1e-5)


def test_bf16_engine_is_as_accurate_as_transformers_in_bf16(tiny):
    """Against the fp32 reference, the bf16 engine's mean |log-prob error| is within 1.5x of transformers' own bf16 run.

    Measured: ours/transformers' = 0.98 (llama), 1.06 (qwen2), 0.87 (qwen3); mean errors 0.03-0.04.
    """
    engine = EmbeddedEngine.from_pretrained(tiny.folder, EmbeddedEngineConfig(device="cpu", dtype="bfloat16"))
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    hf_bf16 = copy.deepcopy(tiny.hf).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, tiny.vocab_size, (n,), generator=g).tolist() for n in (40, 25, 3, 17)]
    reference = torch.cat([hf_score(tiny.hf, s, 1.0) for s in seqs])
    ours = torch.cat(engine.score(seqs, 1.0))
    theirs = torch.cat([hf_score(hf_bf16, s, 1.0) for s in seqs])
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().mean() <= 1.5 * (theirs - reference).abs().mean()
    out = engine.generate(seqs[:2], SamplingParams(max_new_tokens=5, n=2, seed=0))
    assert all(len(c.token_ids) == 5 for cs in out for c in cs)


def test_cuda_default_is_bf16_and_matches_the_cpu_engine(qwen2):
    if not torch.cuda.is_available():
        unavailable("gpu", "needs CUDA")
    gpu = EmbeddedEngine.from_pretrained(qwen2.folder, EmbeddedEngineConfig(device="cuda"))
    assert gpu.dtype == torch.bfloat16 and gpu.model.lm_head.weight.is_cuda
    cpu = EmbeddedEngine.from_pretrained(qwen2.folder, EmbeddedEngineConfig(device="cpu", dtype="bfloat16"))
    fp32 = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    g = torch.Generator().manual_seed(0)  # 81 scored tokens: a mean over a handful would be the luck of a few
    scored = [torch.randint(0, qwen2.vocab_size, (n,), generator=g).tolist() for n in (40, 25, 3, 17)]
    reference = fp32.score(scored, 1.0)

    def error(scores):
        return torch.cat([(got - want).abs() for got, want in zip(scores, reference)]).mean().item()

    bf16_error = error(cpu.score(scored, 1.0))  # bf16 rounding alone, as the CPU engine has it
    assert error(gpu.score(scored, 1.0)) <= 1.5 * bf16_error + 1e-3  # bf16 kernels differ between devices
    seqs = [[4, 8, 15, 16, 23, 42], [108, 3, 77]]
    # Sampled on the GPU with the KV cache, prompts of two lengths in one batch: each completion's log-probs
    # against the fp32 engine scoring prompt + completion whole (a cache read at the wrong place is off by nats;
    # on the CPU in bf16 this differs by ~1.2x bf16_error).
    out = gpu.generate(seqs, SamplingParams(max_new_tokens=6, n=3, top_p=0.9, seed=0))
    assert [len(cs) for cs in out] == [3, 3]
    diffs = []
    for prompt, completions in zip(seqs, out):
        for c in completions:
            assert len(c.token_ids) == len(c.logprobs) == 6
            whole = fp32.score([prompt + c.token_ids], 1.0)[0][len(prompt) - 1:]
            diffs.append((torch.tensor(c.logprobs) - whole).abs())
    assert torch.cat(diffs).mean().item() <= 3 * bf16_error + 2e-3, (torch.cat(diffs), bf16_error)


def test_a_reused_cache_holding_nan_changes_nothing(qwen2):
    """Rows of different lengths read masked cache slots they have not written yet (weight 0, but 0 x NaN is NaN):
    an earlier batch's overflowed values left in the reused buffers must not reach this batch."""
    engine = EmbeddedEngine.from_pretrained(qwen2.folder, CPU)
    prompts, params = [[3, 1, 4, 1, 5], [9]], SamplingParams(max_new_tokens=6, n=2, seed=7)
    before = engine.generate(prompts, params)
    with torch.inference_mode():  # the engine's buffers are inference tensors
        engine.cache.k.fill_(float("nan"))
        engine.cache.v.fill_(float("nan"))
    again = engine.generate(prompts, params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in before]
    assert [[c.logprobs for c in g] for g in again] == [[c.logprobs for c in g] for g in before]


def test_sampling_params_of_the_wrong_type_are_refused_by_name():
    import numpy as np

    assert SamplingParams(max_new_tokens=np.int64(3), seed=np.int64(3), stop_token_ids=5).stop_token_ids == (5,)
    for bad, name in [(dict(max_new_tokens=2.5), "max_new_tokens"), (dict(n=1.5), "n"), (dict(seed=True), "seed")]:
        with pytest.raises(RolloutError, match=f"{name} must be an integer"):
            SamplingParams(**{"max_new_tokens": 3, **bad})
    with pytest.raises(RolloutError, match=r"seed must be in \[0, 2\*\*63\)"):
        SamplingParams(max_new_tokens=3, seed=2**64)


def test_the_kv_cache_grows_to_the_larger_of_its_batches_and_keeps_that(engine):
    """Many short rows, then few long ones, then many short again: one allocation after the first growth, not a
    new one at every switch; whatever it reuses is zeroed for the batch."""
    cache = engine.cache
    cache.release()
    cache.reserve(8, 10)
    cache.reserve(2, 20)
    first = cache.k.data_ptr()
    assert (cache.k.shape[1], cache.k.shape[3]) == (8, 20)
    with torch.inference_mode():
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
    cache.reserve(8, 10)
    cache.reserve(2, 20)
    assert cache.k.data_ptr() == first
    assert not cache.k[:, :2, :, :20].isnan().any() and not cache.v[:, :2, :, :20].isnan().any()
    cache.release()

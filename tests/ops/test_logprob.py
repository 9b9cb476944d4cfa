"""Vocabulary-parallel log-prob + entropy against the full-vocabulary formula."""
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_dapo.ops.logprob import combine_stats, local_stats, vocab_parallel_logprob
from tests.distributed import run_checks


def _naive(logits, targets, temperature):
    logprobs = torch.log_softmax(logits.double() / temperature, -1)
    logp = logprobs.gather(-1, targets[..., None])[..., 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


@pytest.mark.parametrize(("tokens", "vocab"), [(1, 7), (7, 123), (33, 250)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_unsplit_matches_naive_in_value_and_gradient(tokens, vocab, temperature):
    gen = torch.Generator().manual_seed(tokens * vocab)
    logits = (torch.randn(tokens, vocab, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    g_lp, g_h = torch.randn(tokens, generator=gen, dtype=torch.float64), torch.randn(tokens, generator=gen,
                                                                                        dtype=torch.float64)
    logp, entropy = vocab_parallel_logprob(logits, targets, temperature=temperature)
    (g_lp * logp + g_h * entropy).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref_lp, ref_h = _naive(logits, targets, temperature)
    (g_lp * ref_lp + g_h * ref_h).sum().backward()
    torch.testing.assert_close(logp, ref_lp, rtol=0, atol=1e-10)
    torch.testing.assert_close(entropy, ref_h, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours, logits.grad, rtol=0, atol=1e-9)


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (5,), generator=gen)
    def f(x):
        logp, entropy = vocab_parallel_logprob(x, targets, temperature=0.9)
        return logp * 0.3 + entropy

    assert torch.autograd.gradcheck(f, (logits,))


@pytest.mark.parametrize("slices, vocab", [(2, 61), (3, 61), (8, 61), (2, 30)])  # (2, 30): a slice all padding
def test_statistics_of_slices_combine_to_the_full_vocabulary(slices, vocab):
    gen = torch.Generator().manual_seed(slices)
    padded = 64 if slices != 3 else 63
    logits = torch.randn(9, padded, generator=gen) * 4
    logits[:, vocab:] = 1e4  # padding columns must not count, whatever they hold
    targets = torch.randint(0, vocab, (9,), generator=gen)
    width = padded // slices
    stats = []
    for r in range(slices):
        start = r * width
        local = targets - start
        local = torch.where((local >= 0) & (local < width), local, -1)
        stats.append(local_stats(logits[:, start:start + width], local, 1.0, max(0, min(width, vocab - start))))
    logp, entropy, *_ = combine_stats(torch.stack(stats))
    ref_lp, ref_h = _naive(logits[:, :vocab], targets, 1.0)
    torch.testing.assert_close(logp.double(), ref_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=0, atol=2e-5)


def test_tokens_that_cannot_be_drawn_add_nothing():
    """-inf logits (a masked token): log-prob, entropy and gradient are those of the other tokens alone, in
    value and gradient, also when a whole vocabulary slice is -inf (it adds nothing when the slices combine)."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 24, generator=gen, dtype=torch.float64) * 3
    masked = torch.zeros_like(logits, dtype=torch.bool)
    masked[0, 3] = masked[1, :12] = masked[2, 1::2] = True  # row 1: the first slice of two, whole
    targets = torch.tensor([5, 20, 4, 7])
    g_lp, g_h = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)

    x = logits.masked_fill(masked, float("-inf")).requires_grad_(True)
    logp, entropy = vocab_parallel_logprob(x, targets, temperature=0.8)
    (g_lp * logp + g_h * entropy).sum().backward()
    # The same tokens without the masked ones, row by row.
    for row in range(4):
        keep = (~masked[row]).nonzero()[:, 0]
        y = logits[row, keep][None].clone().requires_grad_(True)
        ref_lp, ref_h = _naive(y, (keep == targets[row]).nonzero()[0], 0.8)
        (g_lp[row] * ref_lp + g_h[row] * ref_h).sum().backward()
        torch.testing.assert_close(logp[row], ref_lp[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(entropy[row], ref_h[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(x.grad[row, keep], y.grad[0], rtol=0, atol=1e-10)
        assert (x.grad[row, masked[row]] == 0).all()

    halves = [local_stats(x.detach()[:, :12], torch.where(targets < 12, targets, -1), 0.8, 12),
              local_stats(x.detach()[:, 12:], torch.where(targets >= 12, targets - 12, -1), 0.8, 12)]
    assert halves[0][1].tolist() == [float("-inf"), 0.0, 0.0, 0.0]
    combined = combine_stats(torch.stack(halves))
    torch.testing.assert_close(combined.logp, logp.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(combined.entropy, entropy.detach(), rtol=0, atol=1e-10)


def test_the_reference_gradient_compiles_in_one_graph():
    """torch.compile of the reference is a baseline of the kernel benchmark: a graph break (nonzero() over the rows
    did) splits it in two and round-trips the fp32 gradient through memory, which would flatter the kernel."""
    from megatron_dapo.ops.logprob import local_grad

    t, v = 6, 50
    logits, targets = torch.randn(t, v, dtype=torch.bfloat16), torch.tensor([3, -1, 7, 0, 49, -1])
    top, log_total, shifted = logits.float().amax(-1) / 0.7, torch.rand(t), torch.randn(t)  # only traced here
    args = (logits, targets, top, log_total, shifted, torch.randn(t), torch.randn(t), 0.7, v)
    explained = torch._dynamo.explain(local_grad)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()


def test_bf16_logits_error_no_worse_than_torch_bf16_path():
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 1000, generator=gen) * 3).bfloat16()
    targets = torch.randint(0, 1000, (64,), generator=gen)
    ref_lp, _ = _naive(logits.double(), targets, 1.0)
    ours, _ = vocab_parallel_logprob(logits, targets)
    torch_bf16 = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    assert (ours.double() - ref_lp).abs().max() <= 2 * (torch_bf16.double() - ref_lp).abs().max()
    # bf16 values in, float32 arithmetic: float32's error, not bf16's (a bf16 result would be off by ~0.03).
    assert ours.dtype == torch.float32 and (ours.double() - ref_lp).abs().max() <= 1e-5


def check_two_ranks_match_the_full_vocabulary(rank: int, world_size: int, workdir: Path) -> None:
    gen = torch.Generator().manual_seed(11)
    vocab, padded = 99, 128
    full = torch.randn(2, 6, padded, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, vocab, (2, 6), generator=gen)
    g = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    width = padded // world_size
    local = full[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
    logp, entropy = vocab_parallel_logprob(local, targets, temperature=0.8, vocab_start=rank * width,
                                           vocab_size=vocab, group=dist.group.WORLD)
    (g * logp + entropy).sum().backward()
    ref = full[..., :vocab].clone().requires_grad_(True)
    ref_lp, ref_h = _naive(ref, targets, 0.8)
    (g * ref_lp + ref_h).sum().backward()
    torch.testing.assert_close(logp.double(), ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_h, rtol=0, atol=1e-5)
    ref_grad = torch.nn.functional.pad(ref.grad, (0, padded - vocab))[..., rank * width:(rank + 1) * width]
    torch.testing.assert_close(local.grad, ref_grad, rtol=0, atol=1e-5)


def test_two_gloo_ranks(tmp_path):
    results = run_checks(2, [check_two_ranks_match_the_full_vocabulary], tmp_path)
    errors = results["check_two_ranks_match_the_full_vocabulary"]
    assert not errors, "\n".join(errors)


def test_entropy_keeps_its_precision_when_the_logits_are_large():
    """Confident tokens under large logits (about 60, one 25 above the rest): their entropy is about 6e-6. Taken as
    lse - E[z], two fp32 numbers near 85, it came out 1.5e-5 off, more than itself; taken about the max it is
    within 1e-6 of the fp64 value (3.2e-7 measured), split over two vocabulary slices too."""
    gen = torch.Generator().manual_seed(3)
    tokens, vocab = 64, 4096
    logits = 60 + 2 * torch.randn(tokens, vocab, generator=gen)
    logits[torch.arange(tokens), torch.randint(0, vocab, (tokens,), generator=gen)] += 25
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    exact = torch.log_softmax(logits.double(), -1)
    want = -(exact.exp() * exact).sum(-1)
    assert want.median() < 1e-5
    half = vocab // 2
    for slices in ([(0, vocab)], [(0, half), (half, vocab)]):
        stats = [local_stats(logits[:, a:b], torch.where((targets >= a) & (targets < b), targets - a, -1), 1.0, b - a)
                 for a, b in slices]
        entropy = combine_stats(torch.stack(stats)).entropy
        assert (entropy.double() - want).abs().max() < 1e-6, len(slices)


def test_a_likely_token_s_log_prob_keeps_its_precision_when_the_logits_are_large():
    """bf16 logits topped by 60, the runner-up about 52: the top token's log-prob is -3e-4 to -9e-4. Taken as
    z_target - lse, lse rounded to float32 at 60 first (steps of 4e-6), it was 4e-7 off; taken about the max it is
    within 1e-7 of the fp64 value (5e-8 measured), split over two vocabulary slices too."""
    gen = torch.Generator().manual_seed(5)
    tokens, vocab = 32, 2048
    logits = (3 * torch.randn(tokens, vocab, generator=gen))
    logits[:, 7], logits[:, 900] = 60.0, 52.0 + torch.rand(tokens, generator=gen)
    logits = logits.bfloat16().float()  # values a bf16 model gives
    targets = torch.full((tokens,), 7)
    want = torch.log_softmax(logits.double(), -1)[:, 7]
    assert want.max() < -1e-4
    half = vocab // 2
    for slices in ([(0, vocab)], [(0, half), (half, vocab)]):
        stats = [local_stats(logits[:, a:b], torch.where((targets >= a) & (targets < b), targets - a, -1), 1.0, b - a)
                 for a, b in slices]
        logp = combine_stats(torch.stack(stats)).logp
        assert (logp.double() - want).abs().max() < 1e-7, len(slices)


def test_a_target_that_cannot_be_drawn_has_log_prob_minus_inf_and_a_finite_gradient_on_both_ops():
    """A target whose logit is -inf (a token masked out): log-prob -inf, and a finite gradient on the unsplit op
    as on the split one (it took lse back from its outputs, z_y - logp = -inf - -inf, which made the row NaN)."""
    from megatron_dapo.ops.logprob import logprob_entropy

    logits = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    logits[0, 3] = float("-inf")
    targets = torch.tensor([3, 1, 6])
    grads = []
    for op in (lambda x: logprob_entropy(x, targets, 0.9, 7),
               lambda x: vocab_parallel_logprob(x * 1.0, targets, temperature=0.9)):
        x = logits.clone().requires_grad_(True)
        logp, entropy = op(x)
        assert logp[0] == float("-inf") and logp[1:].isfinite().all() and entropy.isfinite().all()
        (entropy.sum() + logp[1:].sum()).backward()
        assert x.grad.isfinite().all() and x.grad[0, 3] == 0
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_inplace_backward_refuses_a_leaf_and_a_target_of_no_column_has_a_gradient():
    """The in-place backward would write a leaf's gradient over its values: refused. A target outside the real
    vocabulary (an ignore index, a padding column) reads as a logit of 0 in the forward, and the backward (which
    finds lse from the forward's outputs) reads it the same way instead of failing to gather it."""
    from megatron_dapo.ops.logprob import logprob_entropy

    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    for logits in (x, x[:, :6]):
        with pytest.raises(ValueError, match="a leaf tensor \\(or a view of one\\)"):
            vocab_parallel_logprob(logits, torch.tensor([1, 2, 3, 4]), inplace_backward=True)
    # Rows that share memory (one row expanded): the kernel would write one row's gradient over another's logits.
    with pytest.raises(ValueError, match="rows here share memory \\(row stride 0 < 10 columns"):
        vocab_parallel_logprob((x[0] * 1).expand(4, 10), torch.tensor([1, 2, 3, 4]), inplace_backward=True)
    targets = torch.tensor([1, -100, 2, 9, 12])  # 9: a padding column of the 8 real ones; 12: past every column
    logp, entropy = logprob_entropy(x, targets, 1.0, 8)
    lse = torch.logsumexp(x.detach()[:, :8], -1)
    torch.testing.assert_close(logp.detach()[[1, 3, 4]], -lse[[1, 3, 4]])
    (logp.sum() + entropy.sum()).backward()
    assert x.grad[:, 8:].eq(0).all() and x.grad.isfinite().all()
    torch.autograd.gradcheck(lambda y: logprob_entropy(y, targets, 1.0, 8), (x.detach().clone().requires_grad_(),))
    # A count of real columns that is not one of the logits' widths is named (the kernel would clamp it; the
    # reference failed to gather past the end, and below 0 dropped columns from the end).
    for columns in (11, -2):
        with pytest.raises(ValueError, match=rf"valid_columns={columns} is outside \[0, 10\], the logits' columns"):
            logprob_entropy(x, targets, 1.0, columns)


def test_a_slice_of_masked_logits_adds_nothing_when_the_slices_combine():
    """Logits masked with float32's lowest value (not -inf) in one vocabulary slice: its statistics moved to the
    other slice's max would overflow ((m - top) * s), and the entropy came out NaN split, right unsplit."""
    low = torch.finfo(torch.float32).min
    logits = torch.tensor([[low, low, 1.0, 2.0]])
    targets = torch.tensor([3])
    whole = combine_stats(local_stats(logits, targets, 1.0, 4)[None])
    split = combine_stats(torch.stack([local_stats(logits[:, :2], torch.tensor([-1]), 1.0, 2),
                                       local_stats(logits[:, 2:], torch.tensor([1]), 1.0, 2)]))
    for got, want in zip(split, whole):
        torch.testing.assert_close(got, want)
    assert split.entropy.isfinite().all()



def _confident_large_logits(tokens: int = 16, vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits about 60 (bf16 values) with one token 25 above the rest in each row, and targets."""
    gen = torch.Generator().manual_seed(3)
    logits = 60 + 2 * torch.randn(tokens, vocab, generator=gen)
    logits[torch.arange(tokens), torch.randint(0, vocab, (tokens,), generator=gen)] += 25
    return logits.to(torch.bfloat16).float(), torch.randint(0, vocab, (tokens,), generator=gen)


def _fp64_entropy_grad(logits: torch.Tensor) -> torch.Tensor:
    y = logits.double().requires_grad_()
    logp = torch.log_softmax(y, -1)
    (-(logp.exp() * logp).sum(-1)).sum().backward()
    return y.grad


def test_the_entropy_gradient_of_confident_rows_with_large_logits_keeps_its_precision():
    """The backward forms z - lse and E[z] - z from z - max: lse and E[z] themselves, rounded at the logits' size
    (60 in float32: steps of 4e-6), left the entropy's gradient of a likely token 9% of the row's largest off."""
    logits, targets = _confident_large_logits()
    x = logits.clone().requires_grad_()
    _, entropy = vocab_parallel_logprob(x * 1.0, targets)
    entropy.sum().backward()
    exact = _fp64_entropy_grad(logits)
    assert (x.grad.double() - exact).abs().max() <= 1e-4 * exact.abs().max()

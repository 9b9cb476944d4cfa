"""The CUDA kernels of csrc/, compiled for the CPU on the CUDA execution model of cuda_on_cpu/runtime.h
(`cpu_kernels.py`), against the package's pure-torch references and fp64.

This checks the kernels' logic on every machine: indexing, the 16-byte-pack and one-element load paths and
what the launchers choose between them from the logits' and the gradient's addresses and row strides, row
tails, vocabulary padding, the block and warp reductions and their barriers, in-place gradients, NaN
handling, the loss's grid-stride loop and two-stage reduction. The inputs, and the gradients the tests pass
in to be written, lie inside NaN-filled memory (around each row, after the last one, around each loss
vector, and in the padding columns the statistics must not read), so a read outside what a kernel may read
shows as NaN, and a write outside what it may write changes the NaN. Every call runs twice, blocks, warps
and lanes in opposite orders, and must give the same bits. The GPU itself (instructions, speed) is checked
by test_kernels_cuda.py on a machine with one.
"""
import pytest
import torch

from megatron_dapo.ops import dapo_loss as loss_ops
from megatron_dapo.ops import logprob as lp_ops
from tests.ops import cpu_kernels

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (tokens, vocabulary slice, padding columns): 128, 256 and 512 threads (csrc/logprob.cu threads_for); tails of
# every length, inside the valid columns and in the padding.
SHAPES = [(1, 7, 0), (7, 123, 5), (9, 1000, 1), (4, 4099, 9), (3, 32003, 0), (2, 151936, 5)]
# Where the logits and the gradient lie: (first element, row stride beyond the columns' multiple of 8) of each.
# Starting 8 elements in is 16 or 32 bytes from an aligned start (16-byte packs); 1 element in is not; an odd
# row stride rules packs out too, the logits' or the gradient's. The gradient's row stride differs from the
# logits' in "packs".
LAYOUTS = {"packs": ((8, 16), (8, 24)), "one-element": ((1, 16), (1, 16)), "odd-row-stride": ((8, 17), (8, 16)),
           "grad-odd-row-stride": ((8, 16), (8, 17)), "grad-misaligned": ((8, 16), (1, 16)),
           "logits-misaligned": ((1, 16), (8, 16))}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return cpu_kernels.build(tmp_path_factory.mktemp("cpu_kernels"))


def _twice(fn, *args):
    """fn(*args) twice (the model runs blocks, warps and lanes in opposite orders); the results must be the same
    bits."""
    first = fn(*args)
    second = fn(*args)
    assert torch.equal(first.view(torch.uint8), second.view(torch.uint8)), "the result depends on thread order"
    return first


def _in_nan(rows: int, columns: int, dtype, where=(8, 16)):
    """(buffer, view): a [rows, columns] view inside a NaN-filled buffer, NaN before and after every row and a NaN
    row after the last; `where` = (first element, row stride beyond the columns rounded up to 8)."""
    start, extra = where
    buffer = torch.full((rows + 1, (columns + 7) // 8 * 8 + extra), float("nan"), dtype=dtype)
    return buffer, buffer[:rows, start:start + columns]


def _framed(t: torch.Tensor) -> torch.Tensor:
    """A copy of the 1-D `t` inside NaN-filled memory."""
    buffer = torch.full((t.numel() + 64,), float("nan"), dtype=t.dtype)
    view = buffer[32:32 + t.numel()]
    view.copy_(t)
    return view


def _outside_untouched(buffer: torch.Tensor, view: torch.Tensor):
    inside = torch.zeros(buffer.shape, dtype=torch.bool)
    first = (view.data_ptr() - buffer.data_ptr()) // buffer.element_size()
    inside[:view.shape[0], first:first + view.shape[1]] = True
    assert buffer[~inside].isnan().all(), "a kernel wrote outside its tensor"


def _logits(tokens, vocab, valid, dtype, where, seed):
    gen = torch.Generator().manual_seed(seed)
    buffer, logits = _in_nan(tokens, vocab, dtype, where)
    logits[:, :valid] = (torch.randn(tokens, valid, generator=gen) * 4).to(dtype)  # padding columns stay NaN
    targets = torch.randint(0, valid, (tokens,), generator=gen)
    targets[::3] = -1  # owned by another rank
    targets[-1] = valid - 1  # in the row's tail
    return buffer, logits, targets


def _grad_tolerance(dtype):
    # Measured: the 16-bit gradients are the reference's or one unit in the last place from them (at most 2**-7
    # of the value in bf16, 2**-10 in fp16), float32 ones within 5e-5 of it relatively, except near a
    # cancellation in p * (g_h * (E[z] - z) - g_lp), which the two group differently: there, below 1e-8
    # (gradients reach ~1).
    return {torch.float32: {"rtol": 2e-4, "atol": 1e-9}, torch.float16: {"rtol": 2e-3, "atol": 1e-7},
            torch.bfloat16: {"rtol": 8e-3, "atol": 1e-7}}[dtype]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "vocab", "padding"), SHAPES)
def test_logprob_stats_and_grad_against_the_reference(kernels, tokens, vocab, padding, dtype, layout):
    temperature = 0.7
    valid = vocab - padding  # padding columns hold NaN: the statistics must not read them
    logits_at, grad_at = LAYOUTS[layout]
    buffer, logits, targets = _logits(tokens, vocab, valid, dtype, logits_at, seed=tokens * 131 + vocab)

    stats = _twice(kernels.logprob_stats, logits, targets, temperature, valid)
    expected = lp_ops.local_stats(logits, targets, temperature, valid)
    assert stats.dtype == torch.float32 and stats.shape == (tokens, 4)
    # The kernel multiplies by 1 / temperature where the reference divides: the max and the target logit
    # may differ in the last bit.
    torch.testing.assert_close(stats[:, [0, 3]], expected[:, [0, 3]], rtol=2e-7, atol=0)
    torch.testing.assert_close(stats[:, 1:3], expected[:, 1:3], rtol=2e-5, atol=1e-6)

    saved = lp_ops.combine_stats(expected[None])[2:]  # top, log_total, shifted
    gen = torch.Generator().manual_seed(7)
    g_lp, g_h = torch.randn(tokens, generator=gen), torch.randn(tokens, generator=gen)
    want = lp_ops.local_grad(logits, targets, *saved, g_lp, g_h, temperature, valid)
    assert not want.isnan().any()

    grad_buffer, grad = _in_nan(tokens, vocab, dtype, grad_at)
    # NaN again before each run: an element the second run fails to write would keep the first run's value.
    _twice(lambda: (grad.fill_(float("nan")), kernels.logprob_grad_into(
        logits, targets, *saved, g_lp, g_h, temperature, valid, grad), grad.clone())[2])
    torch.testing.assert_close(grad, want, **_grad_tolerance(dtype))
    assert (grad[:, valid:] == 0).all(), "padding columns get a zero gradient"
    _outside_untouched(grad_buffer, grad)

    # In place, on two copies (the two launches run the threads in opposite orders).
    copies = [_logits(tokens, vocab, valid, dtype, logits_at, seed=tokens * 131 + vocab)[:2] for _ in range(2)]
    for copy_buffer, copy in copies:
        kernels.logprob_grad_into(copy, targets, *saved, g_lp, g_h, temperature, valid, copy)
        torch.testing.assert_close(copy, want, **_grad_tolerance(dtype))
        _outside_untouched(copy_buffer, copy)
    assert torch.equal(copies[0][1].view(torch.uint8), copies[1][1].view(torch.uint8))


@pytest.mark.parametrize("layout", ["packs", "one-element"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_valid_column_is_read_once(kernels, dtype, layout):
    """Zero logits: each valid column adds exactly 1 to the sum (exact in float32), 0 to the weighted sum."""
    for valid in (1, 7, 8, 9, 123, 4099, 32003):
        buffer, logits = _in_nan(3, valid + 3, dtype, LAYOUTS[layout][0])
        logits[:, :valid] = 0
        stats = _twice(kernels.logprob_stats, logits, torch.tensor([0, -1, valid - 1]), 1.0, valid)
        assert stats.tolist() == [[0.0, valid, 0.0, 0.0]] * 3, (valid, stats)


@pytest.mark.parametrize("shards", [2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tensor_parallel_combine_against_fp64(kernels, shards, dtype):
    tokens, vocab = 5, 32003
    width = -(-vocab // shards // 8) * 8  # each rank's slice, the last one padded
    gen = torch.Generator().manual_seed(shards)
    full = (torch.randn(tokens, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    padded = torch.cat([full, full.new_full((tokens, width * shards - vocab), float("nan"))], 1)
    stats = []
    for rank in range(shards):
        local = targets - rank * width
        local = torch.where((local >= 0) & (local < width), local, -1)
        valid = max(0, min(width, vocab - rank * width))
        _, shard = _in_nan(tokens, width, dtype)  # each slice in its own NaN-framed memory, as on its own rank
        shard.copy_(padded[:, rank * width:(rank + 1) * width])
        stats.append(_twice(kernels.logprob_stats, shard, local, 1.3, valid))
    logp, got_entropy, *_ = lp_ops.combine_stats(torch.stack(stats))

    logprobs = torch.log_softmax(full.double() / 1.3, -1)
    torch.testing.assert_close(logp.double(), logprobs.gather(1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    torch.testing.assert_close(got_entropy.double(), entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["packs", "one-element"])
def test_nan_and_infinite_logits(kernels, layout):
    tokens, vocab = 5, 1003
    _, logits, targets = _logits(tokens, vocab, vocab, torch.bfloat16, LAYOUTS[layout][0], seed=3)
    logits[0, 100] = float("nan")  # inside the packed part
    logits[1, vocab - 1] = float("nan")  # in the row's tail
    logits[2] = float("-inf")  # nothing possible
    logits[3, :500] = float("-inf")
    logits[3, 600] = float("inf")
    stats = _twice(kernels.logprob_stats, logits, targets, 1.0, vocab)
    # A row's statistics may differ from the reference's where they mean the same (a NaN in the sum but not
    # in the max); what the ranks combine them into may not.
    got = lp_ops.combine_stats(stats[None])
    want = lp_ops.combine_stats(lp_ops.local_stats(logits, targets, 1.0, vocab)[None])
    # The max alone may differ too (NaN in one, not the other) where the row is NaN all the same.
    for name, value, expected in (("logp", got.logp, want.logp), ("entropy", got.entropy, want.entropy),
                                  ("lse", got.top + got.log_total, want.top + want.log_total),
                                  ("E[z]", got.top + got.shifted, want.top + want.shifted)):
        torch.testing.assert_close(value, expected, rtol=2e-5, atol=1e-5, equal_nan=True,
                                   msg=lambda text, name=name: f"{name}: {text}")
    assert got.log_total[:4].isnan().all() and got.log_total[4].isfinite()
    assert stats[:2, 1].isnan().all() and stats[2, 1] == 0  # an all -inf slice adds nothing when combined


@pytest.mark.parametrize("layout", ["packs", "one-element"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tokens_that_cannot_be_drawn_add_nothing(kernels, dtype, layout):
    """-inf logits (masked tokens) among finite ones, in a pack of their own, sharing one, in the tail, a whole
    row: finite statistics and gradients, the reference's (test_logprob.py checks it against fp64)."""
    tokens, vocab = 4, 1003
    _, logits, targets = _logits(tokens, vocab, vocab, dtype, LAYOUTS[layout][0], seed=5)
    logits[0, 8:16] = float("-inf")  # one whole 16-byte pack of bf16 (half of two of fp32)
    logits[1, 3] = float("-inf")  # shares its pack with finite logits
    logits[1, vocab - 2] = float("-inf")  # in the row's tail
    logits[2, 1::2] = float("-inf")
    logits[3] = float("-inf")  # a slice of nothing else (another rank has the row's tokens)
    targets[:] = torch.tensor([20, 40, 100, -1])
    stats = _twice(kernels.logprob_stats, logits, targets, 0.9, vocab)
    expected = lp_ops.local_stats(logits, targets, 0.9, vocab)
    assert stats[:, 1:].isfinite().all() and stats[3].tolist() == [float("-inf"), 0.0, 0.0, 0.0]
    torch.testing.assert_close(stats, expected, rtol=2e-5, atol=1e-6)

    saved = lp_ops.combine_stats(expected[:3][None])[2:]  # top, log_total, shifted
    g_lp, g_h = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.25, -1.0])
    want = lp_ops.local_grad(logits[:3], targets[:3], *saved, g_lp, g_h, 0.9, vocab)
    assert want.isfinite().all()
    _, grad = _in_nan(3, vocab, dtype)
    kernels.logprob_grad_into(logits[:3], targets[:3], *saved, g_lp, g_h, 0.9, vocab, grad)
    torch.testing.assert_close(grad, want, **_grad_tolerance(dtype))
    assert (grad[logits[:3].isinf()] == 0).all()


def test_the_entropy_gradient_of_confident_rows_with_large_logits_keeps_its_precision(kernels):
    """As tests/ops/test_logprob.py checks the reference: the kernel's backward takes the max, log sum exp(z - max)
    and E[z - max] apart, not lse and E[z] rounded at the logits' size."""
    from tests.ops.test_logprob import _confident_large_logits, _fp64_entropy_grad

    logits, targets = _confident_large_logits()
    saved = lp_ops.combine_stats(kernels.logprob_stats(logits, targets, 1.0, logits.shape[1])[None])[2:]
    grad = torch.empty_like(logits)
    tokens = logits.shape[0]
    kernels.logprob_grad_into(logits, targets, *saved, torch.zeros(tokens), torch.ones(tokens), 1.0,
                              logits.shape[1], grad)
    exact = _fp64_entropy_grad(logits)
    assert (grad.double() - exact).abs().max() <= 1e-4 * exact.abs().max()


def test_empty_slices_and_rows(kernels):
    logits = torch.randn(3, 16)
    targets = torch.tensor([0, -1, 5])
    stats = _twice(kernels.logprob_stats, logits, targets, 1.0, 0)  # a slice of padding only
    assert stats[:, 0].eq(float("-inf")).all() and stats[:, 1:].eq(0).all()
    assert kernels.logprob_stats(logits[:0], targets[:0], 1.0, 16).shape == (0, 4)


def test_launcher_checks_name_the_tensor(kernels):
    logits = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        kernels.logprob_stats(logits, torch.zeros(3, dtype=torch.int32), 1.0, 16)
    with pytest.raises(RuntimeError, match="grad must have the logits' shape"):
        kernels.logprob_grad_into(logits, torch.zeros(3, dtype=torch.long), *[torch.zeros(3)] * 5, 1.0, 16,
                                  torch.zeros(3, 15))
    with pytest.raises(RuntimeError, match="logits must be float32, bfloat16 or float16, got Double"):
        kernels.logprob_stats(logits.double(), torch.zeros(3, dtype=torch.long), 1.0, 16)
    # A gradient written where the logits still have to be read (overlapping them other than exactly, in place), or
    # whose rows share memory, would race between blocks: refused before any launch.
    stats = [torch.zeros(3)] * 5
    memory = torch.randn(3 * 16 + 1)
    for grad, overlap in ((torch.zeros(1, 16).expand(3, 16), "more than one element of the written-to tensor"),
                          (memory[1:].view(3, 16), "some elements of the input tensor and the written-to tensor")):
        with pytest.raises(RuntimeError, match=overlap):
            kernels.logprob_grad_into(memory[:48].view(3, 16), torch.zeros(3, dtype=torch.long), *stats, 1.0, 16, grad)
    with pytest.raises(RuntimeError, match="mask has 2 elements, expected 3"):
        kernels.dapo_loss_forward(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2), None,
                                  0.2, 0.28, 10.0, torch.tensor(3.0))


def _loss_inputs(n, mask_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=gen) * 3
    old_logp = logp + torch.randn(n, generator=gen) * 0.3
    old_logp[::5] = logp[::5]  # ratio exactly 1: ties between the clipped and unclipped terms
    old_logp[1::97] = logp[1::97] + 30  # beyond the log-ratio clamp: no gradient
    advantages = torch.randn(n, generator=gen)
    advantages[::7] = 0
    mask = {"mixed": (torch.rand(n, generator=gen) > 0.3).float(), "ones": torch.ones(n), "zeros": torch.zeros(n)}
    weight = torch.rand(n, generator=gen) * 2
    return logp, old_logp, advantages, mask[mask_kind], weight


LOSS_CASES = [(n, mask_kind, weighted) for n in (1, 7, 1000) for mask_kind in ("mixed", "ones", "zeros")
              for weighted in (False, True)]
LOSS_CASES.append((262144 + 77, "mixed", True))  # past the 1024 blocks x 256 threads of one sweep: the loop turns
CLIP_C = 1.5  # a dual-clip bound that some tokens with negative advantages pass


@pytest.mark.parametrize(("n", "mask_kind", "weighted"), LOSS_CASES)
def test_dapo_loss_forward_and_backward_against_the_reference(kernels, n, mask_kind, weighted):
    logp, old_logp, advantages, mask, weight = (_framed(t) for t in _loss_inputs(n, mask_kind, seed=n))
    weight = weight if weighted else None
    args = (logp, old_logp, advantages, mask, weight, 0.2, 0.28, CLIP_C, torch.tensor(float(n) + 11))

    out = _twice(kernels.dapo_loss_forward, *args)
    expected = loss_ops.reference_forward(*args)
    assert out.shape == (len(loss_ops.FIELDS),)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-7)  # loss: fp64 sums against fp32's
    torch.testing.assert_close(out[1:5], expected[1:5], rtol=0, atol=0)  # token and clip counts
    torch.testing.assert_close(out[5:7], expected[5:7], rtol=1e-4, atol=1e-3)  # KL sums
    torch.testing.assert_close(out[7], expected[7], rtol=3e-7, atol=0)  # largest ratio (expf against torch.exp)
    if n == 1000 and mask_kind != "zeros":
        assert expected[4] > 10, "the inputs exercise the dual clip"

    grad_loss = torch.tensor(0.75)
    grad = _twice(kernels.dapo_loss_backward, grad_loss, *args)
    torch.testing.assert_close(grad, loss_ops.reference_backward(grad_loss, *args), rtol=1e-6, atol=1e-9)


def test_dapo_loss_nan_log_prob(kernels):
    logp, old_logp, advantages, mask, _ = _loss_inputs(600, "ones", seed=5)
    logp[300] = float("nan")
    args = (logp, old_logp, advantages, mask, None, 0.2, 0.28, CLIP_C, torch.tensor(600.0))
    out = _twice(kernels.dapo_loss_forward, *args)
    assert out[0].isnan() and out[7].isnan()  # the loss and the largest ratio
    torch.testing.assert_close(out, loss_ops.reference_forward(*args), equal_nan=True)


def test_dapo_loss_nan_token_count(kernels):
    """A NaN global token count makes the loss and its gradient NaN, as the reference's clamp does (fmax would
    take 1 in its place and hide it)."""
    logp, old_logp, advantages, mask, _ = _loss_inputs(50, "ones", seed=6)
    args = (logp, old_logp, advantages, mask, None, 0.2, 0.28, CLIP_C, torch.tensor(float("nan")))
    out = _twice(kernels.dapo_loss_forward, *args)
    assert out[0].isnan() and not out[1:].isnan().any()  # only the loss is divided by the count
    torch.testing.assert_close(out, loss_ops.reference_forward(*args), equal_nan=True)
    grad = _twice(kernels.dapo_loss_backward, torch.tensor(1.0), *args)
    assert grad.isnan().all()
    torch.testing.assert_close(grad, loss_ops.reference_backward(torch.tensor(1.0), *args), equal_nan=True)

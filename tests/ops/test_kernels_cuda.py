"""The fused CUDA kernels against fp64 references, on a GPU (the checks skip, with the reason, on a
machine without one or without the built extension).

Outputs are poisoned before each run: the caching allocator hands the kernel memory that was just
filled with NaN, so an element the kernel forgets to write fails the comparison.
"""
import pytest
import torch

from megatron_dapo.ops import dapo_loss as loss_ops
from megatron_dapo.ops import extension
from megatron_dapo.ops import logprob as lp_ops
from tests.required import unavailable


def _need_gpu():
    if not torch.cuda.is_available():
        unavailable("gpu", "no CUDA device here: the kernels are checked on a GPU machine")
    if extension.EXTENSION is None:
        unavailable("extension", f"megatron_dapo._C is not built: {extension.UNAVAILABLE_BECAUSE}")


def _poison(nbytes: int) -> None:
    """Leave NaN-filled blocks in the caching allocator for the next allocations to reuse."""
    blocks = [torch.full((max(nbytes // 4, 1) + 1024,), float("nan"), device="cuda") for _ in range(4)]
    del blocks


def _fp64_reference(logits, targets, temperature, valid):
    z = logits[:, :valid].double() / temperature
    logprobs = torch.log_softmax(z, -1)
    return logprobs.gather(-1, targets[:, None])[:, 0], -(logprobs.exp() * logprobs).sum(-1)


def _fp64_grad(logits, targets, temperature, valid, g_lp, g_h):
    x = logits.double().clone().requires_grad_(True)
    logp, entropy = _fp64_reference(x, targets, temperature, valid)
    (g_lp.double() * logp + g_h.double() * entropy).sum().backward()
    return x.grad


def _vocab_slices(logits, targets, vocab, width):
    """(slice's logits, its local targets with -1 off the slice, its valid columns) of each rank's vocabulary
    slice of `width` columns, as the tensor-parallel ranks hold them."""
    for start in range(0, logits.shape[1], width):
        local = targets - start
        local = torch.where((local >= 0) & (local < width), local, -1)
        yield logits[:, start:start + width].contiguous(), local, max(0, min(width, vocab - start))


SHAPES = [(1, 7), (7, 123), (33, 1000), (257, 32003), (64, 151936)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("tokens", "vocab"), SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_forward_and_backward_against_fp64(tokens, vocab, dtype, temperature):
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(tokens * 31 + vocab)
    valid = vocab - (vocab % 8 == 0)  # one padding column where the width is a multiple of 8
    logits = (torch.randn(tokens, vocab, device="cuda", generator=gen) * 4).to(dtype)
    logits[:, valid:] = 30.0  # padding must not count
    targets = torch.randint(0, valid, (tokens,), device="cuda", generator=gen)
    g_lp = torch.randn(tokens, device="cuda", generator=gen)
    g_h = torch.randn(tokens, device="cuda", generator=gen)

    _poison(tokens * 16)
    stats = extension.EXTENSION.logprob_stats(logits, targets, temperature, valid)
    logp, entropy, *saved = lp_ops.combine_stats(stats[None])  # saved: top, log_total, shifted
    ref_lp, ref_h = _fp64_reference(logits, targets, temperature, valid)
    # torch's own bf16 path (log_softmax computed in the logits' dtype) sets the error budget: ours <= 2x.
    naive = torch.log_softmax(logits[:, :valid] / temperature, -1)
    naive_err = (naive.gather(-1, targets[:, None])[:, 0].double() - ref_lp).abs().max().item()
    budget = max(2 * naive_err, 1e-5 * max(1.0, ref_lp.abs().max().item()))
    assert torch.isfinite(stats).all(), "an unwritten statistic"
    assert (logp.double() - ref_lp).abs().max().item() <= budget
    assert (entropy.double() - ref_h).abs().max().item() <= max(budget, 1e-4)

    grad = torch.full_like(logits, float("nan"))
    extension.EXTENSION.logprob_grad_into(logits, targets, *saved, g_lp, g_h, temperature, valid, grad)
    ref_grad = _fp64_grad(logits, targets, temperature, valid, g_lp, g_h)
    assert torch.isfinite(grad).all(), "an unwritten gradient element"
    assert (grad[:, valid:] == 0).all()
    scale = ref_grad.abs().max().item()
    tol = (1e-5 if dtype == torch.float32 else 1e-2) * max(scale, 1e-6)
    assert (grad.double() - ref_grad).abs().max().item() <= tol

    inplace = logits.clone()
    extension.EXTENSION.logprob_grad_into(inplace, targets, *saved, g_lp, g_h, temperature, valid, inplace)
    assert torch.equal(inplace, grad)


@pytest.mark.parametrize("padded", [32008, 32064])  # slices of 16004 / 4001 columns: single loads; 16032 / 4008: packs
@pytest.mark.parametrize("shards", [2, 8])
def test_tp_combine_of_shard_statistics(shards, padded):
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(shards)
    tokens, vocab = 129, 32001
    logits = (torch.randn(tokens, padded, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    stats = [extension.EXTENSION.logprob_stats(shard, local, 0.9, valid)
             for shard, local, valid in _vocab_slices(logits, targets, vocab, padded // shards)]
    logp, entropy, *_ = lp_ops.combine_stats(torch.stack(stats))
    ref_lp, ref_h = _fp64_reference(logits, targets, 0.9, vocab)
    assert (logp.double() - ref_lp).abs().max().item() <= 1e-4
    assert (entropy.double() - ref_h).abs().max().item() <= 1e-4


def test_slices_of_padding_only():
    """A tiny vocabulary over many ranks: the last slices hold padding only (valid = 0). Their statistics
    must drop out of the combine and their gradient must be zero, as in the reference."""
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(5)
    tokens, vocab, shards, width = 9, 20, 8, 4  # slices 5, 6 and 7 start at or past the vocabulary
    logits = torch.randn(tokens, shards * width, device="cuda", generator=gen).to(torch.bfloat16)
    logits[:, vocab:] = 30.0  # padding must not count
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    stats, grads = [], []
    g_lp = torch.randn(tokens, device="cuda", generator=gen)
    g_h = torch.randn(tokens, device="cuda", generator=gen)
    for shard, local, valid in _vocab_slices(logits, targets, vocab, width):
        _poison(tokens * 16)
        got = extension.EXTENSION.logprob_stats(shard, local, 1.0, valid)
        want = lp_ops.local_stats(shard.cpu(), local.cpu(), 1.0, valid)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        stats.append(got)
    logp, entropy, *saved = lp_ops.combine_stats(torch.stack(stats))
    ref_lp, ref_h = _fp64_reference(logits, targets, 1.0, vocab)
    assert (logp.double() - ref_lp).abs().max().item() <= 1e-4
    assert (entropy.double() - ref_h).abs().max().item() <= 1e-4
    for shard, local, valid in _vocab_slices(logits, targets, vocab, width):
        grad = torch.full_like(shard, float("nan"))
        extension.EXTENSION.logprob_grad_into(shard, local, *saved, g_lp, g_h, 1.0, valid, grad)
        grads.append(grad)
    ref_grad = _fp64_grad(logits, targets, 1.0, vocab, g_lp, g_h)
    got_grad = torch.cat(grads, dim=1)
    assert torch.isfinite(got_grad).all(), "an unwritten gradient element"
    assert (got_grad[:, vocab:] == 0).all()
    assert (got_grad.double() - ref_grad).abs().max().item() <= 1e-2 * ref_grad.abs().max().item()


# Slices of 16001 columns are read one element at a time, of 16000 in 16-byte packs of 8 bf16 (a row stride that
# is a multiple of 8); either way by 256 threads (csrc/logprob.cu threads_for), so thread 0's second read is 256
# elements, or 256 packs, after its first.
@pytest.mark.parametrize(("vocab", "width", "vec"), [(32002, 16001, 1), (32000, 16000, 8)])
def test_a_nan_logit_makes_its_row_nan_as_in_the_reference(vocab, width, vec):
    """fmaxf skips a NaN: one read while a thread had seen only -inf was dropped, and a slice all NaN dropped out
    of the TP combine, so a diverged model's log-probs stayed finite and no alarm rang."""
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(11)
    tokens = 6
    logits = torch.randn(tokens, vocab, device="cuda", generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    logits[0, 0] = float("nan")                  # the first value thread 0 reads
    logits[1, 0:8] = float("nan")                # a whole 16-byte pack of bf16
    logits[2, :width] = float("nan")             # a TP slice all NaN: row 2's target on the other slice
    targets[2] = vocab - 1
    logits[3, :vec] = float("-inf")              # thread 0 reads only -inf, then a NaN
    logits[3, 256 * vec + vec // 2] = float("nan")
    slices = list(_vocab_slices(logits, targets, vocab, width))
    assert all((shard.stride(0) % 8 == 0) == (vec == 8) for shard, _, _ in slices)  # the load path meant
    stats = [extension.EXTENSION.logprob_stats(shard, local, 1.0, valid) for shard, local, valid in slices]
    logp, *_ = lp_ops.combine_stats(torch.stack(stats))
    want = [lp_ops.local_stats(shard.cpu(), local.cpu(), 1.0, valid)
            for shard, local, valid in _vocab_slices(logits, targets, vocab, width)]
    ref_lp, *_ = lp_ops.combine_stats(torch.stack(want))
    assert logp[:4].isnan().all() and ref_lp[:4].isnan().all(), (logp, ref_lp)
    assert torch.isfinite(logp[4:]).all()
    torch.testing.assert_close(logp[4:].cpu(), ref_lp[4:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("vocab", "width", "vec"), [(32002, 16001, 1), (32000, 16000, 8)])
def test_tokens_that_cannot_be_drawn_add_nothing(vocab, width, vec):
    """-inf logits (masked tokens): finite log-probs, entropies and gradients, those of the other tokens, also
    when a whole TP slice of a row is -inf."""
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(12)
    tokens = 4
    logits = (torch.randn(tokens, vocab, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    targets = torch.randint(width, vocab, (tokens,), device="cuda", generator=gen)  # on the second slice
    logits[0, 0:8] = float("-inf")               # a whole 16-byte pack of bf16
    logits[1, 3] = float("-inf")                 # sharing a pack with finite logits
    logits[2, :width] = float("-inf")            # the first TP slice all -inf
    logits[3, 1::3] = float("-inf")
    targets[3] = targets[3] // 3 * 3             # a token that can be drawn
    keep = ~logits.isinf()
    slices = list(_vocab_slices(logits, targets, vocab, width))
    assert all((shard.stride(0) % 8 == 0) == (vec == 8) for shard, _, _ in slices)  # the load path meant
    stats = [extension.EXTENSION.logprob_stats(shard, local, 1.0, valid) for shard, local, valid in slices]
    logp, entropy, *saved = lp_ops.combine_stats(torch.stack(stats))
    g_lp = torch.randn(tokens, device="cuda", generator=gen)
    g_h = torch.randn(tokens, device="cuda", generator=gen)
    grads = []
    for shard, local, valid in slices:
        grad = torch.full_like(shard, float("nan"))  # an element the kernel does not write stays NaN
        extension.EXTENSION.logprob_grad_into(shard, local, *saved, g_lp, g_h, 1.0, valid, grad)
        grads.append(grad)
    grad = torch.cat(grads, dim=1)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    assert (grad[~keep] == 0).all()
    for row in range(tokens):
        columns = keep[row].nonzero()[:, 0]
        target = (columns == targets[row]).nonzero()[:, 0]
        ref_lp, ref_h = _fp64_reference(logits[row, columns][None], target, 1.0, len(columns))
        ref_grad = _fp64_grad(logits[row, columns][None], target, 1.0, len(columns), g_lp[row:row + 1],
                              g_h[row:row + 1])
        torch.testing.assert_close(logp[row].double(), ref_lp[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(entropy[row].double(), ref_h[0], rtol=1e-4, atol=1e-4)
        assert (grad[row, columns].double() - ref_grad[0]).abs().max() <= 1e-2 * ref_grad.abs().max()


@pytest.mark.parametrize("tokens", [1, 7, 4099, 1 << 20])
@pytest.mark.parametrize("mask_kind", ["random", "zeros", "ones"])
def test_loss_kernel_against_fp64_reference(tokens, mask_kind):
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    logp = -torch.rand(tokens, device="cuda", generator=gen) * 3
    old = logp + torch.randn(tokens, device="cuda", generator=gen) * 0.5
    # A ratio within float32 rounding of a clip bound (0.8, 1.28, 3.0) may land on either side of it in the
    # kernel (a clipped gradient of 0 against one of -A, a count off by one): move those away from it.
    ratio = torch.exp(logp.double() - old.double())
    near = torch.zeros_like(ratio, dtype=torch.bool)
    for bound in (1 - 0.2, 1 + 0.28, 3.0):
        near |= (ratio / bound - 1).abs() < 1e-5
    old = torch.where(near, old + 1e-3, old)
    adv = torch.randn(tokens, device="cuda", generator=gen)
    mask = {"random": (torch.rand(tokens, device="cuda", generator=gen) > 0.3).float(),
            "zeros": torch.zeros(tokens, device="cuda"), "ones": torch.ones(tokens, device="cuda")}[mask_kind]
    weight = torch.rand(tokens, device="cuda", generator=gen) + 0.5
    global_tokens = torch.tensor([max(mask.sum().item(), 1.0) * 2], device="cuda")
    args = (0.2, 0.28, 3.0, global_tokens)
    _poison(tokens * 8)
    out = extension.EXTENSION.dapo_loss_forward(logp, old, adv, mask, weight, *args)
    ref = loss_ops.reference_forward(logp.double(), old.double(), adv.double(), mask.double(), weight.double(), *args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1:5].double(), ref[1:5]), (out[1:5], ref[1:5])  # the counts exactly (none near a bound)
    grad = extension.EXTENSION.dapo_loss_backward(torch.ones((), device="cuda"), logp, old, adv, mask, weight, *args)
    ref_grad = loss_ops.reference_backward(torch.ones((), dtype=torch.float64, device="cuda"), logp.double(),
                                           old.double(), adv.double(), mask.double(), weight.double(), *args)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9)
    again = extension.EXTENSION.dapo_loss_forward(logp, old, adv, mask, weight, *args)
    assert torch.equal(out, again), "the reductions must be deterministic"


@pytest.mark.parametrize("poisoned", ["logp", "old_logp", "advantage", "masked_logp"])
def test_loss_kernel_keeps_a_nan_as_the_reference_does(poisoned):
    # fminf / fmaxf drop a NaN operand: a NaN log-prob must still make the loss NaN, and one under the mask nothing.
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(3)
    tokens = 4099
    logp = -torch.rand(tokens, device="cuda", generator=gen) * 3
    old = logp + torch.randn(tokens, device="cuda", generator=gen) * 0.5
    adv = torch.randn(tokens, device="cuda", generator=gen)
    mask = torch.ones(tokens, device="cuda")
    mask[5] = 0
    at = 5 if poisoned == "masked_logp" else 1234
    {"logp": logp, "old_logp": old, "advantage": adv, "masked_logp": logp}[poisoned][at] = float("nan")
    args = (0.2, 0.28, 3.0, mask.sum().reshape(1))
    out = extension.EXTENSION.dapo_loss_forward(logp, old, adv, mask, None, *args)
    ref = loss_ops.reference_forward(logp.double(), old.double(), adv.double(), mask.double(), None, *args)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[0].isnan().item() == (poisoned != "masked_logp")
    grad = extension.EXTENSION.dapo_loss_backward(torch.ones((), device="cuda"), logp, old, adv, mask, None, *args)
    ref_grad = loss_ops.reference_backward(torch.ones((), dtype=torch.float64, device="cuda"), logp.double(),
                                           old.double(), adv.double(), mask.double(), None, *args)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_ops_through_the_kernels_equal_the_ops_through_the_references(dtype, monkeypatch):
    """What the actor runs, through the custom ops and their autograd (contiguity, the in-place backward on a
    non-leaf, the loss op's float32 kernel): with the kernels and with the references (MEGATRON_DAPO_KERNELS=0),
    the same log-probs, entropies, loss and logits gradient."""
    _need_gpu()
    gen = torch.Generator(device="cuda").manual_seed(7)
    tokens, vocab = 512, 5000
    base = (torch.randn(tokens, vocab, device="cuda", generator=gen) * 3).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    assert extension.use_kernel(base), "the build holds no code for this GPU: the kernels would not run"
    with torch.no_grad():
        start, _ = lp_ops.vocab_parallel_logprob(base.float(), targets, temperature=0.9)
    old = (start + 0.3 * torch.randn(tokens, device="cuda", generator=gen))[None]
    adv = torch.randn(1, tokens, device="cuda", generator=gen)
    mask = (torch.rand(1, tokens, device="cuda", generator=gen) > 0.2).float()

    def run(kernels: bool):
        monkeypatch.setenv("MEGATRON_DAPO_KERNELS", "1" if kernels else "0")
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1.0  # not a leaf: the in-place backward writes the gradient over it, as over a layer's output
        logp, entropy = lp_ops.vocab_parallel_logprob(logits, targets, temperature=0.9, inplace_backward=True)
        out = loss_ops.fused_token_mean_loss(logp.float()[None], old, adv, mask, clip_ratio_low=0.2,
                                             clip_ratio_high=0.28, clip_ratio_c=3.0, global_tokens=mask.sum())
        (out.loss - 0.01 * (entropy.float() * mask[0]).sum() / mask.sum()).backward()
        return logp.detach().float(), entropy.detach().float(), out.loss.detach(), leaf.grad.float()

    got, want = run(kernels=True), run(kernels=False)
    # bf16: the gradient is rounded to bf16 from float32 sums that differ in their last bits (a step of 2^-8 where
    # they straddle a rounding point); the loss, a mean of terms that cancel, gets an absolute floor.
    close = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b, floor in zip(("logp", "entropy", "loss", "logits gradient"), got, want, (0, 0, 1e-6, 0),
                                 strict=True):
        assert torch.isfinite(a).all(), name
        limit = max(close * b.abs().max().item(), floor)
        assert (a - b).abs().max().item() <= limit, (name, (a - b).abs().max().item(), limit)

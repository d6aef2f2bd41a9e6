"""kernels.ppo_loss against hand-derived cases (which anchor the reference too) and the float64
reference, on every kernel backend: Triton (compiled on a GPU machine, through the interpreter on CPU,
with small forced blocks so its multi-block paths run), C++ (past its 4096-token chunk, so the
per-chunk results merge) and the GPU multi-block paths at large N.

Letters: B batch, T time, N = B * T tokens. The loss and stats are fp32 means of N fp32 terms
(2e-6 absolute, 1e-5 relative for |A| ~ 1); the gradient is per token, fp32 math stored in the
logprobs' dtype, so its relative tolerance is a few fp32 ulps, or one rounding of bf16/fp16 (2^-8 and
2^-11 relative, doubled) for those.
"""

import contextlib
import importlib
import math

import pytest
import torch
from _rl_cases import (
    CHUNK,
    LONG_SHAPE,
    MASK_KINDS,
    MASKED_CHUNK,
    at_chunk,
    documented_backends,
    intra_op_threads,
    long_mask,
    make_mask,
    randn,
    record_launches,
)
from util import assert_close, device_for, kernel_backends, on

import rlhf_kernels as kernels
from rlhf_kernels._triton import forced_blocks
from rlhf_kernels.ppo_loss import IMPLEMENTED, ppo_loss_ref

MODULE = importlib.import_module("rlhf_kernels.ppo_loss")
KERNELS = kernel_backends(IMPLEMENTED)
ANCHORED = ["torch", *KERNELS]  # hand-derived values anchor the reference as well as the kernels
STAT_NAMES = ("clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}


def inputs(B, T, dtype=torch.float32, seed=0, spread=0.3):
    logprobs = randn(B, T, seed=seed, scale=0.5, shift=-1.0)
    old_logprobs = logprobs + randn(B, T, seed=seed + 1, scale=spread)  # ratios ~ e^{+-0.3}: many clip
    advantages = randn(B, T, seed=seed + 2)
    return logprobs.to(dtype), old_logprobs.to(dtype), advantages.to(dtype)


def run(backend, lp, olp, adv, mask, upstream=1.0, **kw):
    """On the backend's device: -> (loss, stats, grad of logprobs under the scalar upstream gradient)."""
    dev = device_for(backend)
    x = on(dev, lp.detach().clone()).requires_grad_()
    loss, stats = kernels.ppo_loss(x, *on(dev, olp, adv, mask), backend=backend, **kw)
    (loss * upstream).backward()
    return loss, stats, x.grad


def reference(lp, olp, adv, mask, upstream=1.0, clip_low=0.2, clip_high=0.2, dual_clip=None):
    x = lp.detach().double().requires_grad_()
    loss, stats = ppo_loss_ref(x, olp.double(), adv.double(), mask, clip_low, clip_high, dual_clip)
    (loss * upstream).backward()
    return loss, stats, x.grad


def check(got, want, dtype):
    loss, stats, grad = got
    rloss, rstats, rgrad = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, rloss, atol=2e-6, rtol=1e-5, name="pg_loss")
    for name in STAT_NAMES:
        assert_close(getattr(stats, name), getattr(rstats, name), atol=2e-6, rtol=1e-5, name=name)
    assert grad.dtype == dtype
    assert_close(grad, rgrad, atol=1e-8, rtol=GRAD_RTOL[dtype], name="grad logprobs")


def small_blocks(backend):
    """Triton under forced 64-token blocks and 4-wide reductions: at these sizes the forward loops
    over several blocks and the backward runs several programs (one block otherwise covers them)."""
    return forced_blocks(flat=64, reduce=4) if backend == "triton" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# Hand-derived cases
# ---------------------------------------------------------------------------------------------------
def hand_case():
    # Four tokens, clip 0.2 (ratio clamped to [0.8, 1.2]); the loss is max(pg_losses, pg_losses2):
    #   ratio 1.5, A = +1: pg_losses = -1.5, pg_losses2 = -1.2 -> -1.2, clipped, grad 0
    #   ratio 1.5, A = -1: pg_losses = +1.5, pg_losses2 = +1.2 -> +1.5, grad -A * ratio = +1.5
    #   ratio 0.5, A = +1: pg_losses = -0.5, pg_losses2 = -0.8 -> -0.5, grad -0.5
    #   ratio 0.5, A = -1: pg_losses = +0.5, pg_losses2 = +0.8 -> +0.8, clipped, grad 0
    # pg_loss = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15; clipfrac = 2/4; grads / 4 (the token mean).
    ratio = torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    lp = (old + ratio.log()).float()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    return lp, old.float(), adv, ratio


HAND_GRAD = torch.tensor([[0.0, 1.5, -0.5, 0.0]]) / 4


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_derived(backend):
    lp, old, adv, ratio = hand_case()
    loss, stats, grad = run(backend, lp, old, adv, torch.ones(1, 4, dtype=torch.bool))
    assert_close(loss, torch.tensor(0.15), atol=1e-6, name="pg_loss")
    assert_close(grad, HAND_GRAD, atol=1e-6, name="grad logprobs")
    kl = ((ratio - 1) - ratio.log()).mean()  # 2 (0.5 - ln 1.5) + 2 (-0.5 + ln 2), / 4 = 0.14384
    want = {"clipfrac": 0.5, "approx_kl": float(kl), "ratio_mean": 1.0, "ratio_min": 0.5, "ratio_max": 1.5}
    for name in STAT_NAMES:
        assert_close(getattr(stats, name), torch.tensor(want[name]), atol=1e-6, name=name)


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_dual_clip_and_token_mean(backend):
    # Row 0: token 0 has ratio 5, A = -1: max(5, 1.2) = 5, dual clip 3 caps it at -A * 3 = 3 with
    # no gradient (the cap does not depend on logprobs); token 1 is masked out.
    # Row 1: three tokens with ratio 1 (in range, so pg_losses == pg_losses2 = -A), A = 1, 2, 3:
    # losses -1, -2, -3, grads -1, -2, -3. Token mean over the whole batch (4 valid tokens), not the
    # mean of row means: (3 - 1 - 2 - 3) / 4 = -0.75 (row means would give (3 + -2) / 2 = 0.5).
    lp = torch.tensor([[math.log(5.0), 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    old = torch.zeros(2, 4)
    adv = torch.tensor([[-1.0, 7.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    loss, stats, grad = run(backend, lp, old, adv, mask, dual_clip=3.0)
    assert_close(loss, torch.tensor(-0.75), atol=1e-6, name="pg_loss (dual clip)")
    assert_close(grad, torch.tensor([[0.0, 0, 0, 0], [-1, -2, -3, 0]]) / 4, atol=1e-6, name="grad (dual clip)")
    # without the dual clip token 0 contributes 5 and has gradient -A * ratio = 5
    loss, _, grad = run(backend, lp, old, adv, mask)
    assert_close(loss, torch.tensor((5.0 - 6.0) / 4), atol=1e-6, name="pg_loss (no dual clip)")
    assert_close(grad[0, 0], torch.tensor(5.0 / 4), atol=1e-6, name="grad (no dual clip)")
    # ratio 5 with A < 0: pg_losses2 = 1.2 < pg_losses = 5, so the ratio clip is inactive (the case
    # the dual clip exists for) and clipfrac counts nothing
    assert_close(stats.clipfrac, torch.tensor(0.0), atol=1e-7, name="clipfrac")


@pytest.mark.parametrize("backend", ANCHORED)
def test_clip_higher(backend):
    # clip_high = 0.28, clip_low = 0.2 (DAPO): ratio 1.25 with A = 1 is inside [0.8, 1.28], so not
    # clipped: loss -1.25, grad -1.25; ratio 0.75 with A = -1 is below 0.8: loss max(0.75, 0.8) = 0.8.
    lp = torch.tensor([[math.log(1.25), math.log(0.75)]])
    loss, stats, grad = run(backend, lp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
                            clip_low=0.2, clip_high=0.28)  # fmt: skip
    assert_close(loss, torch.tensor((-1.25 + 0.8) / 2), atol=1e-6, name="pg_loss")
    assert_close(grad, torch.tensor([[-1.25 / 2, 0.0]]), atol=1e-6, name="grad")
    assert_close(stats.clipfrac, torch.tensor(0.5), atol=1e-7, name="clipfrac")


@pytest.mark.parametrize("backend", KERNELS)
def test_ratio_overflow_is_clipped_not_nan(backend):
    # log-ratio 100: the fp32 ratio overflows to inf.
    #   A = +1: pg_losses = -inf, pg_losses2 = -1.2, so the loss is -1.2 with no gradient
    #   A = -2, dual clip 3: pg_losses = +inf is capped at -A * 3 = 6, no gradient
    #   ratio 1, A = +1: loss -1, gradient -1
    # pg_loss = (-1.2 + 6 - 1) / 3; gradients (0, 0, -1) / 3. Neither overflowed token may give NaN.
    # (The fp32 torch reference itself gives NaN here: exp's backward multiplies a 0 gradient by inf.)
    lp = torch.tensor([[100.0, 100.0, 0.0]])
    adv = torch.tensor([[1.0, -2.0, 1.0]])
    loss, _, grad = run(backend, lp, torch.zeros(1, 3), adv, torch.ones(1, 3), dual_clip=3.0)
    assert_close(loss, torch.tensor(3.8 / 3), atol=1e-6, name="pg_loss")
    assert_close(grad, torch.tensor([[0.0, 0.0, -1.0 / 3]]), atol=1e-7, name="grad logprobs")


# ---------------------------------------------------------------------------------------------------
# Gradient rule and order (kernels/_autograd.py)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ANCHORED)
def test_only_logprobs_get_a_gradient(backend):
    # every float input requires grad (the mask too, as a float tensor): old_logprobs and advantages
    # are rollout data and the mask a selector, so only logprobs may receive a gradient
    dev = device_for(backend)
    lp, olp, adv = (on(dev, t).requires_grad_() for t in inputs(3, 7, seed=30))
    mask = on(dev, make_mask(3, 7, "holes", seed=31).float()).requires_grad_()
    loss, stats = kernels.ppo_loss(lp, olp, adv, mask, dual_clip=3.0, backend=backend)
    (loss + sum(stats)).backward()
    assert lp.grad is not None and bool(lp.grad.abs().sum() > 0)
    for name, t in (("old_logprobs", olp), ("advantages", adv), ("mask", mask)):
        assert t.grad is None, f"{name} got a gradient on backend {backend}"


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_raises(backend):
    # create_graph=True still gives the right first-order gradient; differentiating it again raises
    dev = device_for(backend)
    lp, old, adv, _ = hand_case()
    x = on(dev, lp).requires_grad_()
    loss, _ = kernels.ppo_loss(x, *on(dev, old, adv, torch.ones(1, 4)), backend=backend)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    assert_close(grad, HAND_GRAD, atol=1e-6, name="first-order grad under create_graph")
    with pytest.raises(RuntimeError, match=f"ppo_loss: double backward is not supported by backend '{backend}'"):
        grad.sum().backward()


def test_torch_double_backward():
    # unclipped tokens: d pg_losses / d logprobs = -A r and r = exp(logprobs - old), so the second
    # derivative is -A r again; clipped tokens have 0 and 0. For the hand case, d/dlogprobs of
    # sum(grad) is the gradient itself: (0, 1.5, -0.5, 0) / 4.
    _, old, adv, ratio = hand_case()
    x = (old.double() + ratio.log()).requires_grad_()
    loss, _ = kernels.ppo_loss(x, old.double(), adv.double(), torch.ones(1, 4), backend="torch")
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert_close(second, HAND_GRAD, atol=1e-12, name="second derivative")


# ---------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("B,T", [(1, 1), (7, 13), (6, 131)])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_against_float64_reference(backend, kind, B, T, dual_clip):
    lp, olp, adv = inputs(B, T, seed=B + T)
    mask = make_mask(B, T, kind, seed=T)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    up = 0.7  # a random-ish upstream gradient: the backward must scale by it
    with small_blocks(backend):
        got = run(backend, lp, olp, adv, mask, up, **kw)
    check(got, reference(lp, olp, adv, mask, up, **kw), torch.float32)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    B, T = 5, 37
    lp, olp, adv = inputs(B, T, dtype, seed=3)
    mask = make_mask(B, T, "mixed", seed=4)
    check(run(backend, lp, olp, adv, mask, 1.3), reference(lp, olp, adv, mask, 1.3), dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_garbage_under_mask_and_extremes(backend):
    dev = device_for(backend)
    B, T = 5, 17
    lp, olp, adv = inputs(B, T, seed=5, spread=2.0)  # ratios up to e^6: far outside the clip range
    mask = make_mask(B, T, "holes", seed=6)
    want = reference(lp, olp, adv, mask, 0.5, dual_clip=2.0)
    # masked tokens may hold anything (padding): it must not leak
    wide = torch.zeros(B, 2 * T)
    wide[:, ::2] = lp.masked_fill(~mask, float("nan"))
    x = wide.to(dev)[:, ::2].requires_grad_()  # time stride 2
    olp_bad = on(dev, olp.masked_fill(~mask, float("-inf")).t().contiguous().t())  # column-major
    assert not x.is_contiguous() and not olp_bad.is_contiguous()
    loss, stats = kernels.ppo_loss(x, olp_bad, on(dev, adv), on(dev, mask.float()), dual_clip=2.0, backend=backend)
    (loss * 0.5).backward()
    check((loss, stats, x.grad), want, torch.float32)


def long_case():
    """13211 tokens (4 C++ chunks; 13 Triton blocks of the forced 1024) with the extremes in different
    chunks, each valid: the largest ratio (e^3, A = +1: clipped) in chunk 0, the smallest (e^-2 =
    0.135, A = -1: clipped) in chunk 1, a dual-clipped token (ratio e^2.5, A = -2, capped at 6) in
    chunk 3 (the short last one); chunk 2 is entirely masked and holds NaN/-inf. Other tokens have
    |log-ratio| <= 0.5, so the ratio extremes are those two tokens."""
    N = LONG_SHAPE[0] * LONG_SHAPE[1]
    lp = randn(N, seed=40, scale=0.5, shift=-1.0)
    log_ratio = randn(N, seed=41, scale=0.2).clamp(-0.5, 0.5)
    adv = randn(N, seed=42)
    mask = long_mask(seed=43).reshape(-1)
    for i, lr, a in ((at_chunk(0, 1000), 3.0, 1.0), (at_chunk(1, 777), -2.0, -1.0), (at_chunk(3, 500), 2.5, -2.0)):
        log_ratio[i], adv[i], mask[i] = lr, a, True
    old = lp - log_ratio
    dead = slice(MASKED_CHUNK * CHUNK, (MASKED_CHUNK + 1) * CHUNK)
    lp_bad, old_bad = lp.clone(), old.clone()
    lp_bad[dead], old_bad[dead] = float("nan"), -float("inf")
    shape = LONG_SHAPE
    return (lp.view(shape), old.view(shape), adv.view(shape), mask.view(shape)), (lp_bad.view(shape),
                                                                                 old_bad.view(shape))


LONG_CASES = [(b, path) for b in KERNELS for path in (("one_program", "partials") if b == "triton" else ("chunks",))]


@pytest.mark.parametrize("backend,path", LONG_CASES)
def test_past_the_chunk_with_extremes_in_different_chunks(backend, path, monkeypatch):
    # C++: 4 chunks whose partial sums, counts and ratio min/max merge (and a backward split into 3
    # unequal thread ranges). Triton: 1024-token blocks, either one program looping over the 13
    # blocks, or 13 per-block partials reduced 4 at a time (4 loop iterations, the last one short).
    (lp, old, adv, mask), (lp_bad, old_bad) = long_case()
    if path == "partials":
        monkeypatch.setattr(MODULE, "ONE_PROGRAM_MAX_N", 0)
    with forced_blocks(flat=1024, reduce=4), intra_op_threads(3):
        got = run(backend, lp_bad, old_bad, adv, mask, 0.8, dual_clip=3.0)
    want = reference(lp, old, adv, mask, 0.8, dual_clip=3.0)
    assert_close(want[1].ratio_min, torch.tensor(math.exp(-2.0)), atol=0, rtol=1e-6, name="ref ratio_min")
    assert_close(want[1].ratio_max, torch.tensor(math.exp(3.0)), atol=0, rtol=1e-6, name="ref ratio_max")
    check(got, want, torch.float32)


@pytest.mark.parametrize("backend", KERNELS)
def test_empty_batch_is_zero(backend):
    lp = torch.zeros(2, 0)
    loss, stats, grad = run(backend, lp, lp, lp, lp.bool())
    assert float(loss.detach()) == 0.0 and all(float(s) == 0.0 for s in stats), (loss, stats)
    assert grad.shape == (2, 0)


@pytest.mark.parametrize("backend", ANCHORED)
def test_all_masked_is_zero(backend):
    # no valid token: loss and every stat are defined as 0 (not NaN), and so is the gradient
    lp, olp, adv = inputs(3, 4, seed=7)
    loss, stats, grad = run(backend, lp, olp, adv, torch.zeros(3, 4))
    assert float(loss.detach()) == 0.0 and all(float(s) == 0.0 for s in stats), (loss, stats)
    assert bool((grad == 0).all())


# ---------------------------------------------------------------------------------------------------
# Launch device, documentation, bad input
# ---------------------------------------------------------------------------------------------------
def test_triton_launches_on_the_tensors_device(monkeypatch):
    # every launch (one-program and partials forwards, finalize, backward) runs inside
    # on_device(tensor) of its own tensors' device: Triton launches on the current CUDA device
    dev = device_for("triton")
    lp, olp, adv = inputs(2, 40, seed=50)
    mask = make_mask(2, 40, "holes", seed=51)
    with record_launches(MODULE, monkeypatch) as launches, forced_blocks(flat=16, reduce=2):
        for limit in (MODULE.ONE_PROGRAM_MAX_N, 0):
            monkeypatch.setattr(MODULE, "ONE_PROGRAM_MAX_N", limit)
            run("triton", lp, olp, adv, mask)
    assert {name for name, _, _ in launches} == {"_ppo_loss_fwd_one_program_kernel", "_ppo_loss_fwd_kernel",
                                                 "_ppo_loss_finalize_kernel", "_ppo_loss_bwd_kernel"}
    for name, current, devices in launches:
        assert current is not None and devices == {current} and current.type == dev.type, (name, current, devices)


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.ppo_loss) == {"auto", *IMPLEMENTED}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"old_logprobs": torch.zeros(2, 4)}, "shapes must match"),
        ({"mask": torch.ones(2, 5) * 2}, "binary"),
        ({"mask": torch.full((2, 5), 0.5)}, "binary"),
        ({"mask": torch.ones(5, 2)}, "mask shape"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"clip_low": 1.5}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"logprobs": torch.zeros(2, 5, dtype=torch.long)}, "float32"),
    ],
)
def test_bad_inputs(kw, match):
    args = dict(logprobs=torch.zeros(2, 5), old_logprobs=torch.zeros(2, 5), advantages=torch.zeros(2, 5),
                mask=torch.ones(2, 5))  # fmt: skip
    args.update(kw)
    pos = [args.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        kernels.ppo_loss(*pos, **args)


# ---------------------------------------------------------------------------------------------------
# GPU: the launch choices of real sizes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 1000, 65536, 65537, 100003, 3000017])
def test_gpu_triton_large(N):
    # 65536: the largest one-program forward; 65537 and up: per-block partials (1024-token blocks),
    # and at 3000017 (2930 partials) the finalize kernel loops 3 times over 1024 of them
    device_for("triton")
    lp, olp, adv = inputs(1, N, seed=8)
    mask = make_mask(1, N, "holes", seed=9)
    lp[0, N // 3], olp[0, N // 3], mask[0, N // 3] = 2.0, -1.0, True  # ratio e^3: the max
    want = reference(lp, olp, adv, mask, 0.9, dual_clip=3.0)
    got = run("triton", lp, olp, adv, mask, 0.9, dual_clip=3.0)
    check(got, want, torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("N", [1000, 100003])
def test_gpu_non_default_device(N):
    # tensors on cuda:1 while cuda:0 is current: every launch must go to cuda:1
    device_for("triton")
    lp, olp, adv = inputs(1, N, seed=10)
    mask = make_mask(1, N, "holes", seed=11)
    dev = torch.device("cuda:1")
    x = lp.to(dev).requires_grad_()
    with torch.cuda.device(0):
        loss, stats = kernels.ppo_loss(x, *on(dev, olp, adv, mask), dual_clip=3.0, backend="triton")
        (loss * 0.9).backward()
    assert loss.device == dev and x.grad.device == dev
    check((loss, stats, x.grad), reference(lp, olp, adv, mask, 0.9, dual_clip=3.0), torch.float32)

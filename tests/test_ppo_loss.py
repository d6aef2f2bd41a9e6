"""kernels.ppo_loss against hand-derived cases and the float64 reference, on every backend that runs
here (Triton through the interpreter on CPU).

Letters: B batch, T time, N = B * T tokens. The loss and stats are fp32 means of N fp32 terms
(2e-6 absolute, 1e-5 relative for |A| ~ 1); the gradient is per token, fp32 math stored in the
logprobs' dtype, so its relative tolerance is a few fp32 ulps, or one rounding of bf16/fp16 (2^-8 and
2^-11 relative, doubled) for those.
"""

import math

import pytest
import torch
from _rl_cases import MASK_KINDS, make_mask, randn
from util import assert_close, cpu_backends

import rlhf_kernels as kernels
from rlhf_kernels.ppo_loss import IMPLEMENTED, ppo_loss_ref

BACKENDS = cpu_backends(IMPLEMENTED)
STAT_NAMES = ("clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}


def inputs(B, T, dtype=torch.float32, seed=0, spread=0.3):
    logprobs = randn(B, T, seed=seed, scale=0.5, shift=-1.0)
    old_logprobs = logprobs + randn(B, T, seed=seed + 1, scale=spread)  # ratios ~ e^{+-0.3}: many clip
    advantages = randn(B, T, seed=seed + 2)
    return logprobs.to(dtype), old_logprobs.to(dtype), advantages.to(dtype)


def run(backend, lp, olp, adv, mask, upstream=1.0, **kw):
    """-> (loss, stats, grad of logprobs under the scalar upstream gradient)."""
    x = lp.detach().clone().requires_grad_()
    loss, stats = kernels.ppo_loss(x, olp, adv, mask, backend=backend, **kw)
    (loss * upstream).backward()
    return loss, stats, x.grad


def reference(lp, olp, adv, mask, upstream=1.0, clip_low=0.2, clip_high=0.2, dual_clip=None):
    x = lp.detach().double().requires_grad_()
    loss, stats = ppo_loss_ref(x, olp.double(), adv.double(), mask, clip_low, clip_high, dual_clip)
    (loss * upstream).backward()
    return loss, stats, x.grad


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_derived(backend):
    lp, old, adv, ratio = hand_case()
    loss, stats, grad = run(backend, lp, old, adv, torch.ones(1, 4, dtype=torch.bool))
    assert_close(loss, torch.tensor(0.15), atol=1e-6, name="pg_loss")
    assert_close(grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]]) / 4, atol=1e-6, name="grad logprobs")
    kl = ((ratio - 1) - ratio.log()).mean()  # 2 (0.5 - ln 1.5) + 2 (-0.5 + ln 2), / 4 = 0.14384
    want = {"clipfrac": 0.5, "approx_kl": float(kl), "ratio_mean": 1.0, "ratio_min": 0.5, "ratio_max": 1.5}
    for name in STAT_NAMES:
        assert_close(getattr(stats, name), torch.tensor(want[name]), atol=1e-6, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_higher(backend):
    # clip_high = 0.28, clip_low = 0.2 (DAPO): ratio 1.25 with A = 1 is inside [0.8, 1.28], so not
    # clipped: loss -1.25, grad -1.25; ratio 0.75 with A = -1 is below 0.8: loss max(0.75, 0.8) = 0.8.
    lp = torch.tensor([[math.log(1.25), math.log(0.75)]])
    loss, stats, grad = run(backend, lp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2),
                            clip_low=0.2, clip_high=0.28)  # fmt: skip
    assert_close(loss, torch.tensor((-1.25 + 0.8) / 2), atol=1e-6, name="pg_loss")
    assert_close(grad, torch.tensor([[-1.25 / 2, 0.0]]), atol=1e-6, name="grad")
    assert_close(stats.clipfrac, torch.tensor(0.5), atol=1e-7, name="clipfrac")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
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
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("B,T", [(1, 1), (7, 13), (6, 131)])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_against_float64_reference(backend, kind, B, T, dual_clip):
    lp, olp, adv = inputs(B, T, seed=B + T)
    mask = make_mask(B, T, kind, seed=T)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    up = 0.7  # a random-ish upstream gradient: the backward must scale by it
    got = run(backend, lp, olp, adv, mask, up, **kw)
    want = reference(lp, olp, adv, mask, up, **kw)
    check(got, want, torch.float32)


def check(got, want, dtype):
    loss, stats, grad = got
    rloss, rstats, rgrad = want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, rloss, atol=2e-6, rtol=1e-5, name="pg_loss")
    for name in STAT_NAMES:
        assert_close(getattr(stats, name), getattr(rstats, name), atol=2e-6, rtol=1e-5, name=name)
    assert grad.dtype == dtype
    assert_close(grad, rgrad, atol=1e-8, rtol=GRAD_RTOL[dtype], name="grad logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    B, T = 5, 37
    lp, olp, adv = inputs(B, T, dtype, seed=3)
    mask = make_mask(B, T, "mixed", seed=4)
    check(run(backend, lp, olp, adv, mask, 1.3), reference(lp, olp, adv, mask, 1.3), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_garbage_under_mask_and_extremes(backend):
    B, T = 5, 17
    lp, olp, adv = inputs(B, T, seed=5, spread=2.0)  # ratios up to e^6: far outside the clip range
    lp = torch.cat([lp, lp], 1)[:, ::2]  # strided view
    olp = olp.t().contiguous().t()  # column-major
    mask = make_mask(B, T, "holes", seed=6)
    lp_bad = lp.clone()
    lp_bad[~mask] = float("nan")  # masked tokens may hold anything (padding): it must not leak
    olp_bad = olp.masked_fill(~mask, float("-inf"))
    want = reference(lp, olp, adv, mask, 0.5, dual_clip=2.0)
    got = run(backend, lp_bad, olp_bad, adv, mask.float(), 0.5, dual_clip=2.0)
    check(got, want, torch.float32)


@pytest.mark.parametrize("one_program", [True, False])
def test_triton_forward_paths(one_program):
    # Both Triton forwards at several blocks per row of tokens: one program looping over 16-token
    # blocks, and per-block partials (7 of them, the last one short) reduced by the finalize kernel.
    if "triton" not in BACKENDS:
        pytest.skip("triton does not run here")
    from rlhf_kernels._masks import mask_u8
    from rlhf_kernels.ppo_loss import _fwd

    lp, olp, adv = inputs(1, 101, seed=10)
    mask = make_mask(1, 101, "holes", seed=11)
    flat = [t.reshape(-1).contiguous() for t in (lp, olp, adv, mask_u8(mask))]
    out = _fwd("triton", *flat, 0.8, 1.28, 3.0, block=16, one_program=one_program)
    loss, stats, _ = reference(lp, olp, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert_close(out[0], loss, atol=2e-6, rtol=1e-5, name="pg_loss")
    for j, name in enumerate(STAT_NAMES, start=1):
        assert_close(out[j], getattr(stats, name), atol=2e-6, rtol=1e-5, name=name)
    assert float(out[6]) == float(mask.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_is_zero(backend):
    lp = torch.zeros(2, 0)
    loss, stats, grad = run(backend, lp, lp, lp, lp.bool())
    assert float(loss.detach()) == 0.0 and all(float(s) == 0.0 for s in stats), (loss, stats)
    assert grad.shape == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_is_zero(backend):
    lp, olp, adv = inputs(3, 4, seed=7)
    loss, stats, grad = run(backend, lp, olp, adv, torch.zeros(3, 4))
    assert float(loss.detach()) == 0.0 and all(float(s) == 0.0 for s in stats), (loss, stats)
    assert bool((grad == 0).all())


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"old_logprobs": torch.zeros(2, 4)}, "shapes must match"),
        ({"mask": torch.ones(2, 5) * 2}, "binary"),
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
# GPU
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 1000, 16384, 100003])
def test_gpu_triton(N):
    lp, olp, adv = inputs(1, N, seed=8)
    mask = make_mask(1, N, "holes", seed=9)
    want = reference(lp, olp, adv, mask, 0.9, dual_clip=3.0)
    got = run("triton", lp.cuda(), olp.cuda(), adv.cuda(), mask.cuda(), 0.9, dual_clip=3.0)
    check(got, want, torch.float32)

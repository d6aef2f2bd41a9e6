"""kernels.value_loss against hand-derived cases and the float64 reference, on every backend that
runs here (Triton through the interpreter on CPU).

Letters: B batch, T time. Loss and clip fraction are fp32 means (2e-6 absolute, 1e-5 relative for
values ~ 1); the gradient is per token in the values' dtype (a few fp32 ulps, or one bf16/fp16
rounding, doubled, relative).
"""

import pytest
import torch
from _rl_cases import MASK_KINDS, make_mask, randn
from util import assert_close, cpu_backends

import rlhf_kernels as kernels
from rlhf_kernels.value_loss import IMPLEMENTED, value_loss_ref

BACKENDS = cpu_backends(IMPLEMENTED)
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}


def inputs(B, T, dtype=torch.float32, seed=0):
    values = randn(B, T, seed=seed)
    old_values = values + randn(B, T, seed=seed + 1, scale=0.3)  # |diff| > 0.2 for about half
    returns = randn(B, T, seed=seed + 2)
    return values.to(dtype), old_values.to(dtype), returns.to(dtype)


def run(backend, v, old, ret, mask, upstream=1.0, **kw):
    x = v.detach().clone().requires_grad_()
    loss, stats = kernels.value_loss(x, old, ret, mask, backend=backend, **kw)
    (loss * upstream).backward()
    return loss, stats, x.grad


def reference(v, old, ret, mask, upstream=1.0, clip=0.2):
    x = v.detach().double().requires_grad_()
    loss, stats = value_loss_ref(x, old.double(), ret.double(), mask, clip)
    (loss * upstream).backward()
    return loss, stats, x.grad


def check(got, want, dtype):
    (loss, stats, grad), (rloss, rstats, rgrad) = got, want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, rloss, atol=2e-6, rtol=1e-5, name="vf_loss")
    assert_close(stats.vf_clipfrac, rstats.vf_clipfrac, atol=2e-6, name="vf_clipfrac")
    assert grad.dtype == dtype
    assert_close(grad, rgrad, atol=1e-8, rtol=GRAD_RTOL[dtype], name="grad values")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_derived(backend):
    # clip 0.2; values_clipped = old + clamp(values - old, -0.2, 0.2):
    #   v = 1, old = 0.5, R = 0: clipped 0.7; losses 1 vs 0.49 -> 1, gradient 0.5 * 2 (v - R) = 1
    #   v = 1, old = 0.5, R = 2: clipped 0.7; losses 1 vs 1.69 -> 1.69 (clipped), gradient 0 (clamp saturated)
    #   v = 0.625, old = 0.5, R = 0: |diff| = 0.125 < 0.2 so clipped == v exactly (binary fractions),
    #     a tie 0.390625 vs 0.390625: not counted as clipped; gradient 0.625 (both halves agree)
    # vf_loss = 0.5 * (1 + 1.69 + 0.390625) / 3; vf_clipfrac = 1/3; gradients / 3 (the token mean).
    v = torch.tensor([[1.0, 1.0, 0.625]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    ret = torch.tensor([[0.0, 2.0, 0.0]])
    loss, stats, grad = run(backend, v, old, ret, torch.ones(1, 3))
    assert_close(loss, torch.tensor(0.5 * 3.080625 / 3), atol=1e-6, name="vf_loss")
    assert_close(stats.vf_clipfrac, torch.tensor(1 / 3), atol=1e-7, name="vf_clipfrac")
    assert_close(grad, torch.tensor([[1.0, 0.0, 0.625]]) / 3, atol=1e-7, name="grad values")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("B,T", [(1, 1), (7, 13), (6, 131)])
def test_against_float64_reference(backend, kind, B, T):
    v, old, ret = inputs(B, T, seed=B * 7 + T)
    mask = make_mask(B, T, kind, seed=T)
    check(run(backend, v, old, ret, mask, 0.6, clip=0.25), reference(v, old, ret, mask, 0.6, clip=0.25), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    v, old, ret = inputs(5, 37, dtype, seed=1)
    mask = make_mask(5, 37, "mixed", seed=2)
    check(run(backend, v, old, ret, mask, 1.7), reference(v, old, ret, mask, 1.7), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_garbage_under_mask(backend):
    v, old, ret = inputs(5, 11, seed=3)
    mask = make_mask(5, 11, "holes", seed=4)
    want = reference(v, old, ret, mask)
    v_bad = v.masked_fill(~mask, float("nan")).t().contiguous().t()  # column-major
    ret_bad = torch.stack([ret.masked_fill(~mask, float("inf"))] * 2, -1)[..., 0]  # time stride 2
    assert not v_bad.is_contiguous() and not ret_bad.is_contiguous()
    check(run(backend, v_bad, old, ret_bad, mask.int()), want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_is_zero(backend):
    v, old, ret = inputs(2, 3, seed=5)
    loss, stats, grad = run(backend, v, old, ret, torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and float(stats.vf_clipfrac) == 0.0
    assert bool((grad == 0).all())


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"returns": torch.zeros(2, 4)}, "shapes must match"),
        ({"mask": torch.full((2, 5), 3)}, "binary"),
        ({"clip": -0.1}, "clip"),
        ({"values": torch.zeros(2, 5, dtype=torch.int32)}, "float32"),
    ],
)
def test_bad_inputs(kw, match):
    zeros = torch.zeros(2, 5)
    args = dict(values=zeros, old_values=zeros, returns=zeros, mask=torch.ones(2, 5))
    args.update(kw)
    pos = [args.pop(k) for k in ("values", "old_values", "returns", "mask")]
    with pytest.raises(ValueError, match=match):
        kernels.value_loss(*pos, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 16384, 100003])
def test_gpu_triton(N):
    v, old, ret = inputs(1, N, seed=6)
    mask = make_mask(1, N, "holes", seed=7)
    got = run("triton", v.cuda(), old.cuda(), ret.cuda(), mask.cuda(), 0.9)
    check(got, reference(v, old, ret, mask, 0.9), torch.float32)

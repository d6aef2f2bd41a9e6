"""kernels.value_loss against hand-derived cases (which anchor the reference too) and the float64
reference, on every kernel backend: Triton (compiled on a GPU machine, through the interpreter on CPU,
with small forced blocks so its per-block partials and reduction loop run), C++ (past its 4096-token
chunk, so the per-chunk results merge) and the GPU multi-block paths at large N.

Letters: B batch, T time. Loss and clip fraction are fp32 means (2e-6 absolute, 1e-5 relative for
values ~ 1); the gradient is per token in the values' dtype (a few fp32 ulps, or one bf16/fp16
rounding, doubled, relative).
"""

import contextlib
import importlib

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
from rlhf_kernels.value_loss import IMPLEMENTED, value_loss_ref

MODULE = importlib.import_module("rlhf_kernels.value_loss")
KERNELS = kernel_backends(IMPLEMENTED)
ANCHORED = ["torch", *KERNELS]  # hand-derived values anchor the reference as well as the kernels
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}


def inputs(B, T, dtype=torch.float32, seed=0):
    values = randn(B, T, seed=seed)
    old_values = values + randn(B, T, seed=seed + 1, scale=0.3)  # |diff| > 0.2 for about half
    returns = randn(B, T, seed=seed + 2)
    return values.to(dtype), old_values.to(dtype), returns.to(dtype)


def run(backend, v, old, ret, mask, upstream=1.0, **kw):
    """On the backend's device: -> (loss, stats, grad of values under the scalar upstream gradient)."""
    dev = device_for(backend)
    x = on(dev, v.detach().clone()).requires_grad_()
    loss, stats = kernels.value_loss(x, *on(dev, old, ret, mask), backend=backend, **kw)
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


def small_blocks(backend):
    """Triton under forced 16-token blocks reduced 4 at a time: several partials and loop iterations
    of the finalize kernel at these sizes (one block otherwise covers them under the interpreter)."""
    return forced_blocks(flat=16, reduce=4) if backend == "triton" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# Hand-derived cases
# ---------------------------------------------------------------------------------------------------
def hand_case():
    # clip 0.2; values_clipped = old + clamp(values - old, -0.2, 0.2):
    #   v = 1, old = 0.5, R = 0: clipped 0.7; losses 1 vs 0.49 -> 1, gradient 0.5 * 2 (v - R) = 1
    #   v = 1, old = 0.5, R = 2: clipped 0.7; losses 1 vs 1.69 -> 1.69 (clipped), gradient 0 (clamp saturated)
    #   v = 0.625, old = 0.5, R = 0: |diff| = 0.125 < 0.2 so clipped == v exactly (binary fractions),
    #     a tie 0.390625 vs 0.390625: not counted as clipped; gradient 0.625 (both halves agree)
    # vf_loss = 0.5 * (1 + 1.69 + 0.390625) / 3; vf_clipfrac = 1/3; gradients / 3 (the token mean).
    v = torch.tensor([[1.0, 1.0, 0.625]])
    old = torch.tensor([[0.5, 0.5, 0.5]])
    ret = torch.tensor([[0.0, 2.0, 0.0]])
    return v, old, ret


HAND_GRAD = torch.tensor([[1.0, 0.0, 0.625]]) / 3


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_derived(backend):
    v, old, ret = hand_case()
    loss, stats, grad = run(backend, v, old, ret, torch.ones(1, 3))
    assert_close(loss, torch.tensor(0.5 * 3.080625 / 3), atol=1e-6, name="vf_loss")
    assert_close(stats.vf_clipfrac, torch.tensor(1 / 3), atol=1e-7, name="vf_clipfrac")
    assert_close(grad, HAND_GRAD, atol=1e-7, name="grad values")


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_masked_and_below_the_clip(backend):
    # clip 0.25, one masked token (v = 9 would dominate the loss if it counted):
    #   v = -1, old = 0, R = 1: diff -1 clamps to -0.25, clipped value -0.25; losses (-2)^2 = 4 vs
    #     (-1.25)^2 = 1.5625 -> 4, unclipped, gradient v - R = -2
    #   v = 0.5, old = 1, R = 3: clipped value 0.75; losses 6.25 vs 5.0625 -> 6.25, gradient -2.5
    #   v = 2, old = 1, R = 0.5: clipped value 1.25; losses 2.25 vs 0.5625 -> 2.25, gradient 1.5
    # vf_loss = 0.5 * (4 + 6.25 + 2.25) / 3 = 2.083333; vf_clipfrac = 0; gradients / 3.
    v = torch.tensor([-1.0, 0.5, 9.0, 2.0])
    old = torch.tensor([0.0, 1.0, 0.0, 1.0])
    ret = torch.tensor([1.0, 3.0, 0.0, 0.5])
    mask = torch.tensor([True, True, False, True])
    loss, stats, grad = run(backend, v, old, ret, mask, clip=0.25)
    assert_close(loss, torch.tensor(12.5 / 6), atol=1e-6, name="vf_loss")
    assert_close(stats.vf_clipfrac, torch.tensor(0.0), atol=0, name="vf_clipfrac")
    assert_close(grad, torch.tensor([-2.0, -2.5, 0.0, 1.5]) / 3, atol=1e-7, name="grad values")


# ---------------------------------------------------------------------------------------------------
# Gradient rule and order (kernels/_autograd.py)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ANCHORED)
def test_only_values_get_a_gradient(backend):
    # every float input requires grad (the mask too): old_values and returns are rollout data and
    # targets, the mask a selector, so only values may receive a gradient
    dev = device_for(backend)
    v, old, ret = (on(dev, t).requires_grad_() for t in inputs(3, 7, seed=30))
    mask = on(dev, make_mask(3, 7, "holes", seed=31).float()).requires_grad_()
    loss, stats = kernels.value_loss(v, old, ret, mask, backend=backend)
    (loss + stats.vf_clipfrac).backward()
    assert v.grad is not None and bool(v.grad.abs().sum() > 0)
    for name, t in (("old_values", old), ("returns", ret), ("mask", mask)):
        assert t.grad is None, f"{name} got a gradient on backend {backend}"


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_raises(backend):
    dev = device_for(backend)
    v, old, ret = hand_case()
    x = on(dev, v).requires_grad_()
    loss, _ = kernels.value_loss(x, *on(dev, old, ret, torch.ones(1, 3)), backend=backend)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    assert_close(grad, HAND_GRAD, atol=1e-7, name="first-order grad under create_graph")
    with pytest.raises(RuntimeError, match=f"value_loss: double backward is not supported by backend '{backend}'"):
        grad.sum().backward()


def test_torch_double_backward():
    # the gradient is (v - R) / n on the unclipped branch (second derivative 1/n), 0 on the saturated
    # clipped branch, and on the in-range tie 0.5 (v - R) + 0.5 (v - R) (second derivative 1/n):
    # (1, 0, 1) / 3 for the hand case
    v, old, ret = (t.double() for t in hand_case())
    x = v.clone().requires_grad_()
    loss, _ = kernels.value_loss(x, old, ret, torch.ones(1, 3), backend="torch")
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert_close(second, torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64) / 3, atol=1e-12, name="second derivative")


# ---------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("B,T", [(1, 1), (7, 13), (6, 131)])
def test_against_float64_reference(backend, kind, B, T):
    v, old, ret = inputs(B, T, seed=B * 7 + T)
    mask = make_mask(B, T, kind, seed=T)
    with small_blocks(backend):
        got = run(backend, v, old, ret, mask, 0.6, clip=0.25)
    check(got, reference(v, old, ret, mask, 0.6, clip=0.25), torch.float32)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    v, old, ret = inputs(5, 37, dtype, seed=1)
    mask = make_mask(5, 37, "mixed", seed=2)
    check(run(backend, v, old, ret, mask, 1.7), reference(v, old, ret, mask, 1.7), dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_and_garbage_under_mask(backend):
    dev = device_for(backend)
    v, old, ret = inputs(5, 11, seed=3)
    mask = make_mask(5, 11, "holes", seed=4)
    want = reference(v, old, ret, mask)
    x = on(dev, v.masked_fill(~mask, float("nan")).t().contiguous()).t().requires_grad_()  # column-major
    ret_bad = on(dev, torch.stack([ret.masked_fill(~mask, float("inf"))] * 2, -1))[..., 0]  # time stride 2
    assert not x.is_contiguous() and not ret_bad.is_contiguous()
    loss, stats = kernels.value_loss(x, on(dev, old), ret_bad, on(dev, mask.int()), backend=backend)
    loss.backward()
    check((loss, stats, x.grad), want, torch.float32)


def long_case():
    """13211 tokens (4 C++ chunks; 13 Triton blocks of the forced 1024): values with a clip range
    of 0.2 crossed by about half the tokens in every chunk, a token whose residual of 30 dominates the
    loss in chunk 0, a clipped token with a residual of -20 in chunk 1; chunk 2 entirely masked and
    holding NaN/inf."""
    N = LONG_SHAPE[0] * LONG_SHAPE[1]
    v, old, ret = (t.reshape(-1) for t in inputs(1, N, seed=40))
    mask = long_mask(seed=43).reshape(-1)
    i, j = at_chunk(0, 321), at_chunk(1, 2048)
    v[i], old[i], ret[i], mask[i] = 1.0, 1.1, -29.0, True  # unclipped, (v - R)^2 = 900
    v[j], old[j], ret[j], mask[j] = 0.0, -1.0, 19.2, True  # clipped at -0.8: (-20)^2 = 400 > 19.2^2
    dead = slice(MASKED_CHUNK * CHUNK, (MASKED_CHUNK + 1) * CHUNK)
    v_bad, ret_bad = v.clone(), ret.clone()
    v_bad[dead], ret_bad[dead] = float("nan"), float("inf")
    shape = LONG_SHAPE
    return (v.view(shape), old.view(shape), ret.view(shape), mask.view(shape)), (v_bad.view(shape), ret_bad.view(shape))


@pytest.mark.parametrize("backend", KERNELS)
def test_past_the_chunk(backend):
    # C++: 4 chunks whose loss sums, counts and clip counts merge (and a backward split into 3
    # unequal thread ranges). Triton: 13 per-block partials reduced 4 at a time.
    (v, old, ret, mask), (v_bad, ret_bad) = long_case()
    with forced_blocks(flat=1024, reduce=4), intra_op_threads(3):
        got = run(backend, v_bad, old, ret_bad, mask, 0.8)
    check(got, reference(v, old, ret, mask, 0.8), torch.float32)


@pytest.mark.parametrize("backend", ANCHORED)
def test_all_masked_is_zero(backend):
    v, old, ret = inputs(2, 3, seed=5)
    loss, stats, grad = run(backend, v, old, ret, torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and float(stats.vf_clipfrac) == 0.0
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend", KERNELS)
def test_empty(backend):
    v = torch.zeros(3, 0)
    loss, stats, grad = run(backend, v, v, v, v.bool())
    assert float(loss.detach()) == 0.0 and float(stats.vf_clipfrac) == 0.0 and grad.shape == (3, 0)


# ---------------------------------------------------------------------------------------------------
# Launch device, documentation, bad input
# ---------------------------------------------------------------------------------------------------
def test_triton_launches_on_the_tensors_device(monkeypatch):
    dev = device_for("triton")
    v, old, ret = inputs(2, 40, seed=50)
    mask = make_mask(2, 40, "holes", seed=51)
    with record_launches(MODULE, monkeypatch) as launches, forced_blocks(flat=16, reduce=2):
        run("triton", v, old, ret, mask)
    assert {name for name, _, _ in launches} == {"_value_loss_fwd_kernel", "_value_loss_finalize_kernel",
                                                 "_value_loss_bwd_kernel"}
    for name, current, devices in launches:
        assert current is not None and devices == {current} and current.type == dev.type, (name, current, devices)


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.value_loss) == {"auto", *IMPLEMENTED}


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"returns": torch.zeros(2, 4)}, "shapes must match"),
        ({"mask": torch.full((2, 5), 3)}, "binary"),
        ({"mask": torch.full((2, 5), 0.5)}, "binary"),
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


# ---------------------------------------------------------------------------------------------------
# GPU: the launch choices of real sizes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 16384, 100003, 1100003])
def test_gpu_triton_large(N):
    # 1024-token blocks: 98 partials at 100003; at 1100003, 1075 partials, so the finalize kernel
    # loops twice over 1024 of them
    device_for("triton")
    v, old, ret = inputs(1, N, seed=6)
    mask = make_mask(1, N, "holes", seed=7)
    got = run("triton", v, old, ret, mask, 0.9)
    check(got, reference(v, old, ret, mask, 0.9), torch.float32)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_non_default_device():
    device_for("triton")
    v, old, ret = inputs(1, 100003, seed=8)
    mask = make_mask(1, 100003, "holes", seed=9)
    dev = torch.device("cuda:1")
    x = v.to(dev).requires_grad_()
    with torch.cuda.device(0):
        loss, stats = kernels.value_loss(x, *on(dev, old, ret, mask), backend="triton")
        (loss * 0.9).backward()
    assert loss.device == dev and x.grad.device == dev
    check((loss, stats, x.grad), reference(v, old, ret, mask, 0.9), torch.float32)

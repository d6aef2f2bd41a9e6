"""kernels.masked_whiten against hand-derived values and gradients (which anchor the reference too)
and the float64 reference, on every kernel backend: Triton (compiled on a GPU machine, through the
interpreter on CPU, with small forced blocks so the per-block statistics and their parallel merge
run), C++ (past its 4096-token chunk, so the per-chunk sums merge) and the GPU multi-block paths.

Letters: B batch, T time, N tokens. Outputs are fp32 of size ~1 after whitening: mean and variance
come from fp32 (Triton, per-block partials combined with Chan's formula) or double (C++) sums, so
1e-5 absolute and relative covers N <= 1e5 tokens with a mean up to ~100 standard deviations.
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
from rlhf_kernels.whiten import IMPLEMENTED, masked_whiten_ref

MODULE = importlib.import_module("rlhf_kernels.whiten")
KERNELS = kernel_backends(IMPLEMENTED)
ANCHORED = ["torch", *KERNELS]  # hand-derived values anchor the reference as well as the kernels
ATOL = RTOL = 1e-5


def whiten(backend, x, mask, **kw):
    dev = device_for(backend)
    return kernels.masked_whiten(on(dev, x), on(dev, mask), backend=backend, **kw)


def small_blocks(backend):
    """Triton under forced 16-token blocks and 4-wide reductions: dozens of per-block partials (some
    empty, the last one short) merged over several loop iterations of the statistics kernel."""
    return forced_blocks(flat=16, reduce=4) if backend == "triton" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# Hand-derived cases
# ---------------------------------------------------------------------------------------------------
# valid x = 1, 2, 3, 4 (a masked 100 in between): mean 2.5, centred c = (-1.5, -0.5, 0.5, 1.5),
# unbiased variance ((1.5^2 + 0.5^2) * 2) / 3 = 5/3, so out = c * s with s = 1 / sqrt(5/3 + 1e-8)
HAND_X = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
HAND_MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])
S = 1 / math.sqrt(5 / 3 + 1e-8)


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_derived(backend):
    want = torch.tensor([[-1.5 * S, -0.5 * S, 0.0], [0.5 * S, 1.5 * S, 0.0]])
    assert_close(whiten(backend, HAND_X, HAND_MASK), want, atol=1e-6, name="shift_mean=True")
    # shift_mean=False adds the mean back at valid tokens only
    want_keep = torch.where(HAND_MASK.bool(), want + 2.5, 0)
    assert_close(whiten(backend, HAND_X, HAND_MASK, shift_mean=False), want_keep, atol=1e-6, name="shift_mean=False")


@pytest.mark.parametrize("backend", ANCHORED)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_hand_derived_gradient(backend, shift_mean):
    # The rule: with x requiring grad every backend runs the differentiable reference. For
    # L = sum_i u_i out_i over n valid tokens, out_i = c_i s (+ mean), s = (var + eps)^(-1/2),
    # var = sum c_i^2 / (n - 1):
    #   d out_i / d x_j = s (delta_ij - 1/n) - s^3 c_i c_j / (n - 1)     (+ 1/n with shift_mean=False)
    #   dL/dx_j = s (u_j - mean(u)) - s^3 c_j sum_i(u_i c_i) / (n - 1)  (+ mean(u))
    # With u = (1, 0, 0, 0) on the valid tokens (7 at the masked ones, which get no gradient):
    # mean(u) = 1/4, sum u c = -1.5, so dL/dx_j = s (u_j - 1/4) + s^3 c_j / 2:
    #   (0.75 (s - s^3), -0.25 (s + s^3), -0.25 (s - s^3), 0.75 s^3 - 0.25 s)
    #   = (0.232379, -0.309839, -0.077460, 0.154919), summing to 0 (whitening ignores a shift of x)
    dev = device_for(backend)
    x = on(dev, HAND_X.clone()).requires_grad_()
    u = torch.tensor([[1.0, 0.0, 7.0], [0.0, 0.0, 7.0]])
    out = kernels.masked_whiten(x, on(dev, HAND_MASK), shift_mean=shift_mean, backend=backend)
    (out * on(dev, u)).sum().backward()
    s3 = S**3
    want = torch.tensor([[0.75 * (S - s3), -0.25 * (S + s3), 0.0], [-0.25 * (S - s3), 0.75 * s3 - 0.25 * S, 0.0]])
    if not shift_mean:
        want = torch.where(HAND_MASK.bool(), want + 0.25, 0)
    assert_close(x.grad, want, atol=1e-6, name="grad x")


@pytest.mark.parametrize("backend", ANCHORED)
def test_edge_counts(backend):
    x = randn(3, 4, seed=1)
    # no valid token: zeros (no NaN)
    assert bool((whiten(backend, x, torch.zeros(3, 4)) == 0).all())
    # one valid token: var := 0, so it maps to 0, or to itself with shift_mean=False
    one = torch.zeros(3, 4, dtype=torch.bool)
    one[1, 2] = True
    out = whiten(backend, x, one)
    assert bool((out == 0).all()), out
    out = whiten(backend, x, one, shift_mean=False)
    assert_close(out, torch.where(one, x, 0), atol=1e-6, name="single token, shift_mean=False")


# ---------------------------------------------------------------------------------------------------
# Gradient rule (kernels/_autograd.py): forward-only kernels, the reference with grad
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ANCHORED)
def test_only_x_gets_a_gradient(backend):
    dev = device_for(backend)
    x = on(dev, randn(4, 9, seed=4)).requires_grad_()
    mask = on(dev, make_mask(4, 9, "holes", seed=5).float()).requires_grad_()
    (kernels.masked_whiten(x, mask, backend=backend) * on(dev, randn(4, 9, seed=6))).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    assert mask.grad is None, f"the mask got a gradient on backend {backend}"


# ---------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (6, 131)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_against_float64_reference(backend, kind, shape, shift_mean):
    x = randn(*shape, seed=shape[1], scale=2.0, shift=0.5)
    m = make_mask(*shape, kind, seed=shape[0])
    with small_blocks(backend):
        got = whiten(backend, x, m, shift_mean=shift_mean)
    want = masked_whiten_ref(x.double(), m, shift_mean)
    assert got.dtype == torch.float32
    assert_close(got, want, atol=ATOL, rtol=RTOL, name=f"whiten [{kind}]")
    if int(m.sum()) > 1 and shift_mean:
        # whitened: valid tokens have mean 0 and unbiased variance ~1 (1 - 1e-8 / var)
        v = got[on(got.device, m).bool()].double()
        assert abs(float(v.mean())) < 1e-5 and abs(float(v.var()) - 1) < 1e-4


@pytest.mark.parametrize("backend", KERNELS)
def test_blocks_with_different_means(backend):
    # Each 16-token block (Triton, forced) and each row has its own mean (0, 4, 8, ...): most of the
    # variance lies between the blocks, in the n_j (mean_j - mean)^2 term of the parallel merge.
    x = randn(9, 48, seed=11) + 4.0 * torch.arange(27).repeat_interleave(16).view(9, 48)
    m = make_mask(9, 48, "mixed", seed=12)
    with small_blocks(backend):
        got = whiten(backend, x, m)
    assert_close(got, masked_whiten_ref(x.double(), m), atol=ATOL, rtol=RTOL, name="block means")


@pytest.mark.parametrize("backend", KERNELS)
def test_large_offset_low_precision_and_strides(backend):
    # mean 1000 with std 10: a one-pass E[x^2] - E[x]^2 in fp32 would lose ~1e-1 of the variance
    dev = device_for(backend)
    x = randn(41, 101, seed=2, scale=10.0, shift=1000.0)
    m = make_mask(41, 101, "holes", seed=3)
    assert_close(whiten(backend, x, m), masked_whiten_ref(x.double(), m), atol=ATOL, rtol=RTOL, name="offset 1000")
    xb = on(dev, x.t().contiguous().to(torch.bfloat16)).t()  # column-major bf16
    assert not xb.is_contiguous()
    got = kernels.masked_whiten(xb, on(dev, m.float()), backend=backend)
    assert_close(got, masked_whiten_ref(xb.double(), m), atol=ATOL, rtol=RTOL, name="bf16, strided")


@pytest.mark.parametrize("backend", KERNELS)
def test_garbage_under_mask(backend):
    x = randn(5, 17, seed=9)
    m = make_mask(5, 17, "mixed", seed=10)
    bad = x.masked_fill(~m, float("nan"))
    bad[~m & (torch.arange(17) % 2 == 0)] = float("inf")
    assert_close(whiten(backend, bad, m), masked_whiten_ref(x.double(), m), atol=ATOL, rtol=RTOL,
                 name="NaN/inf under the mask")  # fmt: skip


@pytest.mark.parametrize("backend", KERNELS)
def test_past_the_chunk(backend):
    # 13211 tokens: C++ sums counts and values per 4096-token chunk, then squared deviations per
    # chunk, and merges both; Triton (forced 1024-token blocks, 4-wide reductions) merges 13 block
    # statistics over 4 loop iterations. Each chunk has its own mean (0, 3, -, 9); chunk 2 is entirely
    # masked and holds NaN/inf.
    N = LONG_SHAPE[0] * LONG_SHAPE[1]
    x = randn(N, seed=20) + 3.0 * (torch.arange(N) // CHUNK)
    m = long_mask(seed=21).reshape(-1)
    bad = x.clone()
    bad[MASKED_CHUNK * CHUNK : (MASKED_CHUNK + 1) * CHUNK : 2] = float("nan")
    bad[MASKED_CHUNK * CHUNK + 1 : (MASKED_CHUNK + 1) * CHUNK : 2] = float("inf")
    with forced_blocks(flat=1024, reduce=4), intra_op_threads(3):
        for shift_mean in (True, False):
            got = whiten(backend, bad.view(LONG_SHAPE), m.view(LONG_SHAPE), shift_mean=shift_mean)
            want = masked_whiten_ref(x.double().view(LONG_SHAPE), m.view(LONG_SHAPE), shift_mean)
            assert_close(got, want, atol=ATOL, rtol=RTOL, name=f"shift_mean={shift_mean}")


@pytest.mark.parametrize("backend", KERNELS)
def test_empty(backend):
    out = whiten(backend, torch.zeros(2, 0), torch.zeros(2, 0))
    assert out.shape == (2, 0) and out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Launch device, documentation, bad input
# ---------------------------------------------------------------------------------------------------
def test_triton_launches_on_the_tensors_device(monkeypatch):
    dev = device_for("triton")
    with record_launches(MODULE, monkeypatch) as launches, forced_blocks(flat=16, reduce=2):
        whiten("triton", randn(2, 40, seed=30), make_mask(2, 40, "holes", seed=31))
    assert [name for name, _, _ in launches] == ["_whiten_partial_kernel", "_whiten_stats_kernel",
                                                 "_whiten_apply_kernel"]
    for name, current, devices in launches:
        assert current is not None and devices == {current} and current.type == dev.type, (name, current, devices)


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.masked_whiten) == {"auto", *IMPLEMENTED}


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(3, 4), torch.ones(3, 5)), "mask shape"),
        ((torch.zeros(3, 4), torch.full((3, 4), 0.5)), "binary"),
        ((torch.zeros(3, 4), torch.full((3, 4), 2)), "binary"),
        ((torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4)), "float32"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.masked_whiten(*args)


# ---------------------------------------------------------------------------------------------------
# GPU: the launch choices of real sizes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 2049, 1000003, 3000017])
def test_gpu_triton_large(N):
    # 2048-token blocks: 489 partials at 1000003; at 3000017, 1465 partials, so the statistics
    # kernel loops twice over 1024 of them
    device_for("triton")
    x = randn(1, N, seed=7, scale=3.0, shift=50.0)
    m = make_mask(1, N, "holes", seed=8)
    assert_close(whiten("triton", x, m), masked_whiten_ref(x.double(), m), atol=ATOL, rtol=RTOL, name="whiten")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_non_default_device():
    device_for("triton")
    x = randn(3, 100003, seed=9, scale=3.0, shift=50.0)
    m = make_mask(3, 100003, "holes", seed=10)
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        got = kernels.masked_whiten(x.to(dev), m.to(dev), backend="triton")
    assert got.device == dev
    assert_close(got, masked_whiten_ref(x.double(), m), atol=ATOL, rtol=RTOL, name="whiten on cuda:1")

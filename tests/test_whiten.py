"""kernels.masked_whiten against hand-derived values and the float64 reference, on every backend that
runs here (Triton through the interpreter on CPU).

Letters: B batch, T time. Outputs are fp32 of size ~1 after whitening: mean and variance come from
fp32 (Triton, per-block partials combined with Chan's formula) or double (C++) sums, so 1e-5
absolute and relative covers N <= 1e5 tokens with a mean up to ~100 standard deviations.
"""

import math

import pytest
import torch
from _rl_cases import MASK_KINDS, make_mask, randn
from util import assert_close, cpu_backends

import rlhf_kernels as kernels
from rlhf_kernels.whiten import IMPLEMENTED, masked_whiten_ref

BACKENDS = cpu_backends(IMPLEMENTED)
ATOL = RTOL = 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_derived(backend):
    # valid x = 1, 2, 3, 4 (a masked 100 in between): mean 2.5, unbiased variance
    # ((1.5^2 + 0.5^2) * 2) / 3 = 5/3, so out = (x - 2.5) / sqrt(5/3 + 1e-8) = (x - 2.5) * 0.774597
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    s = 1 / math.sqrt(5 / 3 + 1e-8)
    want = torch.tensor([[-1.5 * s, -0.5 * s, 0.0], [0.5 * s, 1.5 * s, 0.0]])
    assert_close(kernels.masked_whiten(x, m, backend=backend), want, atol=1e-6, name="shift_mean=True")
    # shift_mean=False adds the mean back at valid tokens only
    want_keep = torch.where(m.bool(), want + 2.5, 0)
    got = kernels.masked_whiten(x, m, shift_mean=False, backend=backend)
    assert_close(got, want_keep, atol=1e-6, name="shift_mean=False")


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_counts(backend):
    x = randn(3, 4, seed=1)
    # no valid token: zeros (no NaN)
    assert bool((kernels.masked_whiten(x, torch.zeros(3, 4), backend=backend) == 0).all())
    # one valid token: var := 0, so it maps to 0, or to itself with shift_mean=False
    one = torch.zeros(3, 4, dtype=torch.bool)
    one[1, 2] = True
    out = kernels.masked_whiten(x, one, backend=backend)
    assert bool((out == 0).all()), out
    out = kernels.masked_whiten(x, one, shift_mean=False, backend=backend)
    assert_close(out, torch.where(one, x, 0), atol=1e-6, name="single token, shift_mean=False")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (6, 131)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_against_float64_reference(backend, kind, shape, shift_mean):
    x = randn(*shape, seed=shape[1], scale=2.0, shift=0.5)
    m = make_mask(*shape, kind, seed=shape[0])
    got = kernels.masked_whiten(x, m, shift_mean=shift_mean, backend=backend)
    want = masked_whiten_ref(x.double(), m, shift_mean)
    assert got.dtype == torch.float32
    assert_close(got, want, atol=ATOL, rtol=RTOL, name=f"whiten [{kind}]")
    if int(m.sum()) > 1 and shift_mean:
        # whitened: valid tokens have mean 0 and unbiased variance ~1 (1 - 1e-8 / var)
        v = got[m.bool()].double()
        assert abs(float(v.mean())) < 1e-5 and abs(float(v.var()) - 1) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_low_precision_and_strides(backend):
    # mean 1000 with std 10: a one-pass E[x^2] - E[x]^2 in fp32 would lose ~1e-1 of the variance
    x = randn(41, 101, seed=2, scale=10.0, shift=1000.0)
    m = make_mask(41, 101, "holes", seed=3)
    assert_close(kernels.masked_whiten(x, m, backend=backend), masked_whiten_ref(x.double(), m), atol=ATOL, rtol=RTOL,
                 name="offset 1000")  # fmt: skip
    xb = x.t().to(torch.bfloat16).t()  # column-major bf16
    assert_close(kernels.masked_whiten(xb, m.float(), backend=backend), masked_whiten_ref(xb.double(), m),
                 atol=ATOL, rtol=RTOL, name="bf16, strided")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_under_mask(backend):
    x = randn(5, 17, seed=9)
    m = make_mask(5, 17, "mixed", seed=10)
    bad = x.masked_fill(~m, float("nan"))
    bad[~m & (torch.arange(17) % 2 == 0)] = float("inf")
    assert_close(kernels.masked_whiten(bad, m, backend=backend), masked_whiten_ref(x.double(), m), atol=ATOL,
                 rtol=RTOL, name="NaN/inf under the mask")  # fmt: skip


def test_gradient_runs_through_the_reference():
    x = randn(4, 9, seed=4)
    m = make_mask(4, 9, "holes", seed=5)
    up = randn(4, 9, seed=6)
    a = x.clone().requires_grad_()
    (kernels.masked_whiten(a, m) * up).sum().backward()
    b = x.double().requires_grad_()
    (masked_whiten_ref(b, m) * up.double()).sum().backward()
    assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, name="grad x")


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(3, 4), torch.ones(3, 5)), "mask shape"),
        ((torch.zeros(3, 4), torch.full((3, 4), 0.5)), "binary"),
        ((torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4)), "float32"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.masked_whiten(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 2049, 1000003])
def test_gpu_triton(N):
    x = randn(1, N, seed=7, scale=3.0, shift=50.0)
    m = make_mask(1, N, "holes", seed=8)
    got = kernels.masked_whiten(x.cuda(), m.cuda(), backend="triton")
    assert_close(got, masked_whiten_ref(x.double(), m), atol=ATOL, rtol=RTOL, name="whiten")

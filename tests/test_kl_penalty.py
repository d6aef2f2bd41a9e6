"""kernels.kl_penalty against hand-derived values and the float64 reference, on every backend that
runs here (Triton through the interpreter on CPU).

Letters: N tokens. Outputs are fp32 from one subtraction and a few flops: 1e-6 absolute plus 4 fp32
ulps relative; k3 near log_ratio = 0 is checked relative to its own tiny size (the Taylor branch).
Gradients are stored in the logprobs' dtype (one bf16/fp16 rounding, doubled, relative).
"""

import math

import pytest
import torch
from _rl_cases import randn
from util import EPS32, assert_close, cpu_backends

import rlhf_kernels as kernels
from rlhf_kernels.kl_penalty import IMPLEMENTED, kl_penalty_ref

BACKENDS = cpu_backends(IMPLEMENTED)
KINDS = ("k1", "k2", "k3")
GRAD_RTOL = {torch.float32: 4 * EPS32, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}


def run(backend, lp, ref, upstream, **kw):
    x = lp.detach().clone().requires_grad_()
    kl = kernels.kl_penalty(x, ref, backend=backend, **kw)
    kl.backward(upstream)
    return kl, x.grad


def reference(lp, ref, upstream, kind="k3", clamp=None):
    x = lp.detach().double().requires_grad_()
    kl = kl_penalty_ref(x, ref.double(), kind, clamp)
    kl.backward(upstream.double())
    return kl, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_derived(backend):
    # log_ratio = ln 2 (policy twice as likely as the reference):
    #   k1 = ln 2 = 0.693147; k2 = 0.5 ln^2 2 = 0.240227; k3 = 1/2 - 1 + ln 2 = 0.193147
    #   gradients: 1, ln 2, 1 - 1/2 = 0.5
    # log_ratio = -ln 2: k1 = -0.693147, k2 = 0.240227, k3 = 2 - 1 - ln 2 = 0.306853; grads 1, -ln 2, 1 - 2 = -1
    lp = torch.tensor([math.log(2.0) - 1.0, -math.log(2.0) - 1.0])
    ref = torch.tensor([-1.0, -1.0])
    ln2 = math.log(2.0)
    want = {
        "k1": ([ln2, -ln2], [1.0, 1.0]),
        "k2": ([0.5 * ln2**2, 0.5 * ln2**2], [ln2, -ln2]),
        "k3": ([ln2 - 0.5, 1.0 - ln2], [0.5, -1.0]),
    }
    for kind, (value, grad) in want.items():
        kl, g = run(backend, lp, ref, torch.ones(2), kind=kind)
        assert_close(kl, torch.tensor(value), atol=1e-6, name=f"{kind} value")
        assert_close(g, torch.tensor(grad), atol=1e-6, name=f"{kind} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp(backend):
    # clamp 1: log_ratio 3 -> 1 (k3 = e^-1 - 1 + 1 = 0.367879) with zero gradient; -0.5 unchanged
    lp = torch.tensor([3.0, -0.5])
    kl, g = run(backend, lp, torch.zeros(2), torch.ones(2), kind="k3", clamp=1.0)
    assert_close(kl, torch.tensor([math.exp(-1.0), math.exp(0.5) - 1.5]), atol=1e-6, name="k3 clamped")
    assert_close(g, torch.tensor([0.0, 1 - math.exp(0.5)]), atol=1e-6, name="grad clamped")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clamp", [None, 0.7])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 5, 11)])
def test_against_float64_reference(backend, kind, clamp, shape):
    lp = randn(*shape, seed=1, scale=0.5, shift=-2.0)
    ref = lp + randn(*shape, seed=2, scale=0.8)
    up = randn(*shape, seed=3)
    kl, g = run(backend, lp, ref, up, kind=kind, clamp=clamp)
    rkl, rg = reference(lp, ref, up, kind, clamp)
    assert kl.dtype == torch.float32 and kl.shape == lp.shape
    assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name=f"{kind} value")
    assert_close(g, rg, atol=1e-6, rtol=GRAD_RTOL[torch.float32], name=f"{kind} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_small_log_ratio_is_accurate(backend):
    # log_ratio in [1e-6, 0.5] (both signs), where exp(-x) - 1 + x would cancel: k3 ~ x^2 / 2 must hold
    # to 1e-6 relative of its own size, and its gradient 1 - e^-x ~ x likewise.
    x = torch.cat([torch.logspace(-6, math.log10(0.49), 40), -torch.logspace(-6, math.log10(0.49), 40)])
    lp = (x.double() - 1.0).float()
    ref = torch.full_like(lp, -1.0)
    x = lp.double() + 1.0  # the log_ratio fp32 really sees
    kl, g = run(backend, lp, ref, torch.ones_like(lp), kind="k3")
    assert_close(kl, torch.expm1(-x) + x, atol=0, rtol=1e-6, name="k3 near 0")
    assert_close(g, -torch.expm1(-x), atol=0, rtol=1e-6, name="k3 grad near 0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_non_contiguous(backend, dtype):
    lp = randn(13, 7, seed=4, shift=-1.0).to(dtype).t()  # [7, 13] column-major
    ref = randn(7, 26, seed=5, shift=-1.0).to(dtype)[:, ::2]
    up = randn(7, 13, seed=6)
    for kind in KINDS:
        kl, g = run(backend, lp, ref, up, kind=kind)
        rkl, rg = reference(lp, ref, up, kind)
        assert kl.dtype == torch.float32 and g.dtype == dtype
        assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name=f"{kind} value ({dtype})")
        assert_close(g, rg, atol=1e-6, rtol=GRAD_RTOL[dtype], name=f"{kind} grad ({dtype})")


@pytest.mark.parametrize(
    "args,kw,match",
    [
        ((torch.zeros(3), torch.zeros(4)), {}, "shapes must match"),
        ((torch.zeros(3), torch.zeros(3)), {"kind": "k4"}, "kind"),
        ((torch.zeros(3), torch.zeros(3)), {"clamp": 0.0}, "clamp"),
        ((torch.zeros(3, dtype=torch.long), torch.zeros(3)), {}, "float32"),
    ],
)
def test_bad_inputs(args, kw, match):
    with pytest.raises(ValueError, match=match):
        kernels.kl_penalty(*args, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_triton(kind):
    lp = randn(3, 10007, seed=7, shift=-1.0)
    ref = lp + randn(3, 10007, seed=8, scale=0.5)
    up = randn(3, 10007, seed=9)
    kl, g = run("triton", lp.cuda(), ref.cuda(), up.cuda(), kind=kind, clamp=1.0)
    rkl, rg = reference(lp, ref, up, kind, 1.0)
    assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name="value")
    assert_close(g, rg, atol=1e-6, rtol=GRAD_RTOL[torch.float32], name="grad")

"""kernels.kl_penalty against hand-derived values (which anchor the reference too) and the float64
reference, on every kernel backend: Triton (compiled on a GPU machine, through the interpreter on CPU,
with small forced blocks so several programs run) and C++ (past its 4096-token grain, split over
several thread ranges).

Letters: N tokens. Outputs are fp32 from one subtraction and a few flops: 1e-6 absolute plus 4 fp32
ulps relative; k3 near log_ratio = 0 is checked relative to its own tiny size (the Taylor branch).
Gradients are stored in the logprobs' dtype (one bf16/fp16 rounding, doubled, relative).
"""

import contextlib
import importlib
import math

import pytest
import torch
from _rl_cases import documented_backends, intra_op_threads, randn, record_launches
from util import EPS32, assert_close, device_for, kernel_backends, on

import rlhf_kernels as kernels
from rlhf_kernels._triton import forced_blocks
from rlhf_kernels.kl_penalty import IMPLEMENTED, kl_penalty_ref

MODULE = importlib.import_module("rlhf_kernels.kl_penalty")
KERNELS = kernel_backends(IMPLEMENTED)
ANCHORED = ["torch", *KERNELS]  # hand-derived values anchor the reference as well as the kernels
KINDS = ("k1", "k2", "k3")
GRAD_RTOL = {torch.float32: 4 * EPS32, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}


def run(backend, lp, ref, upstream, **kw):
    """On the backend's device: -> (kl, grad of logprobs under the upstream gradient)."""
    dev = device_for(backend)
    x = on(dev, lp.detach().clone()).requires_grad_()
    kl = kernels.kl_penalty(x, on(dev, ref), backend=backend, **kw)
    kl.backward(on(dev, upstream))
    return kl, x.grad


def reference(lp, ref, upstream, kind="k3", clamp=None):
    x = lp.detach().double().requires_grad_()
    kl = kl_penalty_ref(x, ref.double(), kind, clamp)
    kl.backward(upstream.double())
    return kl, x.grad


# ---------------------------------------------------------------------------------------------------
# Hand-derived cases
# ---------------------------------------------------------------------------------------------------
LN2 = math.log(2.0)
# log_ratio = ln 2 (policy twice as likely as the reference) and -ln 2:
#   k1 = +-ln 2; k2 = 0.5 ln^2 2 = 0.240227 both; k3 = e^-x - 1 + x = 1/2 - 1 + ln 2 = 0.193147 and
#   2 - 1 - ln 2 = 0.306853
#   gradients dk/dx: k1 1; k2 x = +-ln 2; k3 1 - e^-x = 0.5 and 1 - 2 = -1
#   second derivatives: k1 0; k2 1; k3 e^-x = 0.5 and 2
HAND = {
    "k1": ([LN2, -LN2], [1.0, 1.0], [0.0, 0.0]),
    "k2": ([0.5 * LN2**2, 0.5 * LN2**2], [LN2, -LN2], [1.0, 1.0]),
    "k3": ([LN2 - 0.5, 1.0 - LN2], [0.5, -1.0], [0.5, 2.0]),
}


def hand_inputs():
    return torch.tensor([LN2 - 1.0, -LN2 - 1.0]), torch.tensor([-1.0, -1.0])


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_derived(backend):
    lp, ref = hand_inputs()
    for kind, (value, grad, _) in HAND.items():
        kl, g = run(backend, lp, ref, torch.ones(2), kind=kind)
        assert_close(kl, torch.tensor(value), atol=1e-6, name=f"{kind} value")
        assert_close(g, torch.tensor(grad), atol=1e-6, name=f"{kind} grad")


@pytest.mark.parametrize("backend", ANCHORED)
def test_clamp(backend):
    # clamp 1: log_ratio 3 -> 1 (k3 = e^-1 - 1 + 1 = 0.367879) with zero gradient; -0.5 unchanged:
    # k3 = e^0.5 - 1.5 = 0.148721, gradient 1 - e^0.5 = -0.648721
    lp = torch.tensor([3.0, -0.5])
    kl, g = run(backend, lp, torch.zeros(2), torch.ones(2), kind="k3", clamp=1.0)
    assert_close(kl, torch.tensor([math.exp(-1.0), math.exp(0.5) - 1.5]), atol=1e-6, name="k3 clamped")
    assert_close(g, torch.tensor([0.0, 1 - math.exp(0.5)]), atol=1e-6, name="grad clamped")


# ---------------------------------------------------------------------------------------------------
# Gradient rule and order (kernels/_autograd.py)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ANCHORED)
@pytest.mark.parametrize("kind", KINDS)
def test_only_logprobs_get_a_gradient(backend, kind):
    # the reference model is frozen: ref_logprobs never receives a gradient
    dev = device_for(backend)
    lp = on(dev, randn(4, 5, seed=30, shift=-1.0)).requires_grad_()
    ref = on(dev, randn(4, 5, seed=31, shift=-1.0)).requires_grad_()
    kernels.kl_penalty(lp, ref, kind=kind, backend=backend).sum().backward()
    assert lp.grad is not None and bool(lp.grad.abs().sum() > 0)
    assert ref.grad is None, f"ref_logprobs got a gradient on backend {backend}"


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_raises(backend, kind):
    dev = device_for(backend)
    lp, ref = on(dev, *hand_inputs())
    x = lp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(kernels.kl_penalty(x, ref, kind=kind, backend=backend).sum(), x, create_graph=True)
    assert_close(grad, torch.tensor(HAND[kind][1]), atol=1e-6, name="first-order grad under create_graph")
    with pytest.raises(RuntimeError, match=f"kl_penalty: double backward is not supported by backend '{backend}'"):
        grad.sum().backward()


@pytest.mark.parametrize("kind", KINDS)
def test_torch_double_backward(kind):
    lp, ref = (t.double() for t in hand_inputs())
    x = lp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(kernels.kl_penalty(x, ref, kind=kind, backend="torch").sum(), x, create_graph=True)
    # k1's gradient is the constant 1: nothing left to differentiate
    second = torch.autograd.grad(grad.sum(), x)[0] if grad.requires_grad else torch.zeros_like(x)
    assert_close(second, torch.tensor(HAND[kind][2], dtype=torch.float64), atol=1e-6, name=f"{kind} second derivative")


# ---------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clamp", [None, 0.7])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 5, 11)])
def test_against_float64_reference(backend, kind, clamp, shape):
    lp = randn(*shape, seed=1, scale=0.5, shift=-2.0)
    ref = lp + randn(*shape, seed=2, scale=0.8)
    up = randn(*shape, seed=3)
    blocks = forced_blocks(flat=16) if backend == "triton" else contextlib.nullcontext()  # several programs
    with blocks:
        kl, g = run(backend, lp, ref, up, kind=kind, clamp=clamp)
    rkl, rg = reference(lp, ref, up, kind, clamp)
    assert kl.dtype == torch.float32 and kl.shape == lp.shape
    assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name=f"{kind} value")
    assert_close(g, rg, atol=1e-6, rtol=GRAD_RTOL[torch.float32], name=f"{kind} grad")


@pytest.mark.parametrize("backend", KERNELS)
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


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_non_contiguous(backend, dtype):
    dev = device_for(backend)
    lp = randn(13, 7, seed=4, shift=-1.0).to(dtype)
    ref = randn(7, 26, seed=5, shift=-1.0).to(dtype)
    up = randn(7, 13, seed=6)
    for kind in KINDS:
        x = on(dev, lp).t().requires_grad_()  # [7, 13] column-major
        r = on(dev, ref)[:, ::2]  # time stride 2
        assert not x.is_contiguous() and not r.is_contiguous()
        kl = kernels.kl_penalty(x, r, kind=kind, backend=backend)
        kl.backward(on(dev, up))
        rkl, rg = reference(lp.t(), ref[:, ::2], up, kind)
        assert kl.dtype == torch.float32 and x.grad.dtype == dtype
        assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name=f"{kind} value ({dtype})")
        assert_close(x.grad, rg, atol=1e-6, rtol=GRAD_RTOL[dtype], name=f"{kind} grad ({dtype})")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", KINDS)
def test_past_the_cpp_grain(backend, kind):
    # 13211 tokens: the C++ kernels split them into 3 unequal thread ranges (grain 4096), Triton into
    # 13 programs of the forced 1024; every token's value and gradient must land at its own index
    # (a log-ratio that grows with the index tells any two apart)
    N = 13211
    ref = randn(N, seed=7, shift=-1.0)
    lp = ref + torch.linspace(-3.0, 3.0, N) + randn(N, seed=8, scale=0.01)
    up = randn(N, seed=9)
    with forced_blocks(flat=1024), intra_op_threads(3):
        kl, g = run(backend, lp, ref, up, kind=kind, clamp=2.5)
    rkl, rg = reference(lp, ref, up, kind, 2.5)
    assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name=f"{kind} value")
    assert_close(g, rg, atol=1e-6, rtol=GRAD_RTOL[torch.float32], name=f"{kind} grad")


@pytest.mark.parametrize("backend", KERNELS)
def test_empty(backend):
    kl, g = run(backend, torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0))
    assert kl.shape == g.shape == (2, 0) and kl.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# Launch device, documentation, bad input
# ---------------------------------------------------------------------------------------------------
def test_triton_launches_on_the_tensors_device(monkeypatch):
    dev = device_for("triton")
    with record_launches(MODULE, monkeypatch) as launches, forced_blocks(flat=16):
        run("triton", randn(40, seed=10), randn(40, seed=11), randn(40, seed=12), kind="k3")
    assert [name for name, _, _ in launches] == ["_kl_penalty_kernel"] * 2  # forward, backward
    for name, current, devices in launches:
        assert current is not None and devices == {current} and current.type == dev.type, (name, current, devices)


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.kl_penalty) == {"auto", *IMPLEMENTED}


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


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_triton(kind):
    device_for("triton")
    lp = randn(3, 100003, seed=7, shift=-1.0)
    ref = lp + randn(3, 100003, seed=8, scale=0.5)
    up = randn(3, 100003, seed=9)
    kl, g = run("triton", lp, ref, up, kind=kind, clamp=1.0)
    rkl, rg = reference(lp, ref, up, kind, 1.0)
    assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name="value")
    assert_close(g, rg, atol=1e-6, rtol=GRAD_RTOL[torch.float32], name="grad")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_non_default_device():
    device_for("triton")
    lp = randn(3, 10007, seed=10, shift=-1.0)
    ref = lp + randn(3, 10007, seed=11, scale=0.5)
    up = randn(3, 10007, seed=12)
    dev = torch.device("cuda:1")
    x = lp.to(dev).requires_grad_()
    with torch.cuda.device(0):
        kl = kernels.kl_penalty(x, ref.to(dev), kind="k3", backend="triton")
        kl.backward(up.to(dev))
    assert kl.device == dev and x.grad.device == dev
    rkl, rg = reference(lp, ref, up, "k3")
    assert_close(kl, rkl, atol=1e-6, rtol=4 * EPS32, name="value")
    assert_close(x.grad, rg, atol=1e-6, rtol=GRAD_RTOL[torch.float32], name="grad")

"""kernels.swiglu against the float64 reference on both backends (the "torch" autograd Function, the
CPU path, and Triton: compiled on a GPU machine, through the interpreter on CPU, with forced small
tiles so many programs and partial tiles run), and what one call keeps for the backward.

Letters: M rows, C columns (the MLP's intermediate size). Tolerances: fp32 values and gradients are a
few fp32 roundings of a handful of flops (sigmoid's exp included): 1e-6 absolute plus 16 fp32 ulps
relative. In bf16/fp16 every rounding to the dtype is allowed a whole ulp (2^-7 bf16, 2^-10 fp16):
Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest; the values round twice on
the "torch" backend (silu(gate) in gate's dtype, then the product, as the reference does),
gradients once.
"""

import importlib

import pytest
import rlhf_kernels as kernels
import torch
from _rl_cases import documented_backends, randn, record_launches
from rlhf_kernels._triton import forced_blocks
from rlhf_kernels.swiglu import IMPLEMENTED, swiglu_ref
from util import EPS32, assert_close, device_for, on

MODULE = importlib.import_module("rlhf_kernels.swiglu")
# "torch" is an autograd Function of its own, not the reference: both are checked
BACKENDS = list(IMPLEMENTED)
# one rounding to the dtype (see the module docstring)
RTOL = {torch.float32: 16 * EPS32, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def run(backend, gate, up, grad):
    """On the backend's device: -> (out, grad of gate, grad of up) under the upstream gradient."""
    dev = device_for(backend)
    # detach, not clone: a clone of a non-dense view (a chunk) is contiguous
    a = on(dev, gate).detach().requires_grad_()
    b = on(dev, up).detach().requires_grad_()
    out = kernels.swiglu(a, b, backend=backend)
    out.backward(on(dev, grad))
    return out, a.grad, b.grad


def reference(gate, up, grad):
    a = gate.detach().double().requires_grad_()
    b = up.detach().double().requires_grad_()
    out = swiglu_ref(a, b)
    out.backward(grad.double())
    return out, a.grad, b.grad


def check(out, d_gate, d_up, gate, up, grad, name):
    r_out, r_gate, r_up = reference(gate, up, grad)
    dtype = torch.promote_types(gate.dtype, up.dtype)
    assert out.dtype == dtype and d_gate.dtype == gate.dtype and d_up.dtype == up.dtype
    assert out.shape == d_gate.shape == d_up.shape == gate.shape
    assert_close(
        out, r_out, atol=1e-6, rtol=RTOL[gate.dtype] + RTOL[dtype], name=f"{name} out"
    )
    assert_close(
        d_gate, r_gate, atol=1e-6, rtol=RTOL[gate.dtype], name=f"{name} d_gate"
    )
    assert_close(d_up, r_up, atol=1e-6, rtol=RTOL[up.dtype], name=f"{name} d_up")


def inputs(*shape, seed, dtype=torch.float32):
    """(gate, up, upstream gradient)."""
    gate = randn(*shape, seed=seed, scale=2.0)
    return (
        gate.to(dtype),
        randn(*shape, seed=seed + 1).to(dtype),
        randn(*shape, seed=seed + 2).to(dtype),
    )


# ---------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------
SHAPES = [(1, 1536), (7, 577), (1024, 1536), (2, 3, 576), (5,)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_against_float64_reference(backend, shape):
    gate, up, grad = inputs(*shape, seed=1)
    check(*run(backend, gate, up, grad), gate, up, grad, f"{shape}")


@pytest.mark.parametrize("tile,shape", [(16, (5, 37)), (64, (7, 577)), (64, (13, 5))])
def test_triton_small_tiles(tile, shape):
    # tiles narrower than a row (one row per tile, the last column tile partial), and tiles of
    # several short rows (8 rows of 8 columns at C = 5: partial in both directions)
    gate, up, grad = inputs(*shape, seed=4)
    with forced_blocks(flat=tile):
        out = run("triton", gate, up, grad)
    check(*out, gate, up, grad, f"tile {tile}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    gate, up, grad = inputs(7, 577, seed=7, dtype=dtype)
    check(*run(backend, gate, up, grad), gate, up, grad, f"{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    gate, up, grad = inputs(3, 33, seed=10)
    gate = gate.to(torch.bfloat16)  # out in fp32; d_gate in bf16, d_up in fp32
    check(*run(backend, gate, up, grad), gate, up, grad, "bf16 gate, fp32 up")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    # gate and up: the two halves of one fused gate_up projection (row stride 2C, no copy needed);
    # the upstream gradient transposed; and a transposed gate (column stride != 1: copied)
    fused = randn(2, 7, 2 * 577, seed=13, scale=2.0)
    gate, up = fused.chunk(2, dim=-1)
    grad = randn(577, 7, 2, seed=14).permute(2, 1, 0)
    assert (
        not gate.is_contiguous() and not up.is_contiguous() and not grad.is_contiguous()
    )
    check(*run(backend, gate, up, grad), gate, up, grad, "chunks")
    gate_t = randn(577, 7, seed=15).t()
    check(
        *run(backend, gate_t, up[0], grad[0]), gate_t, up[0], grad[0], "transposed gate"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_values(backend):
    # saturated sigmoids: s = 0 exactly (exp overflows) and s = 1; the derivative must stay finite
    gate = torch.tensor([[-1e4, -88.0, -30.0, 0.0, 30.0, 88.0, 1e4, 3e38]])
    up, grad = torch.full_like(gate, 1.5), torch.full_like(gate, -0.5)
    check(
        *run(backend, gate[:, :-1], up[:, :-1], grad[:, :-1]),
        gate[:, :-1],
        up[:, :-1],
        grad[:, :-1],
        "saturated",
    )
    for dtype in (torch.bfloat16, torch.float16):
        g16 = torch.tensor([[-6e4, -60.0, 60.0, 6e4]]).to(dtype)
        ones = torch.ones_like(g16)
        check(*run(backend, g16, ones, ones), g16, ones, ones, f"saturated {dtype}")


# ---------------------------------------------------------------------------------------------------
# Gradient order
# ---------------------------------------------------------------------------------------------------
def test_torch_backend_second_order():
    gate = randn(3, 5, seed=16).double().requires_grad_()
    up = randn(3, 5, seed=17).double().requires_grad_()

    def fn(a, b):
        return kernels.swiglu(a, b, backend="torch")

    assert torch.autograd.gradcheck(fn, (gate, up))
    assert torch.autograd.gradgradcheck(fn, (gate, up))


def test_only_one_input_requires_grad():
    for backend in BACKENDS:
        dev = device_for(backend)
        gate, up, grad = inputs(3, 9, seed=18)
        _, r_gate, r_up = reference(gate, up, grad)
        for which, want in ((0, r_gate), (1, r_up)):  # only gate, then only up, requires grad
            args = [on(dev, gate), on(dev, up)]
            args[which].requires_grad_()
            kernels.swiglu(*args, backend=backend).backward(on(dev, grad))
            name = f"{backend} d_{('gate', 'up')[which]} only"
            assert_close(args[which].grad, want, atol=1e-6, rtol=RTOL[torch.float32], name=name)


def test_triton_double_backward_raises():
    dev = device_for("triton")
    a = on(dev, randn(3, 7, seed=19)).requires_grad_()
    out = kernels.swiglu(a, on(dev, randn(3, 7, seed=20)), backend="triton")
    (ga,) = torch.autograd.grad(out.sum(), a, create_graph=True)
    with pytest.raises(
        RuntimeError,
        match="swiglu: double backward is not supported by backend 'triton'",
    ):
        ga.sum().backward()


# ---------------------------------------------------------------------------------------------------
# Memory: what one call keeps for the backward
# ---------------------------------------------------------------------------------------------------
def saved_storages(fn):
    """Call fn() under saved_tensors_hooks -> {storage address: bytes} of every tensor its autograd
    graph keeps."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}


def new_bytes(storages, *inputs):
    own = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(n for ptr, n in storages.items() if ptr not in own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_only_gate_and_up(dtype):
    # the reference keeps silu(gate) as well: M x C in the dtype (6.3 MB fp32 at 1024 x 1536)
    M, C = 1024, 1536
    gate = randn(M, C, seed=21).to(dtype).requires_grad_()
    up = randn(M, C, seed=22).to(dtype).requires_grad_()
    ours = saved_storages(lambda: kernels.swiglu(gate, up, backend="torch"))
    ref = saved_storages(lambda: swiglu_ref(gate, up))
    assert set(ours) == {
        gate.untyped_storage().data_ptr(),
        up.untyped_storage().data_ptr(),
    }, ours
    assert new_bytes(ref, gate, up) == M * C * gate.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_of_one_projection_keep_one_storage(backend):
    dev = device_for(backend)
    fused = on(dev, randn(5, 2 * 33, seed=23)).requires_grad_()
    gate, up = fused.chunk(2, dim=-1)
    ours = saved_storages(lambda: kernels.swiglu(gate, up, backend=backend))
    assert set(ours) == {fused.untyped_storage().data_ptr()}, ours


# ---------------------------------------------------------------------------------------------------
# Dispatch, launch device, documentation, bad input
# ---------------------------------------------------------------------------------------------------
def test_auto_on_cpu_is_the_torch_function(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    out = kernels.swiglu(torch.ones(2, 3, requires_grad=True), torch.ones(2, 3))
    assert "SwiGLUTorch" in out.grad_fn.name(), out.grad_fn.name()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    out, d_gate, d_up = run(
        backend, torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0, 9)
    )
    assert out.shape == d_gate.shape == d_up.shape == (0, 9)


def test_triton_launches_on_the_tensors_device(monkeypatch):
    dev = device_for("triton")
    with record_launches(MODULE, monkeypatch) as launches:
        run("triton", *inputs(5, 40, seed=24))
    assert [name for name, _, _ in launches] == [
        "_swiglu_fwd_kernel",
        "_swiglu_bwd_kernel",
    ]
    for name, current, devices in launches:
        assert (
            current is not None and devices == {current} and current.type == dev.type
        ), (name, current, devices)


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.swiglu) == {"auto", *IMPLEMENTED}


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(3, 4), torch.zeros(3, 5)), "shapes must match"),
        ((torch.zeros(3, dtype=torch.long), torch.zeros(3)), "float32"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.swiglu(*args)


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton(dtype):
    device_for("triton")
    gate, up, grad = inputs(4099, 1536, seed=25, dtype=dtype)
    check(*run("triton", gate, up, grad), gate, up, grad, "4099 x 1536")

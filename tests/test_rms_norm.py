"""kernels.rms_norm against the float64 reference on both backends (the "torch" autograd Function, the
CPU path, and Triton: compiled on a GPU machine, through the interpreter on CPU, with forced small
blocks so the multi-block paths run), and what one call keeps for the backward.

Letters: N rows, H hidden. Tolerances: fp32 values and gradients are a few fp32 roundings of O(1)
numbers, over sums of H squares (rstd) or H products (the mean term): 1e-5 absolute plus 16 fp32 ulps
relative; grad_weight sums N rows, so its absolute bound is 4 ulps of the sum of |g * x_hat| over
the rows. bf16/fp16 outputs round twice (x_hat to x's dtype, then the product, as HF does) and
gradients once, each rounding allowed a whole ulp of the dtype relative (2^-7 bf16, 2^-10 fp16):
Triton's interpreter truncates fp32 -> bf16 where a GPU rounds to nearest.
"""

import contextlib
import importlib

import pytest
import rlhf_kernels as kernels
import torch
from _rl_cases import documented_backends, randn, record_launches
from rlhf_kernels._triton import forced_blocks
from rlhf_kernels.rms_norm import IMPLEMENTED, rms_norm_ref
from util import EPS32, assert_close, device_for, on

MODULE = importlib.import_module("rlhf_kernels.rms_norm")
# "torch" is an autograd Function of its own, not the reference: both are checked
BACKENDS = list(IMPLEMENTED)
# one rounding to the dtype (see the module docstring)
RTOL = {torch.float32: 16 * EPS32, torch.bfloat16: 2**-7, torch.float16: 2**-10}
EPS = 1e-6


def run(backend, x, w, up, *, w_grad=True, eps=EPS):
    """On the backend's device: -> (y, grad of x, grad of weight) under the upstream gradient `up`."""
    dev = device_for(backend)
    # detach, not clone: a clone of a non-dense view (a chunk) is contiguous
    xx = on(dev, x).detach().requires_grad_()
    ww = on(dev, w).detach().requires_grad_(w_grad)
    y = kernels.rms_norm(xx, ww, eps, backend=backend)
    y.backward(on(dev, up))
    return y, xx.grad, ww.grad


def reference(x, w, up, eps=EPS):
    """Float64 oracle from the same (rounded) inputs: (y, grad x, grad weight, bound on the
    grad_weight sum's fp32 error)."""
    xx = x.detach().double().requires_grad_()
    ww = w.detach().double().requires_grad_()
    y = rms_norm_ref(xx, ww, eps)
    y.backward(up.double())
    x_hat = xx.detach() * torch.rsqrt(xx.detach().pow(2).mean(-1, keepdim=True) + eps)
    gw_scale = (up.double() * x_hat).abs().reshape(-1, x.shape[-1]).sum(0).max().item()
    return y, xx.grad, ww.grad, 4 * EPS32 * gw_scale


def check(backend, x, w, up, name, *, blocks=None):
    ctx = forced_blocks(row=blocks) if blocks else contextlib.nullcontext()
    with ctx:
        y, gx, gw = run(backend, x, w, up)
    ry, rgx, rgw, gw_atol = reference(x, w, up)
    dtype = torch.promote_types(x.dtype, w.dtype)
    assert y.dtype == dtype and y.shape == x.shape, (y.dtype, y.shape)
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    assert_close(y, ry, atol=1e-5, rtol=RTOL[x.dtype] + RTOL[dtype], name=f"{name} y")
    assert_close(gx, rgx, atol=1e-5, rtol=RTOL[x.dtype], name=f"{name} grad_x")
    assert_close(
        gw, rgw, atol=gw_atol + 1e-5, rtol=RTOL[w.dtype], name=f"{name} grad_weight"
    )


# ---------------------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------------------
SHAPES = [(1, 576), (7, 577), (2, 5, 1536), (13, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_against_float64_reference(backend, shape):
    H = shape[-1]
    x = randn(*shape, seed=1, scale=1.5, shift=0.3)
    w = randn(H, seed=2, scale=0.5, shift=1.0)
    check(backend, x, w, randn(*shape, seed=3), f"{shape}")


def test_torch_backend_1024_rows():
    # the SmolLM2 shape, on the CPU path (the interpreter would take seconds for the Triton one)
    x = randn(1024, 576, seed=4, scale=2.0)
    check(
        "torch", x, randn(576, seed=5, shift=1.0), randn(1024, 576, seed=6), "1024x576"
    )


@pytest.mark.parametrize("H,block", [(577, 128), (33, 16), (64, 16)])
def test_triton_multi_block_rows(H, block):
    # rows wider than the (forced) block: two passes over column blocks, and the grad_weight partial
    # accumulated in memory instead of registers
    x = randn(7, H, seed=7)
    check(
        "triton",
        x,
        randn(H, seed=8, shift=1.0),
        randn(7, H, seed=9),
        f"H={H} block={block}",
        blocks=block,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_dtype", ["same", torch.float32])
def test_low_precision(backend, dtype, w_dtype):
    w_dtype = dtype if w_dtype == "same" else w_dtype
    x = randn(7, 577, seed=10, scale=3.0).to(dtype)
    w = randn(577, seed=11, scale=0.3, shift=1.0).to(w_dtype)
    up = randn(7, 577, seed=12).to(torch.promote_types(dtype, w_dtype))
    check(backend, x, w, up, f"{dtype}/{w_dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    # x: columns of a transposed tensor (stride 7 along H) inside a time slice of a 3-d tensor;
    # weight every other entry; the upstream gradient transposed too
    base = randn(3, 577, 8, seed=13)
    x = base.transpose(1, 2)[:, :-1]  # [3, 7, 577]
    w = randn(1154, seed=14, shift=1.0)[::2]
    up = randn(577, 7, 3, seed=15).permute(2, 1, 0)
    assert not x.is_contiguous() and not w.is_contiguous() and not up.is_contiguous()
    dev = device_for(backend)
    xx, ww = on(dev, x).requires_grad_(), on(dev, w).requires_grad_()
    y = kernels.rms_norm(xx, ww, backend=backend)
    y.backward(on(dev, up))
    ry, rgx, rgw, gw_atol = reference(x, w, up)
    assert_close(y, ry, atol=1e-5, rtol=RTOL[torch.float32], name="y")
    assert_close(xx.grad, rgx, atol=1e-5, rtol=RTOL[torch.float32], name="grad_x")
    assert_close(
        ww.grad, rgw, atol=gw_atol + 1e-5, rtol=RTOL[torch.float32], name="grad_weight"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_rows(backend):
    # a zero row (rstd = 1/sqrt(eps), x_hat = 0: finite gradients), a row of one huge entry among
    # tiny ones, and fp16 values near its maximum, whose squares overflow fp16 but not the fp32 math
    x = randn(4, 67, seed=16) * 1e-3
    x[0] = 0.0
    x[1, 5] = 3.0e4
    x[2] = 6.0e4 * torch.sign(randn(67, seed=17))
    for dtype in (torch.float32, torch.float16):
        up = randn(4, 67, seed=18).to(dtype)
        check(
            backend,
            x.to(dtype),
            randn(67, seed=19, shift=1.0).to(dtype),
            up,
            f"extreme {dtype}",
        )


# ---------------------------------------------------------------------------------------------------
# Frozen weight, gradient order
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_frozen_x(backend):
    x, w, up = (
        randn(5, 40, seed=20),
        randn(40, seed=21, shift=1.0),
        randn(5, 40, seed=22),
    )
    _, rgx, rgw, gw_atol = reference(x, w, up)
    # the LoRA case: the base's norm weight is frozen
    _, gx, gw = run(backend, x, w, up, w_grad=False)
    assert gw is None
    assert_close(gx, rgx, atol=1e-5, rtol=RTOL[torch.float32], name="grad_x")
    dev = device_for(backend)
    ww = on(dev, w).requires_grad_()
    kernels.rms_norm(on(dev, x), ww, backend=backend).backward(on(dev, up))
    assert_close(
        ww.grad,
        rgw,
        atol=gw_atol + 1e-5,
        rtol=RTOL[torch.float32],
        name="grad_weight only",
    )


def test_torch_backend_second_order():
    # its backward recomputes rstd from x under create_graph, so second derivatives are exact
    x = randn(3, 7, seed=23).double().requires_grad_()
    w = randn(7, seed=24, shift=1.0).double().requires_grad_()

    def fn(a, b):
        return kernels.rms_norm(a, b, 1e-3, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_triton_double_backward_raises():
    dev = device_for("triton")
    x = on(dev, randn(3, 7, seed=25)).requires_grad_()
    y = kernels.rms_norm(x, on(dev, randn(7, seed=26)), backend="triton")
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(
        RuntimeError,
        match="rms_norm: double backward is not supported by backend 'triton'",
    ):
        gx.sum().backward()


# ---------------------------------------------------------------------------------------------------
# Memory: what one call keeps for the backward
# ---------------------------------------------------------------------------------------------------
def saved_storages(fn, *args):
    """Call fn(*args) under saved_tensors_hooks -> {storage address: bytes} of every tensor its
    autograd graph keeps."""
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}


def new_bytes(storages, *inputs):
    """Bytes of the kept storages that are not the inputs' own."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(n for ptr, n in storages.items() if ptr not in own)


# (x dtype, weight trainable, bytes the reference keeps beyond x and weight at N x H = 1024 x 576):
# bf16 x keeps its fp32 copy (N*H*4) and rsqrt's [N, 1]; a trainable weight adds mul's x_hat (N*H in
# x's dtype); fp32 x with a frozen weight keeps only rsqrt's [N, 1] (x.float() is x itself): no saving
MEMORY_CASES = [
    (torch.bfloat16, False, 1024 * 576 * 4 + 1024 * 4),
    (torch.bfloat16, True, 1024 * 576 * (4 + 2) + 1024 * 4),
    (torch.float32, True, 1024 * 576 * 4 + 1024 * 4),
    (torch.float32, False, 1024 * 4),
]


@pytest.mark.parametrize("dtype,w_grad,ref_bytes", MEMORY_CASES)
def test_keeps_only_x_rstd_and_weight(dtype, w_grad, ref_bytes):
    N, H = 1024, 576
    x = randn(N, H, seed=27).to(dtype).requires_grad_()
    w = randn(H, seed=28, shift=1.0).to(dtype).requires_grad_(w_grad)
    ours = saved_storages(lambda: kernels.rms_norm(x, w, backend="torch"))
    ref = saved_storages(lambda: rms_norm_ref(x, w, EPS))
    assert x.untyped_storage().data_ptr() in ours, "x itself must be saved, not a copy"
    assert new_bytes(ours, x, w) == N * 4, (
        f"beyond x and weight only rstd [N] fp32: {ours}"
    )
    assert len(ours) == 3, ours
    assert new_bytes(ref, x, w) == ref_bytes, (new_bytes(ref, x, w), ref_bytes)


def test_triton_keeps_only_x_rstd_and_weight():
    dev = device_for("triton")
    x = on(dev, randn(7, 577, seed=29)).to(torch.bfloat16).requires_grad_()
    w = on(dev, randn(577, seed=30, shift=1.0)).to(torch.bfloat16)
    ours = saved_storages(lambda: kernels.rms_norm(x, w, backend="triton"))
    assert (
        x.untyped_storage().data_ptr() in ours
        and new_bytes(ours, x, w) == 7 * 4
        and len(ours) == 3
    ), ours


# ---------------------------------------------------------------------------------------------------
# Dispatch, launch device, documentation, bad input
# ---------------------------------------------------------------------------------------------------
def test_auto_on_cpu_is_the_torch_function(monkeypatch):
    monkeypatch.delenv("RLHF_KERNELS_BACKEND", raising=False)
    y = kernels.rms_norm(torch.ones(2, 3, requires_grad=True), torch.ones(3))
    assert "RMSNormTorch" in y.grad_fn.name(), y.grad_fn.name()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    y, gx, gw = run(backend, torch.zeros(0, 9), torch.ones(9), torch.zeros(0, 9))
    assert y.shape == gx.shape == (0, 9) and gw.shape == (9,) and not gw.any()


def test_triton_launches_on_the_tensors_device(monkeypatch):
    dev = device_for("triton")
    with record_launches(MODULE, monkeypatch) as launches:
        run("triton", randn(5, 40, seed=31), randn(40, seed=32), randn(5, 40, seed=33))
    assert [name for name, _, _ in launches] == [
        "_rms_norm_fwd_kernel",
        "_rms_norm_bwd_kernel",
    ]
    for name, current, devices in launches:
        assert (
            current is not None and devices == {current} and current.type == dev.type
        ), (name, current, devices)


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.rms_norm) == {"auto", *IMPLEMENTED}


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(3, 4), torch.ones(5)), "weight must have shape"),
        ((torch.zeros(3, 4), torch.ones(4), 0.0), "eps"),
        ((torch.zeros(3, 4, dtype=torch.long), torch.ones(4)), "float32"),
        ((torch.zeros(()), torch.ones(1)), "at least 1 dims"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        kernels.rms_norm(*args)


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
# 8193: past the 4096-wide block, two passes
@pytest.mark.parametrize("H", [576, 4096, 8193])
def test_gpu_triton(H):
    device_for("triton")
    for dtype in (torch.float32, torch.bfloat16):
        x = randn(1031, H, seed=34).to(dtype)
        check(
            "triton",
            x,
            randn(H, seed=35, shift=1.0).to(dtype),
            randn(1031, H, seed=36).to(dtype),
            f"H={H}",
        )

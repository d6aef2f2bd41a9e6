"""kernels.full_kl against the float64 reference full_kl_ref on every kernel backend (Triton compiled on
CUDA where a GPU exists, else under the interpreter; C++), and the reference against hand-derived values."""

import contextlib
import math

import pytest
import torch
from util import EPS32, assert_close, device_for, kernel_backends, on

import rlhf_kernels as kernels
from rlhf_kernels._triton import forced_blocks
from rlhf_kernels.full_kl import IMPLEMENTED, full_kl_ref
from _vocab_cases import (
    DTYPES,
    MULTI_BLOCK,
    close,
    keep_strides,
    make_pair,
    multi_block_pair,
    nan_pair,
    second_backward_raises,
    upstream,
)

BACKENDS = kernel_backends(IMPLEMENTED)

# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")


def _check(backend, x, z, temperature, tols, seed=0):
    """Forward and backward on backend's device (inputs built on CPU) vs the float64 reference."""
    fwd_atol, fwd_rtol, g_atol, g_rtol = tols
    dev = device_for(backend)
    xk, zk = keep_strides(dev, x, z)
    xk = xk.detach().requires_grad_()
    assert xk.stride() == x.stride() and zk.stride() == z.stride()
    kl = kernels.full_kl(xk, zk, temperature=temperature, backend=backend)
    assert kl.dtype == torch.float32 and kl.shape == x.shape[:-1] and kl.device == dev
    xr = x.detach().double().requires_grad_()
    kr = full_kl_ref(xr, z.double(), temperature)
    close(kl, kr, fwd_atol, fwd_rtol, "kl")
    g = upstream(kr.shape, seed)
    kl.backward(on(dev, g.float()))
    kr.backward(g)
    assert xk.grad.dtype == x.dtype and xk.grad.shape == x.shape
    close(xk.grad, xr.grad, g_atol, g_rtol, "grad_logits")
    return kl


# --------------------------------------------------------------------------------------------------
# The reference, anchored by hand
# --------------------------------------------------------------------------------------------------
def test_reference_hand_derived_value_and_gradient():
    # logits [0, ln 3] -> p = [1/4, 3/4]; ref_logits [0, 0] -> q = [1/2, 1/2].
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    # d KL / d x_v = p_v (ln p_v - ln q_v - KL): [1/4 (ln(1/2) - KL), 3/4 (ln(3/2) - KL)] (sum 0).
    # T = 2 with doubled logits: same distributions, so the same KL and half the gradient. A -inf entry
    # in both (masked vocabulary) adds 0 and gets gradient 0; ref_logits get no gradient.
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    d = [0.25 * (math.log(0.5) - kl), 0.75 * (math.log(1.5) - kl)]
    for T in (1.0, 2.0):
        x = torch.tensor([[float("-inf"), 0.0, T * math.log(3)]], dtype=torch.float64, requires_grad=True)
        z = torch.tensor([[float("-inf"), 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
        out = full_kl_ref(x, z, T)
        assert_close(out, torch.tensor([kl], dtype=torch.float64), atol=1e-15, name="kl")
        out.sum().backward()
        assert_close(x.grad, torch.tensor([[0.0, d[0] / T, d[1] / T]], dtype=torch.float64), atol=1e-15, name="grad")
        assert z.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_hand_derived_value(backend):
    dev = device_for(backend)
    x = torch.tensor([[0.0, math.log(3)]], device=dev, requires_grad=True)
    kl = kernels.full_kl(x, torch.zeros(1, 2, device=dev), backend=backend)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert_close(kl, torch.tensor([want]), atol=1e-6, name="kl")
    kl.sum().backward()
    assert_close(x.grad, torch.tensor([[0.25 * (math.log(0.5) - want), 0.75 * (math.log(1.5) - want)]]), atol=1e-6,
                 name="grad")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Kernels against the float64 reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, fa, fr, ga, gr", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1), (5, 37), (2, 3, 257)], ids=str)
def test_matches_reference(backend, dtype, fa, fr, ga, gr, shape):
    x, z = make_pair(shape, dtype, seed=sum(shape))
    _check(backend, x, z, 1.0, (fa, fr, ga, gr))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_temperature_masked_noncontiguous_blocks(backend, temperature, layout):
    # 16-wide Triton blocks, a fully -inf first block in row 0, -inf scattered at the same positions.
    x, z = make_pair((2, 3, 53), torch.float32, seed=3, masked=True, layout=layout)
    with forced_blocks(row=16):
        kl = _check(backend, x, z, temperature, (2e-5, 2e-5, 1e-6, 1e-5))
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, block", MULTI_BLOCK)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_multi_block_rows(backend, V, block, temperature):
    # Every multi-block path, forward and backward (see _vocab_cases.multi_block_pair): fully -inf first
    # blocks/chunk in both rows, both maxima in the last block, the max in the first block, holes.
    # Rows 1 and 2 have KL ~ 11-24: grad = p (log p - log q - KL) / T cancels terms of that size where
    # p ~ 1, so fp32 leaves a few ulps of KL / T there (3e-5 measured at KL = 24, T = 0.6).
    x, z = multi_block_pair(V, block, seed=V)
    x, z = x.float(), z.float()
    g_atol = 16 * EPS32 * full_kl_ref(x.double(), z.double(), temperature).max().item() / temperature
    with forced_blocks(row=block):
        _check(backend, x, z, temperature, (2e-5, 2e-5, g_atol, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    # Entries at +-1e4 (the row max at 1e4 in half the rows, a -1e4 entry in the others): the maxima are
    # subtracted before scaling, so exact up to fp32 of the O(10) gaps; the ref row's 1e4 sits at a
    # different position than the policy's in the -1e4 rows, so KL there is large (~1e4 / T scaled).
    x, z = make_pair((6, 41), torch.float32, seed=5, extreme=True)
    kl_scale = full_kl_ref(x.double(), z.double()).abs().max().item()
    with forced_blocks(row=16):
        _check(backend, x, z, 1.0, (16 * EPS32 * kl_scale + 2e-5, 2e-5, 1e-5, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_common_offset_keeps_fp32_precision(backend, temperature):
    # logits and ref_logits = randn * 3 + 1e4: (x - max) / T keeps the O(10) gaps exact where x / T would
    # carry the ulp of 1e4 (~1e-3) into log p and p; the tolerance is set by KL and the logp sizes (~16),
    # not by 1e4.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 300, generator=g) * 3 + 1e4
    z = torch.randn(6, 300, generator=g) * 3 + 1e4
    tol = 16 * EPS32 * 16 / temperature
    _check(backend, x, z, temperature, (tol, 16 * EPS32, tol, 16 * EPS32), seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_boundaries_cpp_and_wide_rows(backend):
    # V = 5003 (prime) spans two C++ 4096-chunks; the row max sits in the second chunk.
    x, z = make_pair((3, 5003), torch.float32, seed=9)
    x[:, 4500] += 20.0
    # There p ~ 1 and log p - log q ~ KL ~ 20, so grad = p (log p - log q - KL) cancels terms of ~20:
    # fp32 leaves a few ulp(20) = 2e-6 each, hence the 3e-5 absolute tolerance on the gradient.
    _check(backend, x, z, 1.0, (2e-5, 2e-5, 3e-5, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_kl_is_exactly_zero_and_kl_nonnegative(backend, dtype):
    dev = device_for(backend)
    x, z = make_pair((9, 61), dtype, seed=11, masked=True)
    x, z = on(dev, x, z)
    xk = x.clone().requires_grad_()
    with forced_blocks(row=16):
        kl = kernels.full_kl(xk, x, temperature=1.3, backend=backend)
        assert torch.equal(kl, torch.zeros_like(kl)), kl
        kl.sum().backward()
        assert xk.grad.abs().max() < 1e-6
        # KL >= 0 also where p and q nearly agree (rounding could push a naive formula below 0; the
        # unclamped float32 reference does go below 0 here: -1.6e-7).
        noise = on(dev, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
        near = (x.float() + 1e-4 * noise).to(dtype)
        for other in (z, near):
            kl = kernels.full_kl(x, other, backend=backend)
            assert (kl >= 0).all(), kl.min()


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_mass_where_reference_has_none_is_inf(backend):
    # q_v = 0 < p_v makes KL(p || q) infinite, as in the reference; a masked entry shared by both is 0.
    dev = device_for(backend)
    x, z = make_pair((3, 29), torch.float32, seed=6)
    z[:, 5] = float("-inf")
    z[0, 9] = x[0, 9] = float("-inf")
    kl = kernels.full_kl(on(dev, x), on(dev, z), backend=backend)
    assert torch.equal(kl.cpu(), full_kl_ref(x.double(), z.double()).float()) and torch.isinf(kl).all()
    x[:, 5] = float("-inf")
    close(kernels.full_kl(on(dev, x), on(dev, z), backend=backend), full_kl_ref(x.double(), z.double()), 2e-5, 2e-5,
          "kl")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_masked_first_block_is_inf_not_nan(backend):
    # ref_logits -inf over a whole first block (16-wide Triton blocks; all but the last entry of a
    # C++ chunk) where logits are finite: the running reference max is still -inf there.
    dev = device_for(backend)
    x, z = make_pair((2, 40), torch.float32, seed=8)
    z[0, :20] = float("-inf")
    z[1, :-1] = float("-inf")
    with forced_blocks(row=16):
        kl = kernels.full_kl(on(dev, x), on(dev, z), backend=backend)
    assert torch.isinf(kl).all() and (kl > 0).all(), kl
    x, z = make_pair((1, 4100), torch.float32, seed=9)  # a whole 4096-entry C++ chunk of -inf
    z[0, :4096] = float("-inf")
    with forced_blocks(row=1024):
        kl = kernels.full_kl(on(dev, x), on(dev, z), backend=backend)
    assert torch.isinf(kl).all() and (kl > 0).all(), kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, block", [(40, None), (40, 16), (4100, 1024)])
def test_nan_propagates_like_the_reference(backend, V, block):
    # A NaN logit (rows 0-2: last block, first entry, after a -inf head longer than a block / C++ chunk)
    # or a NaN reference logit (row 3) makes that row's kl and gradient NaN, as in the reference; the
    # clean row 4, with -inf-masked entries, is unaffected.
    x, z = nan_pair(V, seed=V)
    dev = device_for(backend)
    with forced_blocks(row=block) if block else contextlib.nullcontext():
        xk = on(dev, x).detach().requires_grad_()
        kl = kernels.full_kl(xk, on(dev, z), backend=backend)
        kl.sum().backward()
    xr = x.detach().double().requires_grad_()
    kr = full_kl_ref(xr, z.double())
    kr.sum().backward()
    assert torch.isnan(kr[:4]).all() and torch.isfinite(kr[4])  # the reference's behaviour
    assert_close(kl, kr, atol=2e-5, rtol=2e-5, name="kl", equal_nan=True)
    # Row 3 (NaN in ref_logits only) keeps p finite: its masked vocabulary (p_v = 0) gets gradient 0,
    # p_v c_v = 0 whatever c_v (the reference's log_softmax backward spreads the row's NaN sum there).
    want = xr.grad.clone()
    want[3][torch.isinf(x[3])] = 0.0
    assert_close(xk.grad, want, atol=1e-6, rtol=1e-5, name="grad", equal_nan=True)
    assert torch.isnan(xk.grad[:3]).all() and torch.isnan(xk.grad[3][torch.isfinite(x[3])]).all()
    assert torch.isfinite(xk.grad[4]).all()


# --------------------------------------------------------------------------------------------------
# Autograd contract: first order only on the kernel backends, gradients to logits only
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_first_order_still_right(backend):
    dev = device_for(backend)
    x, z = make_pair((4, 19), torch.float32, seed=2)
    xk = on(dev, x).detach().requires_grad_()
    (grad,) = second_backward_raises(kernels.full_kl(xk, on(dev, z), backend=backend).sum(), [xk], "full_kl", backend)
    xr = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(full_kl_ref(xr, z.double()).sum(), xr)
    assert_close(grad, want, atol=1e-6, name="first-order grad under create_graph=True")


def test_torch_backend_supports_double_backward():
    x, z = make_pair((3, 7), torch.float64, seed=3)
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: kernels.full_kl(t, z, temperature=0.8, backend="torch").sum(), (x,))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_gradient_only_to_logits(backend):
    # The gradient rule (kernels/_autograd.py): ref_logits is a constant even when it requires grad.
    dev = device_for(backend)
    x, z = make_pair((4, 19), torch.float32, seed=2)
    xk, zk = on(dev, x).detach().requires_grad_(), on(dev, z).detach().requires_grad_()
    kernels.full_kl(xk, zk, backend=backend).sum().backward()
    assert zk.grad is None and xk.grad is not None and xk.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Input validation and dispatch
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    dev = device_for(backend)
    empty = kernels.full_kl(torch.zeros(0, 19, device=dev), torch.zeros(0, 19, device=dev), backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_vocabulary_is_a_value_error(backend):
    dev = device_for(backend)
    x = torch.zeros(3, 0, device=dev)
    with pytest.raises(ValueError, match=r"vocabulary is empty \(V = 0\)"):
        kernels.full_kl(x, x, backend=backend)
    with pytest.raises(ValueError, match=r"V = 0"):
        full_kl_ref(x, x)


def test_float64_runs_the_reference():
    x, z = make_pair((3, 29), torch.float64, seed=4)
    assert kernels.full_kl(x, z, backend="cpp").dtype == torch.float64


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, z: (x, z[:, :-1]), "shape"),
        (lambda x, z: (x, z.half()), "dtype"),
        (lambda x, z: (x.long(), z.long()), "float"),
        (lambda x, z: (x[0, 0], z[0, 0]), "at least 1 dims"),
        (lambda x, z: (x, z.numpy()), "torch.Tensor"),
    ],
)
def test_bad_inputs(make, match):
    x, z = make_pair((3, 11), torch.float32)
    a, b = make(x, z)
    with pytest.raises(ValueError, match=match):
        kernels.full_kl(a, b)


def test_bad_temperature_and_backend():
    x, z = make_pair((3, 11), torch.float32)
    for t in (0.0, -1.0, 5e-4, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0.001"):
            kernels.full_kl(x, z, temperature=t)
    with pytest.raises(ValueError, match="backend"):
        kernels.full_kl(x, z, backend="nope")
    with pytest.raises(ValueError, match="cuda"):
        kernels.full_kl(x, z, backend="cuda")
    assert "cuda" not in kernels.full_kl.__doc__


# --------------------------------------------------------------------------------------------------
# GPU (run where a CUDA device exists)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("V", [128256, 151936])
def test_gpu_full_vocab(V):
    x, z = make_pair((64, V), torch.bfloat16, seed=V)
    _check("triton", x, z, 1.0, (2e-5, 2e-5, 1e-5, 8e-3))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_non_default_device():
    # cuda:1 tensors while cuda:0 is current: the launches must run on cuda:1.
    x, z = make_pair((2, 5, 3001), torch.bfloat16, seed=13, masked=True, layout="sliced")
    xk = x.to("cuda:1").requires_grad_()
    kl = kernels.full_kl(xk, z.to("cuda:1"), temperature=0.9, backend="triton")
    g = upstream(kl.shape, 1)
    kl.backward(g.float().to("cuda:1"))
    xr = x.detach().double().requires_grad_()
    kr = full_kl_ref(xr, z.double(), 0.9)
    kr.backward(g)
    assert kl.device == xk.grad.device == torch.device("cuda:1")
    close(kl, kr, 2e-5, 2e-5, "kl on cuda:1")
    close(xk.grad, xr.grad, 1e-5, 8e-3, "grad on cuda:1")


@pytest.mark.cuda
def test_gpu_past_int32_offsets_forward_and_backward():
    # N * V > 2^31 elements: 16800 x 128256 bf16 (4.3 GB per tensor; x, z and the gradient: 13 GB);
    # checks the last rows, whose element offsets exceed 2^31, forward and backward.
    N, V = 16800, 128256
    assert N * V > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    z = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    kl = kernels.full_kl(x, z, backend="triton")
    gr = torch.randn(N, device="cuda", generator=g)
    kl.backward(gr)
    xr = x[-4:].detach().double().requires_grad_()
    kr = full_kl_ref(xr, z[-4:].double())
    kr.backward(gr[-4:].double())
    close(kl[-4:], kr, 2e-5, 2e-5, "kl tail rows")
    close(x.grad[-4:], xr.grad, 1e-5, 8e-3, "grad tail rows")
    del x, z, kl

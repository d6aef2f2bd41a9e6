"""kernels.full_kl against the float64 reference full_kl_ref (Triton under the interpreter, C++)."""

import pytest
import torch

import rlhf_kernels as kernels
from rlhf_kernels.full_kl import full_kl_ref
from _vocab_cases import BACKENDS, DTYPES, close, make_pair, small_blocks, upstream  # noqa: F401


# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")


def _check(backend, x, z, temperature, tols, seed=0):
    fwd_atol, fwd_rtol, g_atol, g_rtol = tols
    xk = x.detach().clone().requires_grad_()
    kl = kernels.full_kl(xk, z, temperature=temperature, backend=backend)
    assert kl.dtype == torch.float32 and kl.shape == x.shape[:-1]
    xr = x.detach().double().requires_grad_()
    kr = full_kl_ref(xr, z.double(), temperature)
    close(kl, kr, fwd_atol, fwd_rtol, "kl")
    g = upstream(kr.shape, seed)
    kl.backward(g.float())
    kr.backward(g)
    assert xk.grad.dtype == x.dtype and xk.grad.shape == x.shape
    close(xk.grad, xr.grad, g_atol, g_rtol, "grad_logits")
    return kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, fa, fr, ga, gr", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1), (5, 37), (2, 3, 257)], ids=str)
def test_matches_reference(backend, dtype, fa, fr, ga, gr, shape):
    x, z = make_pair(shape, dtype, seed=sum(shape))
    _check(backend, x, z, 1.0, (fa, fr, ga, gr))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_temperature_masked_noncontiguous_blocks(backend, temperature, layout, small_blocks):  # noqa: F811
    # 16-wide Triton blocks, a fully -inf first block in row 0, -inf scattered at the same positions.
    x, z = make_pair((2, 3, 53), torch.float32, seed=3, masked=True, layout=layout)
    kl = _check(backend, x, z, temperature, (2e-5, 2e-5, 1e-6, 1e-5))
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, small_blocks):  # noqa: F811
    # Entries at +-1e4: x / T is scaled by log2(e) in fp32, whose ulp at 1.4e4 is 9.8e-4, so the
    # softmax of a row whose max is 1e4 carries ~1e-3 relative error in p. Without the max-relative
    # sums (see kernels/_vocab.py) the KL would cancel to garbage, not to 1e-3.
    x, z = make_pair((6, 41), torch.float32, seed=5, extreme=True)
    _check(backend, x, z, 1.0, (2e-3, 2e-3, 2e-3, 2e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_boundaries_cpp_and_wide_rows(backend):
    # V = 5003 (prime) spans two C++ 4096-chunks; the row max sits in the second chunk.
    x, z = make_pair((3, 5003), torch.float32, seed=9)
    x[:, 4500] += 20.0
    # There p ~ 1 and log p - log q ~ KL ~ 20, so grad = p (log p - log q - KL) cancels terms of ~20:
    # fp32 leaves a few ulp(20) = 2e-6 each, hence the 3e-5 absolute tolerance on the gradient.
    _check(backend, x, z, 1.0, (2e-5, 2e-5, 3e-5, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_kl_is_exactly_zero_and_kl_nonnegative(backend, dtype, small_blocks):  # noqa: F811
    x, z = make_pair((9, 61), dtype, seed=11, masked=True)
    xk = x.clone().requires_grad_()
    kl = kernels.full_kl(xk, x, temperature=1.3, backend=backend)
    if backend != "torch":
        assert torch.equal(kl, torch.zeros_like(kl)), kl
    else:
        assert kl.abs().max() < 1e-6
    kl.sum().backward()
    assert xk.grad.abs().max() < 1e-6
    # KL >= 0 also where p and q nearly agree (rounding could push a naive formula below 0).
    near = (x.float() + 1e-4 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    # (The unclamped float32 reference does go below 0 here: -1.6e-7.)
    for other in (z, near) if backend != "torch" else ():
        kl = kernels.full_kl(x, other, backend=backend)
        assert (kl >= 0).all(), kl.min()


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_mass_where_reference_has_none_is_inf(backend):
    # q_v = 0 < p_v makes KL(p || q) infinite, as in the reference; a masked entry shared by both is 0.
    x, z = make_pair((3, 29), torch.float32, seed=6)
    z[:, 5] = float("-inf")
    z[0, 9] = x[0, 9] = float("-inf")
    kl = kernels.full_kl(x, z, backend=backend)
    assert torch.equal(kl, full_kl_ref(x.double(), z.double()).float()) and torch.isinf(kl).all()
    x[:, 5] = float("-inf")
    close(kernels.full_kl(x, z, backend=backend), full_kl_ref(x.double(), z.double()), 2e-5, 2e-5, "kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_masked_first_block_is_inf_not_nan(backend, small_blocks):  # noqa: F811
    # ref_logits -inf over a whole first block (16-wide Triton blocks; all but the last entry of a
    # C++ chunk) where logits are finite: the running reference max is still -inf there.
    x, z = make_pair((2, 40), torch.float32, seed=8)
    z[0, :20] = float("-inf")
    z[1, :-1] = float("-inf")
    kl = kernels.full_kl(x, z, backend=backend)
    assert torch.isinf(kl).all() and (kl > 0).all(), kl
    x, z = make_pair((1, 4100), torch.float32, seed=9)  # a whole 4096-entry C++ chunk of -inf
    z[0, :4096] = float("-inf")
    kl = kernels.full_kl(x, z, backend=backend)
    assert torch.isinf(kl).all() and (kl > 0).all(), kl


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_to_ref_and_empty(backend):
    x, z = make_pair((4, 19), torch.float32, seed=2)
    zk = z.clone().requires_grad_()
    xk = x.clone().requires_grad_()
    kernels.full_kl(xk, zk, backend=backend).sum().backward()
    assert zk.grad is None and xk.grad is not None
    empty = kernels.full_kl(torch.zeros(0, 19), torch.zeros(0, 19), backend=backend)
    assert empty.shape == (0,)


def test_auto_dispatch_and_torch_backend():
    x, z = make_pair((3, 29), torch.float32, seed=4)
    a = kernels.full_kl(x, z)
    t = kernels.full_kl(x, z, backend="torch")
    close(a, t, 2e-5, 2e-5, "auto vs torch")
    # float64 runs the reference on every backend
    assert kernels.full_kl(x.double(), z.double(), backend="cpp").dtype == torch.float64


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
    for t in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            kernels.full_kl(x, z, temperature=t)
    with pytest.raises(ValueError, match="backend"):
        kernels.full_kl(x, z, backend="nope")
    with pytest.raises(ValueError, match="cuda"):
        kernels.full_kl(x, z, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("V", [128256, 151936])
def test_gpu_full_vocab(V):
    x, z = make_pair((64, V), torch.bfloat16, seed=V)
    _check("triton", x.cuda(), z.cuda(), 1.0, (2e-5, 2e-5, 1e-5, 8e-3))


@pytest.mark.cuda
def test_gpu_past_int32_offsets():
    # N * V > 2^31 elements: 16800 x 128256 bf16 (4.3 GB per tensor); checks a few rows at the end.
    N, V = 16800, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    z = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    kl = kernels.full_kl(x, z, backend="triton")
    close(kl[-4:], full_kl_ref(x[-4:].double(), z[-4:].double()), 2e-5, 2e-5, "kl tail rows")

"""kernels.nf4_linear against bitsandbytes (the dequantized weight, bit for bit) and the float64 reference
(the exact fp32 weights, float64 x and matmul), on the C++ backend's three forward paths (M <= 16: fused,
weight tiles of 6 rows dequantized in L1 and split over threads; M <= 256: weight tiles dequantized into
per-thread L2 buffers, one at::mm each; larger M: the same on chunks of rows; the backward: the whole weight, one at::mm).

Letters: M rows of x, K in-features, N out-features. Sizes are odd and prime where bitsandbytes allows:
it quantizes any [N, K] as one flat sequence (blocks span rows when K % blocksize != 0, rows start on a
low nibble when K is odd); blocksize is one of 32 ... 4096.

Tolerances: an fp32 dot product of K terms, in any summation order and with FMAs, is within
K * eps32 * sum_k |x_k w_k| of the exact one (Higham's gamma_K, doubled for slack); the check divides by
sum_k |x_k w_k| (`abs_dot`) and compares with that atol. It is loose for typical inputs but a real bug
(a wrong nibble, block scale or row) moves a result by a sizeable fraction of abs_dot, and any
reduced-precision arithmetic by >= 2^-8 of it. A second check bounds the typical error: norm-wise 1e-6.
"""

import logging

import pytest
import torch
from _rl_cases import documented_backends, intra_op_threads, randn
from util import EPS32, assert_close, assert_rel_norm, device_for, kernel_backends

import rlhf_kernels as kernels
from rlhf_kernels._dispatch import ext_op
from rlhf_kernels.nf4_linear import IMPLEMENTED, nf4_dequantize_ref, nf4_linear_ref

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # the hub-gemm warning (engine/stack.py)
bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402  (bnb's portable kernel)

KERNELS = kernel_backends(IMPLEMENTED)


def quantize(N, K, *, double_quant=True, blocksize=64, seed=0, scale=0.05, storage=torch.uint8):
    """A bitsandbytes NF4 Params4bit of an [N, K] weight (quantized on CPU as Linear4bit does) and the
    original weight."""
    W = randn(N, K, seed=seed, scale=scale)
    w = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant,
                          blocksize=blocksize, quant_storage=storage)._quantize("cpu")  # fmt: skip
    return w, W


def abs_dot(a, b):
    """sum_k |a_ik| |b_jk| in float64: the scale of the fp32 rounding error of a @ b.T."""
    return a.detach().double().abs() @ b.detach().double().abs().T


def assert_dot_close(actual, expected, scale, terms, name, extra_rel=0.0):
    """|actual - expected| <= terms * eps32 * scale elementwise (scale = abs_dot), plus `extra_rel` * |expected|
    for an output rounding, and a norm-wise 1e-6 (plus extra_rel) for the typical error."""
    s = scale.clamp(min=1e-30)
    bound = terms * EPS32
    err = (actual.detach().double() - expected.detach().double()).abs() - extra_rel * expected.detach().double().abs()
    assert_close(err.clamp(min=0) / s, torch.zeros_like(s), atol=bound, name=f"{name} (error / abs_dot)")
    assert_rel_norm(actual, expected, bound=1e-6 + extra_rel, name=name)


def run(backend, x, w, bias, upstream):
    """-> (y, grad of x, grad of bias) on the backend, under the upstream gradient."""
    device_for(backend)
    xr = x.detach().clone().requires_grad_()
    br = None if bias is None else bias.detach().clone().requires_grad_()
    y = kernels.nf4_linear(xr, w, br, backend=backend)
    y.backward(upstream)
    return y, xr.grad, None if br is None else br.grad


def reference(x, w, bias, upstream):
    xr = x.detach().double().requires_grad_()
    br = None if bias is None else bias.detach().double().requires_grad_()
    y = nf4_linear_ref(xr, w, br)
    y.backward(upstream.double())
    return y, xr.grad, None if br is None else br.grad


def check_against_reference(backend, x, w, bias, upstream, name=""):
    y, gx, gb = run(backend, x, w, bias, upstream)
    ry, rgx, rgb = reference(x, w, bias, upstream)
    W = nf4_dequantize_ref(w)
    N, K = W.shape
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    x2, up2 = x.reshape(-1, K), upstream.reshape(-1, N)
    bias_terms = 0 if bias is None else 1
    assert_dot_close(y.reshape(-1, N), ry.reshape(-1, N), abs_dot(x2, W) + (0 if bias is None else bias.abs()),
                     K + bias_terms, f"{name} y")  # fmt: skip
    assert_dot_close(gx.reshape(-1, K), rgx.reshape(-1, K), abs_dot(up2, W.T), N, f"{name} grad x")
    if bias is not None:
        assert_dot_close(gb, rgb, up2.abs().double().sum(0), up2.shape[0], f"{name} grad bias")


# ---------------------------------------------------------------------------------------------------
# The dequantized weight
# ---------------------------------------------------------------------------------------------------
SHAPES = [(1, 64), (7, 64), (13, 192), (61, 576), (192, 576), (5, 100), (3, 37), (17, 131), (1, 1), (5, 2)]


def cpp_dequantize(w):
    from rlhf_kernels.nf4_linear import _weight

    device_for("cpp")
    meta = _weight(w)
    return ext_op("nf4_dequant")(*meta.qargs, meta.K)


def bnb_row_aligned_bug(K, blocksize):
    # bitsandbytes 0.50.2's AVX-512 CPU dequantize_4bit (taken when K % 16 == 0) indexes block scales as if
    # every row started a block (scale = absmax[row * (K // blocksize) + k // blocksize]); quantize_4bit
    # does not, so for K % blocksize != 0 its weights are wrong (e.g. K = 688, small-llama's down_proj:
    # 2% error in Linear4bit's output). Its portable kernel (odd K, non-CPU backends) is right.
    return K % blocksize != 0 and K % 16 == 0


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("N,K", SHAPES)
def test_dequantize_matches_bitsandbytes_bit_for_bit(N, K, blocksize, double_quant):
    w, _ = quantize(N, K, double_quant=double_quant, blocksize=blocksize, seed=N * K)
    st = w.quant_state
    ref = nf4_dequantize_ref(w)
    assert ref.dtype == torch.float32 and ref.shape == (N, K)
    # the block scales, double quant undone by bitsandbytes itself
    scales = BF.dequantize_blockwise(st.absmax, st.state2) + st.offset if double_quant else st.absmax
    portable = _dequantize_4bit_compute(w.data.reshape(-1), scales, st.code, blocksize, st.shape, torch.float32)
    assert torch.equal(ref, portable), "reference != bitsandbytes' portable dequantize_4bit"
    if not bnb_row_aligned_bug(K, blocksize):
        assert torch.equal(ref, BF.dequantize_4bit(w.data, st)), "reference != bitsandbytes.functional.dequantize_4bit"
    assert torch.equal(cpp_dequantize(w), ref), "C++ nf4_dequant != reference"


@pytest.mark.parametrize("N,K,blocksize", [(7, 64, 256), (8, 576, 256), (5, 688, 64), (17, 131, 64)])
def test_dequantize_is_the_nearest_level(N, K, blocksize):
    # independent of bitsandbytes' dequantize: each weight is the NF4 level nearest to W / absmax, times
    # absmax, so within half the widest gap between levels (plain absmax scales: exact fp32 block maxima).
    # Includes shapes where bitsandbytes' own CPU dequantize_4bit fails this (bnb_row_aligned_bug).
    w, W = quantize(N, K, double_quant=False, blocksize=blocksize, seed=3)
    code = w.quant_state.code
    max_half_gap = 0.5 * (code[1:] - code[:-1]).max()  # 0.152, between -1 and -0.696
    scale = w.quant_state.absmax.repeat_interleave(blocksize)[: N * K].view(N, K)
    bound = max_half_gap * scale * (1 + 4 * EPS32)
    for name, dq in (("reference", nf4_dequantize_ref(w)), ("cpp", cpp_dequantize(w))):
        err = (dq - W).abs()
        bad = err > bound
        first = bad.nonzero()[:3].tolist()
        assert not bad.any(), f"{name}: {int(bad.sum())} weights off their nearest level, first {first}"


def test_quant_storage_other_than_uint8():
    # FSDP stores the packed bytes as bf16/fp32 elements: the same bytes, viewed as uint8
    x, up = randn(3, 64, seed=1), randn(3, 13, seed=2)
    w8, _ = quantize(13, 64, seed=5)
    for storage in (torch.bfloat16, torch.float32):
        w, _ = quantize(13, 64, seed=5, storage=storage)
        assert w.data.dtype == storage
        assert torch.equal(nf4_dequantize_ref(w), nf4_dequantize_ref(w8))
        for backend in KERNELS:
            check_against_reference(backend, x, w, None, up, name=f"storage {storage}")


# ---------------------------------------------------------------------------------------------------
# Forward and gradients against the float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "M,N,K,blocksize",
    [
        (1, 61, 576, 64),  # fused, one row: 10 tiles of 6 rows + a tile of 1
        (7, 13, 131, 64),  # fused; odd K: rows start on low nibbles, blocks span rows; K % 16 tail
        (16, 29, 100, 256),  # the last fused M: 4 blocks of 4 rows; K < blocksize
        (17, 30, 37, 32),  # the first tiled M
        (32, 192, 576, 64),  # tiled, the decode shape (8 prompts x 4 samples) of k/v proj
        (256, 67, 96, 64),  # the last tiled M; K % blocksize != 0 (blocks span rows)
        (257, 23, 64, 64),  # two row chunks (256 + 1)
        (600, 40, 688, 64),  # three row chunks; K % blocksize != 0 (blocks span rows)
    ],
)
def test_against_float64_reference(backend, M, N, K, blocksize, bias, double_quant):
    w, _ = quantize(N, K, double_quant=double_quant, blocksize=blocksize, seed=M + N)
    x = randn(M, K, seed=M)
    b = randn(N, seed=7, scale=0.1) if bias else None
    check_against_reference(backend, x, w, b, randn(M, N, seed=8), name=f"M={M}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("M", [5, 50, 300])
def test_3d_and_non_contiguous_x(backend, M):
    w, _ = quantize(23, 80, seed=11)
    base = randn(80, M, 2, seed=12)
    x = base.permute(2, 1, 0)  # [2, M, 80], K stride 2M: no row is contiguous
    assert not x.is_contiguous()
    check_against_reference(backend, x, w, randn(23, seed=13), randn(2, M, 23, seed=14), name="3-D strided")
    check_against_reference(backend, randn(80, seed=15), w, None, randn(23, seed=16), name="1-D")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("M", [9, 40])
def test_tiles_split_unequally_over_threads(backend, M):
    # 61 weight rows over 3 threads: fused (M = 9), 10 tiles of 6 rows + one of 1; tiled (M = 40), tiles of
    # 21, 21 and 19 rows. Every output column must land in its place.
    w, _ = quantize(61, 192, seed=17)
    x = randn(M, 192, seed=18)
    with intra_op_threads(3):
        check_against_reference(backend, x, w, randn(61, seed=19), randn(M, 61, seed=20), name="3 threads")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)])
def test_half_precision_x(backend, dtype, rel):
    # x and bias in bf16/fp16: computed in fp32, the output and grad_x rounded once to the dtype (rel)
    w, _ = quantize(19, 64, seed=21)
    x, b, up = randn(6, 64, seed=22).to(dtype), randn(19, seed=23).to(dtype), randn(6, 19, seed=24).to(dtype)
    y, gx, gb = run(backend, x, w, b, up)
    ry, rgx, rgb = reference(x, w, b, up)
    W = nf4_dequantize_ref(w)
    assert y.dtype == gx.dtype == gb.dtype == dtype
    assert_dot_close(y, ry, abs_dot(x, W) + b.double().abs(), 65, "y", extra_rel=rel)
    assert_dot_close(gx, rgx, abs_dot(up, W.T), 19, "grad x", extra_rel=rel)
    assert_dot_close(gb, rgb, up.double().abs().sum(0), 6, "grad bias", extra_rel=rel)


@pytest.mark.parametrize("backend", KERNELS)
def test_no_grad_and_grad_paths_agree(backend):
    # generation runs the kernel outside autograd; training through _NF4Linear: the same numbers
    device_for(backend)
    w, _ = quantize(40, 64, seed=25)
    x = randn(8, 64, seed=26)
    with torch.no_grad():
        y0 = kernels.nf4_linear(x, w, backend=backend)
    y1 = kernels.nf4_linear(x.clone().requires_grad_(), w, backend=backend)
    assert y1.requires_grad and not y0.requires_grad
    assert torch.equal(y0, y1.detach())


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("M", [3, 40, 300])
def test_inference_mode(backend, M):
    # transformers' generate() runs under torch.inference_mode: every path (the tiled one writes y from
    # worker threads) must accept inference tensors and give the same numbers
    device_for(backend)
    w, _ = quantize(40, 64, seed=44)
    x = randn(M, 64, seed=45)
    with intra_op_threads(2), torch.inference_mode():
        y = kernels.nf4_linear(x, w, backend=backend)
    with torch.no_grad():
        assert torch.equal(y, kernels.nf4_linear(x, w, backend=backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_only_x_and_bias_get_gradients(backend):
    device_for(backend)
    w, _ = quantize(12, 64, seed=27)
    x = randn(3, 64, seed=28).requires_grad_()
    bias = randn(12, seed=29)  # does not require grad: only x's gradient
    kernels.nf4_linear(x, w, bias, backend=backend).sum().backward()
    assert x.grad is not None and w.grad is None and bias.grad is None
    assert not w.requires_grad


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_raises(backend):
    device_for(backend)
    w, _ = quantize(12, 64, seed=30)
    x = randn(3, 64, seed=31).requires_grad_()
    (g,) = torch.autograd.grad(kernels.nf4_linear(x, w, backend=backend).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"nf4_linear: double backward is not supported by backend '{backend}'"):
        g.sum().backward()


def test_torch_backend_is_the_reference():
    w, _ = quantize(12, 64, seed=32)
    x, b = randn(4, 64, seed=33), randn(12, seed=34)
    assert torch.equal(kernels.nf4_linear(x, w, b, backend="torch"), nf4_linear_ref(x, w, b))


@pytest.mark.parametrize("backend", KERNELS)
def test_empty_x(backend):
    device_for(backend)
    w, _ = quantize(12, 64, seed=35)
    assert kernels.nf4_linear(torch.zeros(0, 64), w, backend=backend).shape == (0, 12)
    assert kernels.nf4_linear(torch.zeros(2, 0, 64), w, backend=backend).shape == (2, 0, 12)


@pytest.mark.parametrize("backend", KERNELS)
def test_weight_changes_are_seen(backend):
    # the op caches the validated weight per quant_state: replacing its absmax must not serve stale scales
    device_for(backend)
    w, _ = quantize(12, 64, double_quant=False, seed=36)
    x = randn(4, 64, seed=37)
    y1 = kernels.nf4_linear(x, w, backend=backend)
    w.quant_state.absmax = w.quant_state.absmax * 2  # exact: a power of two
    assert torch.equal(kernels.nf4_linear(x, w, backend=backend), 2 * y1)


@pytest.mark.parametrize("backend", KERNELS)
def test_matches_bitsandbytes_linear4bit(backend):
    # the module the engine loads (fp32 compute, double quant, repack off), at a SmolLM2 shape (k/v proj)
    device_for(backend)
    lin = torch.nn.Linear(576, 192)
    q = bnb.nn.Linear4bit(576, 192, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    q.support_avx512bf16_for_cpu = False
    x = randn(2, 5, 576, seed=38)
    up = randn(2, 5, 192, seed=39)
    xb, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yb = q(xb)
    yb.backward(up)
    yo = kernels.nf4_linear(xo, q.weight, q.bias, backend=backend)
    yo.backward(up)
    assert_rel_norm(yo, yb, bound=1e-6, name="y vs Linear4bit")
    assert_rel_norm(xo.grad, xb.grad, bound=1e-6, name="grad x vs Linear4bit")


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.nf4_linear) == {"auto", *IMPLEMENTED}


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def _fp4_weight():
    return bnb.nn.Params4bit(randn(4, 64, seed=40), requires_grad=False, quant_type="fp4")._quantize("cpu")


def _repacked_weight():
    w, _ = quantize(4, 64, seed=41)
    w.quant_state.packing_format_for_cpu = True  # what bitsandbytes' avx512-bf16 repack sets
    return w


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda w: (torch.zeros(3, 65), w), "last dim 65 must equal the weight's in-features K = 64"),
        (lambda w: (torch.zeros(3, 64, dtype=torch.long), w), "x must be float32"),
        (lambda w: (torch.zeros(()), w), "at least 1 dims"),
        (lambda w: ([[0.0] * 64], w), "x must be a torch.Tensor"),
        (lambda w: (torch.zeros(3, 64), w, torch.zeros(5)), r"bias: shape \(5,\) must be \(4,\)"),
        (lambda w: (torch.zeros(3, 64), w, torch.zeros(4, dtype=torch.long)), "bias must be float32"),
        (lambda w: (torch.zeros(3, 64, device="meta"), w), "must be on one device"),
        (lambda w: (torch.zeros(3, 64), torch.zeros(4, 64)), "weight must be a quantized bitsandbytes Params4bit"),
        (lambda w: (torch.zeros(3, 64), bnb.nn.Params4bit(torch.zeros(4, 64), quant_type="nf4")), "not quantized"),
        (lambda w: (torch.zeros(3, 64), _fp4_weight()), "quant_type must be 'nf4', got 'fp4'"),
        (lambda w: (torch.zeros(3, 64), _repacked_weight()), "repacked by bitsandbytes"),
    ],
)
def test_bad_inputs(make, match):
    w, _ = quantize(4, 64, seed=42)
    with pytest.raises(ValueError, match=match):
        kernels.nf4_linear(*make(w))


def test_bad_backend():
    w, _ = quantize(4, 64, seed=43)
    with pytest.raises(ValueError, match="nf4_linear has no 'triton' backend"):
        kernels.nf4_linear(torch.zeros(3, 64), w, backend="triton")

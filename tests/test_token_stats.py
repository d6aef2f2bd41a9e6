"""kernels.token_stats against the float64 reference token_stats_ref on every kernel backend (Triton
compiled on CUDA where a GPU exists, else under the interpreter; C++), and the reference against
hand-derived values."""

import contextlib
import math

import pytest
import torch
from util import EPS32, assert_close, device_for, kernel_backends, on

import rlhf_kernels as kernels
from rlhf_kernels._triton import forced_blocks
from rlhf_kernels.full_kl import full_kl_ref
from rlhf_kernels.token_stats import IMPLEMENTED, token_stats_ref
from _vocab_cases import (
    DTYPES,
    MULTI_BLOCK,
    close,
    keep_strides,
    make_labels,
    make_pair,
    multi_block_labels,
    multi_block_pair,
    nan_pair,
    second_backward_raises,
    upstream,
)

BACKENDS = kernel_backends(IMPLEMENTED)

# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")

NAMES = ("logp", "entropy", "kl")


def _check(backend, x, z, labels, temperature, tols, *, ignore_index=-100, use=(True, True, True), seed=0):
    """Forward of all three outputs on backend's device (inputs built on CPU), and the gradient of
    sum(g_k * out_k) over the outputs in `use`, vs the float64 reference."""
    fwd_atol, fwd_rtol, g_atol, g_rtol = tols
    dev = device_for(backend)
    xk, zk, lk = keep_strides(dev, x, z, labels)
    xk = xk.detach().requires_grad_()
    assert xk.stride() == x.stride() and zk.stride() == z.stride() and lk.stride() == labels.stride()
    outs = kernels.token_stats(xk, zk, lk, temperature=temperature, ignore_index=ignore_index, backend=backend)
    xr = x.detach().double().requires_grad_()
    refs = token_stats_ref(xr, z.double(), labels, temperature, ignore_index)
    for name, o, r in zip(NAMES, outs, refs):
        assert o.dtype == torch.float32 and o.shape == labels.shape and o.device == dev, name
        close(o, r, fwd_atol, fwd_rtol, name)
    ignored = on(dev, labels.long() == ignore_index)
    for name, o in zip(NAMES, outs):
        assert (o[ignored] == 0).all(), f"{name} nonzero at ignored tokens"
    gs = [upstream(labels.shape, seed + k) for k in range(3)]
    loss_k = sum((o * on(dev, g.float())).sum() for o, g, u in zip(outs, gs, use) if u)
    loss_r = sum((r * g).sum() for r, g, u in zip(refs, gs, use) if u)
    loss_k.backward()
    loss_r.backward()
    assert xk.grad.dtype == x.dtype
    close(xk.grad, xr.grad, g_atol, g_rtol, f"grad_logits (outputs used: {use})")
    assert (xk.grad[ignored] == 0).all()
    return outs


# --------------------------------------------------------------------------------------------------
# The reference, anchored by hand
# --------------------------------------------------------------------------------------------------
def test_reference_hand_derived_values_and_gradient():
    # Row 0: logits [0, ln 3] -> p = [1/4, 3/4], ref_logits [0, 0] -> q = [1/2, 1/2], label 0:
    #   logp = ln(1/4); H = (1/4) ln 4 + (3/4) ln(4/3); KL = (1/4) ln(1/2) + (3/4) ln(3/2).
    # Gradient of g_logp logp + g_ent H + g_kl KL, with (g_logp, g_ent, g_kl) = (1, 2, 3):
    #   d logp = onehot - p = [3/4, -3/4]
    #   d H    = -p_v (ln p_v + H)
    #   d KL   = p_v (ln p_v - ln q_v - KL)
    # Row 1: ignored (label -100): zeros and no gradient, whatever its logits.
    H = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    KL = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    p, q = (0.25, 0.75), (0.5, 0.5)
    grad = [
        (1.0 if v == 0 else 0.0) - p[v] + 2 * (-p[v] * (math.log(p[v]) + H)) + 3 * p[v] * (math.log(p[v] / q[v]) - KL)
        for v in range(2)
    ]
    x = torch.tensor([[0.0, math.log(3)], [7.0, -2.0]], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    logp, ent, kl = token_stats_ref(x, z, torch.tensor([0, -100]))
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert_close(logp, f64([math.log(0.25), 0.0]), atol=1e-15, name="logp")
    assert_close(ent, f64([H, 0.0]), atol=1e-15, name="entropy")
    assert_close(kl, f64([KL, 0.0]), atol=1e-15, name="kl")
    (logp.sum() + 2 * ent.sum() + 3 * kl.sum()).backward()
    assert_close(x.grad, f64([grad, [0.0, 0.0]]), atol=1e-15, name="grad")
    assert z.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_hand_derived_values(backend):
    dev = device_for(backend)
    x = torch.tensor([[0.0, math.log(3)]], device=dev)
    logp, ent, kl = kernels.token_stats(x, torch.zeros(1, 2, device=dev), torch.tensor([0], device=dev),
                                        backend=backend)  # fmt: skip
    assert_close(logp, torch.tensor([math.log(0.25)]), atol=1e-6, name="logp")
    assert_close(ent, torch.tensor([0.25 * math.log(4) + 0.75 * math.log(4 / 3)]), atol=1e-6, name="entropy")
    assert_close(kl, torch.tensor([0.25 * math.log(0.5) + 0.75 * math.log(1.5)]), atol=1e-6, name="kl")


# --------------------------------------------------------------------------------------------------
# Kernels against the float64 reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, fa, fr, ga, gr", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1), (5, 37), (2, 3, 257)], ids=str)
def test_matches_reference(backend, dtype, fa, fr, ga, gr, shape):
    x, z = make_pair(shape, dtype, seed=sum(shape))
    labels = make_labels(shape[:-1], shape[-1], seed=len(shape))
    _check(backend, x, z, labels, 1.0, (fa, fr, ga, gr))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", [(True, False, False), (False, True, False), (False, False, True)], ids=NAMES)
def test_each_output_gradient_alone(backend, use):
    x, z = make_pair((4, 45), torch.float32, seed=21, masked=True)
    labels = make_labels((4,), 45, seed=3)
    labels[0] = 44  # row 0 has a fully -inf first block; its label must stay finite
    with forced_blocks(row=16):
        _check(backend, x, z, labels, 1.0, (2e-5, 2e-5, 1e-6, 1e-5), use=use)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_temperature_masked_noncontiguous_blocks(backend, temperature, layout):
    x, z = make_pair((2, 4, 53), torch.float32, seed=8, masked=True, layout=layout)
    labels = make_labels((2, 4), 53, seed=5, n_ignored=2)
    labels.view(-1)[0] = 52 if labels.view(-1)[0] != -100 else -100  # row 0's -inf block holds no label
    mask_free = torch.isfinite(x.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)) | (labels == -100)
    labels = torch.where(mask_free, labels, torch.full_like(labels, 52))
    with forced_blocks(row=16):
        outs = _check(backend, x, z, labels, temperature, (2e-5, 2e-5, 1e-6, 1e-5))
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, block", MULTI_BLOCK)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_multi_block_rows(backend, V, block, temperature):
    # Every multi-block path, forward and backward (see _vocab_cases.multi_block_pair). KL reaches 24
    # in rows 1-2: the gradient's fp32 error is a few ulps of KL / T (see test_full_kl).
    x, z = multi_block_pair(V, block, seed=V)
    x, z = x.float(), z.float()
    g_atol = 16 * EPS32 * full_kl_ref(x.double(), z.double(), temperature).max().item() / temperature
    with forced_blocks(row=block):
        _check(backend, x, z, multi_block_labels(x), temperature, (2e-5, 2e-5, g_atol, 1e-5), seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    # +-1e4 entries: the maxima are subtracted before scaling (exact), so fp32 errors scale with the
    # outputs' size: logp down to -2e4 in the rows whose max is 1e4, KL up to ~1e4.
    x, z = make_pair((6, 41), torch.float32, seed=5, extreme=True)
    labels = make_labels((6,), 41, seed=6)
    scale = max(o.abs().max().item() for o in token_stats_ref(x.double(), z.double(), labels))
    with forced_blocks(row=16):
        _check(backend, x, z, labels, 1.0, (16 * EPS32 * scale + 2e-5, 2e-5, 1e-5, 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_common_offset_keeps_fp32_precision(backend, temperature):
    # logits and ref_logits = randn * 3 + 1e4: exact up to the sizes of logp, H and KL (~16), not 1e4
    # (see test_logprobs.test_large_common_offset_keeps_fp32_precision).
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, 300, generator=g) * 3 + 1e4
    z = torch.randn(6, 300, generator=g) * 3 + 1e4
    labels = torch.randint(0, 300, (6,), generator=g)
    tol = 16 * EPS32 * 16 / temperature
    _check(backend, x, z, labels, temperature, (tol, 16 * EPS32, tol, 16 * EPS32), seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, block", [(40, None), (40, 16), (4100, 1024)])
def test_nan_propagates_like_the_reference(backend, V, block):
    # NaN logits (rows 0-2) make logp, entropy, kl and the gradient NaN; a NaN reference logit (row 3)
    # makes kl NaN, not logp or entropy; the clean row 4 is unaffected (see _vocab_cases.nan_pair).
    x, z = nan_pair(V, seed=V)
    labels = torch.tensor([1, 2, V - 1, 9, 3])
    dev = device_for(backend)
    with forced_blocks(row=block) if block else contextlib.nullcontext():
        xk = on(dev, x).detach().requires_grad_()
        outs = kernels.token_stats(xk, on(dev, z), on(dev, labels), backend=backend)
        sum(o.sum() for o in outs).backward()
    xr = x.detach().double().requires_grad_()
    refs = token_stats_ref(xr, z.double(), labels)
    sum(r.sum() for r in refs).backward()
    assert torch.isnan(refs[2][:4]).all() and torch.isfinite(refs[0][3:]).all()  # the reference's behaviour
    for name, o, r in zip(NAMES, outs, refs):
        assert_close(o, r, atol=2e-5, rtol=2e-5, name=name, equal_nan=True)
    want = xr.grad.clone()
    want[3][torch.isinf(x[3])] = 0.0  # masked vocabulary of the ref-NaN row: p_v = 0, gradient 0 (test_full_kl)
    assert_close(xk.grad, want, atol=1e-6, rtol=1e-5, name="grad", equal_nan=True)
    assert torch.isfinite(xk.grad[4]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "expanded", "int32-strided"])
def test_strided_expanded_and_int32_labels(backend, kind):
    # Labels as a strided column, expanded (stride 0: one element in memory) or int32: read once as
    # [N] contiguous in the forward, the same buffer in the backward.
    x, z = make_pair((3, 4, 29), torch.float32, seed=14)
    table = make_labels((3, 4, 2), 29, seed=14)
    labels = {"strided": table[..., 1], "expanded": torch.tensor([11]).expand(3, 4),
              "int32-strided": table.int()[..., 0]}[kind]  # fmt: skip
    assert not labels.is_contiguous()
    _check(backend, x, z, labels, 0.9, (2e-5, 2e-5, 1e-6, 1e-5), seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_int32_and_custom_index(backend):
    x, z = make_pair((6, 23), torch.float32, seed=13)
    labels = make_labels((6,), 23, seed=2, ignore_index=-1, n_ignored=3, dtype=torch.int32)
    _check(backend, x, z, labels, 1.0, (2e-5, 2e-5, 1e-6, 1e-5), ignore_index=-1)
    dev = device_for(backend)
    all_ignored = torch.full((6,), -100, device=dev)
    outs = kernels.token_stats(on(dev, x), on(dev, z), all_ignored, backend=backend)
    assert all(torch.equal(o.cpu(), torch.zeros(6)) for o in outs)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_int32_labels_and_ignore_index_beyond_int32(backend):
    # ignore_index = 2^32 + 3 compared in int32 would wrap to 3 and drop every label-3 token.
    dev = device_for(backend)
    x, z = make_pair((4, 11), torch.float32, seed=15)
    labels = torch.tensor([3, 1, 3, 2])
    want = token_stats_ref(x.double(), z.double(), labels)
    got = kernels.token_stats(on(dev, x), on(dev, z), on(dev, labels.int()), ignore_index=2**32 + 3, backend=backend)
    for name, o, r in zip(NAMES, got, want):
        assert_close(o, r, atol=2e-5, rtol=2e-5, name=name)


# --------------------------------------------------------------------------------------------------
# Autograd contract: first order only on the kernel backends, gradients to logits only
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_first_order_still_right(backend):
    dev = device_for(backend)
    x, z = make_pair((5, 17), torch.float32, seed=16)
    labels = make_labels((5,), 17, seed=16)
    xk = on(dev, x).detach().requires_grad_()
    logp, ent, kl = kernels.token_stats(xk, on(dev, z), on(dev, labels), backend=backend)
    (grad,) = second_backward_raises((logp + 0.3 * ent + 2 * kl).sum(), [xk], "token_stats", backend)
    xr = x.detach().double().requires_grad_()
    lr, er, kr = token_stats_ref(xr, z.double(), labels)
    (want,) = torch.autograd.grad((lr + 0.3 * er + 2 * kr).sum(), xr)
    assert_close(grad, want, atol=1e-6, name="first-order grad under create_graph=True")


def test_torch_backend_supports_double_backward():
    x, z = make_pair((3, 7), torch.float64, seed=17)
    labels = make_labels((3,), 7, seed=17)
    x.requires_grad_(True)

    def fn(t):
        return sum(o.sum() for o in kernels.token_stats(t, z, labels, temperature=1.2, backend="torch"))

    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_gradient_only_to_logits(backend):
    # The gradient rule (kernels/_autograd.py): ref_logits is a constant even when it requires grad.
    dev = device_for(backend)
    x, z = make_pair((4, 19), torch.float32, seed=18)
    xk, zk = on(dev, x).detach().requires_grad_(), on(dev, z).detach().requires_grad_()
    outs = kernels.token_stats(xk, zk, on(dev, make_labels((4,), 19, seed=18)), backend=backend)
    sum(o.sum() for o in outs).backward()
    assert zk.grad is None and xk.grad is not None and xk.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_logprobs_and_full_kl(backend):
    # token_stats, logprobs and full_kl share one row kernel per backend: this checks their wiring (which
    # output is which, the temperature, the ignored rows), not the row math; the float64 references do that.
    dev = device_for(backend)
    x, z = on(dev, *make_pair((5, 301), torch.bfloat16, seed=17))
    labels = on(dev, make_labels((5,), 301, seed=1))
    logp, ent, kl = kernels.token_stats(x, z, labels, temperature=0.9, backend=backend)
    lp2, ent2 = kernels.logprobs(x, labels, temperature=0.9, entropy=True, backend=backend)
    kl2 = kernels.full_kl(x, z, temperature=0.9, backend=backend)
    ok = labels != -100
    close(logp, lp2, 2e-6, 2e-6, "logp vs logprobs")
    close(ent, ent2, 2e-6, 2e-6, "entropy vs logprobs")
    close(kl[ok], kl2[ok], 2e-6, 2e-6, "kl vs full_kl")
    assert (kl >= 0).all()


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, z, l: (x, z[:, :-1], l), "shape"),
        (lambda x, z, l: (x, z.half(), l), "dtype"),
        (lambda x, z, l: (x, z, l.float()), "int64"),
        (lambda x, z, l: (x, z, l[:-1]), "leading shape"),
        (lambda x, z, l: (x, z, torch.full_like(l, 11)), "outside"),
        (lambda x, z, l: (x, z, torch.full_like(l, -5)), "outside"),
    ],
)
def test_bad_inputs(make, match):
    x, z = make_pair((3, 11), torch.float32)
    labels = make_labels((3,), 11)
    a, b, c = make(x, z, labels)
    with pytest.raises(ValueError, match=match):
        kernels.token_stats(a, b, c)
    with pytest.raises(ValueError, match="temperature"):
        kernels.token_stats(x, z, labels, temperature=0)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_vocabulary_and_temperature_floor(backend):
    dev = device_for(backend)
    x, labels = torch.zeros(3, 0, device=dev), torch.full((3,), -100, device=dev)
    with pytest.raises(ValueError, match=r"vocabulary is empty \(V = 0\)"):
        kernels.token_stats(x, x, labels, backend=backend)
    x, z = on(dev, *make_pair((3, 11), torch.float32))
    for t in (9e-4, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0.001"):
            kernels.token_stats(x, z, on(dev, make_labels((3,), 11)), temperature=t, backend=backend)
    assert "cuda" not in kernels.token_stats.__doc__


# --------------------------------------------------------------------------------------------------
# GPU (run where a CUDA device exists)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("V", [128256, 151936])
def test_gpu_full_vocab(V):
    x, z = make_pair((64, V), torch.bfloat16, seed=V)
    labels = make_labels((64,), V)
    _check("triton", x, z, labels, 1.0, (2e-5, 2e-5, 1e-5, 8e-3))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_non_default_device():
    # cuda:1 tensors while cuda:0 is current: the launches must run on cuda:1.
    x, z = make_pair((2, 5, 3001), torch.float16, seed=19, masked=True, layout="sliced")
    labels = make_labels((2, 5), 3001, seed=19, n_ignored=2)
    on_mask = ~torch.isfinite(x.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)) & (labels != -100)
    labels[on_mask] = 3000  # off the -inf-masked vocabulary (the last entry is never masked)
    xk = x.to("cuda:1").requires_grad_()
    outs = kernels.token_stats(xk, z.to("cuda:1"), labels.to("cuda:1"), backend="triton")
    sum(o.sum() for o in outs).backward()
    xr = x.detach().double().requires_grad_()
    refs = token_stats_ref(xr, z.double(), labels)
    sum(r.sum() for r in refs).backward()
    assert xk.grad.device == torch.device("cuda:1")
    for name, o, r in zip(NAMES, outs, refs):
        close(o, r, 2e-5, 2e-5, f"{name} on cuda:1")
    close(xk.grad, xr.grad, 4e-6, 1e-3, "grad on cuda:1")


@pytest.mark.cuda
def test_gpu_past_int32_offsets_forward_and_backward():
    # N * V > 2^31 elements: 16800 x 128256 bf16 (x, z and the gradient: 13 GB); checks the last rows,
    # whose element offsets exceed 2^31, forward and backward of all three outputs.
    N, V = 16800, 128256
    assert N * V > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    z = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    outs = kernels.token_stats(x, z, labels, backend="triton")
    gs = [torch.randn(N, device="cuda", generator=g) for _ in range(3)]
    torch.autograd.backward(outs, gs)
    xr = x[-4:].detach().double().requires_grad_()
    refs = token_stats_ref(xr, z[-4:].double(), labels[-4:])
    torch.autograd.backward(refs, [gr[-4:].double() for gr in gs])
    for name, o, r in zip(NAMES, outs, refs):
        close(o[-4:], r, 2e-5, 2e-5, name)
    close(x.grad[-4:], xr.grad, 1e-5, 8e-3, "grad tail rows")

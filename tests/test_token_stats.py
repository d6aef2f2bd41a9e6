"""kernels.token_stats against the float64 reference token_stats_ref (Triton under the interpreter, C++)."""

import os

import pytest
import torch

import rlhf_kernels as kernels
from rlhf_kernels.token_stats import token_stats_ref
from _vocab_cases import BACKENDS, DTYPES, close, make_labels, make_pair, small_blocks, upstream  # noqa: F401

# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

NAMES = ("logp", "entropy", "kl")


def _check(backend, x, z, labels, temperature, tols, *, ignore_index=-100, use=(True, True, True), seed=0):
    """Forward of all three outputs, and the gradient of sum(g_k * out_k) over the outputs in `use`."""
    fwd_atol, fwd_rtol, g_atol, g_rtol = tols
    xk = x.detach().clone().requires_grad_()
    outs = kernels.token_stats(xk, z, labels, temperature=temperature, ignore_index=ignore_index, backend=backend)
    xr = x.detach().double().requires_grad_()
    refs = token_stats_ref(xr, z.double(), labels, temperature, ignore_index)
    for name, o, r in zip(NAMES, outs, refs):
        assert o.dtype == torch.float32 and o.shape == labels.shape, name
        close(o, r, fwd_atol, fwd_rtol, name)
    ignored = labels == ignore_index
    for name, o in zip(NAMES, outs):
        assert (o[ignored] == 0).all(), f"{name} nonzero at ignored tokens"
    gs = [upstream(labels.shape, seed + k) for k in range(3)]
    loss_k = sum((o * g.float()).sum() for o, g, u in zip(outs, gs, use) if u)
    loss_r = sum((r * g).sum() for r, g, u in zip(refs, gs, use) if u)
    loss_k.backward()
    loss_r.backward()
    assert xk.grad.dtype == x.dtype
    close(xk.grad, xr.grad, g_atol, g_rtol, f"grad_logits (outputs used: {use})")
    assert (xk.grad[ignored] == 0).all()
    return outs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, fa, fr, ga, gr", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1), (5, 37), (2, 3, 257)], ids=str)
def test_matches_reference(backend, dtype, fa, fr, ga, gr, shape):
    x, z = make_pair(shape, dtype, seed=sum(shape))
    labels = make_labels(shape[:-1], shape[-1], seed=len(shape))
    _check(backend, x, z, labels, 1.0, (fa, fr, ga, gr))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", [(True, False, False), (False, True, False), (False, False, True)], ids=NAMES)
def test_each_output_gradient_alone(backend, use, small_blocks):  # noqa: F811
    x, z = make_pair((4, 45), torch.float32, seed=21, masked=True)
    labels = make_labels((4,), 45, seed=3)
    labels[0] = 44  # row 0 has a fully -inf first block; its label must stay finite
    _check(backend, x, z, labels, 1.0, (2e-5, 2e-5, 1e-6, 1e-5), use=use)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_temperature_masked_noncontiguous_blocks(backend, temperature, layout, small_blocks):  # noqa: F811
    x, z = make_pair((2, 4, 53), torch.float32, seed=8, masked=True, layout=layout)
    labels = make_labels((2, 4), 53, seed=5, n_ignored=2)
    labels.view(-1)[0] = 52 if labels.view(-1)[0] != -100 else -100  # row 0's -inf block holds no label
    mask_free = torch.isfinite(x.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)) | (labels == -100)
    labels = torch.where(mask_free, labels, torch.full_like(labels, 52))
    outs = _check(backend, x, z, labels, temperature, (2e-5, 2e-5, 1e-6, 1e-5))
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, small_blocks):  # noqa: F811
    # +-1e4 entries: fp32 x * log2(e) / T has ulp 9.8e-4 at 1.4e4 (see test_full_kl.test_extreme_logits).
    x, z = make_pair((6, 41), torch.float32, seed=5, extreme=True)
    labels = make_labels((6,), 41, seed=6)
    _check(backend, x, z, labels, 1.0, (2e-3, 2e-3, 2e-3, 2e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_int32_and_custom_index(backend):
    x, z = make_pair((6, 23), torch.float32, seed=13)
    labels = make_labels((6,), 23, seed=2, ignore_index=-1, n_ignored=3, dtype=torch.int32)
    _check(backend, x, z, labels, 1.0, (2e-5, 2e-5, 1e-6, 1e-5), ignore_index=-1)
    all_ignored = torch.full((6,), -100)
    outs = kernels.token_stats(x, z, all_ignored, backend=backend)
    assert all(torch.equal(o, torch.zeros(6)) for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_logprobs_and_full_kl(backend):
    x, z = make_pair((5, 301), torch.bfloat16, seed=17)
    labels = make_labels((5,), 301, seed=1)
    logp, ent, kl = kernels.token_stats(x, z, labels, temperature=0.9, backend=backend)
    lp2, ent2 = kernels.logprobs(x, labels, temperature=0.9, entropy=True, backend=backend)
    kl2 = kernels.full_kl(x, z, temperature=0.9, backend=backend)
    ok = labels != -100
    close(logp, lp2, 2e-6, 2e-6, "logp vs logprobs")
    close(ent, ent2, 2e-6, 2e-6, "entropy vs logprobs")
    close(kl[ok], kl2[ok], 2e-6, 2e-6, "kl vs full_kl")
    assert (kl >= 0).all()


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


@pytest.mark.cuda
@pytest.mark.parametrize("V", [128256, 151936])
def test_gpu_full_vocab(V):
    x, z = make_pair((64, V), torch.bfloat16, seed=V)
    labels = make_labels((64,), V)
    _check("triton", x.cuda(), z.cuda(), labels.cuda(), 1.0, (2e-5, 2e-5, 1e-5, 8e-3))


@pytest.mark.cuda
def test_gpu_past_int32_offsets():
    # N * V > 2^31 elements: 16800 x 128256 bf16; checks the last rows, whose offsets exceed 2^31.
    N, V = 16800, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    z = torch.randn(N, V, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    outs = kernels.token_stats(x, z, labels, backend="triton")
    refs = token_stats_ref(x[-4:].double(), z[-4:].double(), labels[-4:])
    for name, o, r in zip(NAMES, outs, refs):
        close(o[-4:], r, 2e-5, 2e-5, name)



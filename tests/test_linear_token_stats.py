"""kernels.linear_token_stats: against the float64 unfused composition (the reference, itself anchored
by hand), chunking against the same-dtype unfused composition, its GEMM count, no gradient to
ref_hidden, ignored tokens, bad input. Every kernel backend runs on util.device_for(backend)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from util import assert_close, assert_rel_norm, device_for, kernel_backends, on

import rlhf_kernels as kernels
from rlhf_kernels._linear import IMPLEMENTED
from rlhf_kernels.linear_token_stats import linear_token_stats_ref
from _vocab_cases import close, grad_rel_bound, keep_strides, make_labels, make_linear, second_backward_raises, upstream

BACKENDS = kernel_backends(IMPLEMENTED)

# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

NAMES = ("logp", "entropy", "kl")
# (dtype, atol, rtol) of the fp32 OUTPUTS against float64 on the same rounded inputs; the [C, V] logits
# are rounded to the input dtype like the unfused op's (bf16: ~3 * 2^-9 = 6e-3 absolute at logit scale
# 3; see test_linear_logprobs), and KL differences two such rounded rows. 16-bit GRADIENTS are checked
# norm-wise against _vocab_cases.grad_rel_bound (8 unit roundoffs): the elementwise bf16 atol
# of 1e-1 they replaced would pass an all-zero grad_weight at most entries.
LIN_DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-1, 2e-2, id="bf16"),
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
]
GRAD_NAMES = ("grad_hidden", "grad_weight", "grad_bias")


def _run(fn, hidden, ref_hidden, weight, bias, labels, *, weight_grad, use=(True, True, True), seed=0, device=None,
         **kw):  # fmt: skip
    """-> (outputs, grads) on `device`; every float input requires grad (ref_hidden must get none)."""
    dev = device or hidden.device
    h, rh, w, b, lab = keep_strides(dev, hidden, ref_hidden, weight, bias, labels)
    h, rh, w = h.detach().requires_grad_(), rh.detach().requires_grad_(), w.detach().requires_grad_(weight_grad)
    b = None if b is None else b.detach().requires_grad_(weight_grad)
    outs = fn(h, rh, w, lab, bias=b, **kw)
    loss = sum((o * on(dev, upstream(o.shape, seed + k)).to(o.dtype)).sum()
               for k, (o, u) in enumerate(zip(outs, use)) if u)  # fmt: skip
    loss.backward()
    assert rh.grad is None, "ref_hidden must get no gradient"
    grads = [h.grad] + ([w.grad] + ([b.grad] if b is not None else []) if weight_grad else [])
    return list(outs), grads


def _ref(h, rh, w, lab, *, bias, temperature=1.0, ignore_index=-100):
    return linear_token_stats_ref(h, rh, w, lab, bias, temperature, ignore_index)


def _ref64(hidden, ref_hidden, weight, bias, labels, **kw):
    d = lambda t: None if t is None else t.double()  # noqa: E731  (on the inputs' device)
    return _run(_ref, d(hidden), d(ref_hidden), d(weight), d(bias), labels, **kw)


# --------------------------------------------------------------------------------------------------
# The reference, anchored by hand
# --------------------------------------------------------------------------------------------------
def test_reference_hand_derived_values_and_gradients():
    # weight W = [[0, 0], [ln 3, 0]], bias 0, hidden h = [1, 2] -> logits [0, ln 3], p = [1/4, 3/4];
    # ref_hidden rh = [0, 1] -> reference logits [0, 0], q = [1/2, 1/2]; label 1; loss = logp + H + KL:
    #   logp = ln(3/4), H = (1/4) ln 4 + (3/4) ln(4/3), KL = (1/4) ln(1/2) + (3/4) ln(3/2)
    #   dl_v = (onehot - p)_v - p_v (ln p_v + H) + p_v (ln p_v - ln q_v - KL)
    #   grad_h = W^T dl = [ln 3 * dl_1, 0];  grad_W = dl h^T = [[dl_0, 2 dl_0], [dl_1, 2 dl_1]];  grad_b = dl
    # The reference side is a constant: no grad to rh, and none to W through it (it would add
    # (q - p) rh^T, i.e. +-1/4 to column 1 of grad_W).
    H = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    KL = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    p, q, onehot = (0.25, 0.75), (0.5, 0.5), (0.0, 1.0)
    dl = [onehot[v] - p[v] - p[v] * (math.log(p[v]) + H) + p[v] * (math.log(p[v] / q[v]) - KL) for v in range(2)]
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    h, rh = f64([[1.0, 2.0]]).requires_grad_(), f64([[0.0, 1.0]]).requires_grad_()
    w = f64([[0.0, 0.0], [math.log(3), 0.0]]).requires_grad_()
    b = f64([0.0, 0.0]).requires_grad_()
    logp, ent, kl = linear_token_stats_ref(h, rh, w, torch.tensor([1]), b)
    for name, o, want in (("logp", logp, math.log(0.75)), ("entropy", ent, H), ("kl", kl, KL)):
        close(o, f64([want]), 1e-15, 0, name)
    (logp + ent + kl).sum().backward()
    close(h.grad, f64([[math.log(3) * dl[1], 0.0]]), 1e-15, 0, "grad_hidden")
    close(w.grad, f64([[dl[0], 2 * dl[0]], [dl[1], 2 * dl[1]]]), 1e-15, 0, "grad_weight")
    close(b.grad, f64(dl), 1e-15, 0, "grad_bias")
    assert rh.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", LIN_DTYPES)
@pytest.mark.parametrize("weight_grad, bias", [(False, False), (True, True)])
def test_matches_float64_reference(backend, dtype, atol, rtol, weight_grad, bias):
    # N = 2 x 5 tokens (one ignored), H = 13, V = 59 (primes), 3-token chunks, T = 0.9.
    hidden, ref_hidden, weight, b = make_linear((2, 5), 13, 59, dtype, seed=1, bias=bias, ref=True)
    labels = make_labels((2, 5), 59, seed=2)
    kw = dict(weight_grad=weight_grad, temperature=0.9)
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, b, labels, chunk_size=3,
                       backend=backend, device=device_for(backend), **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, ref_hidden, weight, b, labels, **kw)
    for name, o, r in zip(NAMES, outs, routs):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        close(o, r, atol, rtol, name)
    assert (outs[2] >= 0).all()
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        assert g.dtype == dtype
        if dtype == torch.float32:
            close(g, r, atol, rtol, name)
        else:
            assert_rel_norm(g, r, bound=grad_rel_bound(dtype), name=name)
    if dtype != torch.float32 and backend == "cpp":
        # Relative Frobenius error, fused vs unfused 16-bit composition. Only C++: the Triton interpreter
        # truncates fp32 -> 16-bit stores (a GPU rounds to nearest), which biases its rounding error.
        # 1.25x: chunked and full GEMMs round their 16-bit outputs differently by an ulp here and there.
        uouts, ugrads = _run(_ref, hidden, ref_hidden, weight, b, labels, **kw)
        names = NAMES + ("grad_hidden", "grad_weight", "grad_bias")
        for name, o, u, r in zip(names, outs + grads, uouts + ugrads, routs + rgrads):
            rel = lambda a: ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()  # noqa: E731
            assert rel(o) <= 1.25 * rel(u) + 1e-6, f"{name}: fused rel. error {rel(o):.3e} vs unfused {rel(u):.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", [(True, False, False), (False, True, False), (False, False, True)], ids=NAMES)
def test_each_output_gradient_masked_temperature(backend, use):
    # One output's gradient at a time; bias -inf on 3 entries (masked on both sides), T = 1.6.
    hidden, ref_hidden, weight, b = make_linear((9,), 11, 47, torch.float32, seed=3, masked=True, ref=True)
    labels = make_labels((9,), 44, seed=4, n_ignored=2)
    kw = dict(weight_grad=True, use=use, temperature=1.6)
    dev = device_for(backend)
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, b, labels, chunk_size=4,
                       backend=backend, device=dev, **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, ref_hidden, weight, b, labels, **kw)
    for name, o, r in zip(NAMES + GRAD_NAMES, outs + grads, routs + rgrads):
        close(o, r, 1e-5, 1e-5, name)
    ignored = on(dev, labels == -100)
    assert all((o[ignored] == 0).all() for o in outs) and (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_only_matches_unfused_same_kernels_and_self_kl(backend):
    """Checks CHUNKING only: the fused op and token_stats(F.linear(...)) share the row kernel, so this
    compares token chunks / vocabulary slices and their GEMMs with one [N, V] call, not the math
    (test_matches_float64_reference does that); plus KL exactly 0 when ref_hidden is hidden."""
    # Same dtype and kernels: token_stats(F.linear(h), F.linear(rh).detach()) up to GEMM blocking
    # (fp32: dl @ W sums V terms of both signs in a different order, see test_linear_logprobs).
    hidden, ref_hidden, weight, b = make_linear((3, 4), 17, 43, torch.float32, seed=5, bias=True, ref=True)
    labels = make_labels((3, 4), 43, seed=6)

    def unfused(h, rh, w, lab, *, bias):
        ref_logits = F.linear(rh, w, bias).detach()
        return kernels.token_stats(F.linear(h, w, bias), ref_logits, lab, backend=backend)

    dev = device_for(backend)
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, b, labels, chunk_size=5,
                       backend=backend, weight_grad=True, device=dev)  # fmt: skip
    uouts, ugrads = _run(unfused, hidden, ref_hidden, weight, b, labels, weight_grad=True, device=dev)
    for name, o, u in zip(NAMES + GRAD_NAMES, outs + grads, uouts + ugrads):
        close(o, u, 1e-5, 1e-5, name)
    # the policy equal to the reference: KL exactly 0
    hidden, weight, b, labels = on(dev, hidden, weight, b, labels)
    _, _, kl = kernels.linear_token_stats(hidden, hidden, weight, labels, bias=b, backend=backend)
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize(
    "weight_grad, use, gemms",
    [
        (False, (True, True, True), 5),
        (True, (True, True, True), 6),
        (False, (True, True, False), 4),  # no kl in the loss: the ref logits are not recomputed
    ],
)
def test_gemm_count(weight_grad, use, gemms):
    # Total matmul flops fwd+bwd = gemms * 2 M H V over the M = 7 non-ignored tokens (kernels/_linear.py).
    N, H, V = 10, 16, 40
    hidden, ref_hidden, weight, _ = make_linear((N,), H, V, torch.float32, seed=7, ref=True)
    labels = make_labels((N,), V, seed=8, n_ignored=3)
    with FlopCounterMode(display=False) as counter:
        _run(kernels.linear_token_stats, hidden, ref_hidden, weight, None, labels, chunk_size=3, backend="cpp",
             weight_grad=weight_grad, use=use)  # fmt: skip
    assert counter.get_total_flops() == gemms * 2 * 7 * H * V


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    hidden, ref_hidden, weight, _ = make_linear((5,), 8, 21, torch.float32, seed=9, ref=True)
    labels = torch.full((5,), -100)
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, None, labels, backend=backend,
                       weight_grad=True, device=device_for(backend))  # fmt: skip
    assert all(torch.equal(t, torch.zeros_like(t)) for t in outs + grads)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda h, rh, w, l: (h, rh[:-1], w, l), "ref_hidden"),
        (lambda h, rh, w, l: (h, rh.half(), w, l), "ref_hidden"),
        (lambda h, rh, w, l: (h, rh, w[:, :-1], l), "H ="),
        (lambda h, rh, w, l: (h, rh, w, torch.full_like(l, -3)), "outside"),
    ],
)
def test_bad_inputs(make, match):
    hidden, ref_hidden, weight, _ = make_linear((4,), 8, 19, torch.float32, seed=10, ref=True)
    labels = make_labels((4,), 19)
    a, b, c, d = make(hidden, ref_hidden, weight, labels)
    with pytest.raises(ValueError, match=match):
        kernels.linear_token_stats(a, b, c, d)
    with pytest.raises(ValueError, match="linear_token_stats: .*cuda"):
        kernels.linear_token_stats(hidden, ref_hidden, weight, labels, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "expanded", "int32-strided"])
def test_strided_expanded_and_int32_labels(backend, kind):
    # Labels as a strided column, expanded (stride 0) or int32 (and strided): see test_linear_logprobs.
    hidden, ref_hidden, weight, b = make_linear((3, 4), 9, 29, torch.float32, seed=12, bias=True, ref=True)
    table = make_labels((3, 4, 2), 29, seed=12, n_ignored=0)
    labels = {"strided": table[..., 1], "expanded": torch.tensor([17]).expand(3, 4),
              "int32-strided": table.int()[..., 0]}[kind]  # fmt: skip
    kw = dict(weight_grad=True, temperature=1.1)
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, b, labels, chunk_size=5,
                       backend=backend, device=device_for(backend), **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, ref_hidden, weight, b, labels, **kw)
    for name, o, r in zip(NAMES + GRAD_NAMES, outs + grads, routs + rgrads):
        close(o, r, 1e-5, 1e-5, name)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_int32_labels_and_ignore_index_beyond_int32(backend):
    # ignore_index = 2^32 + 4 compared in int32 would wrap to 4 and drop every label-4 token.
    dev = device_for(backend)
    hidden, ref_hidden, weight, _ = make_linear((4,), 8, 19, torch.float32, seed=13, ref=True)
    labels = torch.tensor([4, 1, 4, 2])
    want = linear_token_stats_ref(hidden.double(), ref_hidden.double(), weight.double(), labels)
    got = kernels.linear_token_stats(*on(dev, hidden, ref_hidden, weight, labels.int()), ignore_index=2**32 + 4,
                                     backend=backend)  # fmt: skip
    for name, o, r in zip(NAMES, got, want):
        close(o, r, 1e-5, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_reference_hidden_row_makes_only_kl_nan(backend):
    # A NaN in one token's ref_hidden makes its reference logits NaN: that token's kl (and so the
    # gradient of a loss using kl) is NaN, as in the reference; its logp and entropy stay finite.
    hidden, ref_hidden, weight, _ = make_linear((5,), 8, 37, torch.float32, seed=14, ref=True)
    ref_hidden[1, 0] = float("nan")
    labels = make_labels((5,), 37, seed=14, n_ignored=0)
    kw = dict(weight_grad=False)
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, None, labels, chunk_size=2,
                       backend=backend, device=device_for(backend), **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, ref_hidden, weight, None, labels, **kw)
    for name, o, r in zip(NAMES + ("grad_hidden",), outs + grads, routs + rgrads):
        assert_close(o, r, atol=1e-5, rtol=1e-5, name=name, equal_nan=True)
    assert torch.isnan(outs[2][1]) and torch.isfinite(outs[0]).all() and torch.isfinite(outs[1]).all()


# --------------------------------------------------------------------------------------------------
# Autograd contract: first order only on the kernel backends, no gradient through the reference side
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["token-chunks", "vocab-slices"])
def test_double_backward_raises_first_order_still_right(backend, weight_grad):
    dev = device_for(backend)
    hidden, ref_hidden, weight, b = make_linear((6,), 8, 23, torch.float32, seed=15, bias=True, ref=True)
    labels = make_labels((6,), 23, seed=15)
    h = on(dev, hidden).requires_grad_()
    w = on(dev, weight).requires_grad_(weight_grad)
    bb = on(dev, b).requires_grad_(weight_grad)
    outs = kernels.linear_token_stats(h, on(dev, ref_hidden), w, on(dev, labels), bias=bb, chunk_size=4,
                                      backend=backend)  # fmt: skip
    inputs = [h, w, bb] if weight_grad else [h]
    grads = second_backward_raises(sum(o.sum() for o in outs), inputs, "linear_logprobs/linear_token_stats", backend)
    hr, wr, br = (t.double().requires_grad_(weight_grad or t is hidden) for t in (hidden, weight, b))
    routs = linear_token_stats_ref(hr, ref_hidden.double(), wr, labels, br)
    rgrads = torch.autograd.grad(sum(o.sum() for o in routs), [hr, wr, br][: len(inputs)])
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        close(g, r, 1e-5, 1e-5, f"{name} under create_graph=True")


def test_torch_backend_supports_double_backward():
    # With respect to hidden only: weight and bias also feed the (constant, detached) reference logits,
    # so finite differences in them would move the reference too, unlike the rule's gradient.
    hidden, ref_hidden, weight, b = make_linear((2,), 3, 5, torch.float64, seed=16, bias=True, ref=True)
    labels = make_labels((2,), 5, seed=16, n_ignored=0)

    def fn(h):
        return sum(o.sum() for o in kernels.linear_token_stats(h, ref_hidden, weight, labels, bias=b, backend="torch"))

    assert torch.autograd.gradgradcheck(fn, (hidden.requires_grad_(),))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_gradient_only_through_the_policy_side(backend):
    # The gradient rule (kernels/_autograd.py): every float input requires grad; ref_hidden gets none
    # (asserted in _run), and weight/bias get exactly the policy side's (the reference side detached).
    dev = device_for(backend)
    hidden, ref_hidden, weight, b = make_linear((2, 3), 8, 19, torch.float32, seed=17, bias=True, ref=True)
    labels = make_labels((2, 3), 19, seed=17)
    _, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, b, labels, backend=backend, device=dev,
                    weight_grad=True)  # fmt: skip
    h, w, bb = (t.double().requires_grad_() for t in (hidden, weight, b))
    ref_logits = F.linear(ref_hidden.double(), weight.double(), b.double())  # constants, built outside autograd
    outs = kernels.token_stats(F.linear(h, w, bb), ref_logits, labels, backend="torch")
    sum((o * upstream(o.shape, k)).sum() for k, o in enumerate(outs)).backward()
    for name, g, r in zip(GRAD_NAMES, grads, (h.grad, w.grad, bb.grad)):
        close(g, r, 1e-5, 1e-5, name)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_vocabulary_and_temperature_floor(backend):
    dev = device_for(backend)
    hidden, weight = torch.zeros(3, 4, device=dev), torch.zeros(0, 4, device=dev)
    with pytest.raises(ValueError, match=r"weight: the vocabulary is empty \(V = 0\)"):
        kernels.linear_token_stats(hidden, hidden, weight, torch.full((3,), -100, device=dev), backend=backend)
    hidden, ref_hidden, weight, _ = on(dev, *make_linear((4,), 8, 19, torch.float32, seed=18, ref=True))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0.001"):
        kernels.linear_token_stats(hidden, ref_hidden, weight, on(dev, make_labels((4,), 19)), temperature=5e-4,
                                   backend=backend)  # fmt: skip
    assert "cuda" not in kernels.linear_token_stats.__doc__


# --------------------------------------------------------------------------------------------------
# GPU (run where a CUDA device exists)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_gpu_full_size():
    # H = 4096, V = 151936, 192 tokens in 64-token chunks, bf16, weight gradient; float64 reference on GPU.
    hidden, ref_hidden, weight, _ = make_linear((192,), 4096, 151936, torch.bfloat16, seed=11, ref=True)
    hidden, ref_hidden, weight = hidden.cuda(), ref_hidden.cuda(), weight.cuda()
    labels = make_labels((192,), 151936, seed=12).cuda()
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, None, labels, chunk_size=64,
                       backend="triton", weight_grad=True)  # fmt: skip
    routs, rgrads = _ref64(hidden, ref_hidden, weight, None, labels, weight_grad=True)
    for name, o, r in zip(NAMES, outs, routs):
        close(o, r, 1e-1, 2e-2, name)
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        assert_rel_norm(g, r, bound=grad_rel_bound(torch.bfloat16), name=name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_non_default_device():
    # cuda:1 tensors while cuda:0 is current.
    hidden, ref_hidden, weight, b = make_linear((2, 37), 64, 3000, torch.bfloat16, seed=19, bias=True, ref=True)
    labels = make_labels((2, 37), 3000, seed=19, n_ignored=5)
    outs, grads = _run(kernels.linear_token_stats, hidden, ref_hidden, weight, b, labels, chunk_size=16,
                       backend="triton", weight_grad=True, device=torch.device("cuda:1"))  # fmt: skip
    routs, rgrads = _ref64(hidden, ref_hidden, weight, b, labels, weight_grad=True)
    assert all(g.device == torch.device("cuda:1") for g in grads)
    for name, o, r in zip(NAMES, outs, routs):
        close(o, r, 1e-1, 2e-2, name)
    for name, g, r in zip(GRAD_NAMES, grads, rgrads):
        assert_rel_norm(g, r, bound=grad_rel_bound(torch.bfloat16), name=name)

"""kernels.linear_logprobs: against the float64 unfused composition (the reference, itself anchored by
hand), chunking against the same-dtype unfused composition, its GEMM count, fp32 weight-gradient
accumulation, vocabulary-slice alignment, the fp32-output GEMM probe, ignored tokens, bad input. Every
kernel backend runs on util.device_for(backend)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from util import assert_close, assert_rel_norm, device_for, kernel_backends, on

import rlhf_kernels as kernels
import rlhf_kernels._linear as linear
from rlhf_kernels._linear import IMPLEMENTED, vocab_slice
from rlhf_kernels.linear_logprobs import linear_logprobs_ref
from _vocab_cases import close, grad_rel_bound, keep_strides, make_labels, make_linear, second_backward_raises, upstream

BACKENDS = kernel_backends(IMPLEMENTED)

# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

# (dtype, atol, rtol) of the fp32 OUTPUTS against float64 on the same rounded inputs. The fused op,
# like the unfused one, rounds the [C, V] logits to the input dtype: logits of scale ~3 carry ~3 * 2^-9
# = 6e-3 absolute in bf16 and 3 * 2^-12 = 7e-4 in fp16, and logp/entropy inherit it; fp32 stays fp32.
LIN_DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 3e-2, 2e-2, id="bf16"),
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
]


def _run(fn, hidden, weight, bias, labels, *, weight_grad, entropy, seed=0, device=None, **kw):
    """-> (outputs, grads) with grads for hidden, and weight/bias when weight_grad; inputs on `device`."""
    dev = device or hidden.device
    # detach(), not clone(): a view keeps its strides (clone would make a sliced hidden contiguous)
    h, w, b, lab = keep_strides(dev, hidden, weight, bias, labels)
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_(weight_grad)
    b = None if b is None else b.detach().requires_grad_(weight_grad)
    out = fn(h, w, lab, bias=b, entropy=entropy, **kw)
    outs = out if entropy else (out,)
    loss = sum((o * on(dev, upstream(o.shape, seed + k)).to(o.dtype)).sum() for k, o in enumerate(outs))
    loss.backward()
    grads = [h.grad] + ([w.grad] + ([b.grad] if b is not None else []) if weight_grad else [])
    return outs, grads


def _ref64(hidden, weight, bias, labels, **kw):
    def fn(h, w, lab, *, bias, entropy, temperature=1.0, ignore_index=-100):
        return linear_logprobs_ref(h, w, lab, bias, temperature, ignore_index, entropy)

    d = lambda t: None if t is None else t.double()  # noqa: E731  (on the inputs' device)
    return _run(fn, d(hidden), d(weight), d(bias), labels, **kw)


def check_grads(grads, rgrads, dtype, atol, rtol, names=("grad_hidden", "grad_weight", "grad_bias")):
    """fp32 gradients elementwise; 16-bit ones norm-wise (grad_rel_bound), where an elementwise atol
    loose enough for the dtype would also pass an all-zero gradient."""
    for name, g, r in zip(names, grads, rgrads):
        assert g.dtype == dtype, name
        if dtype == torch.float32:
            close(g, r, atol, rtol, name)
        else:
            assert_rel_norm(g, r, bound=grad_rel_bound(dtype), name=name)


# --------------------------------------------------------------------------------------------------
# The reference, anchored by hand
# --------------------------------------------------------------------------------------------------
def test_reference_hand_derived_values_and_gradients():
    # hidden h = [1, 2], weight W = [[0, 0], [ln 3, 0]], bias b = [0, 0] -> logits x = W h + b = [0, ln 3],
    # p = [1/4, 3/4]; label 1, loss = logp + entropy:
    #   logp = ln(3/4), H = (1/4) ln 4 + (3/4) ln(4/3)
    #   dl = d loss / d x = (onehot - p) - p_v (ln p_v + H) = [-1/4 - (1/4)(ln 1/4 + H), 1/4 - (3/4)(ln 3/4 + H)]
    #   grad_h = W^T dl = [ln 3 * dl_1, 0];  grad_W = dl h^T = [[dl_0, 2 dl_0], [dl_1, 2 dl_1]];  grad_b = dl
    H = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    dl = [-0.25 - 0.25 * (math.log(0.25) + H), 0.25 - 0.75 * (math.log(0.75) + H)]
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    h = f64([[1.0, 2.0]]).requires_grad_()
    w = f64([[0.0, 0.0], [math.log(3), 0.0]]).requires_grad_()
    b = f64([0.0, 0.0]).requires_grad_()
    logp, ent = linear_logprobs_ref(h, w, torch.tensor([1]), b, entropy=True)
    close(logp, f64([math.log(0.75)]), 1e-15, 0, "logp")
    close(ent, f64([H]), 1e-15, 0, "entropy")
    (logp + ent).sum().backward()
    close(h.grad, f64([[math.log(3) * dl[1], 0.0]]), 1e-15, 0, "grad_hidden")
    close(w.grad, f64([[dl[0], 2 * dl[0]], [dl[1], 2 * dl[1]]]), 1e-15, 0, "grad_weight")
    close(b.grad, f64(dl), 1e-15, 0, "grad_bias")


# --------------------------------------------------------------------------------------------------
# Kernels against the float64 reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", LIN_DTYPES)
@pytest.mark.parametrize("entropy, weight_grad, bias", [(False, False, False), (True, False, True), (False, True, True),
                                                        (True, True, False)])  # fmt: skip
def test_matches_float64_reference(backend, dtype, atol, rtol, entropy, weight_grad, bias):
    # N = 11 tokens (one ignored), H = 13, V = 67 (primes), 4-token chunks, T = 0.8.
    hidden, _, weight, b = make_linear((11,), 13, 67, dtype, seed=1, bias=bias)
    labels = make_labels((11,), 67, seed=2)
    kw = dict(weight_grad=weight_grad, entropy=entropy, temperature=0.8)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=4, backend=backend,
                       device=device_for(backend), **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, weight, b, labels, **kw)
    for name, o, r in zip(("logp", "entropy"), outs, routs):
        assert o.dtype == torch.float32
        close(o, r, atol, rtol, name)
    check_grads(grads, rgrads, dtype, atol, rtol)


def test_rel_norm_rejects_an_all_zero_gradient():
    # The 16-bit gradient check above cannot pass a zero grad_weight; the elementwise bf16 tolerance it
    # replaced (atol 3e-2, rtol 2e-2) passed zeros at nearly half the entries here.
    hidden, _, weight, _ = make_linear((11,), 13, 67, torch.bfloat16, seed=1)
    labels = make_labels((11,), 67, seed=2)
    _, rgrads = _ref64(hidden, weight, None, labels, weight_grad=True, entropy=False)
    assert (rgrads[1].abs() <= 3e-2 + 2e-2 * rgrads[1].abs()).float().mean() > 0.4
    with pytest.raises(AssertionError, match="relative error 1 >"):
        assert_rel_norm(torch.zeros_like(rgrads[1]), rgrads[1], bound=grad_rel_bound(torch.bfloat16), name="zeros")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_only_matches_unfused_same_kernels(backend, dtype):
    """Checks CHUNKING only: the fused op and logprobs(F.linear(...)) share the row kernel, so this
    compares token chunks / vocabulary slices and their GEMMs with one [N, V] call, not the math
    (test_matches_float64_reference does that)."""
    # Same dtype, same kernels: the fused op must reproduce logprobs(F.linear(...)) up to GEMM blocking
    # (per-row GEMM results may differ by an ulp of the logits between [C, H] and [N, H] calls) and the
    # final cast of the fp32-accumulated weight gradient (the unfused one rounds once too).
    hidden, _, weight, b = make_linear((2, 5), 17, 41, dtype, seed=3, bias=True)
    labels = make_labels((2, 5), 41, seed=4)

    def unfused(h, w, lab, *, bias, entropy):
        return kernels.logprobs(F.linear(h, w, bias), lab, entropy=entropy, backend=backend)

    kw = dict(weight_grad=True, entropy=True, device=device_for(backend))
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=3, backend=backend, **kw)
    uouts, ugrads = _run(unfused, hidden, weight, b, labels, **kw)
    # fp32: grad_hidden = dl @ W sums V terms of both signs, whose order differs between the [C, V]
    # and [N, V] GEMMs (1.9e-6 measured at |grad| 4e-2); bf16: one ulp of the rounded gradients (2^-8).
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for name, o, u in zip(("logp", "entropy"), outs, uouts):
        close(o, u, tol, tol, name)
    for name, g, u in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ugrads):
        close(g, u, tol, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocab_extreme_noncontiguous_temperature(backend):
    # bias -inf on 3 entries (masked vocabulary), +-1e4 on two; hidden sliced [:, :-1]; weight a
    # transposed [H, V] buffer (tied embeddings). The 1e4 logits: see test_full_kl.test_extreme_logits.
    dev = device_for(backend)
    hidden, _, weight, b = on(dev, *make_linear((3, 5), 11, 53, torch.float32, seed=5, masked=True))
    big = torch.zeros(3, 6, 11, device=dev)
    big[:, :-1] = hidden
    hidden = big[:, :-1]
    weight = weight.t().contiguous().t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    labels = on(dev, make_labels((3, 5), 50, seed=6))
    kw = dict(weight_grad=True, entropy=True, temperature=1.7)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=4, backend=backend, **kw)
    routs, rgrads = _ref64(hidden, weight, b, labels, **kw)
    names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, o, r in zip(names, list(outs) + grads, list(routs) + rgrads):
        close(o, r, 1e-5, 1e-5, name)
    assert (grads[2][-3:] == 0).all()  # masked vocabulary gets no bias gradient
    # extreme: one logit at 1e4 dominates every row
    hidden, _, weight, b = make_linear((6,), 11, 53, torch.float32, seed=7, extreme=True)
    labels = make_labels((6,), 53, seed=8)
    kw = dict(weight_grad=True, entropy=True)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=4, backend=backend, device=dev,
                       **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, weight, b, labels, **kw)
    names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, o, r in zip(names, list(outs) + grads, list(routs) + rgrads):
        close(o, r, 2e-3, 2e-3, name)


def _bf16_accumulated(a, b):
    """What a 16-bit accumulator would give for a @ b: one K-term at a time, rounded to bf16 each step."""
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16)
    for k in range(a.shape[1]):
        acc = (acc.double() + a[:, k : k + 1].double() @ b[k : k + 1].double()).to(torch.bfloat16)
    return acc


def _within_half_ulp(actual, best, what):
    ulp = 2.0**-8 * best.abs()  # bf16 spacing is <= 2^-7 |x|: half of it bounds one final rounding
    err = (actual.double() - best).abs()
    bad = err > ulp
    assert not bad.any(), f"{what}: {int(bad.sum())} entries beyond 1/2 bf16 ulp, first at {bad.nonzero()[0].tolist()}"
    return ulp


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_accumulates_in_fp32(backend):
    # bf16, 96 tokens in one-token forward chunks, so the backward walks 31 one-entry vocabulary slices
    # (kernels/_linear.py). Given the bf16 logits gradient dl (the unfused op's too), dl.T @ h and dl @ W
    # summed in float64 and rounded once are the best a bf16 output can be. grad_weight (one GEMM per
    # slice over all tokens) and grad_hidden (fp32 across the 31 slices) must both stay within half a
    # bf16 ulp of that; a bf16 accumulator does not (checked, so the test can tell them apart).
    N, H, V = 96, 16, 31
    dev = device_for(backend)
    hidden, _, weight, _ = make_linear((N,), H, V, torch.bfloat16, seed=9)
    labels = make_labels((N,), V, seed=10, n_ignored=0)
    _, grads = _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=1, backend=backend,
                    weight_grad=True, entropy=False, device=dev)  # fmt: skip
    x = F.linear(on(dev, hidden), on(dev, weight)).detach().requires_grad_()
    (kernels.logprobs(x, on(dev, labels), backend=backend) * on(dev, upstream((N,), 0)).float()).sum().backward()
    dl = x.grad.cpu()  # [N, V] bf16
    grads = [g.cpu() for g in grads]
    best_w = dl.double().t() @ hidden.double()  # [V, H]
    best_h = dl.double() @ weight.double()  # [N, H]
    ulp_w = _within_half_ulp(grads[1], best_w, "grad_weight")
    ulp_h = _within_half_ulp(grads[0], best_h, "grad_hidden")
    assert int(((_bf16_accumulated(dl.t(), hidden).double() - best_w).abs() > ulp_w).sum()) > V * H // 10
    assert int(((_bf16_accumulated(dl, weight).double() - best_h).abs() > ulp_h).sum()) > N * H // 10
    # and against float64 end to end, the fused op is as good as the unfused composition (relative norm)
    _, rgrads = _ref64(hidden, weight, None, labels, weight_grad=True, entropy=False)

    def unfused(h, w, lab, *, bias, entropy):
        return kernels.logprobs(F.linear(h, w, bias), lab, backend=backend)

    _, ugrads = _run(unfused, hidden, weight, None, labels, weight_grad=True, entropy=False, device=dev)
    for i, name in ((0, "grad_hidden"), (1, "grad_weight")):
        rel = lambda a: ((a.cpu().double() - rgrads[i]).norm() / rgrads[i].norm()).item()  # noqa: E731
        assert rel(grads[i]) <= 1.05 * rel(ugrads[i]), (name, rel(grads[i]), rel(ugrads[i]))


class _LargestTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (shape, dtype, op) of every tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.seen.append((tuple(t.shape), t.dtype, str(func)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True])
def test_no_full_logits_and_no_fp32_weight_accumulator(backend, weight_grad):
    # N = 40 tokens, V = 50, H = 16, 8-token chunks: no tensor with a vocabulary dim may exceed the
    # 8 x 50 chunk (or the 40 x 10 backward slice), except the [V, H] weight (or its transpose view) and
    # its bf16 gradient; and
    # no fp32 tensor is as large as the weight (no fp32 [V, H] accumulator).
    N, H, V = 40, 16, 50
    hidden, _, weight, _ = make_linear((N,), H, V, torch.bfloat16, seed=19)
    labels = make_labels((N,), V, seed=20, n_ignored=0)
    with _LargestTensors() as mode:
        _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=8, backend=backend,
             weight_grad=weight_grad, entropy=True, device=device_for(backend))  # fmt: skip
    floats = [s for s in mode.seen if s[1].is_floating_point]
    numel = lambda shape: int(torch.tensor(shape).prod()) if shape else 1  # noqa: E731
    vocab_sized = [s for s in floats if V in s[0] and numel(s[0]) > 8 * V and s[0] not in ((V, H), (H, V))]
    assert not vocab_sized, vocab_sized[:5]
    assert any(V in s[0] and numel(s[0]) == 8 * V for s in floats), "the chunk itself should be seen"
    fp32_big = [s for s in floats if s[1] == torch.float32 and numel(s[0]) >= V * H]
    assert not fp32_big, fp32_big[:5]


@pytest.mark.parametrize(
    "entropy, weight_grad, gemms",
    [(False, False, 2), (True, False, 3), (False, True, 4), (True, True, 4)],
)
def test_gemm_count(entropy, weight_grad, gemms):
    # Total matmul flops fwd+bwd = gemms * 2 M H V over the M = 8 non-ignored tokens (module docstring
    # of kernels/_linear.py); the 4 ignored tokens cost none.
    N, H, V = 12, 16, 40
    hidden, _, weight, _ = make_linear((N,), H, V, torch.float32, seed=11)
    labels = make_labels((N,), V, seed=12, n_ignored=4)
    with FlopCounterMode(display=False) as counter:
        _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=3, backend="cpp",
             weight_grad=weight_grad, entropy=entropy)  # fmt: skip
    assert counter.get_total_flops() == gemms * 2 * 8 * H * V


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_zero_and_all_ignored(backend):
    hidden, _, weight, b = make_linear((7,), 9, 23, torch.float32, seed=13, bias=True)
    labels = make_labels((7,), 23, seed=14, n_ignored=3, ignore_index=-1)
    dev = device_for(backend)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, ignore_index=-1, backend=backend,
                       weight_grad=True, entropy=True, device=dev)  # fmt: skip
    ignored = on(dev, labels == -1)
    assert all((o[ignored] == 0).all() for o in outs) and (grads[0][ignored] == 0).all()
    labels = torch.full((7,), -100)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, backend=backend, weight_grad=True,
                       entropy=True, device=dev)  # fmt: skip
    assert all(torch.equal(t, torch.zeros_like(t)) for t in list(outs) + grads)


def test_float64_runs_the_reference():
    hidden, _, weight, _ = make_linear((4,), 8, 19, torch.float64, seed=15)
    labels = make_labels((4,), 19, seed=16, n_ignored=0)
    assert kernels.linear_logprobs(hidden, weight, labels, backend="cpp").dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "expanded", "int32-strided"])
def test_strided_expanded_and_int32_labels(backend, kind):
    # Labels as a strided column, expanded (stride 0) or int32 (and strided): made [N] contiguous once
    # in the forward; with no ignored token the vocabulary-slice backward uses them in place.
    hidden, _, weight, b = make_linear((3, 4), 9, 29, torch.float32, seed=21, bias=True)
    table = make_labels((3, 4, 2), 29, seed=21, n_ignored=0)
    labels = {"strided": table[..., 1], "expanded": torch.tensor([17]).expand(3, 4),
              "int32-strided": table.int()[..., 0]}[kind]  # fmt: skip
    kw = dict(weight_grad=True, entropy=True, temperature=1.1)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=5, backend=backend,
                       device=device_for(backend), **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, weight, b, labels, **kw)
    for name, o, r in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), list(outs) + grads,
                          list(routs) + rgrads):  # fmt: skip
        close(o, r, 1e-5, 1e-5, name)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_int32_labels_and_ignore_index_beyond_int32(backend):
    # ignore_index = 2^32 + 4 compared in int32 would wrap to 4 and drop every label-4 token.
    dev = device_for(backend)
    hidden, _, weight, _ = make_linear((4,), 8, 19, torch.float32, seed=22)
    labels = torch.tensor([4, 1, 4, 2])
    want = linear_logprobs_ref(hidden.double(), weight.double(), labels)
    got = kernels.linear_logprobs(on(dev, hidden), on(dev, weight), on(dev, labels.int()), ignore_index=2**32 + 4,
                                  backend=backend)  # fmt: skip
    close(got, want, 1e-5, 1e-5, "logp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_row_propagates(backend):
    # A NaN in one token's hidden state makes its logits row NaN: that token's logp, entropy and
    # grad_hidden are NaN, as in the reference; the other tokens are unaffected (frozen weight).
    hidden, _, weight, _ = make_linear((5,), 8, 37, torch.float32, seed=23)
    hidden[2, 3] = float("nan")
    labels = make_labels((5,), 37, seed=23, n_ignored=0)
    kw = dict(weight_grad=False, entropy=True)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=2, backend=backend,
                       device=device_for(backend), **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, weight, None, labels, **kw)
    for name, o, r in zip(("logp", "entropy", "grad_hidden"), list(outs) + grads, list(routs) + rgrads):
        assert_close(o, r, atol=1e-5, rtol=1e-5, name=name, equal_nan=True)
    assert torch.isnan(outs[0][2]) and torch.isfinite(outs[0][[0, 1, 3, 4]]).all()


# --------------------------------------------------------------------------------------------------
# Autograd contract: first order only on the kernel backends, gradients to hidden / weight / bias
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["precomputed", "token-chunks", "vocab-slices"])
def test_double_backward_raises_first_order_still_right(backend, path):
    # The three backward paths of kernels/_linear.py: frozen weight with logp only (grad_hidden from
    # the forward), frozen weight with entropy (token chunks), weight gradient (vocabulary slices).
    dev = device_for(backend)
    hidden, _, weight, b = make_linear((6,), 8, 23, torch.float32, seed=24, bias=True)
    labels = make_labels((6,), 23, seed=24)
    entropy, weight_grad = {"precomputed": (False, False), "token-chunks": (True, False),
                            "vocab-slices": (True, True)}[path]  # fmt: skip
    h = on(dev, hidden).requires_grad_()
    w = on(dev, weight).requires_grad_(weight_grad)
    bb = on(dev, b).requires_grad_(weight_grad)
    out = kernels.linear_logprobs(h, w, on(dev, labels), bias=bb, entropy=entropy, chunk_size=4, backend=backend)
    loss = sum(o.sum() for o in (out if entropy else (out,)))
    inputs = [h, w, bb] if weight_grad else [h]
    grads = second_backward_raises(loss, inputs, "linear_logprobs/linear_token_stats", backend)

    def fn(hh, ww, lab, *, bias, entropy):
        return linear_logprobs_ref(hh, ww, lab, bias, entropy=entropy)

    hr, wr, br = (t.double().requires_grad_(weight_grad or t is hidden) for t in (hidden, weight, b))
    rout = fn(hr, wr, labels, bias=br, entropy=entropy)
    rgrads = torch.autograd.grad(sum(o.sum() for o in (rout if entropy else (rout,))), [hr, wr, br][: len(inputs)])
    for name, g, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        close(g, r, 1e-5, 1e-5, f"{name} under create_graph=True")


def test_torch_backend_supports_double_backward():
    hidden, _, weight, b = make_linear((2,), 3, 5, torch.float64, seed=25, bias=True)
    labels = make_labels((2,), 5, seed=25, n_ignored=0)
    inputs = tuple(t.requires_grad_() for t in (hidden, weight, b))

    def fn(h, w, bb):
        return sum(o.sum() for o in kernels.linear_logprobs(h, w, labels, bias=bb, entropy=True, backend="torch"))

    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_gradients_to_hidden_weight_and_bias(backend):
    # The gradient rule (kernels/_autograd.py): hidden, weight and bias are the policy side; every float
    # input that requires grad gets one, and it is the reference's.
    dev = device_for(backend)
    hidden, _, weight, b = make_linear((2, 3), 8, 19, torch.float32, seed=26, bias=True)
    labels = make_labels((2, 3), 19, seed=26)
    kw = dict(weight_grad=True, entropy=True)
    _, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, backend=backend, device=dev, **kw)
    _, rgrads = _ref64(hidden, weight, b, labels, **kw)
    assert len(grads) == 3 and all(g is not None for g in grads)
    for name, g, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        close(g, r, 1e-5, 1e-5, name)


# --------------------------------------------------------------------------------------------------
# Vocabulary slices of the weight-gradient backward: widths that keep row strides 16-byte aligned
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [128256, 151936])
@pytest.mark.parametrize("chunk, M", [(523, 8192), (436, 8192), (1024, 16384), (261, 3001), (3, 40)])
def test_vocab_slice_width_is_a_multiple_of_128(V, chunk, M):
    # Unrounded, Vs = chunk * V // M is 8188 at (V, C, M) = (128256, 523, 8192): bf16 rows of 16376
    # bytes, 8-byte aligned only. Rounded down to 128 (a 256-byte bf16 row), never above a forward
    # chunk's element count (the memory bound), and the last slice V mod Vs is a multiple of 128 too.
    vs = vocab_slice(chunk, V, M)
    assert vs % 128 == 0 and 128 <= vs <= V, vs
    assert vs <= max(128, chunk * V // M)
    assert (V % vs) % 128 == 0
    assert vocab_slice(chunk, 100, M) <= 100 and vocab_slice(10**6, 1000, 1) == 1000


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_slices_have_aligned_rows_end_to_end(backend, monkeypatch):
    # V = 2560 = 20 x 128, M = 12 tokens, 1-token chunks: unrounded slices would be 213 wide (bf16 rows
    # of 426 bytes, not a multiple of 16); every [M, Vs] slice the row kernels get must have a row
    # stride that is a multiple of 128 elements, and the gradients stay the reference's.
    seen = []
    real = linear.vocab_bwd

    def recording(backend_, x3, *args, **kwargs):
        seen.append((x3.shape[-1], x3.stride(1), x3.element_size()))
        return real(backend_, x3, *args, **kwargs)

    monkeypatch.setattr(linear, "vocab_bwd", recording)
    hidden, _, weight, _ = make_linear((12,), 8, 2560, torch.bfloat16, seed=27)
    labels = make_labels((12,), 2560, seed=27, n_ignored=0)
    kw = dict(weight_grad=True, entropy=False)
    _, grads = _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=1, backend=backend,
                    device=device_for(backend), **kw)  # fmt: skip
    assert len(seen) == 20 and all(w == 128 and st % 128 == 0 and st * es % 16 == 0 for w, st, es in seen), seen
    _, rgrads = _ref64(hidden, weight, None, labels, **kw)
    check_grads(grads, rgrads, torch.bfloat16, 0, 0, names=("grad_hidden", "grad_weight"))


# --------------------------------------------------------------------------------------------------
# The fp32-output GEMM of the slice backward: a cached probe decides, real errors propagate
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def probe_on_cpu(monkeypatch):
    """A fresh probe cache, and CPU treated like CUDA by _accumulate_f32 (CPU torch has no
    addmm.dtype_out kernel: the real probe finds it unsupported)."""
    monkeypatch.setattr(linear, "_FP32_OUT_GEMM", {})
    monkeypatch.setattr(linear, "_FP32_OUT_DEVICES", ("cpu",))


def _gemm_operands(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(28)
    a, b = torch.randn(5, 7, generator=g).to(dtype), torch.randn(7, 3, generator=g).to(dtype)
    acc = torch.randn(5, 3, generator=g)
    return acc, a, b, acc.double() + a.double() @ b.double()


def test_fp32_out_gemm_unsupported_warns_once_and_upcasts(probe_on_cpu):
    acc, a, b, want = _gemm_operands()
    with pytest.warns(RuntimeWarning, match="no fp32-output torch.bfloat16 GEMM on cpu"):
        linear._accumulate_f32(acc, a, b)
    close(acc, want, 1e-5, 1e-5, "upcast path")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the probe result is cached
        linear._accumulate_f32(acc, a, b)
    assert linear._FP32_OUT_GEMM == {(torch.device("cpu"), torch.bfloat16): False}


def test_fp32_out_gemm_probed_once_per_device_and_dtype(probe_on_cpu, monkeypatch):
    calls = []

    def fp32_out(acc, a, b):  # a build whose GEMM can write fp32 from 16-bit inputs
        calls.append((a.dtype, tuple(a.shape)))
        acc.add_(a.double().mm(b.double()).float())

    monkeypatch.setattr(linear, "_addmm_fp32_out", fp32_out)
    for dtype in (torch.bfloat16, torch.bfloat16, torch.float16):
        acc, a, b, want = _gemm_operands(dtype)
        linear._accumulate_f32(acc, a, b)
        close(acc, want, 1e-5, 1e-5, f"fp32-output path {dtype}")
    probes = [c for c in calls if c[1] == (8, 8)]
    assert probes == [(torch.bfloat16, (8, 8)), (torch.float16, (8, 8))] and len(calls) == 5


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory (simulated)"), RuntimeError("CUBLAS_STATUS_ERROR (simulated)")],
    ids=["oom", "other"],
)
def test_fp32_out_gemm_errors_of_the_real_call_propagate(probe_on_cpu, monkeypatch, error):
    # Before: any RuntimeError of the real call (an out-of-memory one too) was swallowed and switched
    # every later call to the upcast path for good.
    def fp32_out(acc, a, b):
        if a.shape != (8, 8):  # the probe succeeds; the real call fails
            raise error
        acc.add_(a.float() @ b.float())

    monkeypatch.setattr(linear, "_addmm_fp32_out", fp32_out)
    acc, a, b, _ = _gemm_operands()
    with pytest.raises(type(error), match="simulated"):
        linear._accumulate_f32(acc, a, b)
    assert linear._FP32_OUT_GEMM == {(torch.device("cpu"), torch.bfloat16): True}  # still the fast path


def test_fp32_out_gemm_probe_out_of_memory_propagates(probe_on_cpu, monkeypatch):
    def fp32_out(acc, a, b):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(linear, "_addmm_fp32_out", fp32_out)
    acc, a, b, _ = _gemm_operands()
    with pytest.raises(torch.OutOfMemoryError):
        linear._accumulate_f32(acc, a, b)
    assert linear._FP32_OUT_GEMM == {}  # nothing learned from an out-of-memory probe


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda h, w, b, l: (h, w[0], b, l), "at least 2 dims"),
        (lambda h, w, b, l: (h, w[:, :-1], b, l), "H ="),
        (lambda h, w, b, l: (h, w.half(), b, l), "dtype"),
        (lambda h, w, b, l: (h, w, b[:-1], l), "bias"),
        (lambda h, w, b, l: (h, w, b, l[:-1]), "leading shape"),
        (lambda h, w, b, l: (h, w, b, torch.full_like(l, 19)), "outside"),
        (lambda h, w, b, l: (h.long(), w, b, l), "float"),
    ],
)
def test_bad_inputs(make, match):
    hidden, _, weight, b = make_linear((4,), 8, 19, torch.float32, seed=17, bias=True)
    labels = make_labels((4,), 19)
    h, w, bb, lab = make(hidden, weight, b, labels)
    with pytest.raises(ValueError, match=match):
        kernels.linear_logprobs(h, w, lab, bias=bb)


def test_bad_chunk_temperature_backend():
    hidden, _, weight, _ = make_linear((4,), 8, 19, torch.float32)
    labels = make_labels((4,), 19)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            kernels.linear_logprobs(hidden, weight, labels, chunk_size=bad)
    for t in (0.0, 9e-4, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0.001"):
            kernels.linear_logprobs(hidden, weight, labels, temperature=t)
    with pytest.raises(ValueError, match="linear_logprobs: .*cuda"):
        kernels.linear_logprobs(hidden, weight, labels, backend="cuda")
    assert "cuda" not in kernels.linear_logprobs.__doc__.replace("CUDA", "")


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_vocabulary_is_a_value_error(backend):
    dev = device_for(backend)
    hidden, weight = torch.zeros(3, 4, device=dev), torch.zeros(0, 4, device=dev)
    with pytest.raises(ValueError, match=r"weight: the vocabulary is empty \(V = 0\)"):
        kernels.linear_logprobs(hidden, weight, torch.full((3,), -100, device=dev), backend=backend)


# --------------------------------------------------------------------------------------------------
# GPU (run where a CUDA device exists)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("V", [128256, 151936])
def test_gpu_full_size(V):
    # H = 4096, 256 tokens, bf16, several 64-token chunks, weight gradient; float64 reference on GPU.
    hidden, _, weight, _ = make_linear((256,), 4096, V, torch.bfloat16, seed=V)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), make_labels((256,), V, seed=1).cuda()
    kw = dict(weight_grad=True, entropy=True)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=64, backend="triton", **kw)
    routs, rgrads = _ref64(hidden, weight, None, labels, **kw)
    for name, o, r in zip(("logp", "entropy"), outs, routs):
        close(o, r, 3e-2, 2e-2, name)
    check_grads(grads, rgrads, torch.bfloat16, 0, 0, names=("grad_hidden", "grad_weight"))


def _ref64_token_chunks(hidden, weight, labels, gs, chunk):
    """float64 linear_logprobs_ref(entropy=True) and its gradients under upstream gradients gs, one
    token chunk at a time on the inputs' device (a [M, V] float64 logits tensor would be 8 GiB at
    M = 8192, V = 128256; per chunk of 512 it is 0.5 GiB)."""
    w = weight.double().requires_grad_()
    outs, grad_h = [[], []], []
    for c0 in range(0, hidden.shape[0], chunk):
        h = hidden[c0 : c0 + chunk].double().requires_grad_()
        logp, ent = linear_logprobs_ref(h, w, labels[c0 : c0 + chunk], entropy=True)
        ((logp * gs[0][c0 : c0 + chunk]).sum() + (ent * gs[1][c0 : c0 + chunk]).sum()).backward()
        outs[0].append(logp.detach())
        outs[1].append(ent.detach())
        grad_h.append(h.grad)
    return [torch.cat(o) for o in outs], [torch.cat(grad_h), w.grad]


@pytest.mark.cuda
def test_gpu_default_chunk_large_m():
    # The default chunk (128 MiB of [C, V] bf16 logits: C = 523 at V = 128256) with N = 8192 tokens, M =
    # 8092 of them not ignored (H = 4096), and a weight gradient: 16 forward chunks, 128-aligned
    # vocabulary slices of all M tokens in the backward (Vs = 8192, unrounded 8289), fp32 grad_hidden
    # across 16 slices.
    M, H, V = 8192, 4096, 128256
    hidden, _, weight, _ = make_linear((M,), H, V, torch.bfloat16, seed=29)
    labels = make_labels((M,), V, seed=29, n_ignored=100)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    assert linear.default_chunk(V, torch.bfloat16) == 523 and vocab_slice(523, V, M - 100) == 8192
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = kernels.linear_logprobs(h, w, labels, entropy=True, backend="triton")
    gs = [upstream((M,), k).cuda() for k in range(2)]
    ((logp * gs[0]).sum() + (ent * gs[1]).sum()).backward()
    (rlogp, rent), (rgh, rgw) = _ref64_token_chunks(hidden, weight, labels, gs, 512)
    close(logp, rlogp, 3e-2, 2e-2, "logp")
    close(ent, rent, 3e-2, 2e-2, "entropy")
    assert_rel_norm(h.grad, rgh, bound=grad_rel_bound(torch.bfloat16), name="grad_hidden")
    assert_rel_norm(w.grad, rgw, bound=grad_rel_bound(torch.bfloat16), name="grad_weight")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_non_default_device():
    # cuda:1 tensors while cuda:0 is current: every launch, GEMM and probe on cuda:1.
    hidden, _, weight, b = make_linear((2, 37), 64, 3000, torch.bfloat16, seed=30, bias=True)
    labels = make_labels((2, 37), 3000, seed=30, n_ignored=5)
    kw = dict(weight_grad=True, entropy=True)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=16, backend="triton",
                       device=torch.device("cuda:1"), **kw)  # fmt: skip
    routs, rgrads = _ref64(hidden, weight, b, labels, **kw)
    assert all(g.device == torch.device("cuda:1") for g in grads)
    for name, o, r in zip(("logp", "entropy"), outs, routs):
        close(o, r, 3e-2, 2e-2, name)
    check_grads(grads, rgrads, torch.bfloat16, 0, 0)

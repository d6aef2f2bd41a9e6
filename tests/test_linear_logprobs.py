"""kernels.linear_logprobs: against the float64 unfused composition, against the same-dtype unfused
composition, its GEMM count, fp32 weight-gradient accumulation, ignored tokens, bad input."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import rlhf_kernels as kernels
from rlhf_kernels.linear_logprobs import linear_logprobs_ref
from _vocab_cases import BACKENDS, close, make_labels, make_linear, upstream

# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

# (dtype, atol, rtol) against float64 on the same rounded inputs. The fused op, like the unfused one,
# rounds the [C, V] logits and the gradients to the input dtype: logits of scale ~3 carry ~3 * 2^-9
# = 6e-3 absolute in bf16 and 3 * 2^-12 = 7e-4 in fp16, and logp/entropy inherit it; fp32 stays fp32.
LIN_DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 3e-2, 2e-2, id="bf16"),
    pytest.param(torch.float16, 4e-3, 4e-3, id="fp16"),
]


def _run(fn, hidden, weight, bias, labels, *, weight_grad, entropy, seed=0, **kw):
    """-> (outputs, grads) with grads for hidden, and weight/bias when weight_grad."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight_grad)
    b = None if bias is None else bias.detach().clone().requires_grad_(weight_grad)
    out = fn(h, w, labels, bias=b, entropy=entropy, **kw)
    outs = out if entropy else (out,)
    loss = sum((o * upstream(o.shape, seed + k).to(o.dtype)).sum() for k, o in enumerate(outs))
    loss.backward()
    grads = [h.grad] + ([w.grad] + ([b.grad] if b is not None else []) if weight_grad else [])
    return outs, grads


def _ref64(hidden, weight, bias, labels, **kw):
    def fn(h, w, lab, *, bias, entropy, temperature=1.0, ignore_index=-100):
        return linear_logprobs_ref(h, w, lab, bias, temperature, ignore_index, entropy)

    d = lambda t: None if t is None else t.double()  # noqa: E731
    return _run(fn, d(hidden), d(weight), d(bias), labels, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, atol, rtol", LIN_DTYPES)
@pytest.mark.parametrize("entropy, weight_grad, bias", [(False, False, False), (True, False, True), (False, True, True),
                                                        (True, True, False)])  # fmt: skip
def test_matches_float64_reference(backend, dtype, atol, rtol, entropy, weight_grad, bias):
    # N = 11 tokens (one ignored), H = 13, V = 67 (primes), 4-token chunks, T = 0.8.
    hidden, _, weight, b = make_linear((11,), 13, 67, dtype, seed=1, bias=bias)
    labels = make_labels((11,), 67, seed=2)
    kw = dict(weight_grad=weight_grad, entropy=entropy, temperature=0.8)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=4, backend=backend, **kw)
    routs, rgrads = _ref64(hidden, weight, b, labels, **kw)
    for name, o, r in zip(("logp", "entropy"), outs, routs):
        assert o.dtype == torch.float32
        close(o, r, atol, rtol, name)
    for name, g, r in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        assert g.dtype == dtype
        close(g, r, atol, rtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_unfused_composition(backend, dtype):
    # Same dtype, same kernels: the fused op must reproduce logprobs(F.linear(...)) up to GEMM blocking
    # (per-row GEMM results may differ by an ulp of the logits between [C, H] and [N, H] calls) and the
    # final cast of the fp32-accumulated weight gradient (the unfused one rounds once too).
    hidden, _, weight, b = make_linear((2, 5), 17, 41, dtype, seed=3, bias=True)
    labels = make_labels((2, 5), 41, seed=4)

    def unfused(h, w, lab, *, bias, entropy):
        return kernels.logprobs(F.linear(h, w, bias), lab, entropy=entropy, backend=backend)

    kw = dict(weight_grad=True, entropy=True)
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
    hidden, _, weight, b = make_linear((3, 5), 11, 53, torch.float32, seed=5, masked=True)
    big = torch.zeros(3, 6, 11)
    big[:, :-1] = hidden
    hidden = big[:, :-1]
    weight = weight.t().contiguous().t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    labels = make_labels((3, 5), 50, seed=6)
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
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, chunk_size=4, backend=backend, **kw)
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
    hidden, _, weight, _ = make_linear((N,), H, V, torch.bfloat16, seed=9)
    labels = make_labels((N,), V, seed=10, n_ignored=0)
    _, grads = _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=1, backend=backend,
                    weight_grad=True, entropy=False)  # fmt: skip
    x = F.linear(hidden, weight).detach().requires_grad_()
    (kernels.logprobs(x, labels, backend=backend) * upstream((N,), 0).float()).sum().backward()
    dl = x.grad  # [N, V] bf16
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

    _, ugrads = _run(unfused, hidden, weight, None, labels, weight_grad=True, entropy=False)
    for i, name in ((0, "grad_hidden"), (1, "grad_weight")):
        rel = lambda a: ((a.double() - rgrads[i]).norm() / rgrads[i].norm()).item()  # noqa: E731
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
             weight_grad=weight_grad, entropy=True)  # fmt: skip
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
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, ignore_index=-1, backend=backend,
                       weight_grad=True, entropy=True)  # fmt: skip
    ignored = labels == -1
    assert all((o[ignored] == 0).all() for o in outs) and (grads[0][ignored] == 0).all()
    labels = torch.full((7,), -100)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, b, labels, backend=backend, weight_grad=True,
                       entropy=True)  # fmt: skip
    assert all(torch.equal(t, torch.zeros_like(t)) for t in list(outs) + grads)


def test_torch_backend_and_float64():
    hidden, _, weight, _ = make_linear((4,), 8, 19, torch.float32, seed=15)
    labels = make_labels((4,), 19, seed=16, n_ignored=0)
    close(kernels.linear_logprobs(hidden, weight, labels, backend="torch"),
          kernels.linear_logprobs(hidden, weight, labels), 1e-5, 1e-5, "torch vs auto")  # fmt: skip
    assert kernels.linear_logprobs(hidden.double(), weight.double(), labels).dtype == torch.float64


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
    with pytest.raises(ValueError, match="temperature"):
        kernels.linear_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="linear_logprobs: .*cuda"):
        kernels.linear_logprobs(hidden, weight, labels, backend="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("V", [128256, 151936])
def test_gpu_full_size(V):
    # H = 4096, 256 tokens, bf16, several 64-token chunks, weight gradient; float64 reference on GPU.
    hidden, _, weight, _ = make_linear((256,), 4096, V, torch.bfloat16, seed=V)
    labels = make_labels((256,), V, seed=1)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    kw = dict(weight_grad=True, entropy=True)
    outs, grads = _run(kernels.linear_logprobs, hidden, weight, None, labels, chunk_size=64, backend="triton", **kw)
    routs, rgrads = _ref64(hidden, weight, None, labels, **kw)
    for name, o, r in zip(("logp", "entropy", "grad_hidden", "grad_weight"), list(outs) + grads, list(routs) + rgrads):
        close(o, r, 3e-2, 2e-2, name)

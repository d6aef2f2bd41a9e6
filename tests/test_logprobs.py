"""kernels.logprobs against the float64 reference, on every backend that runs here.

Letters: N tokens, B batch, T time, V vocabulary. Outputs are fp32 whatever the input dtype, so the
forward tolerance is fp32's; the gradient is stored in the input dtype, so its tolerance adds one
rounding of that dtype.
"""

import pytest
import torch
from util import EPS32, assert_close, cpu_backends

import rlhf_kernels as kernels
from rlhf_kernels.logprobs import IMPLEMENTED, logprobs_ref

BACKENDS = cpu_backends(IMPLEMENTED)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(lead, V, dtype, *, seed=0, scale=3.0, extremes=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, V, generator=g) * scale
    if extremes and V >= 4:
        flat = x.view(-1, V)
        flat[0, 1] = float("-inf")  # masked vocabulary entry
        flat[-1, :2] = 1e4  # huge logits: tests the running max and the entropy's cancellation
        flat[-1, 2] = -1e4
    return x.to(dtype)


def make_labels(lead, V, *, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, lead, generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return labels


def forward_tol(x, temperature):
    # fp32 rounds x / T itself to EPS32 * |x / T|; logp = x/T - lse subtracts two such values and lse
    # sums V terms, so a few ulps of the largest |x / T| (at least of 1) bound the error.
    finite = x[torch.isfinite(x)].double()
    scale = max(1.0, finite.abs().max().item() / temperature) if finite.numel() else 1.0
    return 16 * EPS32 * scale


def run_case(backend, x, labels, *, temperature=1.0, entropy=True, seed=0):
    """Forward and backward under random upstream gradients, vs the float64 reference."""
    xk = x.detach().clone().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out = kernels.logprobs(xk, labels, temperature=temperature, entropy=entropy, backend=backend)
    ref = logprobs_ref(xr, labels, temperature, -100, entropy)
    out = out if entropy else (out,)
    ref = ref if entropy else (ref,)
    tol = forward_tol(x, temperature)
    for name, o, r in zip(("logp", "entropy"), out, ref):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        assert_close(o, r, atol=tol, rtol=8 * EPS32, name=f"{backend} {name}")
    g = torch.Generator().manual_seed(seed + 2)
    grads = [torch.randn(labels.shape, generator=g) for _ in out]
    torch.autograd.backward(out, grads)
    torch.autograd.backward(ref, [gr.double() for gr in grads])
    assert xk.grad.dtype == x.dtype and xk.grad.shape == x.shape
    # the gradient is rounded once to the logits' dtype on top of the fp32 error (scaled by 1/T)
    gmax = xr.grad.abs().max().item()
    assert_close(xk.grad, xr.grad, atol=tol / temperature + torch.finfo(x.dtype).eps * gmax, name=f"{backend} grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 2, 17, 1000, 32000])
def test_vocab_sizes_and_dtypes(backend, dtype, V):
    lead = (5,) if V >= 1000 else (7,)
    run_case(backend, make_logits(lead, V, dtype, seed=V), make_labels(lead, V, seed=V), seed=V)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_time_noncontiguous_extremes_temperature(backend, dtype):
    # (B, T+1, V) sliced to [:, :-1]: the shifted-logits view PPO uses, not expressible as one [N, V] stride
    full = make_logits((3, 6), 97, dtype, seed=1, extremes=True)
    x = full[:, :-1]
    assert not x.is_contiguous()
    labels = make_labels((3, 5), 97, seed=1, ignore_every=4)
    labels[0, 0] = 1  # the label sits on the -inf logit: logp must be -inf
    run_case(backend, x, labels, temperature=0.7, seed=1)
    out = kernels.logprobs(x, labels, backend=backend)
    assert out[0, 0].item() == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_vocab_and_permuted_leading_dims(backend):
    # vocab stride != 1 and leading dims that cannot be merged into one stride
    base = make_logits((4, 3, 2 * 31), 1, torch.float32, seed=2).squeeze(-1)
    x = base[..., ::2].transpose(0, 1)  # (3, 4, 31), strides (62, 186, 2)
    labels = make_labels((3, 4), 31, seed=2)
    run_case(backend, x, labels, temperature=1.3, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_gives_zero_and_no_gradient(backend):
    x = make_logits((6,), 50, torch.float32, seed=3).requires_grad_(True)
    labels = make_labels((6,), 50, seed=3)
    labels[[1, 4]] = -100
    logp, ent = kernels.logprobs(x, labels, entropy=True, backend=backend)
    assert logp[[1, 4]].eq(0).all() and ent[[1, 4]].eq(0).all()
    (logp.sum() + ent.sum()).backward()
    assert x.grad[[1, 4]].eq(0).all()
    assert x.grad[[0, 2, 3, 5]].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_and_entropy_only_gradients(backend):
    x = make_logits((4,), 33, torch.float32, seed=4)
    labels = make_labels((4,), 33, seed=4)
    run_case(backend, x, labels, entropy=False, seed=4)
    # gradient through the entropy alone (logp unused): d H / d x = -p (log p + H)
    xk = x.clone().requires_grad_(True)
    _, ent = kernels.logprobs(xk, labels, entropy=True, backend=backend)
    ent.sum().backward()
    xd = x.double()
    p = xd.softmax(-1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    assert_close(xk.grad, -p * (p.log() + h), atol=1e-6, name="entropy-only grad")


def test_hand_computed_values():
    # logits [0, ln 3] -> p = [1/4, 3/4]; label 1: logp = ln(3/4);
    # entropy = -(1/4 ln 1/4 + 3/4 ln 3/4); d logp/d x = onehot - p = [-1/4, 1/4]
    import math

    x = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    for backend in BACKENDS:
        x.grad = None
        logp, ent = kernels.logprobs(x, torch.tensor([1]), entropy=True, backend=backend)
        assert abs(logp.item() - math.log(0.75)) < 1e-6
        assert abs(ent.item() + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)) < 1e-6
        logp.sum().backward()
        assert torch.allclose(x.grad, torch.tensor([[-0.25, 0.25]]), atol=1e-6)


def test_float64_input_uses_the_reference():
    x = make_logits((3,), 10, torch.float64)
    labels = make_labels((3,), 10)
    assert kernels.logprobs(x, labels).dtype == torch.float64


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (torch.randn(4, 10), torch.zeros(5, dtype=torch.long), "leading shape"),
        (torch.randn(4, 10), torch.zeros(4, 1, dtype=torch.long), "leading shape"),
        (torch.randint(0, 5, (4, 10)), torch.zeros(4, dtype=torch.long), "float32/bfloat16/float16"),
        (torch.randn(4, 10), torch.zeros(4), "int64"),
        (torch.randn(4, 10), torch.tensor([0, 1, 10, 2]), r"outside \[0, 10\).*index \(2,\) = 10"),
        (torch.randn(4, 10), torch.tensor([0, -1, 3, 2]), "outside"),
        (torch.tensor(1.0), torch.tensor(0), "at least 1 dims"),
    ],
)
def test_bad_input_is_a_clear_value_error(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        kernels.logprobs(logits, labels)


def test_bad_temperature_and_backend():
    x, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            kernels.logprobs(x, labels, temperature=t)
    with pytest.raises(ValueError, match="expected one of"):
        kernels.logprobs(x, labels, backend="fast")
    with pytest.raises(ValueError, match="logprobs has no 'cuda' backend"):
        kernels.logprobs(x, labels, backend="cuda")


# --------------------------------------------------------------------------------------------------
# GPU (run where a CUDA device exists)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_llama3_vocab(backend, dtype):
    V = 128256
    x = make_logits((64,), V, dtype, seed=5, extremes=True).cuda()
    labels = make_labels((64,), V, seed=5, ignore_every=7).cuda()
    run_case(backend, x, labels, temperature=0.9, seed=5)


@pytest.mark.cuda
def test_cuda_more_than_2_31_elements():
    # N * V > 2^31: int32 offsets would wrap (Liger #803). Check the last rows against the reference.
    V, N = 128256, 16800
    assert N * V > 2**31
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    xk = x.requires_grad_(True)
    logp, ent = kernels.logprobs(xk, labels, entropy=True, backend="triton")
    (logp.sum() + ent.sum()).backward()
    tail = slice(N - 4, N)
    xr = x[tail].detach().double().requires_grad_(True)
    lr, er = logprobs_ref(xr, labels[tail], entropy=True)
    (lr.sum() + er.sum()).backward()
    tol = forward_tol(x[tail], 1.0)
    assert_close(logp[tail], lr, atol=tol, name="logp tail")
    assert_close(ent[tail], er, atol=tol, name="entropy tail")
    assert_close(xk.grad[tail], xr.grad, atol=tol + 2**-8 * xr.grad.abs().max().item(), name="grad tail")

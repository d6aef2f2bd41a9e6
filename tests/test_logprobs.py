"""kernels.logprobs against the float64 reference, on every kernel backend (Triton compiled on CUDA
where a GPU exists, else under the interpreter; C++ on CPU); the reference itself against hand-derived
values.

Letters: N tokens, B batch, T time, V vocabulary. Outputs are fp32 whatever the input dtype, so the
forward tolerance is fp32's; the gradient is stored in the input dtype, so its tolerance adds one
rounding of that dtype.
"""

import contextlib
import math

import pytest
import torch
from util import EPS32, assert_close, device_for, kernel_backends, on

import rlhf_kernels as kernels
import rlhf_kernels._vocab as vocab
from rlhf_kernels._triton import forced_blocks
from rlhf_kernels.logprobs import IMPLEMENTED, logprobs_ref
from _vocab_cases import (
    MULTI_BLOCK,
    keep_strides,
    multi_block_labels,
    multi_block_pair,
    nan_pair,
    second_backward_raises,
)

BACKENDS = kernel_backends(IMPLEMENTED)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# numpy warns about NaN/inf in masked-off interpreter lanes (-inf - -inf) that tl.where discards.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")


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
    # logp = (x - max) / T - log sum exp((x - max) / T): fp32 rounds (x - max) / T and the log-sum to a
    # few ulps of their size, at most the largest gap |x - max| / T (at least 1).
    finite = x[torch.isfinite(x)].double()
    gap = (finite.max() - finite.min()).item() / temperature if finite.numel() else 1.0
    return 16 * EPS32 * max(1.0, gap)


def run_case(backend, x, labels, *, temperature=1.0, entropy=True, seed=0, ignore_index=-100):
    """Forward and backward under random upstream gradients on backend's device, vs the float64 reference."""
    dev = device_for(backend)
    xk, lk = keep_strides(dev, x, labels)
    xk = xk.detach().requires_grad_(True)
    assert xk.stride() == x.stride() and lk.stride() == labels.stride()
    xr = x.detach().double().requires_grad_(True)
    out = kernels.logprobs(xk, lk, temperature=temperature, ignore_index=ignore_index,
                           entropy=entropy, backend=backend)  # fmt: skip
    ref = logprobs_ref(xr, labels, temperature, ignore_index, entropy)
    out = out if entropy else (out,)
    ref = ref if entropy else (ref,)
    tol = forward_tol(x, temperature)
    for name, o, r in zip(("logp", "entropy"), out, ref):
        assert o.dtype == torch.float32 and o.shape == labels.shape and o.device == dev
        assert_close(o, r, atol=tol, rtol=8 * EPS32, name=f"{backend} {name}")
    g = torch.Generator().manual_seed(seed + 2)
    grads = [torch.randn(labels.shape, generator=g) for _ in out]
    torch.autograd.backward(out, [on(dev, gr) for gr in grads])
    torch.autograd.backward(ref, [gr.double() for gr in grads])
    assert xk.grad.dtype == x.dtype and xk.grad.shape == x.shape
    # the gradient is rounded once to the logits' dtype on top of the fp32 error (scaled by 1/T)
    gmax = xr.grad.abs().max().item()
    assert_close(xk.grad, xr.grad, atol=tol / temperature + torch.finfo(x.dtype).eps * gmax, name=f"{backend} grad")
    return out, xk.grad


# --------------------------------------------------------------------------------------------------
# The reference, anchored by hand
# --------------------------------------------------------------------------------------------------
def test_reference_hand_derived_values_and_gradients():
    # logits [0, ln 3] -> p = [1/4, 3/4]. label 1: logp = ln(3/4).
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = (1/4) ln 4 + (3/4) ln(4/3).
    # d logp / d x = onehot - p = [-1/4, 1/4].
    # d H / d x_v = -p_v (ln p_v + H): [-(1/4)(ln 1/4 + H), -(3/4)(ln 3/4 + H)] (they sum to 0).
    # With T = 2 and logits [0, 2 ln 3], x / T is the same, so the values are the same and every
    # gradient is halved. A -inf entry prepended (masked vocabulary) changes nothing and gets gradient 0;
    # an ignored row gives 0 and gradient 0.
    H = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    dH = [-0.25 * (math.log(0.25) + H), -0.75 * (math.log(0.75) + H)]
    for T, scale in ((1.0, 1.0), (2.0, 2.0)):
        x = torch.tensor([[float("-inf"), 0.0, scale * math.log(3)], [5.0, 1.0, 2.0]], dtype=torch.float64)
        x.requires_grad_(True)
        labels = torch.tensor([2, -100])
        logp, ent = logprobs_ref(x, labels, T, -100, entropy=True)
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        assert_close(logp, f64([math.log(0.75), 0.0]), atol=1e-15, name="logp")
        assert_close(ent, f64([H, 0.0]), atol=1e-15, name="entropy")
        (dlogp,) = torch.autograd.grad(logp.sum(), x, retain_graph=True)
        (dent,) = torch.autograd.grad(ent.sum(), x)
        assert_close(dlogp, f64([[0.0, -0.25 / T, 0.25 / T], [0.0, 0.0, 0.0]]), atol=1e-15, name="dlogp")
        assert_close(dent, f64([[0.0, dH[0] / T, dH[1] / T], [0.0, 0.0, 0.0]]), atol=1e-15, name="dH")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_hand_derived_values(backend):
    # the same hand values as above (fp32): p = [1/4, 3/4], label 1.
    dev = device_for(backend)
    x = torch.tensor([[0.0, math.log(3.0)]], device=dev, requires_grad=True)
    logp, ent = kernels.logprobs(x, torch.tensor([1], device=dev), entropy=True, backend=backend)
    assert_close(logp, torch.tensor([math.log(0.75)]), atol=1e-6, name="logp")
    assert_close(ent, torch.tensor([0.25 * math.log(4) + 0.75 * math.log(4 / 3)]), atol=1e-6, name="entropy")
    logp.sum().backward()
    assert_close(x.grad, torch.tensor([[-0.25, 0.25]]), atol=1e-6, name="grad")


# --------------------------------------------------------------------------------------------------
# Kernels against the float64 reference
# --------------------------------------------------------------------------------------------------
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
    dev = device_for(backend)
    out = kernels.logprobs(keep_strides(dev, x), on(dev, labels), backend=backend)
    assert out[0, 0].item() == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_vocab_and_permuted_leading_dims(backend):
    # vocab stride != 1 and leading dims that cannot be merged into one stride
    base = make_logits((4, 3, 2 * 31), 1, torch.float32, seed=2).squeeze(-1)
    x = base[..., ::2].transpose(0, 1)  # (3, 4, 31), strides (62, 186, 2)
    labels = make_labels((3, 4), 31, seed=2)
    run_case(backend, x, labels, temperature=1.3, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, block", MULTI_BLOCK)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_multi_block_rows(backend, V, block, temperature):
    # Every multi-block path of the row kernels, forward and backward: a fully -inf first block (and
    # C++ chunk), the max in the last block (online-softmax rescaling of every earlier block), the
    # max in the first block, scattered -inf.
    x, _ = multi_block_pair(V, block, seed=V)
    with forced_blocks(row=block):
        run_case(backend, x.float(), multi_block_labels(x), temperature=temperature, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_common_offset_keeps_fp32_precision(backend, temperature):
    # logits = randn * 3 + 1e4: fp32 x / T and lse = max + log(sum) carry the ulp of 1e4 (~1e-3), so
    # forming logp = x / T - lse errs by ~5e-4. (x - max) / T - log(sum) is exact up to the size of
    # logp itself: the tolerance is 16 ulps of max |logp| (~16), not of 1e4, for logp, entropy and the
    # gradient (whose terms p_v and p_v log p_v are O(1)).
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 300, generator=g) * 3 + 1e4
    labels = torch.randint(0, 300, (6,), generator=g)
    dev = device_for(backend)
    xk = on(dev, x).detach().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    out = kernels.logprobs(xk, on(dev, labels), temperature=temperature, entropy=True, backend=backend)
    ref = logprobs_ref(xr, labels, temperature, entropy=True)
    tol = 16 * EPS32 * max(1.0, ref[0].abs().max().item())
    for name, o, r in zip(("logp", "entropy"), out, ref):
        assert_close(o, r, atol=tol, name=f"{name} at offset 1e4, T={temperature}")
    gr = torch.randn(2, 6, generator=g)
    torch.autograd.backward(out, list(on(dev, gr[0], gr[1])))
    torch.autograd.backward(ref, [gr[0].double(), gr[1].double()])
    assert_close(xk.grad, xr.grad, atol=tol / temperature, name="grad at offset 1e4")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, block", [(40, None), (40, 16), (4100, 1024)])
def test_nan_propagates_like_the_reference(backend, V, block):
    # A NaN logit makes its row's logp, entropy and gradient NaN (as torch.log_softmax does): rows 0-2 of
    # _vocab_cases.nan_pair, the NaN in the last block, first, or after a -inf head longer than a block
    # and a C++ chunk; other rows, -inf-masked ones included, are unaffected; an ignored row is never
    # read (NaN padding gives 0).
    x, _ = nan_pair(V, seed=5)
    labels = torch.tensor([1, 2, V - 1, 9, 3])
    dev = device_for(backend)
    with forced_blocks(row=block) if block else contextlib.nullcontext():
        xk = on(dev, x).detach().requires_grad_(True)
        out = kernels.logprobs(xk, on(dev, labels), entropy=True, backend=backend)
        (out[0].sum() + out[1].sum()).backward()
    xr = x.detach().double().requires_grad_(True)
    ref = logprobs_ref(xr, labels, entropy=True)
    (ref[0].sum() + ref[1].sum()).backward()
    assert torch.isnan(ref[0][:3]).all() and torch.isfinite(ref[0][3:]).all()  # the reference's behaviour
    for name, o, r in zip(("logp", "entropy"), out, ref):
        assert_close(o, r, atol=1e-5, rtol=1e-5, name=name, equal_nan=True)
    assert_close(xk.grad, xr.grad, atol=1e-5, name="grad", equal_nan=True)
    assert torch.isnan(xk.grad[:3]).all() and torch.isfinite(xk.grad[3:]).all()
    # NaN in an ignored row (padding): 0, zero gradient, never read
    xk = on(dev, x).detach().requires_grad_(True)
    ignored = on(dev, torch.tensor([-100, -100, V - 1, 9, 3]))
    logp, ent = kernels.logprobs(xk, ignored, entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert (logp[:2] == 0).all() and (ent[:2] == 0).all() and (xk.grad[:2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["strided", "expanded", "int32", "int32-strided"])
def test_strided_expanded_and_int32_labels(backend, kind):
    # The kernels read labels as [N] contiguous: a strided column t[:, 0], an expanded label (stride 0,
    # one element in memory) and int32 labels must all give the reference's values and gradients.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 37, generator=g) * 3
    table = torch.randint(0, 37, (2, 5, 3), generator=g)
    if kind == "strided":
        labels = table[..., 1]
    elif kind == "expanded":
        labels = torch.tensor([23]).expand(2, 5)
    elif kind == "int32":
        labels = table[..., 0].to(torch.int32).contiguous()
    else:
        labels = table.to(torch.int32)[..., 2]
    assert (kind.startswith("int32") or not labels.is_contiguous()) and labels.shape == (2, 5)
    run_case(backend, x, labels, seed=6)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_int32_labels_and_ignore_index_beyond_int32(backend):
    # ignore_index = 2^32 + 5 is not 5: compared in int32 it would wrap and drop every label-5 token.
    dev = device_for(backend)
    x = make_logits((4,), 11, torch.float32, seed=7)
    labels = torch.tensor([5, 1, 5, 2])
    want = logprobs_ref(x.double(), labels, ignore_index=-100)
    got = kernels.logprobs(on(dev, x), on(dev, labels.int()), ignore_index=2**32 + 5, backend=backend)
    assert_close(got, want, atol=1e-6, name="int32 labels, ignore_index 2^32 + 5")
    # and a label equal to the wrapped value (-100 + 2^32 in int32 is -100) is out of range, not ignored
    with pytest.raises(ValueError, match="outside"):
        kernels.logprobs(on(dev, x), on(dev, torch.tensor([-100, 1, 2, 3], dtype=torch.int32)),
                         ignore_index=2**32 - 100, backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_gives_zero_and_no_gradient(backend):
    dev = device_for(backend)
    x = on(dev, make_logits((6,), 50, torch.float32, seed=3)).requires_grad_(True)
    labels = make_labels((6,), 50, seed=3)
    labels[[1, 4]] = -100
    logp, ent = kernels.logprobs(x, on(dev, labels), entropy=True, backend=backend)
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
    dev = device_for(backend)
    xk = on(dev, x).detach().requires_grad_(True)
    _, ent = kernels.logprobs(xk, on(dev, labels), entropy=True, backend=backend)
    ent.sum().backward()
    xd = x.double()
    p = xd.softmax(-1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    assert_close(xk.grad, -p * (p.log() + h), atol=1e-6, name="entropy-only grad")


# --------------------------------------------------------------------------------------------------
# Autograd contract: first order only on the kernel backends, gradients to logits only
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_first_order_still_right(backend):
    dev = device_for(backend)
    x = make_logits((3,), 13, torch.float32, seed=8)
    labels = make_labels((3,), 13, seed=8)
    xk = on(dev, x).detach().requires_grad_(True)
    logp, ent = kernels.logprobs(xk, on(dev, labels), entropy=True, backend=backend)
    (grad,) = second_backward_raises((logp + 0.5 * ent).sum(), [xk], "logprobs", backend)
    xr = x.detach().double().requires_grad_(True)
    lr, er = logprobs_ref(xr, labels, entropy=True)
    (want,) = torch.autograd.grad((lr + 0.5 * er).sum(), xr)
    assert_close(grad, want, atol=1e-6, name="first-order grad under create_graph=True")


def test_torch_backend_supports_double_backward():
    x = make_logits((3,), 7, torch.float64, seed=9).requires_grad_(True)
    labels = make_labels((3,), 7, seed=9)

    def fn(t):
        return sum(o.sum() for o in kernels.logprobs(t, labels, entropy=True, temperature=0.8, backend="torch"))

    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_gradient_only_to_logits(backend):
    # The gradient rule (kernels/_autograd.py): logits are the policy side; labels are integers.
    dev = device_for(backend)
    x = on(dev, make_logits((2, 3), 9, torch.float32, seed=10)).requires_grad_(True)
    logp, ent = kernels.logprobs(x, on(dev, make_labels((2, 3), 9, seed=10)), entropy=True, backend=backend)
    (logp.sum() + ent.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_vocabulary_is_a_value_error(backend):
    dev = device_for(backend)
    x, labels = torch.zeros(3, 0, device=dev), torch.full((3,), -100, device=dev)
    with pytest.raises(ValueError, match=r"vocabulary is empty \(V = 0\)"):
        kernels.logprobs(x, labels, backend=backend)
    with pytest.raises(ValueError, match=r"V = 0"):
        logprobs_ref(x, labels)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_temperature_floor(backend):
    dev = device_for(backend)
    x, labels = on(dev, make_logits((2,), 5, torch.float32), torch.zeros(2, dtype=torch.long))
    for t in (0.0, -1.0, 9.99e-4, 1e-40, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0.001"):
            kernels.logprobs(x, labels, temperature=t, backend=backend)
    if backend != "torch":  # the floor itself runs and matches the reference
        run_case(backend, make_logits((3,), 6, torch.float32, seed=12, scale=0.01), make_labels((3,), 6, seed=12),
                 temperature=1e-3, seed=12)  # fmt: skip


def test_bad_backend():
    x, labels = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="expected one of"):
        kernels.logprobs(x, labels, backend="fast")
    with pytest.raises(ValueError, match="logprobs has no 'cuda' backend"):
        kernels.logprobs(x, labels, backend="cuda")
    assert "cuda" not in kernels.logprobs.__doc__


# --------------------------------------------------------------------------------------------------
# Launch device: every Triton launch of the vocabulary ops runs inside on_device(its tensors)
# --------------------------------------------------------------------------------------------------
def _record_launches(monkeypatch):
    """Replace _vocab's on_device by a recorder of the device it makes current, and wrap both row
    kernels so that each launch records the device current at that moment (None: outside on_device)."""
    current, launches = [], []

    @contextlib.contextmanager
    def recording_on_device(t):
        current.append(t.device)
        try:
            yield
        finally:
            current.pop()

    class Wrapped:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                launches.append((current[-1] if current else None, args[0].device))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(vocab, "on_device", recording_on_device)
    for name in ("_vocab_fwd_kernel", "_vocab_bwd_kernel"):
        monkeypatch.setattr(vocab, name, Wrapped(getattr(vocab, name)))
    return launches


def test_triton_launches_make_the_tensors_device_current(monkeypatch):
    # On CPU (interpreter) on_device is a no-op, so the recorder stands in for torch.cuda.device: each
    # launch of every vocabulary op, forward and backward, must happen inside on_device of its logits.
    dev = device_for("triton")
    launches = _record_launches(monkeypatch)
    x = on(dev, make_logits((3,), 9, torch.float32, seed=13)).requires_grad_(True)
    labels = on(dev, make_labels((3,), 9, seed=13))
    kernels.logprobs(x, labels, backend="triton").sum().backward()
    kernels.full_kl(x, x.detach() + 1, backend="triton").sum().backward()
    sum(o.sum() for o in kernels.token_stats(x, x.detach() + 1, labels, backend="triton")).backward()
    h = on(dev, torch.randn(3, 4)).requires_grad_(True)
    w = on(dev, torch.randn(9, 4)).requires_grad_(True)
    kernels.linear_logprobs(h, w, labels, entropy=True, backend="triton")[0].sum().backward()
    sum(o.sum() for o in kernels.linear_token_stats(h, h.detach(), w, labels, backend="triton")).backward()
    assert len(launches) >= 10
    assert all(made_current == device for made_current, device in launches), launches


# --------------------------------------------------------------------------------------------------
# GPU (run where a CUDA device exists)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_llama3_vocab(dtype):
    V = 128256
    x = make_logits((64,), V, dtype, seed=5, extremes=True)
    labels = make_labels((64,), V, seed=5, ignore_every=7)
    run_case("triton", x, labels, temperature=0.9, seed=5)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_non_default_device():
    # Tensors on cuda:1 while cuda:0 is current: the launches must run on cuda:1.
    assert torch.cuda.current_device() == 0
    x = make_logits((2, 7), 1000, torch.bfloat16, seed=14, extremes=True)
    labels = make_labels((2, 7), 1000, seed=14, ignore_every=5)
    xk = x.to("cuda:1").requires_grad_(True)
    logp, ent = kernels.logprobs(xk, labels.to("cuda:1"), entropy=True, backend="triton")
    (logp.sum() + ent.sum()).backward()
    xr = x.detach().double().requires_grad_(True)
    lr, er = logprobs_ref(xr, labels, entropy=True)
    (lr.sum() + er.sum()).backward()
    assert logp.device == xk.grad.device == torch.device("cuda:1")
    tol = forward_tol(x, 1.0)
    assert_close(logp, lr, atol=tol, name="logp on cuda:1")
    assert_close(ent, er, atol=tol, name="entropy on cuda:1")
    assert_close(xk.grad, xr.grad, atol=tol + 2**-8 * xr.grad.abs().max().item(), name="grad on cuda:1")


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

"""kernels.gae against hand-derived cases, a literal transcription of the issue's definition, and the
float64 reference, on every backend that runs here (Triton through the interpreter on CPU).

Letters: B batch, T time. Outputs are fp32 and each is a sum of at most T terms of size ~|r| + |v|
discounted by gamma * lam <= 1, so the fp32 error stays within a few ulps times T of that size: the
tolerances below are 2e-5 absolute and relative for |r|, |v| ~ 1, T <= 131. bf16 inputs are rounded
once on the way in; the reference sees the same rounded values, so the tolerance does not change.
"""

import math

import pytest
import torch
from _rl_cases import MASK_KINDS, make_mask, randn
from util import assert_close, cpu_backends

import rlhf_kernels as kernels
from rlhf_kernels.gae import IMPLEMENTED, _gae_triton, gae_ref
from rlhf_kernels._masks import mask_u8

BACKENDS = cpu_backends(IMPLEMENTED)
ATOL = RTOL = 2e-5


def spec_gae(rewards, values, mask, gamma, lam):
    """The issue's definition, literally: per row, walk the valid positions t_1 < ... < t_k backwards."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        ts = [t for t in range(T) if mask[b, t]]
        next_adv = 0.0
        for j in reversed(range(len(ts))):
            t = ts[j]
            next_value = float(values[b, ts[j + 1]]) if j + 1 < len(ts) else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            a = delta + (gamma * lam * next_adv if j + 1 < len(ts) else 0.0)
            adv[b, t] = a
            ret[b, t] = a + float(values[b, t])
            next_adv = a
    return adv, ret


def inputs(B, T, dtype=torch.float32, seed=0):
    return randn(B, T, seed=seed).to(dtype), randn(B, T, seed=seed + 1).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Hand-derived cases
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_example_with_hole(backend):
    # r = [1, 0, 2], v = [0.5, 1, 1.5], mask = [1, 0, 1], gamma = 0.9, lam = 0.8. Valid t = 0, 2.
    #   t = 2 (last valid): next_value = 0, delta = 2 - 1.5 = 0.5, adv = 0.5, ret = 0.5 + 1.5 = 2.0
    #   t = 1 masked: adv = ret = 0 (skipped, not discounted)
    #   t = 0: next_value = v[2] = 1.5, delta = 1 + 0.9 * 1.5 - 0.5 = 1.85,
    #          adv = 1.85 + 0.9 * 0.8 * 0.5 = 2.21, ret = 2.21 + 0.5 = 2.71
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    m = torch.tensor([[1, 0, 1]])
    adv, ret = kernels.gae(r, v, m, gamma=0.9, lam=0.8, backend=backend)
    assert_close(adv, torch.tensor([[2.21, 0.0, 0.5]]), atol=1e-6, name="advantages")
    assert_close(ret, torch.tensor([[2.71, 0.0, 2.0]]), atol=1e-6, name="returns")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma1_lam1_is_reward_to_go_minus_value(backend):
    # gamma = lam = 1: adv_t = delta_t + adv_next with delta_t = r_t + v_next - v_t, so the values
    # telescope: adv_t = sum_{valid j >= t} r_j + v_{after last} - v_t = reward-to-go - v_t
    # (the value after the last valid token is 0). Holes are skipped, so the sum runs over valid j only.
    B, T = 6, 29
    r, v = inputs(B, T, seed=3)
    m = make_mask(B, T, "mixed", seed=4)
    rtg = torch.flip(torch.cumsum(torch.flip(torch.where(m, r, 0).double(), [1]), 1), [1])
    want = torch.where(m, rtg - v.double(), 0)
    adv, ret = kernels.gae(r, v, m, gamma=1.0, lam=1.0, backend=backend)
    assert_close(adv, want, atol=ATOL, rtol=RTOL, name="advantages")
    assert_close(ret, torch.where(m, rtg, 0), atol=ATOL, rtol=RTOL, name="returns = reward-to-go")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam0_is_one_step_td(backend):
    # lam = 0: the recursion term vanishes, adv_t = delta_t = r_t + gamma * v_{next valid} - v_t.
    B, T = 3, 11
    r, v = inputs(B, T, seed=5)
    m = make_mask(B, T, "holes", seed=6)
    gamma = 0.9
    want = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        ts = m[b].nonzero().flatten().tolist()
        for j, t in enumerate(ts):
            nv = float(v[b, ts[j + 1]]) if j + 1 < len(ts) else 0.0
            want[b, t] = float(r[b, t]) + gamma * nv - float(v[b, t])
    adv, _ = kernels.gae(r, v, m, gamma=gamma, lam=0.0, backend=backend)
    assert_close(adv, want, atol=1e-6, rtol=1e-6, name="advantages")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_does_not_change_valid_tokens(backend):
    # The same trajectory right-padded, left-padded, and with holes spliced in gives the same
    # advantages at its tokens: masked positions are skipped entirely.
    L = 7
    r, v = inputs(1, L, seed=7)
    base, _ = kernels.gae(r, v, torch.ones(1, L), gamma=0.95, lam=0.9, backend=backend)
    # garbage under the mask (padding may hold anything) must not leak in
    junk = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1e30, -7.0]])
    layouts = {
        "right": (torch.cat([r, junk], 1), torch.cat([v, junk], 1), torch.arange(L + 5) < L),
        "left": (torch.cat([junk, r], 1), torch.cat([junk, v], 1), torch.arange(L + 5) >= 5),
    }
    holes_at = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1], dtype=torch.bool)  # 5 holes, 7 tokens
    rh, vh = torch.zeros(1, 12), torch.zeros(1, 12)
    rh[0, ~holes_at], vh[0, ~holes_at] = r[0], v[0]
    rh[0, holes_at], vh[0, holes_at] = junk[0], junk[0]
    layouts["holes"] = (rh, vh, ~holes_at)
    for name, (rr, vv, m) in layouts.items():
        adv, ret = kernels.gae(rr, vv, m[None] if m.dim() == 1 else m, gamma=0.95, lam=0.9, backend=backend)
        m = m.reshape(1, -1)
        assert_close(adv[m].view(1, L), base, atol=1e-6, name=f"{name}: advantages at the valid tokens")
        assert bool((adv[~m] == 0).all() and (ret[~m] == 0).all()), f"{name}: masked outputs must be 0"


# ---------------------------------------------------------------------------------------------------
# Against the references
# ---------------------------------------------------------------------------------------------------
def test_reference_matches_the_definition():
    B, T = 6, 17
    r, v = inputs(B, T, torch.float64, seed=9)
    m = make_mask(B, T, "mixed", seed=10)
    want = spec_gae(r, v, m, 0.97, 0.9)
    got = gae_ref(r, v, m, 0.97, 0.9)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=1e-12, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("B,T", [(1, 1), (6, 1), (7, 13), (6, 131)])
def test_against_float64_reference(backend, kind, B, T):
    r, v = inputs(B, T, seed=B * 1000 + T)
    m = make_mask(B, T, kind, seed=T)
    want = gae_ref(r.double(), v.double(), m, 0.99, 0.95)
    got = kernels.gae(r, v, m, gamma=0.99, lam=0.95, backend=backend)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert g.dtype == torch.float32 and g.shape == (B, T)
        assert_close(g, w, atol=ATOL, rtol=RTOL, name=f"{name} [{kind}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    B, T = 5, 23
    r, v = inputs(B, T, dtype, seed=11)
    m = make_mask(B, T, "mixed", seed=12)
    want = gae_ref(r.double(), v.double(), m, 1.0, 0.95)  # the same rounded inputs
    got = kernels.gae(r, v, m, gamma=1.0, lam=0.95, backend=backend)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert g.dtype == torch.float32
        assert_close(g, w, atol=ATOL, rtol=RTOL, name=f"{name} ({dtype})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_mixed_dtypes_and_mask_dtypes(backend):
    B, T = 5, 19
    r = randn(T, B, seed=13).t()  # [B, T] with time stride B
    v = randn(B, 2 * T, seed=14)[:, ::2].to(torch.bfloat16)  # strided and another dtype
    m_bool = make_mask(B, T, "holes", seed=15)
    want = gae_ref(r.double(), v.double(), m_bool, 0.95, 0.9)
    for m in (m_bool, m_bool.int(), m_bool.float(), m_bool.t().contiguous().t()):
        got = kernels.gae(r, v, m, gamma=0.95, lam=0.9, backend=backend)
        for g, w, name in zip(got, want, ("advantages", "returns")):
            assert_close(g, w, atol=ATOL, rtol=RTOL, name=f"{name} (mask {m.dtype})")


@pytest.mark.parametrize(
    "block,span",
    [
        (8, None),  # one span, 5 chunks: the carry between chunks
        (8, 16),  # 3 spans of 2 chunks: span maps composed into each span's carry-in
        (4, 4),  # 10 spans (not a power of 2), one chunk each
        (16, 32),  # 2 spans, the last one short
    ],
)
def test_triton_chunked_and_split_scan(block, span):
    if "triton" not in BACKENDS:
        pytest.skip("triton does not run here")
    B, T = 6, 37
    r, v = inputs(B, T, seed=16)
    m = make_mask(B, T, "mixed", seed=17)
    want = gae_ref(r.double(), v.double(), m, 0.99, 0.95)
    got = _gae_triton(r, v, mask_u8(m), 0.99, 0.95, block=block, span=span)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=ATOL, rtol=RTOL, name=f"{name} (block {block}, span {span})")


def test_cpp_long_rows():
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    B, T = 3, 3001
    r, v = inputs(B, T, seed=18)
    m = make_mask(B, T, "holes", seed=19)
    want = gae_ref(r.double(), v.double(), m, 0.999, 0.95)
    got = kernels.gae(r, v, m, gamma=0.999, lam=0.95, backend="cpp")
    # advantages sum up to ~1 / (1 - 0.95) = 20 terms of size ~2: |adv| ~ 10, fp32 error ~ 20 ulps of it
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty(backend, shape):
    adv, ret = kernels.gae(torch.zeros(shape), torch.zeros(shape), torch.ones(shape), backend=backend)
    assert adv.shape == ret.shape == shape and adv.dtype == torch.float32


def test_gradient_runs_through_the_reference():
    # The kernels are forward-only (GAE outputs are targets); with grad-requiring inputs the public
    # op uses the reference, so gradients match autograd through the float64 loop.
    B, T = 3, 7
    r, v = inputs(B, T, seed=20)
    m = make_mask(B, T, "holes", seed=21)
    up = randn(B, T, seed=22), randn(B, T, seed=23)
    r1, v1 = r.clone().requires_grad_(), v.clone().requires_grad_()
    adv, ret = kernels.gae(r1, v1, m, gamma=0.9, lam=0.8)
    (adv * up[0] + ret * up[1]).sum().backward()
    r2, v2 = r.double().requires_grad_(), v.double().requires_grad_()
    adv2, ret2 = gae_ref(r2, v2, m, 0.9, 0.8)
    (adv2 * up[0].double() + ret2 * up[1].double()).sum().backward()
    assert_close(r1.grad, r2.grad, atol=1e-6, name="grad rewards")
    assert_close(v1.grad, v2.grad, atol=1e-6, name="grad values")


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda r, v, m: (r, v[:, :-1], m), "shapes must match"),
        (lambda r, v, m: (r, v, m[:, :-1]), "mask shape"),
        (lambda r, v, m: (r, v, m.float() * 0.5), "binary"),
        (lambda r, v, m: (r, v, m.int() * 2), "binary"),
        (lambda r, v, m: (r[0], v[0], m[0]), r"\[B, T\]"),
        (lambda r, v, m: (r.long(), v, m), "float32"),
    ],
)
def test_bad_inputs(change, match):
    r, v = inputs(2, 5, seed=24)
    m = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        kernels.gae(*change(r, v, m))


@pytest.mark.parametrize("kw", [{"gamma": 1.5}, {"lam": -0.1}, {"gamma": math.nan}, {"backend": "nope"}])
def test_bad_arguments(kw):
    r, v = inputs(2, 5, seed=25)
    with pytest.raises(ValueError):
        kernels.gae(r, v, torch.ones(2, 5), **kw)


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("B,T", [(1, 1), (7, 13), (5, 4099), (2, 20011), (300, 257)])
def test_gpu_against_reference(backend, B, T):
    r, v = inputs(B, T, seed=26)
    m = make_mask(B, T, "mixed", seed=27)
    want = gae_ref(r.double(), v.double(), m, 0.999, 0.95)
    got = kernels.gae(r.cuda(), v.cuda(), m.cuda(), gamma=0.999, lam=0.95, backend=backend)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=1e-4, rtol=1e-5, name=f"{name} ({backend})")

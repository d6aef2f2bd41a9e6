"""kernels.gae against hand-derived cases (which anchor the reference too), a literal transcription of
the issue's definition, and the float64 reference, on every kernel backend: Triton (compiled on a GPU
machine, through the interpreter on CPU, with small chunks and spans so the chunk carry and the span
split run), C++, and CUDA (on a GPU machine); the GPU split path at T >= 65536 and a non-default
device. Also the mask check every RL-math op shares (kernels/_masks.py).

Letters: B batch, T time. Outputs are fp32 and each is a sum of at most T terms of size ~|r| + |v|
discounted by gamma * lam <= 1, so the fp32 error stays within a few ulps times T of that size: the
tolerances below are 2e-5 absolute and relative for |r|, |v| ~ 1, T <= 131. bf16 inputs are rounded
once on the way in; the reference sees the same rounded values, so the tolerance does not change.
"""

import importlib
import math

import pytest
import torch
from _rl_cases import MASK_KINDS, documented_backends, intra_op_threads, make_mask, randn, record_launches
from util import assert_close, device_for, kernel_backends, on

import rlhf_kernels as kernels
from rlhf_kernels import _masks
from rlhf_kernels._masks import check_mask
from rlhf_kernels.gae import IMPLEMENTED, _gae_triton, gae_ref

MODULE = importlib.import_module("rlhf_kernels.gae")
KERNELS = kernel_backends(IMPLEMENTED)
ANCHORED = ["torch", *KERNELS]  # hand-derived values anchor the reference as well as the kernels
ATOL = RTOL = 2e-5


def spec_gae(rewards, values, mask, gamma, lam):
    """The issue's definition, literally: per row, walk the valid positions t_1 < ... < t_k backwards,
    in Python floats (float64)."""
    r, v, m = rewards.double().tolist(), values.double().tolist(), mask.bool().tolist()
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        ts = [t for t in range(T) if m[b][t]]
        row_adv, row_ret = [0.0] * T, [0.0] * T
        next_adv = 0.0
        for j in reversed(range(len(ts))):
            t = ts[j]
            next_value = v[b][ts[j + 1]] if j + 1 < len(ts) else 0.0
            delta = r[b][t] + gamma * next_value - v[b][t]
            a = delta + (gamma * lam * next_adv if j + 1 < len(ts) else 0.0)
            row_adv[t], row_ret[t] = a, a + v[b][t]
            next_adv = a
        adv[b], ret[b] = torch.tensor(row_adv, dtype=torch.float64), torch.tensor(row_ret, dtype=torch.float64)
    return adv, ret


def inputs(B, T, dtype=torch.float32, seed=0):
    return randn(B, T, seed=seed).to(dtype), randn(B, T, seed=seed + 1).to(dtype)


def run(backend, r, v, m, **kw):
    dev = device_for(backend)
    return kernels.gae(*on(dev, r, v, m), backend=backend, **kw)


# ---------------------------------------------------------------------------------------------------
# Hand-derived cases
# ---------------------------------------------------------------------------------------------------
# r = [1, 0, 2], v = [0.5, 1, 1.5], mask = [1, 0, 1], gamma = 0.9, lam = 0.8. Valid t = 0, 2.
#   t = 2 (last valid): next_value = 0, delta = 2 - 1.5 = 0.5, adv = 0.5, ret = 0.5 + 1.5 = 2.0
#   t = 1 masked: adv = ret = 0 (skipped, not discounted)
#   t = 0: next_value = v[2] = 1.5, delta = 1 + 0.9 * 1.5 - 0.5 = 1.85,
#          adv = 1.85 + 0.9 * 0.8 * 0.5 = 2.21, ret = 2.21 + 0.5 = 2.71
HAND_R = torch.tensor([[1.0, 0.0, 2.0]])
HAND_V = torch.tensor([[0.5, 1.0, 1.5]])
HAND_M = torch.tensor([[1, 0, 1]])


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_example_with_hole(backend):
    adv, ret = run(backend, HAND_R, HAND_V, HAND_M, gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[2.21, 0.0, 0.5]]), atol=1e-6, name="advantages")
    assert_close(ret, torch.tensor([[2.71, 0.0, 2.0]]), atol=1e-6, name="returns")


@pytest.mark.parametrize("backend", ANCHORED)
def test_hand_gradient(backend):
    # The rule: with rewards/values requiring grad every backend runs the differentiable reference.
    # In the hand example, with c = gamma * lam = 0.72:
    #   adv2 = r2 - v2,  ret2 = r2,  adv0 = r0 + gamma v2 - v0 + c (r2 - v2),  ret0 = r0 + gamma v2 + c (r2 - v2)
    # Under upstream gradients a = (1, 5, 2) on adv and b = (3, 7, -1) on ret (position 1 is masked):
    #   dL/dr = (a0 + b0, 0, c (a0 + b0) + a2 + b2) = (4, 0, 0.72 * 4 + 1) = (4, 0, 3.88)
    #   dL/dv = (-a0, 0, (a0 + b0)(gamma - c) - a2) = (-1, 0, 4 * 0.18 - 2) = (-1, 0, -1.28)
    dev = device_for(backend)
    r, v = on(dev, HAND_R.clone(), HAND_V.clone())
    r.requires_grad_(), v.requires_grad_()
    adv, ret = kernels.gae(r, v, on(dev, HAND_M), gamma=0.9, lam=0.8, backend=backend)
    up_adv, up_ret = on(dev, torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[3.0, 7.0, -1.0]]))
    (adv * up_adv + ret * up_ret).sum().backward()
    assert_close(r.grad, torch.tensor([[4.0, 0.0, 3.88]]), atol=1e-6, name="grad rewards")
    assert_close(v.grad, torch.tensor([[-1.0, 0.0, -1.28]]), atol=1e-6, name="grad values")


@pytest.mark.parametrize("backend", ANCHORED)
def test_gamma1_lam1_is_reward_to_go_minus_value(backend):
    # gamma = lam = 1: adv_t = delta_t + adv_next with delta_t = r_t + v_next - v_t, so the values
    # telescope: adv_t = sum_{valid j >= t} r_j + v_{after last} - v_t = reward-to-go - v_t
    # (the value after the last valid token is 0). Holes are skipped, so the sum runs over valid j only.
    B, T = 6, 29
    r, v = inputs(B, T, seed=3)
    m = make_mask(B, T, "mixed", seed=4)
    rtg = torch.flip(torch.cumsum(torch.flip(torch.where(m, r, 0).double(), [1]), 1), [1])
    want = torch.where(m, rtg - v.double(), 0)
    adv, ret = run(backend, r, v, m, gamma=1.0, lam=1.0)
    assert_close(adv, want, atol=ATOL, rtol=RTOL, name="advantages")
    assert_close(ret, torch.where(m, rtg, 0), atol=ATOL, rtol=RTOL, name="returns = reward-to-go")


@pytest.mark.parametrize("backend", ANCHORED)
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
    adv, _ = run(backend, r, v, m, gamma=gamma, lam=0.0)
    assert_close(adv, want, atol=1e-6, rtol=1e-6, name="advantages")


@pytest.mark.parametrize("backend", ANCHORED)
def test_padding_does_not_change_valid_tokens(backend):
    # The same trajectory right-padded, left-padded, and with holes spliced in gives the same
    # advantages at its tokens: masked positions are skipped entirely.
    L = 7
    r, v = inputs(1, L, seed=7)
    base, _ = run(backend, r, v, torch.ones(1, L), gamma=0.95, lam=0.9)
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
        m = m.reshape(1, -1)
        adv, ret = (t.cpu() for t in run(backend, rr, vv, m, gamma=0.95, lam=0.9))
        assert_close(adv[m].view(1, L), base, atol=1e-6, name=f"{name}: advantages at the valid tokens")
        assert bool((adv[~m] == 0).all() and (ret[~m] == 0).all()), f"{name}: masked outputs must be 0"


# ---------------------------------------------------------------------------------------------------
# Gradient rule (kernels/_autograd.py): forward-only kernels, the reference with grad
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ANCHORED)
def test_rewards_and_values_get_gradients_the_mask_none(backend):
    dev = device_for(backend)
    r, v = (on(dev, t).requires_grad_() for t in inputs(3, 7, seed=20))
    mask = on(dev, make_mask(3, 7, "holes", seed=21).float()).requires_grad_()
    adv, ret = kernels.gae(r, v, mask, gamma=0.9, lam=0.8, backend=backend)
    (adv.sum() + ret.sum()).backward()
    assert r.grad is not None and v.grad is not None and bool(r.grad.abs().sum() > 0)
    assert mask.grad is None, f"the mask got a gradient on backend {backend}"


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


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("B,T", [(1, 1), (6, 1), (7, 13), (6, 131)])
def test_against_float64_reference(backend, kind, B, T):
    r, v = inputs(B, T, seed=B * 1000 + T)
    m = make_mask(B, T, kind, seed=T)
    want = gae_ref(r.double(), v.double(), m, 0.99, 0.95)
    got = run(backend, r, v, m, gamma=0.99, lam=0.95)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert g.dtype == torch.float32 and g.shape == (B, T)
        assert_close(g, w, atol=ATOL, rtol=RTOL, name=f"{name} [{kind}]")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    B, T = 5, 23
    r, v = inputs(B, T, dtype, seed=11)
    m = make_mask(B, T, "mixed", seed=12)
    want = gae_ref(r.double(), v.double(), m, 1.0, 0.95)  # the same rounded inputs
    got = run(backend, r, v, m, gamma=1.0, lam=0.95)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert g.dtype == torch.float32
        assert_close(g, w, atol=ATOL, rtol=RTOL, name=f"{name} ({dtype})")


@pytest.mark.parametrize("backend", KERNELS)
def test_non_contiguous_mixed_dtypes_and_mask_dtypes(backend):
    dev = device_for(backend)
    B, T = 5, 19
    r = on(dev, randn(T, B, seed=13)).t()  # [B, T] with time stride B
    v = on(dev, randn(B, 2 * T, seed=14).to(torch.bfloat16))[:, ::2]  # strided and another dtype
    assert not r.is_contiguous() and not v.is_contiguous()
    m_bool = make_mask(B, T, "holes", seed=15)
    want = gae_ref(r.double().cpu(), v.double().cpu(), m_bool, 0.95, 0.9)
    for m in (m_bool, m_bool.int(), m_bool.float(), m_bool.t().contiguous().t()):
        got = kernels.gae(r, v, on(dev, m), gamma=0.95, lam=0.9, backend=backend)
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
    dev = device_for("triton")
    B, T = 6, 37
    r, v = inputs(B, T, seed=16)
    m = make_mask(B, T, "mixed", seed=17)
    want = gae_ref(r.double(), v.double(), m, 0.99, 0.95)
    md = on(dev, m)
    got = _gae_triton(*on(dev, r, v), check_mask(md, md.shape), 0.99, 0.95, block=block, span=span)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=ATOL, rtol=RTOL, name=f"{name} (block {block}, span {span})")


def test_cpp_long_rows_over_threads():
    # 12 rows of 3001 steps, grouped 5 rows per task (16384 steps) and split over 3 threads. (Triton's
    # long rows: the chunk carry and span split above, and on GPU test_gpu_long_rows_split.)
    B, T = 12, 3001
    r, v = inputs(B, T, seed=18)
    m = make_mask(B, T, "holes", seed=19)
    want = spec_gae(r, v, m, 0.999, 0.95)
    with intra_op_threads(3):
        got = run("cpp", r, v, m, gamma=0.999, lam=0.95)
    # advantages sum up to ~1 / (1 - 0.95) = 20 terms of size ~2: |adv| ~ 10, fp32 error ~ 20 ulps of it
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_empty(backend, shape):
    adv, ret = run(backend, torch.zeros(shape), torch.zeros(shape), torch.ones(shape))
    assert adv.shape == ret.shape == shape and adv.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# The mask check (kernels/_masks.py): one pass on CPU through the extension, torch otherwise
# ---------------------------------------------------------------------------------------------------
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
               torch.float32, torch.float64]  # fmt: skip


def _bad_values(dtype):
    if dtype == torch.bool:
        return []
    if dtype == torch.uint8:
        return [2, 255]
    if not dtype.is_floating_point:
        return [2, -1]
    return [0.5, 2.0, -1.0, 1.0 + 2**-7, 1e-30 if dtype != torch.float16 else 2**-24, float("nan"), float("inf")]


@pytest.mark.parametrize("path", ["extension", "torch"])
@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_mask_check_every_dtype(dtype, path, monkeypatch):
    if path == "torch":  # the extension missing: the same check in torch ops
        monkeypatch.setattr(_masks, "ext_op", lambda name: None)
    elif kernels.backends()["cpp"] != "yes":
        pytest.fail("the C++ extension is not built")
    m_bool = make_mask(6, 37, "mixed", seed=40)
    for m in (m_bool.to(dtype), m_bool.to(dtype).t().contiguous().t()):  # contiguous, column-major
        u8 = check_mask(m, m.shape)
        assert u8.dtype == torch.uint8 and u8.shape == m.shape and torch.equal(u8.bool(), m_bool), dtype
    for value in _bad_values(dtype):
        bad = m_bool.to(dtype)
        bad[3, 29] = value
        with pytest.raises(ValueError, match=r"mask must be binary \(0/1\): 1 other values, first at index \(3, 29\)"):
            check_mask(bad, bad.shape)
        with pytest.raises(ValueError, match="binary"):  # and through a public op
            kernels.gae(torch.zeros(6, 37), torch.zeros(6, 37), bad, backend="torch")


@pytest.mark.cuda
def test_gpu_mask_check_under_debug(monkeypatch):
    # on GPU the value check is a device sync: it runs with RLHF_KERNELS_DEBUG=1 only
    device_for("triton")
    bad = torch.ones(4, 9, device="cuda")
    bad[2, 5] = 0.5
    check_mask(bad, bad.shape)  # unchecked by default
    monkeypatch.setenv("RLHF_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"first at index \(2, 5\)"):
        check_mask(bad, bad.shape)


# ---------------------------------------------------------------------------------------------------
# Launch device, documentation, bad input
# ---------------------------------------------------------------------------------------------------
def test_triton_launches_on_the_tensors_device(monkeypatch):
    dev = device_for("triton")
    r, v = inputs(3, 37, seed=30)
    m = on(dev, make_mask(3, 37, "holes", seed=31))
    with record_launches(MODULE, monkeypatch) as launches:
        MODULE._gae_triton(*on(dev, r, v), check_mask(m, m.shape), 0.99, 0.95, block=8, span=16)  # split
        kernels.gae(*on(dev, r, v), m, backend="triton")
    assert [name for name, _, _ in launches] == ["_gae_span_map_kernel", "_gae_fwd_kernel", "_gae_fwd_kernel"]
    for name, current, devices in launches:
        assert current is not None and devices == {current} and current.type == dev.type, (name, current, devices)


def test_docstring_lists_exactly_the_backends():
    assert documented_backends(kernels.gae) == {"auto", *IMPLEMENTED}


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda r, v, m: (r, v[:, :-1], m), "shapes must match"),
        (lambda r, v, m: (r, v, m[:, :-1]), "mask shape"),
        (lambda r, v, m: (r, v, m.float() * 0.5), "binary"),
        (lambda r, v, m: (r, v, m.int() * 2), "binary"),
        (lambda r, v, m: (r, v, m.to(torch.complex64)), "bool, integer or floating"),
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
# GPU: the launch choices of real sizes
# ---------------------------------------------------------------------------------------------------
GPU_BACKENDS = [b for b in KERNELS if b != "cpp"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 1), (7, 13), (5, 4099), (2, 20011), (300, 257), (512, 2048)])
def test_gpu_against_reference(backend, B, T):
    r, v = inputs(B, T, seed=26)
    m = make_mask(B, T, "mixed", seed=27)
    want = spec_gae(r, v, m, 0.999, 0.95)
    got = run(backend, r, v, m, gamma=0.999, lam=0.95)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=1e-4, rtol=1e-5, name=f"{name} ({backend})")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,T,gamma", [(2, 65536, 1.0), (3, 70001, 0.999), (1, 131072, 1.0)])
def test_gpu_long_rows_split(backend, B, T, gamma):
    # Few long rows: Triton splits each row into spans (about 2 programs per SM; 64+ spans here, so
    # the span-map carry-in runs over S_POW2 >= 64), CUDA scans each row in 2048-position tiles.
    # Right padding and holes; gamma = 1 (no discount) is the common RLHF setting, the hardest for
    # fp32 (advantages accumulate ~1 / (1 - lam) = 20 terms).
    r, v = inputs(B, T, seed=28)
    m = make_mask(B, T, "holes", seed=29)
    m[0, T - T // 3 :] = False  # right padding in row 0
    want = spec_gae(r, v, m, gamma, 0.95)
    got = run(backend, r, v, m, gamma=gamma, lam=0.95)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert_close(g, w, atol=1e-4, rtol=1e-5, name=f"{name} ({backend}, T={T})")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("B,T", [(300, 257), (2, 70001)])
def test_gpu_non_default_device(backend, B, T):
    # tensors on cuda:1 while cuda:0 is current (one row per program, and the split path)
    device_for(backend)
    r, v = inputs(B, T, seed=32)
    m = make_mask(B, T, "mixed", seed=33)
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        got = kernels.gae(*on(dev, r, v, m), gamma=0.999, lam=0.95, backend=backend)
    want = spec_gae(r, v, m, 0.999, 0.95)
    for g, w, name in zip(got, want, ("advantages", "returns")):
        assert g.device == dev
        assert_close(g, w, atol=1e-4, rtol=1e-5, name=f"{name} ({backend} on cuda:1)")

"""Generalized advantage estimation over masked token rows (Schulman et al. 2015, arXiv:1506.02438).

Letters: B batch (rows), T time (tokens per row), S spans a row is split into on GPU.

For each row, let the valid positions (mask == 1) be t_1 < ... < t_k. Going backwards, j = k..1:

    next_value      = values[t_{j+1}] if j < k else 0
    delta           = rewards[t_j] + gamma * next_value - values[t_j]
    advantages[t_j] = delta + gamma * lam * advantages[t_{j+1}]      (second term 0 when j == k)
    returns[t_j]    = advantages[t_j] + values[t_j]

and advantages = returns = 0 where mask == 0. Masked positions are skipped, not discounted: this
covers right padding, left padding and holes inside a row (tool or observation tokens).

Parallel form. The backward recurrence carries a state x_t = (A_t, V_t): the advantage and value at
the first valid position >= t. A valid position maps the state after it, x_{t+1}, affinely:

    A_t = gamma * lam * A_{t+1} + gamma * V_{t+1} + (rewards[t] - values[t])
    V_t = values[t]

i.e. x_t = M_t x_{t+1} + b_t with M_t = [[gamma*lam, gamma], [0, 0]], b_t = (r_t - v_t, v_t); a masked
position is the identity (M = I, b = 0). Every M is upper triangular, so a map is 5 numbers
(p, q, s, bA, bV) with M = [[p, q], [0, s]], and composing maps is associative: an associative scan
over time (in reverse) gives x_t = (M_t ... M_{T-1}) 0 + ... for every t at once. The Triton kernels
scan BLOCK-wide chunks and carry the state from chunk to chunk; when there are too few rows to fill
the GPU, each row is split into S spans, a first kernel composes each span into one map, and the
second composes the maps of the later spans into its carry-in, so no row serialises on one program.

Gradients. The outputs are targets, so the kernels are forward-only. The rule, the same on every
backend: with grad mode on and `rewards` or `values` requiring grad, the public op runs the
differentiable reference (gae_ref) whatever the backend, so both get their exact gradients; the mask
is a constant.
"""

from __future__ import annotations

import torch

from rlhf_kernels._checks import check_float, check_same_device
from rlhf_kernels._dispatch import ext_op, resolve, triton_interpreted
from rlhf_kernels._masks import check_mask, check_same_shape, check_scalar
from rlhf_kernels._triton import next_pow2, on_device, tl, triton

IMPLEMENTED = ("torch", "triton", "cpp", "cuda")


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def gae_ref(rewards, values, mask, gamma=1.0, lam=0.95):
    """PyTorch reference: the reverse loop over time that TRL / OpenRLHF / verl use, extended to
    skip masked positions. rewards, values, mask [B, T] -> (advantages, returns) [B, T] in
    max(dtype, fp32); float64 in gives the float64 test oracle. Differentiable through autograd."""
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    r, v = rewards.to(dtype), values.to(dtype)
    valid = mask != 0
    B, T = r.shape
    next_value = r.new_zeros(B)  # value at the next valid position (0 past the last)
    next_adv = r.new_zeros(B)
    advantages = [None] * T
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        m = valid[:, t]
        advantages[t] = torch.where(m, adv, torch.zeros_like(adv))
        next_value = torch.where(m, v[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    advantages = torch.stack(advantages, dim=1) if T else r.new_zeros(B, 0)
    returns = torch.where(valid, advantages + v, torch.zeros_like(advantages))
    return advantages, returns


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _compose(p1, q1, s1, a1, v1, p2, q2, s2, a2, v2):
    """Map 2 after map 1 (map 1 is later in time, so applied first going backwards)."""
    return p2 * p1, p2 * q1 + q2 * s1, s2 * s1, p2 * a1 + q2 * v1 + a2, s2 * v1 + v2


@triton.jit
def _chunk_maps(r_ptr, v_ptr, m_ptr, srb, srt, svb, svt, smb, smt, row, t, t_lo, t_hi, gamma, c):
    """The per-position maps of times `t` (a vector), identity outside [t_lo, t_hi) and where masked."""
    inb = (t >= t_lo) & (t < t_hi)
    t64 = t.to(tl.int64)
    r = tl.load(r_ptr + row * srb + t64 * srt, mask=inb, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * svb + t64 * svt, mask=inb, other=0.0).to(tl.float32)
    valid = tl.load(m_ptr + row * smb + t64 * smt, mask=inb, other=0) != 0
    p = tl.where(valid, c, 1.0)
    q = tl.where(valid, gamma, 0.0)
    s = tl.where(valid, 0.0, 1.0)
    a = tl.where(valid, r - v, 0.0)
    vv = tl.where(valid, v, 0.0)
    return p, q, s, a, vv, v, valid


@triton.jit
def _last(x, idx, n: tl.constexpr):
    return tl.sum(tl.where(idx == n - 1, x, 0.0), axis=0)


@triton.jit
def _gae_span_map_kernel(
    # data pointers
    r_ptr,  # [B, T] rewards, any float dtype
    v_ptr,  # [B, T] values
    m_ptr,  # [B, T] uint8 mask
    agg_ptr,  # [B, S, 5] fp32 out: each span composed into one map (p, q, s, bA, bV)
    # strides (elements)
    srb, srt, svb, svt, smb, smt,
    # shapes and scalars
    T, S, SPAN, gamma, c,
    # meta
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # = row * S + span
    row = pid // S
    span = pid % S
    t_lo = span * SPAN
    t_hi = tl.minimum(t_lo + SPAN, T)
    i = tl.arange(0, BLOCK)
    P = 1.0
    Q = 0.0
    Sm = 1.0
    A = 0.0
    V = 0.0
    for k in range(0, tl.cdiv(SPAN, BLOCK)):
        t = t_hi - 1 - k * BLOCK - i  # reversed: scan order runs backwards in time
        p, q, s, a, vv, _v, _valid = _chunk_maps(r_ptr, v_ptr, m_ptr, srb, srt, svb, svt, smb, smt,
                                                 row, t, t_lo, t_hi, gamma, c)
        p, q, s, a, vv = tl.associative_scan((p, q, s, a, vv), 0, _compose)
        P, Q, Sm, A, V = _compose(P, Q, Sm, A, V, _last(p, i, BLOCK), _last(q, i, BLOCK), _last(s, i, BLOCK),
                                  _last(a, i, BLOCK), _last(vv, i, BLOCK))
    base = agg_ptr + pid * 5
    tl.store(base + 0, P)
    tl.store(base + 1, Q)
    tl.store(base + 2, Sm)
    tl.store(base + 3, A)
    tl.store(base + 4, V)


@triton.jit
def _carry_in(agg_ptr, row, span, S, S_POW2: tl.constexpr):
    """The state handed to `span` by the later spans S-1, ..., span+1: their maps composed in scan
    order (backwards in time) and applied to x_T = 0, i.e. the composite's offset (bA, bV)."""
    j = tl.arange(0, S_POW2)
    k = S - 1 - j
    later = k > span
    base = agg_ptr + (row * S + tl.where(later, k, 0)) * 5
    p = tl.load(base + 0, mask=later, other=1.0)
    q = tl.load(base + 1, mask=later, other=0.0)
    s = tl.load(base + 2, mask=later, other=1.0)
    a = tl.load(base + 3, mask=later, other=0.0)
    vv = tl.load(base + 4, mask=later, other=0.0)
    p, q, s, a, vv = tl.associative_scan((p, q, s, a, vv), 0, _compose)
    return _last(a, j, S_POW2), _last(vv, j, S_POW2)


@triton.jit
def _gae_fwd_kernel(
    # data pointers
    r_ptr,  # [B, T] rewards, any float dtype
    v_ptr,  # [B, T] values
    m_ptr,  # [B, T] uint8 mask
    agg_ptr,  # [B, S, 5] fp32 span maps (read only if SPLIT)
    adv_ptr,  # [B, T] fp32 out, contiguous
    ret_ptr,  # [B, T] fp32 out, contiguous
    # strides (elements)
    srb, srt, svb, svt, smb, smt,
    # shapes and scalars
    T, S, SPAN, gamma, c,
    # meta
    SPLIT: tl.constexpr,  # S > 1: start from the state the later spans hand over
    S_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // S
    span = pid % S
    t_lo = span * SPAN
    t_hi = tl.minimum(t_lo + SPAN, T)
    A = 0.0  # carried state: advantage and value at the first valid position >= t_hi
    V = 0.0
    if SPLIT:
        # In a helper: its [S_POW2] temporaries must not share names with the loop's [BLOCK] ones
        # below (the compiler treats a name assigned before and inside the loop as loop-carried and
        # rejects the shape change; the interpreter does not check).
        A, V = _carry_in(agg_ptr, row, span, S, S_POW2)
    i = tl.arange(0, BLOCK)
    for kk in range(0, tl.cdiv(SPAN, BLOCK)):
        t = t_hi - 1 - kk * BLOCK - i
        p, q, s, a, vv, v, valid = _chunk_maps(r_ptr, v_ptr, m_ptr, srb, srt, svb, svt, smb, smt,
                                               row, t, t_lo, t_hi, gamma, c)
        p, q, s, a, vv = tl.associative_scan((p, q, s, a, vv), 0, _compose)
        # state at t = (composite of the maps from the chunk's end down to t) applied to the carry
        adv = p * A + q * V + a
        val = s * V + vv
        inb = (t >= t_lo) & (t < t_hi)
        out = row * T + t.to(tl.int64)
        tl.store(adv_ptr + out, tl.where(valid, adv, 0.0), mask=inb)
        tl.store(ret_ptr + out, tl.where(valid, adv + v, 0.0), mask=inb)
        A = _last(adv, i, BLOCK)  # padding past t_lo is identity, so the last entry is the state at the chunk start
        V = _last(val, i, BLOCK)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _triton_launch(T: int, B: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, SPAN). On GPU a chunk is 1024 wide; rows are split into spans until there are about
    two programs per SM (so B=512 runs one span per row and B=8, T=16384 runs 16 spans per row)."""
    if triton_interpreted():
        return min(next_pow2(max(T, 1)), 1 << 14), max(T, 1)
    block = min(next_pow2(max(T, 1)), 1024)
    n_chunks = triton.cdiv(max(T, 1), block)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    spans = max(1, min(n_chunks, triton.cdiv(2 * sms, max(B, 1))))
    return block, triton.cdiv(n_chunks, spans) * block


def _gae_triton(rewards, values, m, gamma, lam, *, block=None, span=None):
    """[B, T] inputs (any strides; `m` the uint8 mask) -> (advantages, returns) fp32 contiguous.
    `block` and `span` override the launch (tests use them to exercise the chunk carry and the span
    split under the interpreter, where one chunk otherwise covers a row of up to 16k)."""
    B, T = rewards.shape
    adv = torch.empty((B, T), device=rewards.device, dtype=torch.float32)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    auto_block, auto_span = _triton_launch(T, B, rewards.device)
    block = block or auto_block
    span = span or auto_span
    S = triton.cdiv(T, span)
    agg = torch.empty((B, S, 5), device=rewards.device, dtype=torch.float32) if S > 1 else adv
    strides = (*rewards.stride(), *values.stride(), *m.stride())
    with on_device(rewards):
        if S > 1:
            _gae_span_map_kernel[(B * S,)](
                rewards, values, m, agg, *strides, T, S, span, gamma, gamma * lam,
                BLOCK=block, num_warps=4,
            )  # fmt: skip
        _gae_fwd_kernel[(B * S,)](
            rewards, values, m, agg, adv, ret, *strides, T, S, span, gamma, gamma * lam,
            SPLIT=S > 1, S_POW2=next_pow2(S), BLOCK=block, num_warps=4,
        )  # fmt: skip
    return adv, ret


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def gae(rewards, values, mask, *, gamma=1.0, lam=0.95, backend="auto"):
    """Generalized advantage estimation over masked rows (see the module docstring for the formula).

    Args:
        rewards: [B, T] float32/bfloat16/float16, any strides (per-token rewards, e.g. the KL
            penalty everywhere plus the score at the last valid token).
        values: [B, T] value estimates, same shape.
        mask: [B, T] bool/int/float with values in {0, 1}: 1 for the tokens that count.
        gamma: discount in [0, 1].  lam: GAE lambda in [0, 1].
        backend: "auto" | "torch" | "triton" | "cpp" | "cuda" (see kernels.backends()).

    Returns:
        (advantages, returns), both [B, T] fp32 (float64 in gives float64 through the reference),
        0 where mask == 0. Differentiable w.r.t. rewards and values through the reference on every
        backend (the kernels are forward-only; see the module docstring).
    """
    check_float("rewards", rewards)
    check_float("values", values)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    check_same_shape(rewards=rewards, values=values)
    check_same_device(rewards=rewards, values=values, mask=mask)
    m = check_mask(mask, rewards.shape)
    gamma = check_scalar("gamma", gamma, lo=0.0, hi=1.0)
    lam = check_scalar("lam", lam, lo=0.0, hi=1.0)
    chosen = resolve(backend, rewards.device, "gae", IMPLEMENTED)
    wants_grad = torch.is_grad_enabled() and (rewards.requires_grad or values.requires_grad)
    if chosen == "torch" or wants_grad or torch.float64 in (rewards.dtype, values.dtype):
        return gae_ref(rewards, values, mask, gamma, lam)
    if rewards.dtype != values.dtype:
        rewards, values = rewards.float(), values.float()
    if chosen == "triton":
        return _gae_triton(rewards, values, m, gamma, lam)
    return ext_op("gae")(rewards, values, m, gamma, lam)

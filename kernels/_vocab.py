"""Row kernels shared by the vocabulary ops: logprobs, token_stats, full_kl and the fused-linear ops.

Letters: N tokens (rows), V vocabulary. Per row, with x = logits, z = ref_logits, T the temperature,
p = softmax(x / T), q = softmax(z / T):

    logp    = log p[label]                        (LABELS)
    entropy = -sum_v p_v log p_v                  (ENTROPY)
    kl      = sum_v p_v (log p_v - log q_v)       (KL)

and the gradient of (g_logp * logp + g_ent * entropy + g_kl * kl) with respect to the logits:

    d/dx_v = g_logp 1[v == label] - p_v (g_logp + g_ent (log p_v + H) - g_kl (log p_v - log q_v - KL))

divided by T. One forward pass reads each row of logits and ref_logits once (online softmax in
base 2, running maxima from -inf, rescaled sums); the backward reads them once more and writes the
gradient in the logits' dtype.

Saved row statistics: stats[n] = (m, log_s), m = max_v x_v (the RAW logits' max) and
log_s = log sum_v exp((x_v - m) / T); likewise stats_ref for z. Both passes form

    log p_v = (x_v - m) / T - log_s

never x_v / T - lse: with a common offset of 1e4 in the logits, fp32 x / T and lse carry the ulp of
1e4 (~1e-3), which would leak into log p and p; x_v - m is exact there (Sterbenz) and small.
Subtracting the raw max before scaling also keeps T != 1 as accurate as T = 1.

Numerics: the entropy numerator t = sum e_v d_v and the KL numerator u = sum e_v (d_v - w_v), with
d_v = (x_v - m) log2(e) / T, w_v = (z_v - m_ref) log2(e) / T and e_v = 2^d_v, stay relative to the running
maxima, so neither forms lse - E[x] (which cancels at |logits| ~ 1e4). KL of a row with itself is
exactly 0 (u = 0 and s = s_ref bit for bit); a negative rounding residue is clamped to 0 so that
KL >= 0 holds (a NaN is kept).

NaN: a NaN logit makes that row's logp, entropy and kl NaN (and its gradient), a NaN reference logit
its kl, as in the torch reference: the masks test `e == 0` / `p == 0` (false for NaN), never `y > -inf`,
and the running maxima are not trusted to carry NaN (tl.max ignores it under the interpreter).

Rows whose label == ignore_index (with LABELS) yield zeros, read nothing and get a zero gradient.
Masked vocabulary (-inf at the same positions in logits and ref_logits) contributes 0.
"""

from __future__ import annotations

import torch

from rlhf_kernels._dispatch import ext_op
from rlhf_kernels._triton import on_device, row_launch, tl, triton


@triton.jit
def _vocab_fwd_kernel(
    # data pointers
    x_ptr,  # [A, R, V] strided view of logits, any float dtype
    z_ptr,  # [A2, R2, V] strided view of ref_logits (read only if KL)
    labels_ptr,  # [N] int32/int64 contiguous (read only if LABELS)
    logp_ptr,  # [N] fp32 out (written only if LABELS)
    entropy_ptr,  # [N] fp32 out (written only if ENTROPY)
    kl_ptr,  # [N] fp32 out (written only if KL)
    stats_ptr,  # [N, 2] fp32 out: (max of the raw logits, log sum exp((x - max) / T))
    stats_ref_ptr,  # [N, 2] fp32 out: the same for ref_logits (written only if KL)
    # strides (elements)
    sx_outer,
    sx_inner,
    sx_v,
    sz_outer,
    sz_inner,
    sz_v,
    # shapes and scalars
    x_rows_inner,
    z_rows_inner,
    V,
    inv_temp,
    ignore_index,
    # meta
    LABELS: tl.constexpr,
    ENTROPY: tl.constexpr,
    KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NEG_INF: tl.constexpr = -float("inf")
    if LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        n_cols = tl.where(label != ignore_index, V, 0)  # ignored tokens stream nothing
    else:
        label = row * 0 - 1
        n_cols = V
    xb = x_ptr + (row // x_rows_inner) * sx_outer + (row % x_rows_inner) * sx_inner
    zb = z_ptr + (row // z_rows_inner) * sz_outer + (row % z_rows_inner) * sz_inner
    scale = inv_temp * LOG2E  # base 2: d = (x - m) log2(e) / T
    m = NEG_INF  # running max of the raw x
    s = 0.0  # sum 2^d
    t = 0.0  # sum 2^d d
    mr = NEG_INF  # running max of the raw z
    sr = 0.0  # sum 2^w, w = (z - mr) log2(e) / T
    u = 0.0  # sum 2^d (d - w)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        offs64 = offs.to(tl.int64)
        x = tl.load(xb + offs64 * sx_v, mask=inb, other=NEG_INF).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # m_new == -inf only while every x so far is -inf (or NaN): subtract 0 instead (no -inf - -inf
        # = NaN), so -inf entries give e = 0 and a NaN entry gives e = NaN, which then poisons s.
        x_seen = m_new > NEG_INF
        m_sub = tl.where(x_seen, m_new, 0.0)
        shift = tl.where(x_seen, (m - m_new) * scale, 0.0)  # <= 0; -inf while s == 0
        alpha = tl.exp2(shift)
        d = (x - m_sub) * scale
        e = tl.exp2(d)
        if ENTROPY:
            # sum e d moves by shift * s when the max moves; e == 0 (a -inf entry) adds 0, not 0 * -inf
            t = alpha * (t + tl.where(s > 0, shift * s, 0.0)) + tl.sum(tl.where(e == 0, 0.0, e * d), axis=0)
        if KL:
            z = tl.load(zb + offs64 * sz_v, mask=inb, other=NEG_INF).to(tl.float32)
            mr_new = tl.maximum(mr, tl.max(z, axis=0))
            # While every z so far is -inf, subtract 0 (sr stays 0); x mass there makes u = +inf, i.e.
            # KL = +inf where q_v = 0 < p_v.
            z_seen = mr_new > NEG_INF
            mr_sub = tl.where(z_seen, mr_new, 0.0)
            shift_r = tl.where(z_seen, (mr - mr_new) * scale, 0.0)
            w = (z - mr_sub) * scale
            sr = sr * tl.exp2(shift_r) + tl.sum(tl.exp2(w), axis=0)
            # d - w moves by shift - shift_r when the maxima move.
            u = alpha * (u + tl.where(s > 0, (shift - shift_r) * s, 0.0)) + tl.sum(
                tl.where(e == 0, 0.0, e * (d - w)), axis=0
            )
            mr = mr_new
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    valid = n_cols > 0
    log2_s = tl.log2(s)
    log_s = log2_s * LN2
    tl.store(stats_ptr + 2 * row, tl.where(valid, m, 0.0))
    tl.store(stats_ptr + 2 * row + 1, tl.where(valid, log_s, 0.0))
    if LABELS:
        safe_label = tl.where(valid & (label >= 0) & (label < V), label, 0)
        x_label = tl.load(xb + safe_label * sx_v, mask=valid).to(tl.float32)
        tl.store(logp_ptr + row, tl.where(valid, (x_label - m) * inv_temp - log_s, 0.0))
    if ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, (log2_s - t / s) * LN2, 0.0))
    if KL:
        log2_sr = tl.log2(sr)
        kl = (u / s - log2_s + log2_sr) * LN2
        kl = tl.where(kl < 0, 0.0, kl)  # a rounding residue below 0 (not tl.maximum: it would drop NaN)
        tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
        tl.store(stats_ref_ptr + 2 * row, tl.where(valid, mr, 0.0))
        tl.store(stats_ref_ptr + 2 * row + 1, tl.where(valid, log2_sr * LN2, 0.0))


@triton.jit
def _vocab_bwd_kernel(
    # data pointers
    x_ptr,  # [A, R, V] strided view of logits
    z_ptr,  # [A2, R2, V] strided view of ref_logits (read only if KL)
    labels_ptr,  # [N] int32/int64 contiguous (read only if LABELS)
    stats_ptr,  # [N, 2] fp32 from the forward: (max, log_s)
    stats_ref_ptr,  # [N, 2] fp32 from the forward (read only if KL)
    entropy_ptr,  # [N] fp32 from the forward (read only if ENTROPY)
    kl_ptr,  # [N] fp32 from the forward (read only if KL)
    grad_logp_ptr,  # [N] fp32 upstream (read only if LABELS)
    grad_entropy_ptr,  # [N] fp32 upstream (read only if ENTROPY)
    grad_kl_ptr,  # [N] fp32 upstream (read only if KL)
    grad_x_ptr,  # [N, V] contiguous out, logits' dtype; may alias x when x is that same [N, V] buffer
    # strides (elements)
    sx_outer,
    sx_inner,
    sx_v,
    sz_outer,
    sz_inner,
    sz_v,
    # shapes and scalars
    x_rows_inner,
    z_rows_inner,
    V,
    inv_temp,
    ignore_index,
    # meta
    LABELS: tl.constexpr,
    ENTROPY: tl.constexpr,
    KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        g_logp = tl.where(valid, tl.load(grad_logp_ptr + row), 0.0) * inv_temp
    else:
        label = row * 0 - 1
        valid = row >= 0
        g_logp = 0.0
    xb = x_ptr + (row // x_rows_inner) * sx_outer + (row % x_rows_inner) * sx_inner
    zb = z_ptr + (row // z_rows_inner) * sz_outer + (row % z_rows_inner) * sz_inner
    out = grad_x_ptr + row * V
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    # c_v = g_logp + g_ent (log p_v + H) - g_kl (log p_v - log q_v - KL) = c0 + c1 log p_v + g_kl log q_v
    c0 = g_logp
    c1 = 0.0
    g_kl = 0.0
    mr = 0.0
    log_sr = 0.0
    if ENTROPY:
        g_ent = tl.where(valid, tl.load(grad_entropy_ptr + row), 0.0) * inv_temp
        c0 += g_ent * tl.load(entropy_ptr + row)
        c1 += g_ent
    if KL:
        g_kl = tl.where(valid, tl.load(grad_kl_ptr + row), 0.0) * inv_temp
        mr = tl.load(stats_ref_ptr + 2 * row)
        log_sr = tl.load(stats_ref_ptr + 2 * row + 1)
        c0 += g_kl * tl.load(kl_ptr + row)
        c1 -= g_kl
    n_read = tl.where(valid, V, 0)  # ignored tokens write zeros without reading
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        offs64 = offs.to(tl.int64)
        rd = offs < n_read
        x = tl.load(xb + offs64 * sx_v, mask=rd, other=-float("inf")).to(tl.float32)
        logp = (x - m) * inv_temp - log_s  # -inf where p_v == 0
        p = tl.exp(logp)
        c = c0 + c1 * logp
        if KL:
            zv = tl.load(zb + offs64 * sz_v, mask=rd, other=0.0).to(tl.float32)
            c += g_kl * ((zv - mr) * inv_temp - log_sr)
        # p == 0 (masked vocabulary, where c may be +-inf or NaN) contributes 0; a NaN p stays NaN.
        g = tl.where(offs == label, g_logp, 0.0) - tl.where(p == 0, 0.0, p * c)
        tl.store(out + offs64, g.to(grad_x_ptr.dtype.element_ty), mask=offs < V)


def as_grad(g):
    """An upstream gradient as the kernels take it: [N] fp32 contiguous, or None."""
    return None if g is None else g.reshape(-1).float().contiguous()


def _empty(device):
    return torch.empty(0, device=device, dtype=torch.float32)


def vocab_fwd(backend, x3, z3, labels, inv_temp, ignore_index, entropy):
    """x3 [A, R, V] (and z3, the ref rows, or None), labels [N] contiguous int or None
    -> (logp, entropy, kl, stats, stats_ref): logp/entropy/kl [N] fp32 or empty when not asked for,
    stats [N, 2] fp32 (max, log_s) and stats_ref [N, 2] (or empty without z3)."""
    if backend == "cpp":
        return ext_op("token_stats_fwd")(x3, z3, labels, inv_temp, ignore_index, entropy)
    A, R, V = x3.shape
    N = A * R
    dev = x3.device
    f32 = dict(device=dev, dtype=torch.float32)
    has_labels, has_kl = labels is not None, z3 is not None
    stats = torch.empty((N, 2), **f32)
    logp = torch.empty(N, **f32) if has_labels else _empty(dev)
    ent = torch.empty(N, **f32) if entropy else _empty(dev)
    kl = torch.empty(N, **f32) if has_kl else _empty(dev)
    stats_ref = torch.empty((N, 2), **f32) if has_kl else _empty(dev)
    zz = z3 if has_kl else x3
    # With KL each block iteration keeps x, z, d, w and e live (about 6 fp32 per element with the
    # temporaries): a 2048-wide block on 8 warps is 2048 x 6 / 256 = 48 fp32 registers per thread.
    # Not tuned on a GPU yet (none in the session that wrote it).
    launch = row_launch(V, max_block=4096 if not has_kl else 2048)
    if N:
        with on_device(x3):
            _vocab_fwd_kernel[(N,)](
                x3, zz, labels if has_labels else stats, logp if has_labels else stats, ent if entropy else stats,
                kl if has_kl else stats, stats, stats_ref if has_kl else stats,
                x3.stride(0), x3.stride(1), x3.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
                x3.shape[1], zz.shape[1], V, inv_temp, ignore_index,
                LABELS=has_labels, ENTROPY=bool(entropy), KL=has_kl,
                BLOCK=launch["BLOCK"], num_warps=launch["num_warps"],
            )  # fmt: skip
    return logp, ent, kl, stats, stats_ref


def vocab_bwd(backend, x3, z3, labels, saved, grads, inv_temp, ignore_index, out=None):
    """Gradient w.r.t. the logits of sum(g_logp logp + g_ent entropy + g_kl kl).

    saved = (stats, stats_ref, entropy, kl) from vocab_fwd; grads = (g_logp, g_ent, g_kl), each [N] fp32
    contiguous or None (None: that output gets no gradient). `out` ([N, V] contiguous, x3's dtype) is
    written in place when given (Triton only; it may be x3 itself). -> grad [N, V] in x3's dtype.
    """
    stats, stats_ref, ent, kl = saved
    g_logp, g_ent, g_kl = grads
    with_logp = labels is not None and g_logp is not None
    with_ent, with_kl = g_ent is not None, g_kl is not None and z3 is not None
    if backend == "cpp":
        return ext_op("token_stats_bwd")(
            x3, z3 if with_kl else None, labels, stats, stats_ref if with_kl else None, ent if with_ent else None,
            kl if with_kl else None, g_logp if with_logp else None, g_ent, g_kl if with_kl else None,
            inv_temp, ignore_index,
        )  # fmt: skip
    A, R, V = x3.shape
    N = A * R
    grad = out if out is not None else torch.empty((N, V), device=x3.device, dtype=x3.dtype)
    zz = z3 if with_kl else x3
    # With labels but no logp gradient the row still has a label (ignore_index masks it): pass zeros.
    if labels is not None and g_logp is None:
        g_logp = torch.zeros(N, device=x3.device, dtype=torch.float32)
    launch = row_launch(V, max_block=4096 if not with_kl else 2048)
    if N:
        with on_device(x3):
            _vocab_bwd_kernel[(N,)](
                x3, zz, labels if labels is not None else stats, stats, stats_ref if with_kl else stats,
                ent if with_ent else stats, kl if with_kl else stats,
                g_logp if labels is not None else stats, g_ent if with_ent else stats, g_kl if with_kl else stats,
                grad,
                x3.stride(0), x3.stride(1), x3.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
                x3.shape[1], zz.shape[1], V, inv_temp, ignore_index,
                LABELS=labels is not None, ENTROPY=with_ent, KL=with_kl,
                BLOCK=launch["BLOCK"], num_warps=launch["num_warps"],
            )  # fmt: skip
    return grad

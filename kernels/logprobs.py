"""Per-token log-probabilities (and entropy) of labels under softmax(logits / temperature).

Letters: N tokens (all leading dims flattened), V vocabulary.

    logp[n]    = log_softmax(logits[n] / T)[labels[n]]
    entropy[n] = -sum_v p[n, v] log p[n, v],   p = softmax(logits[n] / T)

Tokens whose label is `ignore_index` get logp = entropy = 0 and no gradient, and cost no vocabulary
work. Gradients (x = logits / T, lse = logsumexp(x), log p = x - lse, H = entropy):

    d logp / d x_v = 1[v == label] - p_v
    d H    / d x_v = -p_v (log p_v + H)

The forward streams each row once with an online softmax (running max from -inf, rescaled sums);
the backward streams it once more and writes the gradient in the logits' dtype. Math is fp32.
"""

from __future__ import annotations

import torch

from kernels._checks import check_float, check_labels, check_same_device, check_temperature
from kernels._dispatch import ext_op, resolve
from kernels._rows import as_rows3
from kernels._triton import row_launch, tl, triton

IMPLEMENTED = ("torch", "triton", "cpp")


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def logprobs_ref(logits, labels, temperature=1.0, ignore_index=-100, entropy=False):
    """PyTorch reference: materialises [N, V] temporaries; math in max(logits.dtype, fp32).

    Differentiable through autograd; float64 logits give a float64 result (the test oracle).
    """
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0).long()
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not entropy:
        return logp
    p = logp_all.exp()
    # p * log p is 0 where p == 0 (a -inf logit); the where keeps -inf out of the product and its grad.
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    ent = -plogp.sum(-1)
    ent = torch.where(ignored, torch.zeros_like(ent), ent)
    return logp, ent


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _logprobs_fwd_kernel(
    # data pointers
    logits_ptr,  # [A, R, V] strided view, any float dtype
    labels_ptr,  # [N] int
    logp_ptr,  # [N] fp32 out
    entropy_ptr,  # [N] fp32 out (untouched unless ENTROPY)
    lse_ptr,  # [N] fp32 out: logsumexp(logits / T), saved for the backward
    # strides (elements)
    stride_outer,
    stride_inner,
    stride_v,
    # shapes and scalars
    rows_inner,
    V,
    inv_temp,
    ignore_index,
    # meta
    ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    base = logits_ptr + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    scale = inv_temp * LOG2E  # work in base 2: y = x * log2(e) / T
    m = -float("inf")  # running max of y
    s = 0.0  # sum exp2(y - m)
    t = 0.0  # sum exp2(y - m) * (y - m): entropy numerator, relative to m to avoid cancellation
    n_cols = tl.where(valid, V, 0)  # ignored tokens stream nothing
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        y = tl.load(base + offs.to(tl.int64) * stride_v, mask=offs < V, other=-float("inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(y, axis=0))
        # m_new == -inf only while every y so far is -inf: then nothing is added and s stays 0.
        alpha = tl.where(m_new > -float("inf"), tl.exp2(m - m_new), 1.0)
        d = y - m_new
        e = tl.where(y > -float("inf"), tl.exp2(d), 0.0)
        if ENTROPY:
            shift = tl.where(s > 0, (m - m_new) * s, 0.0)
            t = alpha * (t + shift) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    safe_label = tl.where(valid & (label >= 0) & (label < V), label, 0)
    y_label = tl.load(base + safe_label * stride_v, mask=valid).to(tl.float32) * scale
    log2_s = tl.log2(s)
    lse2 = m + log2_s
    tl.store(logp_ptr + row, tl.where(valid, (y_label - lse2) * LN2, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse2 * LN2, 0.0))
    if ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, (log2_s - t / s) * LN2, 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    # data pointers
    logits_ptr,  # [A, R, V] strided view
    labels_ptr,  # [N]
    lse_ptr,  # [N] fp32 from the forward
    entropy_ptr,  # [N] fp32 from the forward (read only if ENTROPY)
    grad_logp_ptr,  # [N] fp32 upstream gradient of logp
    grad_entropy_ptr,  # [N] fp32 upstream gradient of entropy (read only if ENTROPY)
    grad_logits_ptr,  # [N, V] contiguous out, logits' dtype
    # strides (elements)
    stride_outer,
    stride_inner,
    stride_v,
    # shapes and scalars
    rows_inner,
    V,
    inv_temp,
    ignore_index,
    # meta
    ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    base = logits_ptr + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner
    out = grad_logits_ptr + row * V
    lse = tl.load(lse_ptr + row)
    g_logp = tl.where(valid, tl.load(grad_logp_ptr + row), 0.0) * inv_temp
    if ENTROPY:
        ent = tl.load(entropy_ptr + row)
        g_ent = tl.where(valid, tl.load(grad_entropy_ptr + row), 0.0) * inv_temp
    n_read = tl.where(valid, V, 0)  # ignored tokens write zeros without reading
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < V
        x = tl.load(base + offs.to(tl.int64) * stride_v, mask=offs < n_read, other=-float("inf"))
        logp = x.to(tl.float32) * inv_temp - lse  # log p_v (-inf where p_v == 0)
        p = tl.exp(logp)
        g = tl.where(offs == label, g_logp, 0.0) - g_logp * p
        if ENTROPY:
            g -= g_ent * tl.where(p > 0, p * (logp + ent), 0.0)
        tl.store(out + offs, g.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------------------
# Launchers: one strided [A, R, V] view in, fp32 rows out
# --------------------------------------------------------------------------------------------------
def _fwd(backend, rows3, labels, inv_temp, ignore_index, entropy):
    """rows3 [A, R, V], labels [N] -> (logp [N], entropy [N] or empty, lse [N]), fp32."""
    if backend in ("cpp", "cuda"):
        return ext_op("logprobs_fwd")(rows3, labels, inv_temp, ignore_index, entropy)
    A, R, V = rows3.shape
    N = A * R
    logp = torch.empty(N, device=rows3.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else torch.empty(0, device=rows3.device, dtype=torch.float32)
    launch = row_launch(V, max_block=4096)
    if N:
        _logprobs_fwd_kernel[(N,)](
            rows3, labels, logp, ent if entropy else logp, lse,
            rows3.stride(0), rows3.stride(1), rows3.stride(2),
            R, V, inv_temp, ignore_index,
            ENTROPY=entropy, BLOCK=launch["BLOCK"], num_warps=launch["num_warps"],
        )  # fmt: skip
    return logp, ent, lse


def _bwd(backend, rows3, labels, lse, ent, grad_logp, grad_ent, inv_temp, ignore_index):
    """-> grad_logits [N, V] contiguous, rows3's dtype."""
    if backend in ("cpp", "cuda"):
        return ext_op("logprobs_bwd")(rows3, labels, lse, ent, grad_logp, grad_ent, inv_temp, ignore_index)
    A, R, V = rows3.shape
    N = A * R
    grad = torch.empty((N, V), device=rows3.device, dtype=rows3.dtype)
    with_ent = grad_ent is not None
    launch = row_launch(V, max_block=4096)
    if N:
        _logprobs_bwd_kernel[(N,)](
            rows3, labels, lse, ent if with_ent else lse, grad_logp, grad_ent if with_ent else grad_logp, grad,
            rows3.stride(0), rows3.stride(1), rows3.stride(2),
            R, V, inv_temp, ignore_index,
            ENTROPY=with_ent, BLOCK=launch["BLOCK"], num_warps=launch["num_warps"],
        )  # fmt: skip
    return grad


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_temp, ignore_index, entropy, backend):
        rows3 = as_rows3(logits)
        flat_labels = labels.reshape(-1)
        logp, ent, lse = _fwd(backend, rows3, flat_labels, inv_temp, ignore_index, entropy)
        ctx.save_for_backward(rows3, flat_labels, lse, ent)
        ctx.meta = (inv_temp, ignore_index, backend, logits.shape)
        ctx.set_materialize_grads(False)
        shape = labels.shape
        return logp.view(shape), (ent.view(shape) if entropy else None)

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        rows3, labels, lse, ent = ctx.saved_tensors
        inv_temp, ignore_index, backend, shape = ctx.meta
        if grad_logp is None and grad_ent is None:
            return (None,) * 6
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logp = grad_logp.reshape(-1).float().contiguous()
        if grad_ent is not None:
            grad_ent = grad_ent.reshape(-1).float().contiguous()
        grad = _bwd(backend, rows3, labels, lse, ent, grad_logp, grad_ent, inv_temp, ignore_index)
        return grad.view(shape), None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, entropy=False, backend="auto"):
    """Per-token log-probs of `labels`, optionally with the entropy of each row.

    Args:
        logits: [..., V] float32/bfloat16/float16, any strides.
        labels: [...] int64 (int32 accepted), in [0, V) or == ignore_index.
        temperature: logits are divided by it before the softmax.
        ignore_index: label value whose token yields 0 and no gradient.
        entropy: also return the entropy of softmax(logits / temperature).
        backend: "auto" | "torch" | "triton" | "cpp" | "cuda" (see kernels.backends()).

    Returns:
        logp [...] fp32, or (logp, entropy) with entropy=True; both differentiable w.r.t. logits.
    """
    check_float("logits", logits, min_dim=1)
    check_same_device(logits=logits, labels=labels)
    check_temperature(temperature)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    chosen = resolve(backend, logits.device, "logprobs", IMPLEMENTED)
    if chosen == "torch" or logits.dtype == torch.float64:
        return logprobs_ref(logits, labels, temperature, ignore_index, entropy)
    logp, ent = _LogProbs.apply(logits, labels, 1.0 / float(temperature), int(ignore_index), bool(entropy), chosen)
    return (logp, ent) if entropy else logp

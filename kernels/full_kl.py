"""Exact per-token KL divergence over the whole vocabulary, without materialising log-probs.

Letters: N tokens (all leading dims flattened), V vocabulary.

    kl[n] = KL(p || q) = sum_v p_v (log p_v - log q_v),   p = softmax(logits[n] / T), q = softmax(ref_logits[n] / T)

Gradient flows to `logits` only (ref_logits is a constant, e.g. the frozen reference policy):

    d kl / d x_v = p_v (log p_v - log q_v - kl),   x = logits / T

The forward reads each tensor once (2 N V elements) and keeps five fp32 scalars per row (kl and the
(max, log-sum) statistics of both rows, kernels/_vocab.py); the
backward reads both once more and writes the gradient in the logits' dtype. -inf at the same
positions in both tensors is masked vocabulary and contributes 0. Row kernels: kernels/_vocab.py
(Triton) and csrc/vocab_rows.h (C++), shared with kernels.token_stats.
"""

from __future__ import annotations

import torch

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_same_device, check_temperature, check_vocab
from rlhf_kernels._dispatch import ext_op, resolve
from rlhf_kernels._rows import as_rows3
from rlhf_kernels._vocab import vocab_bwd, vocab_fwd

IMPLEMENTED = ("torch", "triton", "cpp")


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def full_kl_ref(logits, ref_logits, temperature=1.0):
    """PyTorch reference: materialises [N, V] temporaries; math in max(dtype, fp32).

    Differentiable w.r.t. `logits` through autograd, to any order (ref_logits is detached: the gradient
    rule of kernels/_autograd.py); float64 in, float64 out. V = 0 is a ValueError, as in kernels.full_kl.
    """
    check_vocab(logits.shape[-1])
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(ref_logits.detach().to(dtype) / temperature, dim=-1)
    p = logp.exp()
    # p_v = 0 (a -inf logit) contributes 0; the inner where keeps -inf - -inf = NaN out of the grad.
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


# --------------------------------------------------------------------------------------------------
# Launchers (the Triton kernels are the shared row kernels of kernels/_vocab.py)
# --------------------------------------------------------------------------------------------------
def _fwd(backend, x3, z3, inv_temp):
    """x3, z3 [A, R, V] views -> (kl [N], stats [N, 2], stats_ref [N, 2]), fp32 (stats: kernels/_vocab.py)."""
    if backend == "cpp":
        return ext_op("full_kl_fwd")(x3, z3, inv_temp)
    _, _, kl, stats, stats_ref = vocab_fwd(backend, x3, z3, None, inv_temp, -100, False)
    return kl, stats, stats_ref


def _bwd(backend, x3, z3, kl, stats, stats_ref, grad_kl, inv_temp):
    """-> grad_logits [N, V] contiguous, logits' dtype."""
    if backend == "cpp":
        return ext_op("full_kl_bwd")(x3, z3, stats, stats_ref, kl, grad_kl, inv_temp)
    return vocab_bwd(backend, x3, z3, None, (stats, stats_ref, None, kl), (None, None, grad_kl), inv_temp, -100)


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, inv_temp, backend):
        x3, z3 = as_rows3(logits), as_rows3(ref_logits.detach())
        kl, stats, stats_ref = _fwd(backend, x3, z3, inv_temp)
        ctx.save_for_backward(x3, z3, kl, stats, stats_ref, logits)  # logits: first_order_only's anchor
        ctx.meta = (inv_temp, backend, logits.shape)
        ctx.backend = backend
        return kl.view(logits.shape[:-1])

    @staticmethod
    @first_order_only("full_kl")
    def backward(ctx, grad_kl):
        x3, z3, kl, stats, stats_ref, _ = ctx.saved_tensors
        inv_temp, backend, shape = ctx.meta
        grad_kl = grad_kl.reshape(-1).float().contiguous()
        grad = _bwd(backend, x3, z3, kl, stats, stats_ref, grad_kl, inv_temp)
        return grad.view(shape), None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def check_ref_logits(logits, ref_logits):
    check_float("ref_logits", ref_logits, min_dim=1)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal the logits' {tuple(logits.shape)}")
    if ref_logits.dtype != logits.dtype:
        raise ValueError(f"ref_logits dtype {ref_logits.dtype} must equal the logits' {logits.dtype}")


def full_kl(logits, ref_logits, *, temperature=1.0, backend="auto"):
    """Exact KL(softmax(logits / T) || softmax(ref_logits / T)) per token, over the whole vocabulary.

    Args:
        logits: [..., V] float32/bfloat16/float16, any strides: the policy.
        ref_logits: same shape and dtype, any strides: the reference (no gradient).
        temperature: both are divided by it before the softmax; >= 1e-3 (kernels._checks.MIN_TEMPERATURE).
        backend: "auto" | "torch" | "triton" | "cpp" (see kernels.backends()).

    Returns:
        kl [...] fp32 (>= 0, or NaN where a row of either input holds NaN), differentiable w.r.t. logits
        (first order on "triton"/"cpp"; "torch" supports higher orders).
    """
    check_float("logits", logits, min_dim=1)
    check_vocab(logits.shape[-1])
    check_ref_logits(logits, ref_logits)
    check_same_device(logits=logits, ref_logits=ref_logits)
    check_temperature(temperature)
    chosen = resolve(backend, logits.device, "full_kl", IMPLEMENTED)
    if chosen == "torch" or logits.dtype == torch.float64:
        return full_kl_ref(logits, ref_logits, temperature)
    return _FullKL.apply(logits, ref_logits, 1.0 / float(temperature), chosen)

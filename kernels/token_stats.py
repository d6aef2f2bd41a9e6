"""Everything PPO needs from the vocabulary in one read of each logits tensor: logp, entropy, KL.

Letters: N tokens (all leading dims flattened), V vocabulary. With p = softmax(logits[n] / T),
q = softmax(ref_logits[n] / T):

    logp[n]    = log p[labels[n]]
    entropy[n] = -sum_v p_v log p_v
    kl[n]      = sum_v p_v (log p_v - log q_v)      (exact, not a sampled estimate)

All three are differentiable w.r.t. `logits` (ref_logits is a constant); with x = logits / T,

    d (g_logp logp + g_ent entropy + g_kl kl) / d x_v
        = g_logp 1[v == label] - p_v (g_logp + g_ent (log p_v + H) - g_kl (log p_v - log q_v - kl))

so the backward reads both rows once and writes one gradient, whichever outputs the loss uses.
Tokens whose label is `ignore_index` get logp = entropy = kl = 0, no gradient, and cost no
vocabulary work. Row kernels: kernels/_vocab.py (Triton) and csrc/vocab_rows.h (C++).
"""

from __future__ import annotations

import torch

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_labels, check_same_device, check_temperature, check_vocab
from rlhf_kernels._dispatch import resolve
from rlhf_kernels._rows import as_rows3
from rlhf_kernels._vocab import as_grad, vocab_bwd, vocab_fwd
from rlhf_kernels.full_kl import check_ref_logits, full_kl_ref
from rlhf_kernels.logprobs import logprobs_ref

IMPLEMENTED = ("torch", "triton", "cpp")


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def token_stats_ref(logits, ref_logits, labels, temperature=1.0, ignore_index=-100):
    """PyTorch reference (the composition logprobs_ref + full_kl_ref): [N, V] temporaries.

    Differentiable w.r.t. `logits` (to any order; ref_logits is detached); float64 in, float64 out.
    """
    logp, ent = logprobs_ref(logits, labels, temperature, ignore_index, entropy=True)
    kl = full_kl_ref(logits, ref_logits, temperature)
    kl = torch.where(labels.long() == ignore_index, torch.zeros_like(kl), kl)
    return logp, ent, kl


# --------------------------------------------------------------------------------------------------
# autograd (the kernels are the shared row kernels of kernels/_vocab.py and csrc/vocab_rows.h)
# --------------------------------------------------------------------------------------------------
class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, labels, inv_temp, ignore_index, backend):
        x3, z3 = as_rows3(logits), as_rows3(ref_logits.detach())
        flat_labels = labels.reshape(-1).contiguous()  # [N] contiguous for the kernels, the same buffer fwd and bwd
        logp, ent, kl, stats, stats_ref = vocab_fwd(backend, x3, z3, flat_labels, inv_temp, ignore_index, True)
        ctx.save_for_backward(x3, z3, flat_labels, stats, stats_ref, ent, kl, logits)  # logits: the anchor
        ctx.meta = (inv_temp, ignore_index, backend, logits.shape)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        shape = labels.shape
        return logp.view(shape), ent.view(shape), kl.view(shape)

    @staticmethod
    @first_order_only("token_stats")
    def backward(ctx, grad_logp, grad_ent, grad_kl):
        x3, z3, labels, stats, stats_ref, ent, kl, _ = ctx.saved_tensors
        inv_temp, ignore_index, backend, shape = ctx.meta
        if grad_logp is None and grad_ent is None and grad_kl is None:
            return (None,) * 6
        grads = (as_grad(grad_logp), as_grad(grad_ent), as_grad(grad_kl))
        grad = vocab_bwd(backend, x3, z3, labels, (stats, stats_ref, ent, kl), grads, inv_temp, ignore_index)
        return grad.view(shape), None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def token_stats(logits, ref_logits, labels, *, temperature=1.0, ignore_index=-100, backend="auto"):
    """Per-token (logp, entropy, kl) in one read of `logits` and `ref_logits`.

    Args:
        logits: [..., V] float32/bfloat16/float16, any strides: the policy.
        ref_logits: same shape and dtype, any strides: the reference (no gradient).
        labels: [...] int64 (int32 accepted), any strides, in [0, V) or == ignore_index.
        temperature: both logits are divided by it before the softmax; >= 1e-3 (kernels._checks.MIN_TEMPERATURE).
        ignore_index: label value whose token yields zeros and no gradient.
        backend: "auto" | "torch" | "triton" | "cpp" (see kernels.backends()).

    Returns:
        (logp, entropy, kl), each [...] fp32 and differentiable w.r.t. logits (first order on
        "triton"/"cpp"; "torch" supports higher orders). A NaN logit makes its row's three NaN, a NaN
        reference logit its kl.
    """
    check_float("logits", logits, min_dim=1)
    check_vocab(logits.shape[-1])
    check_ref_logits(logits, ref_logits)
    check_same_device(logits=logits, ref_logits=ref_logits, labels=labels)
    check_temperature(temperature)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    chosen = resolve(backend, logits.device, "token_stats", IMPLEMENTED)
    if chosen == "torch" or logits.dtype == torch.float64:
        return token_stats_ref(logits, ref_logits, labels, temperature, ignore_index)
    return _TokenStats.apply(logits, ref_logits, labels, 1.0 / float(temperature), int(ignore_index), chosen)

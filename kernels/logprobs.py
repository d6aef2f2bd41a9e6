"""Per-token log-probabilities (and entropy) of labels under softmax(logits / temperature).

Letters: N tokens (all leading dims flattened), V vocabulary.

    logp[n]    = log_softmax(logits[n] / T)[labels[n]]
    entropy[n] = -sum_v p[n, v] log p[n, v],   p = softmax(logits[n] / T)

Tokens whose label is `ignore_index` get logp = entropy = 0 and no gradient, and cost no vocabulary
work. Gradients (x = logits / T, log p = log_softmax(x), H = entropy):

    d logp / d x_v = 1[v == label] - p_v
    d H    / d x_v = -p_v (log p_v + H)

The forward streams each row once with an online softmax (running max from -inf, rescaled sums);
the backward streams it once more and writes the gradient in the logits' dtype. Math is fp32, with
log p_v = (logits_v - max) / T - log sum exp((logits - max) / T) in both passes (kernels/_vocab.py):
exact to fp32 relative precision of log p even with a common offset of 1e4 in the logits.
"""

from __future__ import annotations

import torch

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_labels, check_same_device, check_temperature, check_vocab
from rlhf_kernels._dispatch import resolve
from rlhf_kernels._rows import as_rows3
from rlhf_kernels._vocab import as_grad, vocab_bwd, vocab_fwd

IMPLEMENTED = ("torch", "triton", "cpp")


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def logprobs_ref(logits, labels, temperature=1.0, ignore_index=-100, entropy=False):
    """PyTorch reference: materialises [N, V] temporaries; math in max(logits.dtype, fp32).

    Differentiable through autograd (to any order); float64 logits give a float64 result (the test
    oracle). An empty vocabulary (V = 0) is a ValueError, as in kernels.logprobs.
    """
    check_vocab(logits.shape[-1])
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    ignored = labels.long() == ignore_index  # int64: an ignore_index outside int32 must not wrap
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
# autograd: the kernels are the shared vocabulary row kernels (kernels/_vocab.py for Triton,
# csrc/vocab_rows.h for C++) with the logp and entropy switches on and KL off.
# --------------------------------------------------------------------------------------------------
class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_temp, ignore_index, entropy, backend):
        rows3 = as_rows3(logits)
        # The kernels read labels as [N] contiguous; one copy here for strided or expanded (stride 0)
        # labels, saved so that the backward reads the same buffer.
        flat_labels = labels.reshape(-1).contiguous()
        logp, ent, _, stats, _ = vocab_fwd(backend, rows3, None, flat_labels, inv_temp, ignore_index, entropy)
        ctx.save_for_backward(rows3, flat_labels, stats, ent, logits)  # logits: first_order_only's anchor
        ctx.meta = (inv_temp, ignore_index, backend, logits.shape)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        shape = labels.shape
        return logp.view(shape), (ent.view(shape) if entropy else None)

    @staticmethod
    @first_order_only("logprobs")
    def backward(ctx, grad_logp, grad_ent):
        rows3, labels, stats, ent, _ = ctx.saved_tensors
        inv_temp, ignore_index, backend, shape = ctx.meta
        if grad_logp is None and grad_ent is None:
            return (None,) * 6
        grads = (as_grad(grad_logp), as_grad(grad_ent), None)
        grad = vocab_bwd(backend, rows3, None, labels, (stats, None, ent, None), grads, inv_temp, ignore_index)
        return grad.view(shape), None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, entropy=False, backend="auto"):
    """Per-token log-probs of `labels`, optionally with the entropy of each row.

    Args:
        logits: [..., V] float32/bfloat16/float16, any strides.
        labels: [...] int64 (int32 accepted), any strides, in [0, V) or == ignore_index.
        temperature: logits are divided by it before the softmax; >= 1e-3 (kernels._checks.MIN_TEMPERATURE).
        ignore_index: label value whose token yields 0 and no gradient.
        entropy: also return the entropy of softmax(logits / temperature).
        backend: "auto" | "torch" | "triton" | "cpp" (see kernels.backends()).

    Returns:
        logp [...] fp32, or (logp, entropy) with entropy=True; both differentiable w.r.t. logits (first
        order on "triton"/"cpp"; "torch" supports higher orders). A NaN logit makes its row NaN.
    """
    check_float("logits", logits, min_dim=1)
    check_vocab(logits.shape[-1])
    check_same_device(logits=logits, labels=labels)
    check_temperature(temperature)
    check_labels(labels, logits.shape[:-1], logits.shape[-1], ignore_index)
    chosen = resolve(backend, logits.device, "logprobs", IMPLEMENTED, ext="token_stats_fwd")
    if chosen == "torch" or logits.dtype == torch.float64:
        return logprobs_ref(logits, labels, temperature, ignore_index, entropy)
    logp, ent = _LogProbs.apply(logits, labels, 1.0 / float(temperature), int(ignore_index), bool(entropy), chosen)
    return (logp, ent) if entropy else logp

"""(logp, entropy, kl) straight from the policy's and the reference's hidden states through ONE shared
lm_head: the LoRA-policy-over-a-frozen-base case, with no [N, V] tensor on either side.

Letters: N tokens (all leading dims flattened), H hidden, V vocabulary. Policy logits are
hidden @ weight.T (+ bias), reference logits ref_hidden @ weight.T (+ bias); the reference side is a
constant (no gradient to ref_hidden, nor to weight through it). Design, memory and GEMM counts:
kernels/_linear.py.
"""

from __future__ import annotations

import torch.nn.functional as F

from rlhf_kernels._linear import LinearVocab, check_linear, default_chunk, resolve_linear
from rlhf_kernels.token_stats import token_stats_ref


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def linear_token_stats_ref(hidden, ref_hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100):
    """The unfused composition: token_stats_ref(F.linear(hidden, ...), F.linear(ref_hidden, ...).detach(), ...)."""
    ref_logits = F.linear(ref_hidden.detach(), weight.detach(), None if bias is None else bias.detach())
    return token_stats_ref(F.linear(hidden, weight, bias), ref_logits, labels, temperature, ignore_index)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def linear_token_stats(
    hidden,
    ref_hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    chunk_size=None,
    backend="auto",
):
    """token_stats(hidden @ weight.T + bias, ref_hidden @ weight.T + bias, labels) without materialising logits.

    Args:
        hidden: [..., H] float32/bfloat16/float16: the policy's final hidden states.
        ref_hidden: same shape and dtype: the reference's (no gradient).
        weight: [V, H] the shared lm_head, hidden's dtype. Gets a gradient only if it requires grad.
        labels: [...] int64 (int32 accepted), in [0, V) or == ignore_index.
        bias: optional [V], hidden's dtype.
        temperature: both logits are divided by it before the softmax; >= 1e-3 (kernels._checks.MIN_TEMPERATURE).
        ignore_index: label value whose token yields zeros, no gradient and no vocabulary work.
        chunk_size: tokens per chunk (None: [C, V] chunks of 128 MiB).
        backend: "auto" | "torch" | "triton" | "cpp" (the row kernels; "torch" is the unfused reference).

    Returns:
        (logp, entropy, kl), each [...] fp32 and differentiable w.r.t. hidden (and weight, bias).
    """
    check_linear(hidden, ref_hidden, weight, bias, labels, temperature, ignore_index, chunk_size)
    chosen = resolve_linear(backend, hidden.device, "linear_token_stats")
    if chosen == "torch" or hidden.dtype.itemsize == 8:
        return linear_token_stats_ref(hidden, ref_hidden, weight, labels, bias, temperature, ignore_index)
    chunk = chunk_size or default_chunk(weight.shape[0], hidden.dtype)
    return LinearVocab.apply(
        hidden, ref_hidden, weight, bias, labels, 1.0 / float(temperature), int(ignore_index), True, chosen, chunk
    )

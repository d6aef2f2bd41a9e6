"""Per-token log-probs (and entropy) straight from hidden states: logprobs(hidden @ weight.T + bias)
without ever holding the [N, V] logits.

Letters: N tokens (all leading dims flattened), H hidden, V vocabulary. The op is token-chunked:
[C, V] logits per chunk from torch's matmul, the row math from the shared vocabulary kernels, fp32
weight/bias gradient accumulators. Design, memory and GEMM counts: kernels/_linear.py.
"""

from __future__ import annotations

import torch.nn.functional as F

from rlhf_kernels._linear import LinearVocab, check_linear, default_chunk, resolve_linear
from rlhf_kernels.logprobs import logprobs_ref


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def linear_logprobs_ref(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100, entropy=False):
    """The unfused composition: logprobs_ref(F.linear(hidden, weight, bias), ...); [N, V] temporaries."""
    return logprobs_ref(F.linear(hidden, weight, bias), labels, temperature, ignore_index, entropy)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def linear_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    ignore_index=-100,
    entropy=False,
    chunk_size=None,
    backend="auto",
):
    """logprobs(hidden @ weight.T + bias, labels) without materialising the logits.

    Args:
        hidden: [..., H] float32/bfloat16/float16, e.g. the final hidden states.
        weight: [V, H] the lm_head, hidden's dtype. Gets a gradient only if it requires grad.
        labels: [...] int64 (int32 accepted), in [0, V) or == ignore_index.
        bias: optional [V], hidden's dtype.
        temperature: logits are divided by it before the softmax; >= 1e-3 (kernels._checks.MIN_TEMPERATURE).
        ignore_index: label value whose token yields 0, no gradient and no vocabulary work.
        entropy: also return the entropy of softmax(logits / temperature).
        chunk_size: tokens per chunk (None: [C, V] chunks of 128 MiB).
        backend: "auto" | "torch" | "triton" | "cpp" (the row kernels; "torch" is the unfused reference).

    Returns:
        logp [...] fp32, or (logp, entropy) with entropy=True; differentiable w.r.t. hidden, weight, bias.
    """
    check_linear(hidden, None, weight, bias, labels, temperature, ignore_index, chunk_size)
    chosen = resolve_linear(backend, hidden.device, "linear_logprobs")
    if chosen == "torch" or hidden.dtype.itemsize == 8:
        return linear_logprobs_ref(hidden, weight, labels, bias, temperature, ignore_index, entropy)
    chunk = chunk_size or default_chunk(weight.shape[0], hidden.dtype)
    logp, ent, _ = LinearVocab.apply(
        hidden, None, weight, bias, labels, 1.0 / float(temperature), int(ignore_index), bool(entropy), chosen, chunk
    )
    return (logp, ent) if entropy else logp

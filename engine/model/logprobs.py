"""Hidden states -> log-probs, entropy and KL through the fused kernels (rlhf_kernels): no stage ever
materialises [N, V] logits. The stack's roles return hidden states; the shared lm_head weight (V, H)
goes into `rlhf_kernels.linear_logprobs` / `linear_token_stats` together with them.

Letters: B sequences, T time, P prompt tokens (left-padded), R response positions, N tokens, H hidden,
V vocabulary.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels

from ..core.tensors import IGNORE_INDEX


def completion_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, backend: str, *,
                        bias: torch.Tensor | None = None,
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N,) log-probs of the completion tokens and (N,) their rows, from hidden (B, T, H) and labels
    (B, T - 1): only the N hidden states right before completion tokens go through
    rlhf_kernels.linear_logprobs with the lm_head weight (V, H) (and bias, and the temperature that
    carries the model's logit scale: `**stack.head()`); no [N, V] logits are kept."""
    keep = labels != IGNORE_INDEX  # (B, T - 1)
    rows = keep.nonzero()[:, 0]  # (N,)
    logp = kernels.linear_logprobs(hidden[:, :-1][keep], weight, labels[keep], bias=bias, temperature=temperature,
                                   backend=backend)  # (N,)  # fmt: skip
    return logp, rows


def sequence_logps(logp: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) sums of the (N,) token log-probs per row."""
    return logp.new_zeros(n_rows).index_add(0, rows, logp)


@torch.no_grad()
def policy_reference_stats(stack, ids, am, labels, P: int, temperature: float, backend: str, *,
                           adapter: str = "policy") -> dict:  # fmt: skip
    """For sequences (b, P + R) and their response labels (b, R): the policy's (`adapter`'s) log-probs,
    entropy and exact KL to the reference in one fused pass over both hidden states, and the
    reference's log-probs; plus the hidden states (b, P + R, H) and the reference's (b, R, H). In eval
    mode whatever the stack's (no LoRA dropout: these are statistics of fixed policies)."""
    weight = stack.lm_head_weight
    with stack.evaluating():
        hidden = stack.hidden_states(adapter, ids, am)
        ref_hidden = stack.reference(ids, am)[:, P - 1 : -1]
    head = stack.head(temperature)  # the lm_head's bias; the model's logit scale folded into the temperature
    logp, ent, kl = kernels.linear_token_stats(hidden[:, P - 1 : -1], ref_hidden, weight, labels, **head,
                                               ignore_index=IGNORE_INDEX, backend=backend)  # fmt: skip
    ref_logp = kernels.linear_logprobs(ref_hidden, weight, labels, **head, ignore_index=IGNORE_INDEX,
                                       backend=backend)  # fmt: skip
    return {"logp": logp, "ent": ent, "kl": kl, "ref_logp": ref_logp, "hidden": hidden, "ref_hidden": ref_hidden}

"""Shared prefixes: rows that begin with the same tokens (a prompt and its k sampled responses in GRPO; a
preference pair's chosen and rejected in DPO and the reward model) run those tokens through the model
ONCE. The prefix forward fills a KV cache (one row per distinct prefix); the cache is expanded to every
row that shares it (DynamicCache.batch_select_indices: a differentiable gather) and each row's own
tokens run on top of it, positions continuing after the prefix. Gradients reach the shared prefix
through the cached keys and values, summed over the rows that read them.

The attention of a row's own tokens sees the prefix's keys and values and its own earlier tokens, with
the positions it has alone: exactly the set of the unshared row, so the hidden states, log-probs and
gradients are the unshared forward's up to fp32 rounding (tests/test_prefix.py). What it saves: every
shared prefix once instead of k times in each linear layer (the activations kept for backward shrink
alike), at the price of two decoder calls instead of one (a quantised base dequantises its weights
per call).

Letters: B rows, T time (the caller's layout), G distinct prefixes, L the longest prefix (left-padded),
S the longest suffix (right-padded), H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefixPlan:
    """How B rows split into G shared prefixes and B suffixes, and where each hidden state goes back."""

    prefix_ids: torch.Tensor  # (G, L) long, left-padded: every prefix ends at column L - 1
    prefix_mask: torch.Tensor  # (G, L) long
    group: torch.Tensor  # (B,) long: each row's prefix
    prefix_length: torch.Tensor  # (B,) long: tokens of the row's prefix (the suffix's first position)
    suffix_ids: torch.Tensor  # (B, S) long, right-padded
    suffix_mask: torch.Tensor  # (B, S) long
    gather: torch.Tensor  # (B, T) long: index of each output position in [zero row, G prefix ends, B * S suffix states]
    shared_tokens: int  # tokens not run again: sum over prefixes of (rows sharing it - 1) * its length


def plan_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_lengths) -> PrefixPlan | None:
    """Group rows (B, T) whose first prefix_lengths[b] real tokens are equal (the real tokens of a row are
    where attention_mask is 1, contiguous: right padding, or a left-padded prompt followed by a
    right-padded response). A row shares at most len - 1 tokens (one token of its own, at least) and at
    least 1 (a prefix is never empty). Returns None when no two rows share a prefix (nothing to save).

    The output layout of shared_prefix_hidden: position c of row b holds the hidden state of the row's
    real token there when that token is the prefix's last or one of its own; any other position
    (padding, a prefix token before the last) holds zeros. Nothing downstream reads those: a prefix
    token before the last predicts another prefix token (a prompt token: no label), and the last real
    token is always the row's own or the prefix's last."""
    B, T = input_ids.shape
    caps = torch.as_tensor(prefix_lengths).tolist()
    ids_cpu, mask_cpu = input_ids.cpu(), attention_mask.cpu().bool()
    rows = []  # (real token ids, first real column)
    for b in range(B):
        cols = mask_cpu[b].nonzero().flatten()
        first = int(cols[0]) if len(cols) else 0
        rows.append((ids_cpu[b, first : first + len(cols)].tolist(), first))
    keys: dict[tuple, int] = {}
    group, lengths = [], []
    for b, (toks, _) in enumerate(rows):
        n = len(toks)
        L = max(1, min(int(caps[b]), n - 1)) if n else 0
        key = tuple(toks[:L])
        group.append(keys.setdefault(key, len(keys)))
        lengths.append(L)
    G = len(keys)
    if G == B:
        return None
    prefixes = list(keys)
    Lmax = max(1, max(len(p) for p in prefixes))
    S = max(1, max(len(t) - L for (t, _), L in zip(rows, lengths)))
    prefix_ids = torch.zeros(G, Lmax, dtype=torch.long)
    prefix_mask = torch.zeros(G, Lmax, dtype=torch.long)
    for g, p in enumerate(prefixes):
        if p:
            prefix_ids[g, Lmax - len(p) :] = torch.tensor(p)
            prefix_mask[g, Lmax - len(p) :] = 1
    suffix_ids = torch.zeros(B, S, dtype=torch.long)
    suffix_mask = torch.zeros(B, S, dtype=torch.long)
    gather = torch.zeros(B, T, dtype=torch.long)  # 0: the zero row
    for b, ((toks, first), L) in enumerate(zip(rows, lengths)):
        own = toks[L:]
        if own:
            suffix_ids[b, : len(own)] = torch.tensor(own)
            suffix_mask[b, : len(own)] = 1
        if L:
            gather[b, first + L - 1] = 1 + group[b]  # the prefix's last token
        base = 1 + G + b * S
        gather[b, first + L : first + L + len(own)] = torch.arange(base, base + len(own))
    sizes = torch.bincount(torch.tensor(group), minlength=G)
    shared = int(sum((int(sizes[g]) - 1) * len(p) for g, p in enumerate(prefixes)))
    device = input_ids.device
    return PrefixPlan(
        prefix_ids=prefix_ids.to(device), prefix_mask=prefix_mask.to(device),
        group=torch.tensor(group, device=device), prefix_length=torch.tensor(lengths, device=device),
        suffix_ids=suffix_ids.to(device), suffix_mask=suffix_mask.to(device), gather=gather.to(device),
        shared_tokens=shared,
    )  # fmt: skip


def prefix_hidden(stack, adapter: str | None, plan: PrefixPlan) -> torch.Tensor:
    """(B, T, H) hidden states of `adapter` (None: the bare base) for the rows `plan` was made from, in
    their layout (plan_prefixes says which positions are filled): the prefixes once, then every row's
    own tokens on the expanded KV cache."""
    from transformers import DynamicCache

    config = stack.model.get_base_model().config
    cache = DynamicCache(config=config)
    # step 1. the G prefixes, left-padded, filling the cache
    pre = stack.hidden_states(adapter, plan.prefix_ids, plan.prefix_mask, past_key_values=cache)  # (G, L, H)
    # step 2. one cache row per row (a gather: its backward sums each row's gradient into its prefix)
    _expand_cache(cache, plan.group)
    L, S = plan.prefix_ids.shape[1], plan.suffix_ids.shape[1]
    mask = torch.cat([plan.prefix_mask[plan.group], plan.suffix_mask], dim=1)  # (B, L + S)
    positions = plan.prefix_length[:, None] + torch.arange(S, device=mask.device)[None, :]
    own = stack.hidden_states(adapter, plan.suffix_ids, mask, position_ids=positions, past_key_values=cache,
                              cache_position=torch.arange(L, L + S, device=mask.device))  # (B, S, H)
    # step 3. back to the caller's layout
    H = own.shape[-1]
    flat = torch.cat([own.new_zeros(1, H), pre[:, -1], own.reshape(-1, H)])
    return _gather_rows(flat, plan.gather)


def _expand_cache(cache, group: torch.Tensor) -> None:
    """Every layer's cached keys and values, (G, ...) -> (B, ...) by `group`, through _select_rows (what
    DynamicCache.batch_select_indices does, with a backward in a fixed order); a cache whose layers select
    more than keys and values keeps its own method."""
    from transformers.cache_utils import DynamicLayer

    if any(type(layer).batch_select_indices is not DynamicLayer.batch_select_indices for layer in cache.layers):
        cache.batch_select_indices(group)
        return
    for layer in cache.layers:
        if layer.get_seq_length() > 0:
            layer.keys = _select_rows(layer.keys, group)
            layer.values = _select_rows(layer.values, group)


def _gather_rows(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat[index]: index (B, T) into flat's rows -> (B, T, H), through _select_rows."""
    return _select_rows(flat, index.reshape(-1)).view(*index.shape, flat.shape[-1])


def _select_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] for a 1-D index into dim 0, with a backward that sums repeated rows in a fixed order. Both
    gathers here repeat rows (a prefix's cache and last state in every row sharing it, the zero row at
    every unfilled position), so their backward accumulates. On a CPU, advanced indexing's backward
    (index_put_ with accumulate) adds in parallel in whatever order the threads take: the same step gave
    gradients that differed in the last bits from run to run with 2 threads (a shared-prefix reward-model
    step, 2026-12-08), enough to send a chaotic PPO run elsewhere. index_select's backward (index_add_) adds
    in index order on a CPU; on CUDA it adds with atomics, where index_put_'s sorted accumulate is the
    deterministic one."""
    return t[index] if t.device.type == "cuda" else t.index_select(0, index)

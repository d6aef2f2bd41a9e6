"""Batches of token rows: right-padded sequences with next-token labels on completion tokens only
(TokenBatch), pairs as one batch (chosen rows then rejected rows), and the orders batches are cut in:
seeded and length-bucketed for training, fixed for held-out evaluation and precomputation.

Letters: B sequences, T time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.order import DataOrder, seeded_permutation
from ..core.tensors import IGNORE_INDEX, pad


@dataclass
class TokenBatch:
    """Right-padded sequences and their next-token labels on completion tokens only."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T - 1) long: input_ids[:, 1:] where that token is a completion token, else IGNORE_INDEX
    prompt_lengths: torch.Tensor  # (B,) long: each row's prompt tokens (rows with equal prompts share them: model.prefix)

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                          self.prompt_lengths.to(device))  # fmt: skip


def collate(rows: list[tuple[list[int], int]], pad_id: int) -> TokenBatch:
    """[(ids, P)] * B -> TokenBatch (T = the longest row)."""
    input_ids, attention_mask = pad([ids for ids, _ in rows], pad_id)
    labels = torch.full((len(rows), input_ids.shape[1] - 1), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, P) in enumerate(rows):
        first = max(P, 1)  # label j is token j + 1: completion tokens sit at labels [first - 1, len - 1)
        labels[r, first - 1 : len(ids) - 1] = input_ids[r, first : len(ids)]
    return TokenBatch(input_ids, attention_mask, labels, torch.tensor([P for _, P in rows], dtype=torch.long))


def collate_pairs(pairs: list, pad_id: int) -> TokenBatch:
    """b encoded pairs [((chosen ids, P), (rejected ids, P))] -> ONE TokenBatch of 2b rows: the chosen
    sequences in rows [0, b), the rejected in rows [b, 2b) (one forward scores both)."""
    return collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def bucketed_batch(order: DataOrder, lengths: list[int], step: int, window: int) -> list[int]:
    """Item indices of step `step`'s batch (0-based), length-bucketed.

    The epoch's seeded permutation (the one `order.batch` slices) is cut into windows of `window`
    batches; a window is sorted by length (ties keep the permutation's order) and cut into batches,
    visited in a seeded order of their own. Every epoch visits every item once, the epoch has
    order.steps_per_epoch batches, and the batch is a pure function of (seed, step); window=1 gives
    order.batch(step)'s items."""
    epoch, k = divmod(step, order.steps_per_epoch)
    perm = seeded_permutation(order.n, order.seed, epoch, order.name)
    w, bs = k // window, order.batch_size
    items = sorted(perm[w * window * bs : (w + 1) * window * bs], key=lambda i: lengths[i])
    n_batches = -(-len(items) // bs)
    j = seeded_permutation(n_batches, order.seed, epoch, f"{order.name}/bucket/{w}")[k - w * window]
    return items[j * bs : (j + 1) * bs]


def fixed_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Held-out / precompute batches: items sorted by length (little padding), a fixed composition."""
    ordered = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]

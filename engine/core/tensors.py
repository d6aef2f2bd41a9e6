"""Token rows as tensors: the one padder, the ignore index of labels, the last real token of a row.

Letters: B rows, T time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # a label no loss reads (prompt, padding); rlhf_kernels' ignore_index default


def pad(rows: Sequence[Sequence[int]], pad_id: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ((B, T) long ids, (B, T) long mask), T the longest row (at least 1). side="right"
    pads after each row (training batches); side="left" before it, so every row ends at column T - 1
    (prompts to continue, a question whose last position predicts the answer)."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: expected 'left' or 'right'")
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not len(r):
            continue
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, cols] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) position of each row's last real token (0 for an empty row); works for left
    and right padding."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * (positions + 1)).argmax(dim=1)

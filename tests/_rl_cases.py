"""Masks and inputs shared by the RL-math tests (gae, ppo_loss, value_loss, whiten, kl_penalty).

Letters: B batch, T time.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("full", "right_pad", "left_pad", "holes", "mixed")


def make_mask(B: int, T: int, kind: str, *, seed: int = 0) -> torch.Tensor:
    """[B, T] bool mask.

    right_pad / left_pad: row b keeps a random length in [1, T] at the end / start.
    holes: random interior gaps (tool or observation tokens), at least one valid token per row.
    mixed: every row pattern at once, row by row: full, right pad, left pad, holes, all masked,
    a single valid token (then random) — the edge cases the issue names.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T)
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if kind == "right_pad":
        return t[None, :] < lengths[:, None]
    if kind == "left_pad":
        return t[None, :] >= (T - lengths)[:, None]
    if kind == "holes":
        m = torch.rand(B, T, generator=g) > 0.35
        m[:, 0] = True
        return m
    assert kind == "mixed"
    m = torch.rand(B, T, generator=g) > 0.4
    rows = [
        torch.ones(T, dtype=torch.bool),
        t < max(1, T // 2),
        t >= T - max(1, T // 3),
        (t % 3) != 1,
        torch.zeros(T, dtype=torch.bool),
        t == (T // 2),
    ]
    for b, row in enumerate(rows[:B]):
        m[b] = row
    return m


def randn(*shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift

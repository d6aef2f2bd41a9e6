"""View the leading dims of a [..., V] tensor as strided rows without copying.

Row n of an [A, R, V] view starts at (n // R) * stride_outer + (n % R) * stride_inner; this covers
contiguous tensors and the common slices (e.g. logits[:, :-1] of a (B, T, V) tensor) that a flat
[N, V] view cannot express. Kernels take (rows_inner, stride_outer, stride_inner, stride_v).
"""

from __future__ import annotations

import torch


def as_rows3(x: torch.Tensor) -> torch.Tensor:
    """x [..., V] -> an [A, R, V] view of the same storage (a copy only if 3+ leading dims cannot merge)."""
    lead = [(s, st) for s, st in zip(x.shape[:-1], x.stride()[:-1]) if s != 1]
    merged: list[list[int]] = []
    for size, stride in lead:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    V, sv = x.shape[-1], x.stride(-1)
    if len(merged) == 0:
        return x.as_strided((1, 1, V), (0, 0, sv))
    if len(merged) == 1:
        (n, st), = merged
        return x.as_strided((1, n, V), (0, st, sv))
    if len(merged) == 2:
        (a, sa), (r, sr) = merged
        return x.as_strided((a, r, V), (sa, sr, sv))
    return x.contiguous().view(1, -1, V)

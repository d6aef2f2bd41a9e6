"""Shared test helpers: verbose comparisons against float64 references."""

from __future__ import annotations

import torch

import rlhf_kernels as kernels

EPS32 = torch.finfo(torch.float32).eps


def cpu_backends(op_backends: tuple[str, ...]) -> list[str]:
    """The op's backends that can run CPU tensors on this machine (triton through the interpreter)."""
    status = kernels.backends()
    return [b for b in op_backends if b != "cuda" and status.get(b, "").startswith("yes")]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = "", equal_nan=False
) -> None:
    """Compare in float64; infinities must match exactly and NaN fails unless `equal_nan` (then NaN
    must meet NaN). On failure report the count of mismatches, the first indices and their values,
    and the worst error."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    same_inf = (a == e) & torch.isinf(e)
    finite = torch.isfinite(e)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = (finite & ~(err <= atol + rtol * e.abs())) | (~finite & ~same_inf & ~(equal_nan & torch.isnan(a) & torch.isnan(e)))
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        shown = "; ".join(f"{tuple(i)}: got {a[tuple(i)].item():.8g}, want {e[tuple(i)].item():.8g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol:.3g}, rtol={rtol:.3g}); "
            f"worst finite error {err.max().item():.3g}; first: {shown}"
        )

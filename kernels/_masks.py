"""Token masks shared by the RL-math ops (gae, ppo_loss, value_loss, masked_whiten).

A mask marks the tokens that count (1) and those that do not (0: padding, prompt, tool output).
Any of bool / integer / floating dtypes is accepted, but the values must be exactly 0 or 1: a
weighted mask would silently change every masked mean, so it is an error. Kernels read masks as
uint8 (a bool mask is reinterpreted for free).
"""

from __future__ import annotations

import math

import torch

from rlhf_kernels._dispatch import debug_checks


def check_mask(mask: torch.Tensor, shape: torch.Size, *, name: str = "mask") -> None:
    """mask: same shape as the data, values in {0, 1}.

    The value check reads every element: free on CPU, a device sync on GPU, so there it runs only
    with RLHF_KERNELS_DEBUG=1 (as kernels._checks.check_labels does).
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool, integer or floating, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} must equal the data shape {tuple(shape)}")
    if mask.dtype != torch.bool and mask.numel() and (mask.device.type == "cpu" or debug_checks()):
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            idx = tuple(bad.nonzero()[0].tolist())
            raise ValueError(
                f"{name} must be binary (0/1): {int(bad.sum())} other values, first at index {idx} = {mask[idx].item()}"
            )


def check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shapes must match: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))


def check_scalar(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open=False) -> float:
    """A finite Python number within [lo, hi] (or (lo, hi] with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return float(value)


def mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """The mask as uint8 of the same shape; a bool mask is viewed, not copied."""
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.dtype == torch.uint8:
        return mask
    return (mask != 0).view(torch.uint8)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / count, and 0 (not NaN) when no token is valid. Reference helper."""
    valid = mask != 0
    # where, not x * mask: a NaN or inf at a masked token must not leak into the mean.
    return torch.where(valid, x, torch.zeros_like(x)).sum() / valid.sum().clamp_min(1).to(x.dtype)

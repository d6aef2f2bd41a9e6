"""Token masks shared by the RL-math ops (gae, ppo_loss, value_loss, masked_whiten).

A mask marks the tokens that count (1) and those that do not (0: padding, prompt, tool output).
Any of bool / integer / floating dtypes is accepted, but the values must be exactly 0 or 1: a
weighted mask would silently change every masked mean, so it is an error. Kernels read masks as
uint8, which check_mask returns (a bool mask is reinterpreted for free).
"""

from __future__ import annotations

import math
from typing import NoReturn

import torch

from rlhf_kernels._dispatch import debug_checks, ext_op


def check_mask(mask: torch.Tensor, shape: torch.Size, *, name: str = "mask") -> torch.Tensor:
    """mask: same shape as the data, values in {0, 1}. Returns it as uint8 0/1 of the same shape
    (what the kernels read): a bool mask is viewed, any other dtype converted.

    The value check reads every element: free on CPU, a device sync on GPU, so there it runs only
    with RLHF_KERNELS_DEBUG=1 (as kernels._checks.check_labels does). On CPU the extension's
    `mask_u8` checks and converts in one pass (bench/RESULTS.md: the torch form was two thirds of a
    small kernels.gae call with a float mask).
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool, integer or floating, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} must equal the data shape {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    if mask.device.type == "cpu" and mask.numel():
        op = ext_op("mask_u8")
        if op is not None:
            u8, n_bad = op(mask.detach())
            if n_bad:
                _raise_not_binary(mask, name)
            return u8
        _check_binary(mask, name)
    elif debug_checks() and mask.numel():
        _check_binary(mask, name)
    return mask if mask.dtype == torch.uint8 else (mask != 0).view(torch.uint8)


def _check_binary(mask: torch.Tensor, name: str) -> None:
    if bool(((mask != 0) & (mask != 1)).any()):
        _raise_not_binary(mask, name)


def _raise_not_binary(mask: torch.Tensor, name: str) -> NoReturn:
    bad = (mask != 0) & (mask != 1)
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / count, and 0 (not NaN) when no token is valid. Reference helper."""
    valid = mask != 0
    # where, not x * mask: a NaN or inf at a masked token must not leak into the mean.
    return torch.where(valid, x, torch.zeros_like(x)).sum() / valid.sum().clamp_min(1).to(x.dtype)

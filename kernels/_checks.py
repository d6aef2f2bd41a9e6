"""Input checks and the dtype rule shared by the public ops: every bad input is one clear ValueError."""

from __future__ import annotations

import torch

from rlhf_kernels._dispatch import debug_checks

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def math_dtype(*tensors) -> torch.dtype:
    """The dtype a kernel's reference math runs in: float64 when any input is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_float(name: str, t: torch.Tensor, *, min_dim: int = 0) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32/bfloat16/float16 (or float64), got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


# Smallest temperature the ops accept. At T = 1e-3 a logit gap of 0.1 (under one bf16 ulp at |logit| >= 16)
# already gives p = e^-100, below fp32's smallest normal: the softmax is an argmax to fp32 precision, so
# refusing smaller T loses nothing. Without a floor, T -> 0 reaches where the backends disagree: the
# kernels multiply by an fp32 1/T, which overflows to inf below T ~ 2.9e-39 (then (x - max) / T is
# 0 * inf = NaN at the max), while the reference divides by T.
MIN_TEMPERATURE = 1e-3


def check_temperature(temperature: float) -> None:
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not (ok and MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g}, got {temperature!r}")


def check_vocab(V: int, name: str = "logits") -> None:
    """An empty vocabulary has no softmax: one clear error instead of an IndexError deep inside."""
    if V == 0:
        raise ValueError(f"{name}: the vocabulary is empty (V = 0); a softmax needs at least one entry")


def check_labels(labels: torch.Tensor, lead_shape: torch.Size, vocab: int, ignore_index: int, *, name="labels") -> None:
    """labels: integer tensor of shape `lead_shape`, each in [0, vocab) or == ignore_index.

    The range check reads every label; on CPU that is free, on GPU it is a device sync, so it runs
    only with RLHF_KERNELS_DEBUG=1 (the kernels mask out-of-range labels to -inf/NaN-free values).
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32), got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"{name} shape {tuple(labels.shape)} must equal the logits' leading shape {tuple(lead_shape)}")
    if labels.numel() and (labels.device.type == "cpu" or debug_checks()):
        lab = labels.long()  # compared in int64: an ignore_index outside int32 must not wrap
        bad = (lab != ignore_index) & ((lab < 0) | (lab >= vocab))
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            value = int(labels[tuple(idx)])
            raise ValueError(
                f"{name}: {int(bad.sum())} labels outside [0, {vocab}) and != ignore_index={ignore_index}; "
                f"first at index {tuple(idx)} = {value}"
            )

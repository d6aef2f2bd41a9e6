"""Devices, timing and memory: where a run computes, a clock that waits for the device, and the peak
memory of a step (the CUDA allocator's, or the CPU process's resident high-water mark) and of a whole
run (PeakWindow: the step peaks folded together, setup included).
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """"auto" (CUDA when available), "cpu" or "cuda" (an error when no GPU is visible)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda': no CUDA GPU visible")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype: "auto" is bf16 on CUDA and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def sync_time(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work (timings of CUDA steps)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _current_peak_mib(kind: str) -> float | None:
    """MiB at the peak since the last reset: the CUDA allocator's, or the CPU process's resident
    high-water mark (VmHWM; None where /proc is not readable)."""
    if kind == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakWindow:
    """The largest memory peak from its start on, kept across the per-step resets of reset_peak_memory:
    a reset folds the peak it ends into every open window first. A Run opens one, so result.json
    reports the run's whole peak (setup, every step, evaluations) while each metrics row reports its
    step's."""

    _open: list[PeakWindow] = []

    def __init__(self):
        _fold()
        self.folded = {"cpu": 0.0, "cuda": 0.0}
        _reset("cpu")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            _reset("cuda")
        PeakWindow._open.append(self)

    def peak_mib(self, kind: str) -> float | None:
        """MiB at the window's peak: "cpu" the resident high-water mark of the process, "cuda" the CUDA
        tensors allocated (None when CUDA was never initialised)."""
        now = _current_peak_mib(kind)
        if now is None and not self.folded[kind]:
            return None
        return max(self.folded[kind], now or 0.0)

    def close(self) -> None:
        if self in PeakWindow._open:
            PeakWindow._open.remove(self)


def _fold() -> None:
    for kind in ("cpu", "cuda"):
        now = _current_peak_mib(kind)
        if now is not None:
            for w in PeakWindow._open:
                w.folded[kind] = max(w.folded[kind], now)


def _reset(kind: str) -> None:
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or on CPU the process's resident high-water mark
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current resident size). The peak it
    ends is folded into every open PeakWindow first, so the run's peak survives the reset. (The kernel's
    VmHWM, and with it what /usr/bin/time or a parent polling /proc reports, does restart here: read
    the run's peak from result.json.)"""
    _fold()
    _reset("cuda" if device.type == "cuda" else "cpu")


def peak_memory_mib(device: torch.device) -> float | None:
    """MiB at the peak since reset_peak_memory: CUDA tensors allocated, or the CPU process's resident
    high-water mark (None where /proc is not readable)."""
    return _current_peak_mib("cuda" if device.type == "cuda" else "cpu")

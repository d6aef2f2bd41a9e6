"""Devices, timing and memory: where a run computes, a clock that waits for the device, and the peak
memory of a step (the CUDA allocator's, or the CPU process's resident high-water mark).
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


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or on CPU the process's resident high-water mark
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current resident size)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mib(device: torch.device) -> float | None:
    """MiB at the peak since reset_peak_memory: CUDA tensors allocated, or the CPU process's resident
    high-water mark (None where /proc is not readable)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None

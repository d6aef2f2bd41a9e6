"""Which allocator serves the process's large CPU tensors: rlhf_kernels' caching allocator (the default)
or torch's own (posix_memalign over glibc's heap).

A training step on a CPU frees and reallocates the same large activations every step. glibc serves most of
them from its heap, where they fragment: on SmolLM2-135M about 700 MiB of a DPO step's ~1.9 GiB resident
peak was freed heap that stayed resident (bench/RESULTS.md). The caching allocator (csrc/cpu_allocator.cpp)
maps every block of at least MIN_BYTES on its own and keeps a freed one for the next request of its size
class, so the step's repeated shapes cost no new page faults, and it unmaps idle blocks before the bytes it
maps pass the peak of live ones by more than 1/8 (at least 64 MiB), so what it holds stays near that peak.

RLHF_CPU_ALLOCATOR=system keeps torch's allocator (for a comparison, or a process that shares memory with
a library that frees torch's tensors itself). The choice is process-wide and made when the first model
loads (model/loading.py): tensors allocated before keep their allocator, which frees them.
"""

from __future__ import annotations

import os

ENV = "RLHF_CPU_ALLOCATOR"
CHOICES = ("caching", "system")
MIN_BYTES = 128 * 1024  # glibc's initial mmap threshold: smaller blocks stay with torch's allocator


def chosen() -> str:
    """RLHF_CPU_ALLOCATOR's value ("caching" when unset); anything else is a one-line error."""
    from ..errors import ConfigError

    value = os.environ.get(ENV, "caching").strip().lower() or "caching"
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def use_chosen_cpu_allocator() -> bool:
    """Install the caching allocator unless RLHF_CPU_ALLOCATOR=system (once per process; later calls only
    report). True when it serves large CPU tensors; False with `system` or without the C++ extension."""
    if chosen() == "system":
        return False
    from rlhf_kernels._dispatch import ext_op

    install = ext_op("install_cpu_allocator")
    return bool(install(MIN_BYTES)) if install is not None else False


def cpu_allocator_stats() -> dict[str, int] | None:
    """The caching allocator's counters (bytes and counts), or None when it was never installed."""
    from rlhf_kernels._dispatch import ext_op

    op = ext_op("cpu_allocator_stats")
    values = list(op()) if op is not None else []
    if not values:
        return None
    keys = ("min_bytes", "live_bytes", "idle_bytes", "mapped_bytes", "peak_mapped_bytes", "peak_live_bytes", "hits",
            "misses", "evictions")
    return dict(zip(keys, values))

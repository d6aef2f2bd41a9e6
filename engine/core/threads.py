"""OpenMP's wait policy for every CPU kernel of the process, chosen by the machine's load before torch
loads: torch's ATen and MKL, and rlhf_kernels' C++ kernels (at::parallel_for), all run on the libgomp that
torch bundles, which reads OMP_WAIT_POLICY once, when it is loaded.

libgomp's default lets a thread that finished its share of a parallel region spin (GOMP_SPINCOUNT,
300000 iterations) before it sleeps. On a machine whose cores other processes also want, the spinning
thread burns the time slice its sibling needs to finish, and every region waits for the slowest thread:
a 2-thread run falls far below a 1-thread run. Measured (torch 2.13 CPU, a 2-core machine shared with
other jobs plus a busy loop on one core; separate processes, interleaved, two rounds; provisional, not
a quiet machine):

    fp32 matmul                    1 thread    2 threads: default   GOMP_SPINCOUNT=10000   PASSIVE
    (32, 576) @ (576, 1536)        11-15       1.8-3.6              5.4-6.2                32-40   GFLOP/s
    (1024, 576) @ (576, 1536)      14-20       17-19                19-21                  29-39   GFLOP/s

The first is a decode-step GEMM of SmolLM2-135M's MLP: with the default policy 2 threads ran it 4-8x
slower than 1; with PASSIVE, 2 threads ran it faster than 1. A sleeping thread costs a futex wake per
parallel region instead (microseconds), which on an idle machine is the price of not spinning.
"""

from __future__ import annotations

import os
import sys
import time


RUNNABLE_SAMPLES = 3  # reads of the kernel's runnable-task count, RUNNABLE_GAP_S apart, at import
RUNNABLE_GAP_S = 0.01


def wait_policy(load1: float, others_running: int, cpus: int) -> str | None:
    """"PASSIVE" when other tasks want this process's cores: some are runnable now (`others_running`, the
    kernel's count less this process), or the 1-minute load average is above the cores it may use. A
    spinning thread would burn the time slice its sibling needs. None (libgomp's default: spin a while,
    then sleep) on a quiet machine, where a sleeping thread costs a futex wake per parallel region, which
    tiny models pay on every op. Measured with `python -m rlhf_engine pipeline --seed 0` (`make run`, the
    world-llama toy, 2 threads, 2026-12-07, bench/RESULTS.md): quiet, 46-47 s PASSIVE against 25-27 s
    default; with a busy loop on one of the two cores, 34 s PASSIVE against 82 s default. The load average
    alone lags by a minute (1.74 on 2 cores 20 s after the busy loop started), hence the runnable count."""
    return "PASSIVE" if others_running > 0 or load1 > cpus else None


def _others_running(path: str = "/proc/loadavg") -> int:
    """Tasks the kernel finds runnable besides this one (/proc/loadavg's fourth field, R of R/T; the
    smallest of a few reads, so that a task waking for a moment does not count)."""
    counts = []
    for i in range(RUNNABLE_SAMPLES):
        if i:
            time.sleep(RUNNABLE_GAP_S)
        with open(path, encoding="ascii") as f:
            counts.append(int(f.read().split()[3].split("/")[0]) - 1)
    return max(0, min(counts))


def prefer_passive_openmp() -> str | None:
    """Sets OMP_WAIT_POLICY by wait_policy(the machine now) unless the environment sets a policy; returns
    what it set (None: nothing). Too late once torch is imported (libgomp has read the environment): the
    engine's package calls it first thing (`import rlhf_engine` imports no torch)."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return None
    try:
        load1, cpus = os.getloadavg()[0], len(os.sched_getaffinity(0))
        others = _others_running()
    except (OSError, AttributeError, ValueError, IndexError):  # no /proc (macOS) or no load average: the default
        return None
    policy = wait_policy(load1, others, cpus)
    if policy:
        os.environ["OMP_WAIT_POLICY"] = policy
    return policy

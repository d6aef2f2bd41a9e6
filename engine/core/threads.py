"""OpenMP's wait policy for every CPU kernel of the process, set before torch loads: torch's ATen and
MKL, and rlhf_kernels' C++ kernels (at::parallel_for), all run on the libgomp that torch bundles, which
reads OMP_WAIT_POLICY once, when it is loaded.

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


def prefer_passive_openmp() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless the environment sets a policy; returns whether it was set here.
    Too late once torch is imported (libgomp has read the environment): the engine's package calls it
    first thing (`import rlhf_engine` imports no torch)."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True

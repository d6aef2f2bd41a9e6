"""core.allocator + csrc/cpu_allocator.cpp: large CPU tensors through the caching allocator.

What it promises: a freed block serves the next request of its size class (the same memory, no new
mapping); a request is rounded up by at most 1/8; blocks below MIN_BYTES stay with torch's allocator; idle
blocks are unmapped before the bytes mapped pass the live peak by more than 1/8 (at least 64 MiB); tensors hold what was written into them under many threads; RLHF_CPU_ALLOCATOR chooses it.
Installed once in this process (as every model load does; later tests run on it too)."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from rlhf_engine.core import allocator
from rlhf_engine.errors import ConfigError
from rlhf_kernels._dispatch import ext_op

pytestmark = pytest.mark.skipif(ext_op("install_cpu_allocator") is None, reason="the C++ extension is not built")

MiB = 1 << 20


@pytest.fixture(scope="module")
def installed():
    assert allocator.use_chosen_cpu_allocator()
    assert torch.ops.rlhf_kernels.cpu_allocator_installed()
    return allocator.cpu_allocator_stats


def floats(nbytes):
    return torch.empty(nbytes // 4, dtype=torch.float32)


def test_a_freed_block_serves_the_next_request_of_its_class(installed):
    torch.ops.rlhf_kernels.cpu_allocator_trim()  # no idle block left by earlier tests (best fit could take one)
    x = floats(5 * MiB)
    ptr = x.data_ptr()
    del x
    before = installed()
    y = floats(5 * MiB - 4096)  # a smaller request of the same class: the same block, mapped once
    after = installed()
    assert y.data_ptr() == ptr
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert after["mapped_bytes"] == before["mapped_bytes"]


def test_requests_round_up_by_at_most_an_eighth_and_small_ones_stay_with_torch(installed):
    torch.ops.rlhf_kernels.cpu_allocator_trim()  # a fresh block per request, not an idle one up to 1/4 larger
    for nbytes in (MiB + 4, 3 * MiB + 12345 * 4, 9 * MiB - 4, 130 * 1024):
        before = installed()["live_bytes"]
        x = floats(nbytes)
        held = installed()["live_bytes"] - before
        assert nbytes <= held <= nbytes * 9 / 8 + 4096, (nbytes, held)
        del x
    before = installed()
    small = floats(64 * 1024)  # below MIN_BYTES (128 KiB)
    after = installed()
    assert small.numel() and after["live_bytes"] == before["live_bytes"] and after["misses"] == before["misses"]


def test_idle_blocks_are_unmapped_before_the_mapped_bytes_pass_the_live_peak_by_an_eighth(installed):
    # Sizes that never repeat (each 15% above the last: a new class that no idle block serves), each freed
    # before the next: kept idle, 25 blocks of 4-115 MiB would map 900 MiB (untouched: no memory used); the
    # allocator unmaps the oldest idle ones so that the bytes mapped stay within the live peak plus
    # max(1/8 of it, 64 MiB).
    before = installed()
    for i in range(25):
        x = floats(int(4 * MiB * 1.15**i) // 4096 * 4096)
        s = installed()
        assert s["mapped_bytes"] <= s["peak_live_bytes"] + max(s["peak_live_bytes"] // 8, 64 * MiB), (i, s)
        del x
    assert installed()["evictions"] >= before["evictions"] + 15


def test_tensors_hold_their_values_under_threads(installed):
    # Four threads allocate, fill, check and free blocks of several classes at once (the mutex), and torch's
    # own worker threads compute on them: every tensor reads back what was written, and nothing leaks.
    before = installed()["live_bytes"]
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for step in range(30):
            n = int(torch.randint(40_000, 700_000, (1,), generator=g))
            a = torch.full((n,), float(seed * 1000 + step))
            b = a * 2 + 1
            if not (torch.equal(a, torch.full((n,), float(seed * 1000 + step)))
                    and float(b[-1]) == 2 * (seed * 1000 + step) + 1):  # fmt: skip
                errors.append((seed, step))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert installed()["live_bytes"] == before
    m = torch.randn(300, 400, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((m @ m.T).double(), m.double() @ m.double().T, atol=1e-3)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})  # fmt: skip


def test_raw_scratch_buffers_free_through_it():
    # ATen frees some buffers with the allocator's raw_deleter (raw_allocate / raw_deallocate: a small
    # Linear already does), small ones included, which the fallback allocated. In a child process: the
    # failure this catches is an abort (c10's "raw_deallocate" assert) that would take pytest down with it.
    code = ("import torch; from rlhf_engine.core.allocator import use_chosen_cpu_allocator as u; assert u(); "
            "torch.manual_seed(0); m = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.GELU()); "
            "big = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU()); "
            "print(float(m(torch.randn(3, 8)).sum()), float(big(torch.randn(256, 512)).sum().detach()))")  # fmt: skip
    done = run_python(code)
    assert done.returncode == 0 and len(done.stdout.split()) == 2, done.stderr[-2000:]


def test_the_environment_chooses_and_a_bad_value_is_one_line(monkeypatch):
    probe = ("from rlhf_engine.core.allocator import use_chosen_cpu_allocator as u; "
             "from rlhf_kernels._dispatch import ext_op; print(u(), ext_op('cpu_allocator_installed')())")  # fmt: skip
    assert run_python(probe, RLHF_CPU_ALLOCATOR="system").stdout.split() == ["False", "False"]
    assert run_python(probe, RLHF_CPU_ALLOCATOR="").stdout.split() == ["True", "True"]
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ConfigError, match="RLHF_CPU_ALLOCATOR='jemalloc': expected one of caching, system"):
        allocator.chosen()

"""Every @triton.jit kernel compiles for sm_90 (H100/H200) with the launch choices a GPU would make,
on any machine: tests/_sm90_compile.py runs the Triton paths against a stand-in sm_90 driver (nothing
executes). The interpreter that CPU tests use accepts code the compiler rejects (e.g. gae's span
split once re-assigned a loop-carried variable with another shape)."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "_sm90_compile.py")


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    # the two areas compile in parallel processes (2 cores on CI)
    procs = {
        area: subprocess.Popen([sys.executable, "-P", SCRIPT, area], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for area in ("vocab", "rl")
    }  # fmt: skip
    for area, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        if proc.returncode and "ptxas" in err and "not found" in err:
            pytest.skip("Triton's ptxas is not available here")
        assert proc.returncode == 0, f"{area}: {out[-2000:]}\n{err[-4000:]}"

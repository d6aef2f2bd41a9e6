"""core.threads: on a loaded machine the engine asks libgomp for a passive wait policy before torch (which
loads libgomp) is imported; on a quiet one it keeps libgomp's default; a policy the environment chose
stays."""

import os
import subprocess
import sys

import pytest

# Records OMP_WAIT_POLICY at the moment torch is first imported (what libgomp will read), then makes
# the engine import torch through a lazy name.
PROBE = """
import builtins, os, sys
seen = []
real = builtins.__import__
def hook(name, *a, **k):
    if name == "torch" and "torch" not in sys.modules and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return real(name, *a, **k)
builtins.__import__ = hook
import rlhf_engine
rlhf_engine.ModelStack
print(seen[0])
"""


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_wait_policy_is_set_before_torch_loads(given):
    """With the load average pinned high the engine picks PASSIVE, and libgomp (loaded with torch) sees it;
    an explicit policy wins at any load."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    pin = "import os; os.getloadavg = lambda: (99.0, 0.0, 0.0)\n"
    out = subprocess.run([sys.executable, "-P", "-c", pin + PROBE], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == (given or "PASSIVE")


def test_the_policy_follows_the_machine(tmp_path):
    from rlhf_engine.core.threads import _others_running, wait_policy

    assert wait_policy(0.3, 0, 2) is None and wait_policy(2.0, 0, 2) is None  # quiet (our own load included)
    assert wait_policy(1.7, 1, 2) == "PASSIVE"  # a task runnable now, before the load average shows it
    assert wait_policy(2.01, 0, 2) == "PASSIVE" and wait_policy(9.0, 0, 8) == "PASSIVE" and wait_policy(7.9, 0, 8) is None
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.73 1.70 1.57 3/125 15901\n")  # 3 runnable: this process and 2 others
    assert _others_running(str(loadavg)) == 2
    loadavg.write_text("0.10 0.20 0.30 1/125 15901\n")  # only this process
    assert _others_running(str(loadavg)) == 0

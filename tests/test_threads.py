"""core.threads: the engine asks libgomp for a passive wait policy before torch (which loads libgomp)
is imported, and leaves a policy the environment chose alone."""

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


@pytest.mark.parametrize("given, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_wait_policy_is_set_before_torch_loads(given, want):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-P", "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == want

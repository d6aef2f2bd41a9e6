"""Backend discovery, "auto" choice, the environment override and the no-extension fallback."""

import os
import subprocess
import sys

import pytest
import torch
from util import device_for

import rlhf_kernels as kernels
from rlhf_kernels._dispatch import ENV_BACKEND, resolve
from rlhf_kernels.logprobs import IMPLEMENTED

CPU = torch.device("cpu")
EXT = "token_stats_fwd"  # the extension op behind logprobs' cpp path


def test_backends_reports_every_backend():
    status = kernels.backends()
    assert set(status) == set(kernels.BACKENDS)
    assert status["torch"] == "yes"
    assert status["cpp"] == "yes", f"the extension should be built by `make build`: {status['cpp']}"
    if not torch.cuda.is_available():
        assert status["cuda"] != "yes"


def test_auto_prefers_the_cpp_extension_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_BACKEND, raising=False)
    assert resolve("auto", CPU, "logprobs", IMPLEMENTED, ext=EXT) == "cpp"
    # an op without a C++ kernel falls back to the reference
    assert resolve("auto", CPU, "some_op", ("torch", "triton")) == "torch"


def test_environment_overrides_auto_but_not_an_explicit_backend(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "torch")
    assert resolve("auto", CPU, "logprobs", IMPLEMENTED, ext=EXT) == "torch"
    assert resolve("cpp", CPU, "logprobs", IMPLEMENTED, ext=EXT) == "cpp"
    monkeypatch.setenv(ENV_BACKEND, "triton")  # on CPU tensors under the interpreter, CUDA ones on a GPU machine
    assert resolve("auto", device_for("triton"), "logprobs", IMPLEMENTED, ext=EXT) == "triton"
    monkeypatch.setenv(ENV_BACKEND, "cuda")
    with pytest.raises(ValueError, match="no 'cuda' backend"):
        resolve("auto", CPU, "logprobs", IMPLEMENTED, ext=EXT)
    monkeypatch.setenv(ENV_BACKEND, "quick")
    with pytest.raises(ValueError, match=f"{ENV_BACKEND}='quick'"):
        resolve("auto", CPU, "logprobs", IMPLEMENTED, ext=EXT)


def test_explicit_backend_that_cannot_run_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # unset already on a GPU machine
    with pytest.raises(ValueError, match="triton needs CUDA tensors.*TRITON_INTERPRET=1"):
        resolve("triton", CPU, "logprobs", IMPLEMENTED)
    with pytest.raises(ValueError, match="cpp runs CPU tensors"):
        resolve("cpp", torch.device("meta"), "logprobs", IMPLEMENTED)


def test_device_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="one device"):
        kernels.logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long, device="meta"))


def test_missing_extension_falls_back_with_one_warning():
    # A fresh interpreter in which `rlhf_kernels._C` cannot be imported: `import kernels` still works,
    # backends() says why, "auto" runs the reference, and the warning is printed exactly once.
    code = """
import sys, warnings
sys.modules["rlhf_kernels._C"] = None  # makes `from rlhf_kernels import _C` raise ImportError
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, rlhf_kernels as kernels
    status = kernels.backends()
    x = torch.randn(3, 7)
    y = torch.tensor([1, 2, 3])
    a = kernels.logprobs(x, y)
    b = kernels.logprobs(x, y)
    try:
        kernels.logprobs(x, y, backend="cpp")
        raise SystemExit("cpp should have been refused")
    except ValueError as e:
        assert "extension is not built" in str(e), e
ours = [w for w in caught if "extension unavailable" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert status["cpp"].startswith("extension not built"), status
assert torch.allclose(a, torch.log_softmax(x, -1).gather(-1, y[:, None])[:, 0])
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cpu_kernels_run_on_torchs_threads():
    # at::parallel_for is header code over OpenMP: built without -fopenmp the extension's CPU kernels
    # ran every range on one thread, whatever torch.get_num_threads() said.
    from rlhf_kernels._dispatch import ext_op

    threads = ext_op("parallel_threads")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads(64) == 2
        torch.set_num_threads(1)
        assert threads(64) == 1
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine Triton runs compiled")
def test_a_backend_this_run_expects_but_cannot_run_fails_loudly(tmp_path):
    # TRITON_INTERPRET=0 on a CPU machine: the triton cases must fail, not vanish from the run (issue 8, 23)
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_TEST_BACKENDS", None)
    test = os.path.join(os.path.dirname(__file__), "test_kl_penalty.py")
    out = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          f"{test}::test_triton_launches_on_the_tensors_device"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 1 and "backend 'triton' is expected in this run but cannot run" in out.stdout, out.stdout

"""Test setup.

Without a CUDA device the Triton interpreter is turned on here, before any @triton.jit kernel is
defined (so before rlhf_kernels is imported); with one, Triton cases run compiled on CUDA tensors:
tests put each backend's inputs where `util.device_for(backend)` says.

Which backends a run covers is explicit: RLHF_TEST_BACKENDS=torch,triton,cpp,cuda (the default is all
four). A listed backend that cannot run FAILS its cases instead of silently shrinking the run (e.g.
TRITON_INTERPRET=0 on a CPU machine); "cuda" cases skip where there is no GPU or the extension was
built without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))

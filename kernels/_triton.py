"""Triton import guard and the one place launch settings come from.

Op modules do `from rlhf_kernels._triton import triton, tl` and define their @triton.jit kernels at module
level; without Triton installed the decorator yields a stub that raises when launched, so
`import rlhf_kernels` works everywhere.
"""

from __future__ import annotations

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


def row_launch(n_cols: int, *, max_block: int = 4096) -> dict:
    """Block width and warps for a kernel that streams one row of `n_cols` per program."""
    if triton_interpreted():
        return {"BLOCK": min(next_pow2(n_cols), _INTERP_MAX_BLOCK), "num_warps": 1}
    block = min(next_pow2(n_cols), max_block)
    return {"BLOCK": block, "num_warps": 16 if block >= 4096 else 8 if block >= 1024 else 4}


def flat_block(n: int, *, gpu_block: int = 1024) -> int:
    """Block width of an elementwise/reduction kernel over `n` flat tokens.

    Under the interpreter one block covers up to 64k tokens (its per-block cost is Python overhead);
    on GPU a 1024-token block keeps a few fp32 streams per token in registers at 4 warps.
    """
    if triton_interpreted():
        return min(next_pow2(max(n, 1)), _INTERP_MAX_FLAT)
    return gpu_block


_INTERP_MAX_FLAT = 1 << 16

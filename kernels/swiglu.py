"""SwiGLU's gating product silu(gate) * up (Shazeer 2020, arXiv:2002.05202), as in Llama's MLP
`down_proj(act_fn(gate_proj(x)) * up_proj(x))`, with an autograd Function that saves only its inputs.

Letters: M rows (all leading dims flattened), C columns (the MLP's intermediate size).

    s   = sigmoid(gate)
    out = gate * s * up

Backward, g the upstream gradient, in fp32 whatever the dtypes (sigmoid recomputed):

    d_gate = g * up * s * (1 + gate * (1 - s))
    d_up   = g * gate * s

Memory. The reference's autograd graph keeps gate, up and silu(gate) (M x C); this op keeps gate
and up only. Bytes kept by one call beyond its inputs, M x C = 1024 x 1536: 6,291,456 (fp32) or
3,145,728 (bf16) for the reference vs 0 (tests/test_swiglu.py measures them).

Gradients: gate and up. The "torch" backend supports higher orders (its backward is plain torch
ops on the saved inputs); the "triton" backend is first order only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_same_device, math_dtype
from rlhf_kernels._dispatch import resolve
from rlhf_kernels._masks import check_same_shape
from rlhf_kernels._triton import flat_block, next_pow2, on_device, tl, triton

IMPLEMENTED = ("torch", "triton")
AUTO = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def swiglu_ref(gate, up):
    """PyTorch reference, as HF's LlamaMLP (act_fn = silu); differentiable."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Triton kernels: one [BLOCK_M, BLOCK_C] tile per program, rows on grid axis 0
# --------------------------------------------------------------------------------------------------
# Kernel arguments are grouped by kind, one group a line: the formatter leaves them be.
# fmt: off
@triton.jit
def _load_tile(gate_ptr, up_ptr, gate_stride, up_stride, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_C] tile: its row and column offsets (int64 rows), the in-bounds mask,
    and gate and up in fp32."""
    rows = (tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64))[:, None]
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    inb = (rows < M) & (cols < C)
    a = tl.load(gate_ptr + rows * gate_stride + cols, mask=inb, other=0.0).to(tl.float32)
    b = tl.load(up_ptr + rows * up_stride + cols, mask=inb, other=0.0).to(tl.float32)
    return rows, cols, inb, a, b


@triton.jit
def _swiglu_fwd_kernel(
    # data pointers
    gate_ptr,  # [M, C] rows of stride gate_stride, unit column stride
    up_ptr,  # [M, C] rows of stride up_stride
    out_ptr,  # [M, C] contiguous out, promote(gate, up) dtype
    # strides and shapes
    gate_stride, up_stride,
    M, C,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows, cols, inb, a, b = _load_tile(gate_ptr, up_ptr, gate_stride, up_stride, M, C, BLOCK_M, BLOCK_C)
    out = a * tl.sigmoid(a) * b
    tl.store(out_ptr + rows * C + cols, out.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _swiglu_bwd_kernel(
    # data pointers
    gate_ptr,  # [M, C] rows of stride gate_stride (saved input)
    up_ptr,  # [M, C] rows of stride up_stride (saved input)
    g_ptr,  # [M, C] rows of stride g_stride: the upstream gradient
    d_gate_ptr,  # [M, C] contiguous out, gate's dtype
    d_up_ptr,  # [M, C] contiguous out, up's dtype
    # strides and shapes
    gate_stride, up_stride, g_stride,
    M, C,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows, cols, inb, a, b = _load_tile(gate_ptr, up_ptr, gate_stride, up_stride, M, C, BLOCK_M, BLOCK_C)
    g = tl.load(g_ptr + rows * g_stride + cols, mask=inb, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    d_gate = g * b * s * (1.0 + a * (1.0 - s))
    d_up = g * a * s
    tl.store(d_gate_ptr + rows * C + cols, d_gate.to(d_gate_ptr.dtype.element_ty), mask=inb)
    tl.store(d_up_ptr + rows * C + cols, d_up.to(d_up_ptr.dtype.element_ty), mask=inb)
# fmt: on


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] -> an [M, C] view with unit column stride (e.g. a chunk of a fused gate_up
    projection); a contiguous copy only where no such view exists."""
    t = t.reshape(1) if t.dim() == 0 else t
    C = t.shape[-1]
    if t.stride(-1) == 1 or C == 1:
        try:
            v = t.view(-1, C)
        except RuntimeError:  # leading dims that cannot merge into one stride
            v = None
        if v is not None and (v.stride(1) == 1 or C == 1):
            return v
    return t.contiguous().view(-1, C)


def _launch(M: int, C: int):
    """(grid, BLOCK_M, BLOCK_C): a tile of flat_block(M * C) elements (1024 on GPU), as wide as the
    row up to the whole tile, the rest of it rows."""
    tile = flat_block(M * C)
    block_c = min(next_pow2(C), tile)
    block_m = max(1, tile // block_c)
    return (triton.cdiv(M, block_m), triton.cdiv(C, block_c)), block_m, block_c


def _fwd_triton(gate, up):
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    out = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if out.numel() == 0:
        return out
    a, b = _as_rows(gate), _as_rows(up)
    M, C = a.shape
    grid, block_m, block_c = _launch(M, C)
    with on_device(gate):
        _swiglu_fwd_kernel[grid](
            a, b, out, a.stride(0), b.stride(0), M, C, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return out


def _bwd_triton(gate, up, grad_out):
    d_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    d_up = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return d_gate, d_up
    a, b, g = _as_rows(gate), _as_rows(up), _as_rows(grad_out)
    M, C = a.shape
    grid, block_m, block_c = _launch(M, C)
    with on_device(gate):
        _swiglu_bwd_kernel[grid](
            a, b, g, d_gate, d_up, a.stride(0), b.stride(0), g.stride(0), M, C,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return d_gate, d_up


# --------------------------------------------------------------------------------------------------
# Autograd Functions: both save gate and up, nothing else
# --------------------------------------------------------------------------------------------------
class _SwiGLUTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_ref(gate, up)  # under no_grad here: silu(gate) is freed, not kept

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        dtype = math_dtype(gate, up, grad_out)
        a, b, g = gate.to(dtype), up.to(dtype), grad_out.to(dtype)
        s = torch.sigmoid(a)
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            d_gate = (g * b * s * (1 + a * (1 - s))).to(gate.dtype)
        if ctx.needs_input_grad[1]:
            d_up = (g * a * s).to(up.dtype)
        return d_gate, d_up


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, backend):
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        return _fwd_triton(gate, up)

    @staticmethod
    @first_order_only("swiglu")
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        d_gate, d_up = _bwd_triton(gate, up, grad_out)
        need_gate, need_up = ctx.needs_input_grad[:2]
        return d_gate if need_gate else None, d_up if need_up else None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def swiglu(gate, up, *, backend="auto"):
    """silu(gate) * up, saving only gate and up for the backward.

    Args:
        gate: [...] float32/bfloat16/float16 (gate_proj's output).
        up: [...] the same shape (up_proj's output).
        backend: "auto" | "torch" | "triton" (see kernels.backends(); "auto" is "torch" on CPU and
            "triton" on CUDA).

    Returns:
        [...] in promote(gate.dtype, up.dtype), as swiglu_ref; differentiable w.r.t. gate and up
        (first order only on "triton").
    """
    check_float("gate", gate)
    check_float("up", up)
    check_same_shape(gate=gate, up=up)
    check_same_device(gate=gate, up=up)
    chosen = resolve(backend, gate.device, "swiglu", IMPLEMENTED, auto=AUTO)
    if chosen == "torch" or torch.float64 in (gate.dtype, up.dtype):
        return _SwiGLUTorch.apply(gate, up)
    return _SwiGLUTriton.apply(gate, up, chosen)

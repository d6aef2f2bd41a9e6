"""RMSNorm over the last dim (Zhang & Sennrich 2019, arXiv:1910.07467), as Llama's LlamaRMSNorm,
with an autograd Function that saves only what the backward needs.

Letters: N rows (all leading dims flattened), H hidden, P backward programs.

    rstd  = 1 / sqrt(mean(x^2) + eps)          fp32, one per row
    x_hat = x * rstd
    y     = weight * x_hat                      x_hat rounded to x's dtype first, as HF does

Backward, g the upstream gradient, in fp32 whatever the dtypes:

    grad_x      = rstd * (g * w - x_hat * mean(g * w * x_hat))
    grad_weight = sum over rows of g * x_hat    (only when weight requires grad)

Memory. The reference's autograd graph keeps the fp32 copy of x and (with a trainable weight) the
normalized x_hat, each N x H; this op keeps x itself (no copy), rstd (N fp32) and weight, and
recomputes x_hat in the backward. Bytes kept by one call beyond its inputs, N x H = 1024 x 576:
bf16 x, frozen weight 2,363,392 (reference) vs 4,096 (this op); fp32 x, trainable weight
2,363,392 vs 4,096; fp32 x, frozen weight 4,096 both (tests/test_rms_norm.py measures them).

Gradients: x and weight. The "torch" backend supports higher orders (under create_graph its
backward recomputes rstd from x differentiably); the "triton" backend is first order only.
"""

from __future__ import annotations

import torch
from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_same_device, math_dtype
from rlhf_kernels._dispatch import resolve, triton_interpreted
from rlhf_kernels._masks import check_scalar
from rlhf_kernels._rows import as_rows3
from rlhf_kernels._triton import on_device, row_launch, tl, triton

IMPLEMENTED = ("torch", "triton")
AUTO = {"cuda": ("triton", "torch"), "cpu": ("torch",)}


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def rms_norm_ref(x, weight, eps=1e-6):
    """HF LlamaRMSNorm's math (fp32 for fp32/bf16/fp16 x; float64 in gives the float64 oracle).
    Differentiable; output dtype promote(x.dtype, weight.dtype)."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
# Kernel arguments are grouped by kind, one group a line: the formatter leaves them be.
# fmt: off
@triton.jit
def _rms_norm_fwd_kernel(
    # data pointers
    x_ptr,  # [A, R, H] strided rows, any float dtype
    w_ptr,  # [H] contiguous
    y_ptr,  # [N, H] out, promote(x, weight) dtype
    rstd_ptr,  # [N] fp32 out
    # strides and shapes
    rows_inner, stride_outer, stride_inner, stride_h,
    H, eps,
    # meta
    ONE_BLOCK: tl.constexpr,  # H <= BLOCK: the row is loaded once
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner
    y_row = y_ptr + row * H
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        inb = cols < H
        x = tl.load(x_row + cols * stride_h, mask=inb, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        x_hat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as HF does
        w = tl.load(w_ptr + cols, mask=inb, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (w * x_hat).to(y_ptr.dtype.element_ty), mask=inb)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            c = start + cols
            x = tl.load(x_row + c * stride_h, mask=c < H, other=0.0).to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / H + eps)
        for start in range(0, H, BLOCK):
            c = start + cols
            x = tl.load(x_row + c * stride_h, mask=c < H, other=0.0).to(tl.float32)
            x_hat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
            tl.store(y_row + c, (w * x_hat).to(y_ptr.dtype.element_ty), mask=c < H)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    # data pointers
    x_ptr,  # [A, R, H] strided rows (the saved input)
    w_ptr,  # [H] contiguous
    rstd_ptr,  # [N] fp32 (forward)
    gy_ptr,  # [A', R', H] strided rows: the upstream gradient
    gx_ptr,  # [N, H] out, x's dtype
    gw_part_ptr,  # [P, H] fp32 out: this program's sum of gy * x_hat over its rows
    # strides and shapes
    x_rows_inner, x_stride_outer, x_stride_inner, x_stride_h,
    g_rows_inner, g_stride_outer, g_stride_inner, g_stride_h,
    N, H, rows_per_program,
    # meta
    HAS_GW: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # H <= BLOCK: the row and the partial stay in registers
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    cols = tl.arange(0, BLOCK)
    part_row = gw_part_ptr + pid * H
    if ONE_BLOCK:
        inb = cols < H
        w = tl.load(w_ptr + cols, mask=inb, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(first, last):
            x_row = x_ptr + (row // x_rows_inner) * x_stride_outer + (row % x_rows_inner) * x_stride_inner
            g_row = gy_ptr + (row // g_rows_inner) * g_stride_outer + (row % g_rows_inner) * g_stride_inner
            rstd = tl.load(rstd_ptr + row)
            x_hat = tl.load(x_row + cols * x_stride_h, mask=inb, other=0.0).to(tl.float32) * rstd
            g = tl.load(g_row + cols * g_stride_h, mask=inb, other=0.0).to(tl.float32)
            gw = g * w
            dot = tl.sum(gw * x_hat, axis=0) / H
            gx = rstd * (gw - x_hat * dot)
            tl.store(gx_ptr + row * H + cols, gx.to(gx_ptr.dtype.element_ty), mask=inb)
            if HAS_GW:
                acc += g * x_hat
        if HAS_GW:
            tl.store(part_row + cols, acc, mask=inb)
    else:
        if HAS_GW:
            for start in range(0, H, BLOCK):
                c = start + cols
                tl.store(part_row + c, tl.zeros([BLOCK], dtype=tl.float32), mask=c < H)
        for row in range(first, last):
            x_row = x_ptr + (row // x_rows_inner) * x_stride_outer + (row % x_rows_inner) * x_stride_inner
            g_row = gy_ptr + (row // g_rows_inner) * g_stride_outer + (row % g_rows_inner) * g_stride_inner
            rstd = tl.load(rstd_ptr + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, H, BLOCK):
                c = start + cols
                x_hat = tl.load(x_row + c * x_stride_h, mask=c < H, other=0.0).to(tl.float32) * rstd
                g = tl.load(g_row + c * g_stride_h, mask=c < H, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
                acc += g * w * x_hat
            dot = tl.sum(acc, axis=0) / H
            for start in range(0, H, BLOCK):
                c = start + cols
                x_hat = tl.load(x_row + c * x_stride_h, mask=c < H, other=0.0).to(tl.float32) * rstd
                g = tl.load(g_row + c * g_stride_h, mask=c < H, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + c, mask=c < H, other=0.0).to(tl.float32)
                gx = rstd * (g * w - x_hat * dot)
                tl.store(gx_ptr + row * H + c, gx.to(gx_ptr.dtype.element_ty), mask=c < H)
                if HAS_GW:  # this program alone owns its partial row: no race
                    p = tl.load(part_row + c, mask=c < H, other=0.0)
                    tl.store(part_row + c, p + g * x_hat, mask=c < H)
# fmt: on


def _bwd_programs(N: int, device: torch.device) -> int:
    """P, the backward's program count: each program owns a partial grad_weight row (P x H fp32 =
    1.2 MB at H = 2304 on an H100's 264), so P stays a small multiple of the SM count; under the
    interpreter 3, so that a program's loop covers several rows and programs end unevenly."""
    if triton_interpreted():
        return max(1, min(N, 3))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(N, 2 * sms))


def _fwd_triton(x, weight, eps):
    """x [..., H], weight [H] -> (y [..., H] in promote(x, weight), rstd [N] fp32)."""
    H = x.shape[-1]
    x3 = as_rows3(x)  # [A, R, H], no copy for the usual layouts
    N = x3.shape[0] * x3.shape[1]
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N and H:
        launch = row_launch(H)
        with on_device(x):
            _rms_norm_fwd_kernel[(N,)](
                x3, weight.contiguous(), y, rstd,
                x3.shape[1], *x3.stride(), H, eps,
                ONE_BLOCK=H <= launch["BLOCK"], **launch,
            )  # fmt: skip
    return y, rstd


def _bwd_triton(x, weight, rstd, grad_y, need_weight):
    """-> (grad_x [..., H] in x's dtype, grad_weight [H] in weight's dtype or None)."""
    H = x.shape[-1]
    N = rstd.numel()
    x3, g3 = as_rows3(x), as_rows3(grad_y)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0 or H == 0:
        return grad_x, torch.zeros_like(weight) if need_weight else None
    P = _bwd_programs(N, x.device)
    rows_per_program = triton.cdiv(N, P)
    P = triton.cdiv(N, rows_per_program)
    part = rstd  # a placeholder pointer when HAS_GW is off
    if need_weight:
        part = torch.empty((P, H), dtype=torch.float32, device=x.device)
    launch = row_launch(H)
    with on_device(x):
        _rms_norm_bwd_kernel[(P,)](
            x3, weight.contiguous(), rstd, g3, grad_x, part,
            x3.shape[1], *x3.stride(), g3.shape[1], *g3.stride(),
            N, H, rows_per_program,
            HAS_GW=need_weight, ONE_BLOCK=H <= launch["BLOCK"], **launch,
        )  # fmt: skip
    return grad_x, part.sum(0).to(weight.dtype) if need_weight else None


# --------------------------------------------------------------------------------------------------
# Autograd Functions: both save x, rstd [N] and weight, nothing else
# --------------------------------------------------------------------------------------------------
class _RMSNormTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        h = x.to(torch.promote_types(x.dtype, torch.float32))  # x itself when x is fp32
        rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)  # [...] one per row
        ctx.save_for_backward(x, rstd, weight)
        ctx.eps = eps
        return weight * (h * rstd.unsqueeze(-1)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        dtype = math_dtype(x, weight, grad_y)
        h = x.to(dtype)
        if torch.is_grad_enabled():
            # create_graph: the saved rstd is a constant; recompute it from x
            rstd = torch.rsqrt(h.pow(2).mean(-1) + ctx.eps)
        rstd = rstd.to(dtype).unsqueeze(-1)
        x_hat = h * rstd
        g = grad_y.to(dtype)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            gw = g * weight.to(dtype)
            mean = (gw * x_hat).mean(-1, keepdim=True)
            grad_x = (rstd * (gw - x_hat * mean)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (g * x_hat).reshape(-1, x.shape[-1]).sum(0)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, backend):
        y, rstd = _fwd_triton(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.backend = backend
        return y

    @staticmethod
    @first_order_only("rms_norm")
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        grad_x, grad_weight = _bwd_triton(
            x, weight, rstd, grad_y, ctx.needs_input_grad[1]
        )
        return grad_x if ctx.needs_input_grad[0] else None, grad_weight, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps=1e-6, *, backend="auto"):
    """RMSNorm over the last dim, saving only x, rstd and weight for the backward.

    Args:
        x: [..., H] float32/bfloat16/float16.
        weight: [H] float32/bfloat16/float16 (usually frozen: then no grad_weight is computed).
        eps: > 0, added to mean(x^2).
        backend: "auto" | "torch" | "triton" (see kernels.backends(); "auto" is "torch" on CPU and
            "triton" on CUDA).

    Returns:
        [..., H] in promote(x.dtype, weight.dtype), as rms_norm_ref; differentiable w.r.t. x and
        weight (first order only on "triton").
    """
    check_float("x", x, min_dim=1)
    check_float("weight", weight)
    check_same_device(x=x, weight=weight)
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    eps = check_scalar("eps", eps, lo=0.0, lo_open=True)
    chosen = resolve(backend, x.device, "rms_norm", IMPLEMENTED, auto=AUTO)
    if chosen == "torch" or torch.float64 in (x.dtype, weight.dtype):
        return _RMSNormTorch.apply(x, weight, eps)
    return _RMSNormTriton.apply(x, weight, eps, chosen)

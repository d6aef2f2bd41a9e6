"""Masked whitening: the one place advantages (or any per-token quantity) are normalised.

Letters: N tokens (all dims flattened), P per-block partials.

    n    = sum(mask)
    mean = sum(x * mask) / n
    var  = sum((x - mean)^2 * mask) / (n - 1)                      unbiased (Bessel), as TRL's masked_var
    out  = (x - mean) * rsqrt(var + 1e-8)   (+ mean if not shift_mean),   0 where mask == 0

Statistics are global over every valid token (not per row). Edge cases, defined rather than NaN:
n == 0 gives all zeros; n == 1 takes var = 0, so the single valid token maps to 0 (or to itself with
shift_mean=False). Kernels: per-block (count, sum, M2 about the block mean), a one-program kernel
combining them with Chan et al.'s parallel variance formula into (mean, rstd), then an elementwise
pass; the C++ kernel does two exact passes (mean, then squared deviations) in double.

Gradients. Whitened advantages are targets, so the kernels are forward-only. The rule, the same on
every backend: with grad mode on and `x` requiring grad, the public op runs the differentiable
reference (masked_whiten_ref) whatever the backend; the mask is a constant.
"""

from __future__ import annotations

import torch

from rlhf_kernels._checks import check_float, check_same_device
from rlhf_kernels._dispatch import ext_op, resolve
from rlhf_kernels._masks import check_mask
from rlhf_kernels._triton import flat_block, on_device, reduce_block, tl, triton

IMPLEMENTED = ("torch", "triton", "cpp")
EPS = 1e-8


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def masked_whiten_ref(x, mask, shift_mean=True):
    """PyTorch reference (two-pass); math in max(dtype, fp32). Differentiable."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    valid = mask != 0
    xs = torch.where(valid, x.to(dtype), torch.zeros((), dtype=dtype))
    n = valid.sum().to(dtype)
    mean = xs.sum() / n.clamp_min(1)
    centered = torch.where(valid, xs - mean, torch.zeros((), dtype=dtype))
    var = (centered**2).sum() / (n - 1).clamp_min(1)
    out = centered * torch.rsqrt(var + EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, torch.zeros((), dtype=dtype))


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _whiten_partial_kernel(
    x_ptr,  # [N] any float dtype
    m_ptr,  # [N] uint8 mask
    part_ptr,  # [P, 4] fp32 out: (count, sum, M2 about the block mean, -)
    N,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = tl.load(m_ptr + offs, mask=offs < N, other=0) != 0
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    n = tl.sum(valid.to(tl.float32), axis=0)
    s = tl.sum(x, axis=0)
    d = tl.where(valid, x - s / tl.maximum(n, 1.0), 0.0)
    base = part_ptr + pid * 4
    tl.store(base + 0, n)
    tl.store(base + 1, s)
    tl.store(base + 2, tl.sum(d * d, axis=0))


@triton.jit
def _whiten_stats_kernel(
    part_ptr,  # [P, 4] fp32 partials
    stats_ptr,  # [4] fp32 out: (mean, rstd, count, var)
    P, eps,
    BLOCK: tl.constexpr,
):
    n = 0.0
    s = 0.0
    for start in range(0, P, BLOCK):
        j = (start + tl.arange(0, BLOCK)).to(tl.int64)
        n += tl.sum(tl.load(part_ptr + j * 4 + 0, mask=j < P, other=0.0), axis=0)
        s += tl.sum(tl.load(part_ptr + j * 4 + 1, mask=j < P, other=0.0), axis=0)
    mean = s / tl.maximum(n, 1.0)
    m2 = 0.0
    for start in range(0, P, BLOCK):
        j = (start + tl.arange(0, BLOCK)).to(tl.int64)
        nj = tl.load(part_ptr + j * 4 + 0, mask=j < P, other=0.0)
        sj = tl.load(part_ptr + j * 4 + 1, mask=j < P, other=0.0)
        d = tl.where(nj > 0, sj / tl.maximum(nj, 1.0) - mean, 0.0)
        # Chan et al.: M2 = sum_j M2_j + sum_j n_j (mean_j - mean)^2
        m2 += tl.sum(tl.load(part_ptr + j * 4 + 2, mask=j < P, other=0.0) + nj * d * d, axis=0)
    var = m2 / tl.maximum(n - 1.0, 1.0)
    tl.store(stats_ptr + 0, mean)
    tl.store(stats_ptr + 1, 1.0 / tl.sqrt(var + eps))
    tl.store(stats_ptr + 2, n)
    tl.store(stats_ptr + 3, var)


@triton.jit
def _whiten_apply_kernel(
    x_ptr,  # [N]
    m_ptr,  # [N] uint8
    stats_ptr,  # [4] fp32 (mean, rstd, ...)
    out_ptr,  # [N] fp32 out
    N,
    SHIFT_MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < N
    valid = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(stats_ptr + 0)
    y = (x - mean) * tl.load(stats_ptr + 1)
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + offs, tl.where(valid, y, 0.0), mask=inb)


def _whiten_triton(x, m, shift_mean):
    """x, m flat contiguous [N] -> fp32 [N]."""
    N = x.numel()
    out = torch.empty(N, device=x.device, dtype=torch.float32)
    if N == 0:
        return out
    block = flat_block(N, gpu_block=2048)
    P = triton.cdiv(N, block)
    part = torch.empty((P, 4), device=x.device, dtype=torch.float32)
    stats = torch.empty(4, device=x.device, dtype=torch.float32)
    with on_device(x):
        _whiten_partial_kernel[(P,)](x, m, part, N, BLOCK=block, num_warps=8)
        _whiten_stats_kernel[(1,)](part, stats, P, EPS, BLOCK=reduce_block(P), num_warps=4)
        _whiten_apply_kernel[(P,)](x, m, stats, out, N, SHIFT_MEAN=shift_mean, BLOCK=block, num_warps=8)
    return out


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def masked_whiten(x, mask, *, shift_mean=True, backend="auto"):
    """Whiten `x` over its valid tokens; see the module docstring for the formula and edge cases.

    Args:
        x: [...] float32/bfloat16/float16 (typically the advantages from rlhf_kernels.gae).
        mask: [...] bool/int/float in {0, 1}.
        shift_mean: False adds the mean back (scale-only normalisation).
        backend: "auto" | "torch" | "triton" | "cpp" (see kernels.backends()).

    Returns:
        [...] fp32 (float64 in gives float64), 0 where mask == 0. Differentiable w.r.t. x through the
        reference on every backend (the kernels are forward-only; see the module docstring).
    """
    check_float("x", x)
    check_same_device(x=x, mask=mask)
    m = check_mask(mask, x.shape)
    chosen = resolve(backend, x.device, "masked_whiten", IMPLEMENTED)
    wants_grad = torch.is_grad_enabled() and x.requires_grad
    if chosen == "torch" or wants_grad or x.dtype == torch.float64:
        return masked_whiten_ref(x, mask, bool(shift_mean))
    flat_x = x.detach().reshape(-1).contiguous()
    flat_m = m.reshape(-1).contiguous()
    if chosen == "cpp":
        out = ext_op("masked_whiten")(flat_x, flat_m, bool(shift_mean), EPS)
    else:
        out = _whiten_triton(flat_x, flat_m, bool(shift_mean))
    return out.view(x.shape)

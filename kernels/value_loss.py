"""The clipped value loss of PPO, fused with its clip fraction (the PPO2 baselines form, as in TRL,
OpenRLHF and cleanrl).

Letters: N tokens (all dims flattened).

    values_clipped = old_values + clamp(values - old_values, -clip, clip)
    vf_losses1     = (values - returns)^2
    vf_losses2     = (values_clipped - returns)^2
    vf_loss        = 0.5 * masked_mean(max(vf_losses1, vf_losses2), mask)     token mean over the batch
    vf_clipfrac    = masked_mean(vf_losses2 > vf_losses1)

A batch with no valid token gives 0 for both. Gradient rule (kernels/_autograd.py), the same on every
backend, the reference included: only `values` gets a gradient (old_values and returns are
constants); first order only in the kernel backends (the torch backend supports higher orders):

    d vf_losses1 / d values = 2 (values - returns)
    d vf_losses2 / d values = 2 (values_clipped - returns) * [-clip <= values - old_values <= clip]

with max splitting the gradient evenly on a tie, as torch.maximum does. Inside the clip range
values_clipped is `values` itself: equal in exact arithmetic, but in floating point
old + (values - old) can land an ulp away and turn the tie into a spurious clip (a 1-token
difference in vf_clipfrac between fp32 and float64 at N = 786, measured before this change). Kernels as in
kernels/ppo_loss.py: per-block partials, a one-program reduction, an elementwise backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_same_device
from rlhf_kernels._dispatch import ext_op, resolve
from rlhf_kernels._masks import check_mask, check_same_shape, check_scalar, masked_mean
from rlhf_kernels._triton import flat_block, on_device, reduce_block, tl, triton

IMPLEMENTED = ("torch", "triton", "cpp")


class ValueStats(NamedTuple):
    """0-d fp32 tensors (detached in the kernel backends)."""

    vf_clipfrac: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def value_loss_ref(values, old_values, returns, mask, clip=0.2):
    """PyTorch reference; math in max(dtype, fp32). Differentiable w.r.t. values only (old_values and
    returns are detached: the gradient rule of every backend). -> (vf_loss, ValueStats)."""
    dtype = torch.promote_types(values.dtype, torch.float32)
    valid = mask != 0
    zero = torch.zeros((), dtype=dtype, device=values.device)
    v = torch.where(valid, values.to(dtype), zero)
    old = torch.where(valid, old_values.detach().to(dtype), zero)
    ret = torch.where(valid, returns.detach().to(dtype), zero)
    diff = v - old
    values_clipped = torch.where(diff.abs() <= clip, v, old + torch.clamp(diff, -clip, clip))
    vf_losses1 = (v - ret) ** 2
    vf_losses2 = (values_clipped - ret) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        stats = ValueStats(vf_clipfrac=masked_mean((vf_losses2 > vf_losses1).to(dtype), mask))
    return vf_loss, stats


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _value_token(v_ptr, old_ptr, ret_ptr, m_ptr, offs, N, clip):
    """-> (valid, diff, values - returns, values_clipped - returns, vf_losses1, vf_losses2)."""
    valid = tl.load(m_ptr + offs, mask=offs < N, other=0) != 0
    v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ret = tl.load(ret_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    diff = v - old
    e1 = v - ret
    e2 = tl.where(tl.abs(diff) <= clip, v, old + tl.minimum(tl.maximum(diff, -clip), clip)) - ret
    return valid, diff, e1, e2, e1 * e1, e2 * e2


@triton.jit
def _value_loss_fwd_kernel(
    # data pointers
    v_ptr,  # [N] values, any float dtype
    old_ptr,  # [N] old_values
    ret_ptr,  # [N] returns
    m_ptr,  # [N] uint8 mask
    part_ptr,  # [P, 4] fp32 out: per-block (sum max loss, count, sum clipped, -)
    # shapes and scalars
    N, clip,
    # meta
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid, diff, e1, e2, l1, l2 = _value_token(v_ptr, old_ptr, ret_ptr, m_ptr, offs, N, clip)
    base = part_ptr + pid * 4
    tl.store(base + 0, tl.sum(tl.where(valid, tl.maximum(l1, l2), 0.0), axis=0))
    tl.store(base + 1, tl.sum(valid.to(tl.float32), axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid & (l2 > l1), 1.0, 0.0), axis=0))


@triton.jit
def _value_loss_finalize_kernel(
    part_ptr,  # [P, 4] fp32 partials
    out_ptr,  # [4] fp32 out: (vf_loss, vf_clipfrac, count, -)
    P,
    BLOCK: tl.constexpr,
):
    loss = 0.0
    cnt = 0.0
    clipped = 0.0
    for start in range(0, P, BLOCK):
        j = (start + tl.arange(0, BLOCK)).to(tl.int64)
        inb = j < P
        loss += tl.sum(tl.load(part_ptr + j * 4 + 0, mask=inb, other=0.0), axis=0)
        cnt += tl.sum(tl.load(part_ptr + j * 4 + 1, mask=inb, other=0.0), axis=0)
        clipped += tl.sum(tl.load(part_ptr + j * 4 + 2, mask=inb, other=0.0), axis=0)
    denom = tl.maximum(cnt, 1.0)
    tl.store(out_ptr + 0, 0.5 * loss / denom)
    tl.store(out_ptr + 1, clipped / denom)
    tl.store(out_ptr + 2, cnt)


@triton.jit
def _value_loss_bwd_kernel(
    # data pointers
    v_ptr, old_ptr, ret_ptr, m_ptr,  # [N] as in the forward
    out_ptr,  # [4] fp32 forward result (count at 2)
    grad_out_ptr,  # [] fp32 upstream gradient of vf_loss
    grad_v_ptr,  # [N] out, values' dtype
    # shapes and scalars
    N, clip,
    # meta
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid, diff, e1, e2, l1, l2 = _value_token(v_ptr, old_ptr, ret_ptr, m_ptr, offs, N, clip)
    # 0.5 * d/dv of the square is (v - returns): the factors 0.5 and 2 cancel
    scale = tl.load(grad_out_ptr).to(tl.float32) / tl.maximum(tl.load(out_ptr + 2), 1.0)
    g2 = tl.where((diff >= -clip) & (diff <= clip), e2, 0.0)
    g = tl.where(l1 > l2, e1, tl.where(l2 > l1, g2, 0.5 * (e1 + g2)))
    g = tl.where(valid, g * scale, 0.0)
    tl.store(grad_v_ptr + offs, g.to(grad_v_ptr.dtype.element_ty), mask=offs < N)


# --------------------------------------------------------------------------------------------------
# Launchers: flat contiguous [N] inputs
# --------------------------------------------------------------------------------------------------
def _fwd(backend, v, old, ret, m, clip):
    """-> out [4] fp32: (vf_loss, vf_clipfrac, count, 0)."""
    if backend == "cpp":
        return ext_op("value_loss_fwd")(v, old, ret, m, clip)
    N = v.numel()
    block = flat_block(N)
    P = triton.cdiv(N, block)
    part = torch.empty((max(P, 1), 4), device=v.device, dtype=torch.float32)
    out = torch.zeros(4, device=v.device, dtype=torch.float32)
    if P:
        with on_device(v):
            _value_loss_fwd_kernel[(P,)](v, old, ret, m, part, N, clip, BLOCK=block, num_warps=4)
            _value_loss_finalize_kernel[(1,)](part, out, P, BLOCK=reduce_block(P), num_warps=4)
    return out


def _bwd(backend, v, old, ret, m, out, grad_out, clip):
    if backend == "cpp":
        return ext_op("value_loss_bwd")(v, old, ret, m, out, grad_out, clip)
    N = v.numel()
    grad = torch.empty_like(v)
    block = flat_block(N)
    if N:
        with on_device(v):
            _value_loss_bwd_kernel[(triton.cdiv(N, block),)](
                v, old, ret, m, out, grad_out, grad, N, clip, BLOCK=block, num_warps=4,
            )  # fmt: skip
    return grad


class _ValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, m, clip, backend):
        shape = values.shape
        flat = [t.reshape(-1).contiguous() for t in (values, old_values, returns, m)]
        out = _fwd(backend, *flat, clip)
        ctx.save_for_backward(*flat, out, values)  # values: first_order_only's anchor
        ctx.meta = (clip, shape)
        ctx.backend = backend
        ctx.mark_non_differentiable(out)
        return out[0].clone(), out

    @staticmethod
    @first_order_only("value_loss")
    def backward(ctx, grad_loss, _grad_out):
        v, old, ret, m, out, _ = ctx.saved_tensors
        clip, shape = ctx.meta
        grad = _bwd(ctx.backend, v, old, ret, m, out, grad_loss.float().reshape(()), clip)
        return grad.view(shape), None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def value_loss(values, old_values, returns, mask, *, clip=0.2, backend="auto"):
    """Clipped value loss (token mean over the whole batch) and its clip fraction.

    Args:
        values: [...] float32/bfloat16/float16 predictions of the value head being trained.
        old_values: [...] the predictions at rollout time.
        returns: [...] targets (kernels.gae's returns).
        mask: [...] bool/int/float in {0, 1}.
        clip: values may move at most this far from old_values before the clipped branch takes over.
        backend: "auto" | "torch" | "triton" | "cpp" (see kernels.backends()).

    Returns:
        (vf_loss, ValueStats(vf_clipfrac)): vf_loss a 0-d fp32 tensor differentiable w.r.t. values
        only (on every backend; first order only except on "torch").
    """
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_float(name, t)
    check_same_shape(values=values, old_values=old_values, returns=returns)
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    m = check_mask(mask, values.shape)
    clip = check_scalar("clip", clip, lo=0.0)
    chosen = resolve(backend, values.device, "value_loss", IMPLEMENTED)
    if chosen == "torch" or torch.float64 in (values.dtype, old_values.dtype, returns.dtype):
        return value_loss_ref(values, old_values, returns, mask, clip)
    if chosen == "cpp" and len({values.dtype, old_values.dtype, returns.dtype}) > 1:
        values, old_values, returns = values.float(), old_values.float(), returns.float()
    loss, out = _ValueLoss.apply(values, old_values.detach(), returns.detach(), m, clip, chosen)
    return loss, ValueStats(out.unbind(0)[1])

"""The clipped PPO policy loss with its statistics, fused (Schulman et al. 2017, arXiv:1707.06347;
dual clip: Ye et al. 2020, arXiv:1912.09729).

Letters: N tokens (all dims flattened).

    ratio      = exp(logprobs - old_logprobs)
    pg_losses  = -advantages * ratio
    pg_losses2 = -advantages * clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg_loss_t  = max(pg_losses, pg_losses2)
    dual clip (advantages < 0 only): pg_loss_t = min(pg_loss_t, -advantages * dual_clip)
    pg_loss    = masked_mean(pg_loss_t, mask)                   token mean over the whole batch

    stats: clipfrac  = masked_mean(pg_losses2 > pg_losses)
           approx_kl = masked_mean((ratio - 1) - log(ratio))   (k3 of Schulman's "Approximating KL")
           ratio_mean, ratio_min, ratio_max over valid tokens

A batch with no valid token gives 0 for the loss and every stat. Gradient rule (kernels/_autograd.py),
the same on every backend, the reference included: only `logprobs` gets a gradient (old_logprobs and
advantages are rollout data, constants). First order only in the kernel backends (a second backward
raises); the torch backend supports higher orders. Per token, with r = ratio and A = advantages:

    d pg_losses / d logprobs  = -A r
    d pg_losses2 / d logprobs = -A r * [1 - clip_low <= r <= 1 + clip_high]
    max / min pass the gradient of the larger / smaller side and split it evenly on a tie, as torch does.

Kernels: the forward writes per-block partial sums and a one-program kernel reduces them into
(loss, stats, count), or for up to 64k tokens one program does both (one launch); one elementwise
backward reads the count and the upstream gradient from device memory, so nothing syncs with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_same_device
from rlhf_kernels._dispatch import ext_op, resolve, triton_interpreted
from rlhf_kernels._masks import check_mask, check_same_shape, check_scalar, masked_mean
from rlhf_kernels._triton import flat_block, on_device, reduce_block, tl, triton

IMPLEMENTED = ("torch", "triton", "cpp")


class PPOStats(NamedTuple):
    """0-d fp32 tensors (detached in the kernel backends)."""

    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _masked_extreme(x, valid, identity, reduce):
    """min/max of x over valid entries; `identity` if none (also for an empty x, where torch raises)."""
    flat = torch.where(valid, x, identity).reshape(-1)
    return reduce(torch.cat([flat, flat.new_full((1,), identity)]))


def ppo_loss_ref(logprobs, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """PyTorch reference (cleanrl / TRL / verl form); math in max(dtype, fp32), float64 in gives the
    float64 oracle. Differentiable through autograd w.r.t. logprobs only (old_logprobs and advantages
    are detached: the gradient rule of every backend). -> (pg_loss, PPOStats)."""
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    valid = mask != 0
    old = old_logprobs.detach().to(dtype)
    log_ratio = torch.where(valid, logprobs.to(dtype) - old, torch.zeros((), dtype=dtype))
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages.detach().to(dtype), torch.zeros((), dtype=dtype))
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(pg_losses, pg_losses2)
    if dual_clip is not None:
        losses = torch.where(adv < 0, torch.minimum(losses, -adv * dual_clip), losses)
    pg_loss = masked_mean(losses, mask)
    with torch.no_grad():
        any_valid = valid.any()
        zero = torch.zeros((), dtype=dtype, device=ratio.device)
        stats = PPOStats(
            clipfrac=masked_mean((pg_losses2 > pg_losses).to(dtype), mask),
            approx_kl=masked_mean((ratio - 1) - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
            ratio_min=torch.where(any_valid, _masked_extreme(ratio, valid, float("inf"), torch.min), zero),
            ratio_max=torch.where(any_valid, _masked_extreme(ratio, valid, -float("inf"), torch.max), zero),
        )
    return pg_loss, stats


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _ppo_token(lp_ptr, olp_ptr, adv_ptr, m_ptr, offs, N, lo, hi, dual_clip, DUAL: tl.constexpr):
    """Per-token math for a block of offsets: (valid, A, ratio, log_ratio, pg_losses, pg_losses2, clip1, loss)."""
    inb = offs < N
    valid = tl.load(m_ptr + offs, mask=inb, other=0) != 0
    lp = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    olp = tl.load(olp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    A = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    log_ratio = lp - olp
    ratio = tl.exp(log_ratio)
    pg1 = -A * ratio
    pg2 = -A * tl.minimum(tl.maximum(ratio, lo), hi)
    clip1 = tl.maximum(pg1, pg2)
    loss = clip1
    if DUAL:
        loss = tl.where(A < 0, tl.minimum(clip1, -A * dual_clip), clip1)
    return valid, A, ratio, log_ratio, pg1, pg2, clip1, loss


@triton.jit
def _ppo_loss_fwd_kernel(
    # data pointers
    lp_ptr,  # [N] logprobs, any float dtype
    olp_ptr,  # [N] old_logprobs
    adv_ptr,  # [N] advantages
    m_ptr,  # [N] uint8 mask
    part_ptr,  # [P, 8] fp32 out: per-block (sum loss, count, sum clipped, sum kl, sum ratio, min, max, -)
    # shapes and scalars
    N, lo, hi, dual_clip,
    # meta
    DUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid, A, ratio, log_ratio, pg1, pg2, clip1, loss = _ppo_token(
        lp_ptr, olp_ptr, adv_ptr, m_ptr, offs, N, lo, hi, dual_clip, DUAL)
    w = valid.to(tl.float32)
    base = part_ptr + pid * 8
    tl.store(base + 0, tl.sum(loss * w, axis=0))
    tl.store(base + 1, tl.sum(w, axis=0))
    tl.store(base + 2, tl.sum(tl.where(valid & (pg2 > pg1), 1.0, 0.0), axis=0))
    tl.store(base + 3, tl.sum(tl.where(valid, (ratio - 1.0) - log_ratio, 0.0), axis=0))
    tl.store(base + 4, tl.sum(ratio * w, axis=0))
    tl.store(base + 5, tl.min(tl.where(valid, ratio, float("inf")), axis=0))
    tl.store(base + 6, tl.max(tl.where(valid, ratio, -float("inf")), axis=0))


@triton.jit
def _ppo_loss_finalize_kernel(
    part_ptr,  # [P, 8] fp32 partials
    out_ptr,  # [8] fp32 out: (pg_loss, clipfrac, approx_kl, ratio_mean, ratio_min, ratio_max, count, -)
    P,
    BLOCK: tl.constexpr,
):
    loss = 0.0
    cnt = 0.0
    clipped = 0.0
    kl = 0.0
    rsum = 0.0
    rmin = float("inf")
    rmax = -float("inf")
    for start in range(0, P, BLOCK):
        j = (start + tl.arange(0, BLOCK)).to(tl.int64)
        inb = j < P
        loss += tl.sum(tl.load(part_ptr + j * 8 + 0, mask=inb, other=0.0), axis=0)
        cnt += tl.sum(tl.load(part_ptr + j * 8 + 1, mask=inb, other=0.0), axis=0)
        clipped += tl.sum(tl.load(part_ptr + j * 8 + 2, mask=inb, other=0.0), axis=0)
        kl += tl.sum(tl.load(part_ptr + j * 8 + 3, mask=inb, other=0.0), axis=0)
        rsum += tl.sum(tl.load(part_ptr + j * 8 + 4, mask=inb, other=0.0), axis=0)
        rmin = tl.minimum(rmin, tl.min(tl.load(part_ptr + j * 8 + 5, mask=inb, other=float("inf")), axis=0))
        rmax = tl.maximum(rmax, tl.max(tl.load(part_ptr + j * 8 + 6, mask=inb, other=-float("inf")), axis=0))
    denom = tl.maximum(cnt, 1.0)
    tl.store(out_ptr + 0, loss / denom)
    tl.store(out_ptr + 1, clipped / denom)
    tl.store(out_ptr + 2, kl / denom)
    tl.store(out_ptr + 3, rsum / denom)
    tl.store(out_ptr + 4, tl.where(cnt > 0, rmin, 0.0))
    tl.store(out_ptr + 5, tl.where(cnt > 0, rmax, 0.0))
    tl.store(out_ptr + 6, cnt)


@triton.jit
def _ppo_loss_fwd_one_program_kernel(
    # data pointers
    lp_ptr, olp_ptr, adv_ptr, m_ptr,  # [N] as in _ppo_loss_fwd_kernel
    out_ptr,  # [8] fp32 out, as written by _ppo_loss_finalize_kernel
    # shapes and scalars
    N, lo, hi, dual_clip,
    # meta
    DUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Small N: one program streams all tokens and writes the final result (one launch, not two)."""
    loss = tl.zeros([BLOCK], tl.float32)
    cnt = tl.zeros([BLOCK], tl.float32)
    clipped = tl.zeros([BLOCK], tl.float32)
    kl = tl.zeros([BLOCK], tl.float32)
    rsum = tl.zeros([BLOCK], tl.float32)
    rmin = tl.full([BLOCK], float("inf"), tl.float32)
    rmax = tl.full([BLOCK], -float("inf"), tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        valid, A, ratio, log_ratio, pg1, pg2, clip1, tok = _ppo_token(
            lp_ptr, olp_ptr, adv_ptr, m_ptr, offs, N, lo, hi, dual_clip, DUAL)
        loss += tl.where(valid, tok, 0.0)
        cnt += tl.where(valid, 1.0, 0.0)
        clipped += tl.where(valid & (pg2 > pg1), 1.0, 0.0)
        kl += tl.where(valid, (ratio - 1.0) - log_ratio, 0.0)
        rsum += tl.where(valid, ratio, 0.0)
        rmin = tl.minimum(rmin, tl.where(valid, ratio, float("inf")))
        rmax = tl.maximum(rmax, tl.where(valid, ratio, -float("inf")))
    n = tl.sum(cnt, axis=0)
    denom = tl.maximum(n, 1.0)
    tl.store(out_ptr + 0, tl.sum(loss, axis=0) / denom)
    tl.store(out_ptr + 1, tl.sum(clipped, axis=0) / denom)
    tl.store(out_ptr + 2, tl.sum(kl, axis=0) / denom)
    tl.store(out_ptr + 3, tl.sum(rsum, axis=0) / denom)
    tl.store(out_ptr + 4, tl.where(n > 0, tl.min(rmin, axis=0), 0.0))
    tl.store(out_ptr + 5, tl.where(n > 0, tl.max(rmax, axis=0), 0.0))
    tl.store(out_ptr + 6, n)


@triton.jit
def _ppo_loss_bwd_kernel(
    # data pointers
    lp_ptr, olp_ptr, adv_ptr, m_ptr,  # [N] as in the forward
    out_ptr,  # [8] fp32 forward result (count at 6)
    grad_out_ptr,  # [] fp32 upstream gradient of pg_loss
    grad_lp_ptr,  # [N] out, logprobs' dtype
    # shapes and scalars
    N, lo, hi, dual_clip,
    # meta
    DUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid, A, ratio, log_ratio, pg1, pg2, clip1, loss = _ppo_token(
        lp_ptr, olp_ptr, adv_ptr, m_ptr, offs, N, lo, hi, dual_clip, DUAL)
    scale = tl.load(grad_out_ptr).to(tl.float32) / tl.maximum(tl.load(out_ptr + 6), 1.0)
    g1 = -A * ratio
    g2 = tl.where((ratio >= lo) & (ratio <= hi), g1, 0.0)
    g = tl.where(pg1 > pg2, g1, tl.where(pg2 > pg1, g2, 0.5 * (g1 + g2)))
    if DUAL:
        pg3 = -A * dual_clip
        g_dual = tl.where(clip1 < pg3, g, tl.where(pg3 < clip1, 0.0, 0.5 * g))
        g = tl.where(A < 0, g_dual, g)
    g = tl.where(valid, g * scale, 0.0)
    tl.store(grad_lp_ptr + offs, g.to(grad_lp_ptr.dtype.element_ty), mask=offs < N)


# --------------------------------------------------------------------------------------------------
# Launchers: flat contiguous [N] inputs
# --------------------------------------------------------------------------------------------------
# Up to this many tokens the forward is one program (one launch): 64k tokens x 13 B = 832 KB, a few
# microseconds for one SM, less than the second launch it saves.
ONE_PROGRAM_MAX_N = 1 << 16


def _fwd(backend, lp, olp, adv, m, lo, hi, dual_clip):
    """-> out [8] fp32: (pg_loss, clipfrac, approx_kl, ratio_mean, ratio_min, ratio_max, count, 0).
    Up to ONE_PROGRAM_MAX_N tokens one program loops over the blocks; past it, per-block partials and
    a one-program reduction (tests lower the threshold and force small blocks to run both paths)."""
    if backend == "cpp":
        return ext_op("ppo_loss_fwd")(lp, olp, adv, m, lo, hi, dual_clip)
    N = lp.numel()
    out = torch.zeros(8, device=lp.device, dtype=torch.float32)
    if N == 0:
        return out
    block = flat_block(N)
    P = triton.cdiv(N, block)
    with on_device(lp):
        if P == 1 or N <= ONE_PROGRAM_MAX_N:
            _ppo_loss_fwd_one_program_kernel[(1,)](
                lp, olp, adv, m, out, N, lo, hi, dual_clip, DUAL=dual_clip > 0,
                BLOCK=block if triton_interpreted() else 2048, num_warps=8,
            )  # fmt: skip
            return out
        part = torch.empty((P, 8), device=lp.device, dtype=torch.float32)
        _ppo_loss_fwd_kernel[(P,)](
            lp, olp, adv, m, part, N, lo, hi, dual_clip, DUAL=dual_clip > 0, BLOCK=block, num_warps=4,
        )  # fmt: skip
        _ppo_loss_finalize_kernel[(1,)](part, out, P, BLOCK=reduce_block(P), num_warps=4)
    return out


def _bwd(backend, lp, olp, adv, m, out, grad_out, lo, hi, dual_clip):
    if backend == "cpp":
        return ext_op("ppo_loss_bwd")(lp, olp, adv, m, out, grad_out, lo, hi, dual_clip)
    N = lp.numel()
    grad = torch.empty_like(lp)
    block = flat_block(N)
    if N:
        with on_device(lp):
            _ppo_loss_bwd_kernel[(triton.cdiv(N, block),)](
                lp, olp, adv, m, out, grad_out, grad, N, lo, hi, dual_clip,
                DUAL=dual_clip > 0, BLOCK=block, num_warps=4,
            )  # fmt: skip
    return grad


class _PPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, m, lo, hi, dual_clip, backend):
        shape = logprobs.shape
        flat = [t.reshape(-1).contiguous() for t in (logprobs, old_logprobs, advantages, m)]
        out = _fwd(backend, *flat, lo, hi, dual_clip)
        ctx.save_for_backward(*flat, out, logprobs)  # logprobs: first_order_only's anchor
        ctx.meta = (lo, hi, dual_clip, shape)
        ctx.backend = backend
        ctx.mark_non_differentiable(out)
        return out[0].clone(), out

    @staticmethod
    @first_order_only("ppo_loss")
    def backward(ctx, grad_loss, _grad_out):
        lp, olp, adv, m, out, _ = ctx.saved_tensors
        lo, hi, dual_clip, shape = ctx.meta
        backend = ctx.backend
        grad_loss = grad_loss.float().reshape(())
        grad = _bwd(backend, lp, olp, adv, m, out, grad_loss, lo, hi, dual_clip)
        return grad.view(shape), None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def ppo_loss(logprobs, old_logprobs, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None, backend="auto"):
    """Clipped PPO policy loss (token mean over the whole batch) and its stats; see the module docstring.

    Args:
        logprobs: [...] float32/bfloat16/float16 log-probs of the sampled tokens under the policy.
        old_logprobs: [...] the same under the policy that generated the rollout.
        advantages: [...] (e.g. from rlhf_kernels.gae, whitened with kernels.masked_whiten).
        mask: [...] bool/int/float in {0, 1}: the tokens that count.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO's
            clip-higher uses clip_high > clip_low).
        dual_clip: None, or c > 1: for advantages < 0 the loss is capped at -advantages * c.
        backend: "auto" | "torch" | "triton" | "cpp" (see kernels.backends()).

    Returns:
        (pg_loss, PPOStats): pg_loss a 0-d fp32 tensor differentiable w.r.t. logprobs only (on every
        backend; first order only except on "torch").
    """
    for name, t in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        check_float(name, t)
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    m = check_mask(mask, logprobs.shape)
    lo = 1.0 - check_scalar("clip_low", clip_low, lo=0.0, hi=1.0)
    hi = 1.0 + check_scalar("clip_high", clip_high, lo=0.0)
    if dual_clip is not None:
        dual_clip = check_scalar("dual_clip", dual_clip, lo=1.0, lo_open=True)
    chosen = resolve(backend, logprobs.device, "ppo_loss", IMPLEMENTED)
    if chosen == "torch" or torch.float64 in (logprobs.dtype, old_logprobs.dtype, advantages.dtype):
        return ppo_loss_ref(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip)
    if chosen == "cpp" and len({logprobs.dtype, old_logprobs.dtype, advantages.dtype}) > 1:
        # the C++ kernel takes one input dtype; fp32 holds every accepted one exactly
        old_logprobs, advantages = old_logprobs.float(), advantages.float()
        logprobs_in = logprobs.float()
    else:
        logprobs_in = logprobs
    loss, out = _PPOLoss.apply(
        logprobs_in, old_logprobs.detach(), advantages.detach(), m, lo, hi,
        dual_clip if dual_clip is not None else 0.0, chosen,
    )  # fmt: skip
    _, clipfrac, approx_kl, ratio_mean, ratio_min, ratio_max, _, _ = out.unbind(0)  # one op, not five
    return loss, PPOStats(clipfrac, approx_kl, ratio_mean, ratio_min, ratio_max)

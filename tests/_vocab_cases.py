"""Input builders and comparison helpers shared by the vocabulary-op tests (full_kl, token_stats,
linear_logprobs, linear_token_stats). Letters: N tokens, V vocabulary, H hidden."""

from __future__ import annotations

import pytest
import torch

from util import assert_close

import rlhf_kernels._vocab as vocab

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
BACKENDS = ["triton", "cpp"]


def close(actual, expected, atol, rtol, what):
    """util.assert_close (float64, mismatch count, first indices and values) with positional tolerances."""
    assert_close(actual, expected, atol=atol, rtol=rtol, name=what)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force 16-wide Triton blocks so the online-softmax rescaling across blocks runs under the
    interpreter (which otherwise streams a whole row in one block)."""
    monkeypatch.setattr(vocab, "row_launch", lambda n, max_block=4096: {"BLOCK": 16, "num_warps": 1})


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

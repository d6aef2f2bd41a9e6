"""kernels.gumbel_argmax, the sampler's Gumbel-max draw: the reference against the sampler it replaced
(engine/model/generation.py before issue 18, copied below: every seeded run's draws depend on it), and the
C++ backend against the reference, draw for draw, on many rows, steps and seeds.

Letters: B rows, V vocabulary.

Exactness: the backends compute the same 64-bit hash and the same float64 sums; only log() differs (torch's
vectorised log vs std::log, at most in the last ulp), which can change a draw only where two values of a row
tie to within an ulp. Every comparison here is exact (torch.equal).
"""

import pytest
import torch
from _rl_cases import documented_backends, intra_op_threads
from util import device_for, kernel_backends

import rlhf_kernels as kernels
from rlhf_kernels._dispatch import resolve
from rlhf_kernels.gumbel_argmax import AUTO, IMPLEMENTED, gumbel_argmax_ref, gumbel_noise, gumbel_streams

KERNELS = kernel_backends(IMPLEMENTED)
NEG_INF = float("-inf")


# ---- the sampler before issue 18, verbatim (engine/model/generation.py at the `layout` branch) ----------
_MASK64 = (1 << 64) - 1


def _old_i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_OLD_GOLDEN, _OLD_C1, _OLD_C2 = _old_i64(0x9E3779B97F4A7C15), _old_i64(0xBF58476D1CE4E5B9), _old_i64(0x94D049BB133111EB)


def _old_shr(x, s):
    return (x >> s) & ((1 << (64 - s)) - 1)


def _old_mix(x):
    x = (x ^ _old_shr(x, 30)) * _OLD_C1
    x = (x ^ _old_shr(x, 27)) * _OLD_C2
    return x ^ _old_shr(x, 31)


def old_row_streams(seed, keys):
    seeded = _old_i64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)
    base = _old_mix(torch.tensor([seeded], dtype=torch.long))
    return _old_mix(base ^ _old_mix(keys.long().cpu() * _OLD_GOLDEN + 1)).to(keys.device)


def old_gumbel(streams, step, vocab):
    at_step = _old_mix(streams ^ _old_i64(((step + 1) * 0xD1B54A32D192ED03) & _MASK64))
    v = torch.arange(vocab, device=streams.device, dtype=torch.long)
    bits = _old_mix(at_step[:, None] + v[None, :] * _OLD_GOLDEN)
    u = (_old_shr(bits, 11).double() + 0.5) * 2.0**-53
    return -torch.log(-torch.log(u))


def old_draw(scaled, streams, step):
    return (scaled.double() + old_gumbel(streams, step, scaled.shape[-1])).argmax(dim=-1)


# ---- cases ---------------------------------------------------------------------------------------------
def logits_case(B, V, *, seed, dtype=torch.float32, scale=3.0, drop=0.3):
    """(B, V) logits ~ N(0, scale^2) with a fraction `drop` of each row set to -inf (top-k / top-p), each
    row's largest entry kept (as filter_logits keeps the most likely token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g, dtype=torch.float64) * scale
    keep = x.argmax(-1, keepdim=True)
    mask = torch.rand(B, V, generator=g) < drop
    mask.scatter_(1, keep, False)
    return x.masked_fill(mask, NEG_INF).to(dtype)


def mismatches(got, want, logits):
    bad = (got != want).nonzero().flatten().tolist()
    rows = [(b, int(got[b]), int(want[b]), float(logits[b, got[b]]), float(logits[b, want[b]])) for b in bad[:5]]
    return f"{len(bad)} of {got.numel()} rows differ; first (row, got, want, logit got, logit want): {rows}"


# ---- the reference is the old sampler --------------------------------------------------------------------
def test_streams_and_noise_are_the_old_samplers_bit_for_bit():
    keys = torch.tensor([0, 1, 5, 123456789, -3, 2**40])
    for seed in (0, 7, 2**63 + 5, -1):
        assert torch.equal(gumbel_streams(seed, keys), old_row_streams(seed, keys)), seed
    streams = gumbel_streams(3, torch.arange(16))
    for step in (0, 1, 17, 4095):
        assert torch.equal(gumbel_noise(streams, step, 1000), old_gumbel(streams, step, 1000)), step


def test_pinned_draws():
    # measured with the old sampler (layout branch) on 2026-12-07: stream ids and three steps of draws
    streams = gumbel_streams(7, torch.tensor([0, 1, 5, 123456789]))
    assert streams.tolist() == [2396525797550122442, 2267635066318712525, -193071765363338987, -595233198606306304]
    logits = torch.tensor([[0.5, -1.0, 2.0, NEG_INF, 0.0, 1.5]]).expand(4, 6)
    want = {0: [5, 2, 5, 2], 1: [2, 0, 4, 2], 2: [2, 2, 5, 5]}
    for step, tokens in want.items():
        assert gumbel_argmax_ref(logits, streams, step).tolist() == tokens, step
        for backend in KERNELS:
            device = device_for(backend)
            got = kernels.gumbel_argmax(logits.to(device), streams.to(device), step, backend=backend)
            assert got.tolist() == tokens, (backend, step)


@pytest.mark.parametrize("B, V", [(64, 4099), (5, 3)])
def test_reference_equals_the_old_sampler(B, V):
    streams = gumbel_streams(11, torch.arange(B))
    for step in range(3):
        x = logits_case(B, V, seed=step)
        assert torch.equal(gumbel_argmax_ref(x, streams, step), old_draw(x, streams, step))


# ---- the C++ backend is the reference --------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize(
    "B, V, dtype, scale, drop",
    [
        (64, 49152, torch.float32, 3.0, 0.3),  # SmolLM2's vocabulary, 64 rows
        (32, 49152, torch.float32, 1.0, 0.0),  # flat logits, nothing filtered: the bound prunes least
        (16, 49152, torch.float32, 40.0, 0.0),  # T = 0.05: one entry dominates, the bound prunes most
        (64, 1000, torch.float64, 3.0, 0.5),
        (257, 3, torch.float32, 1.0, 0.3),
        (7, 1, torch.float32, 1.0, 0.0),
        (3, 12289, torch.float32, 2.0, 0.99),  # top-p: a handful of entries left
    ],
)
def test_backend_equals_reference(backend, B, V, dtype, scale, drop):
    device = device_for(backend)
    for seed in (0, 5):
        streams = gumbel_streams(seed, torch.arange(B) * 3 + seed)
        for step in (0, 1, 63):
            x = logits_case(B, V, seed=seed * 100 + step, dtype=dtype, scale=scale, drop=drop)
            want = gumbel_argmax_ref(x, streams, step)
            got = kernels.gumbel_argmax(x.to(device), streams.to(device), step, backend=backend).cpu()
            assert got.dtype == torch.int64 and got.shape == (B,)
            assert torch.equal(got, want), (seed, step, mismatches(got, want, x))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B", [1, 2, 5])
def test_rows_split_across_threads(backend, threads, B):
    # B < threads: each row is cut into chunks scanned by different threads and merged; V = 3 * 4096 + 7
    # gives three chunks with 3 threads and a ragged last one
    device = device_for(backend)
    V = 3 * 4096 + 7
    streams = gumbel_streams(1, torch.arange(B))
    with intra_op_threads(threads):
        for step in range(8):
            x = logits_case(B, V, seed=step, scale=1.0, drop=0.2)
            want = gumbel_argmax_ref(x, streams, step)
            got = kernels.gumbel_argmax(x.to(device), streams.to(device), step, backend=backend).cpu()
            assert torch.equal(got, want), (step, mismatches(got, want, x))


@pytest.mark.parametrize("backend", KERNELS)
def test_argmax_rule_ties_inf_nan_and_all_filtered(backend):
    # torch.argmax's rule: the lowest index among equal maxima, a NaN beats everything (the first NaN)
    device = device_for(backend)
    V = 9000
    x = torch.zeros(6, V)
    x[0, [17, 8500]] = float("inf")  # +inf + g = +inf twice: the first wins (8500 in another chunk)
    x[1, [9, 8000]] = float("nan")
    x[1, 3] = float("inf")
    x[2] = NEG_INF  # every entry filtered: index 0, as torch.argmax
    x[3, 8999] = float("nan")  # the last entry
    x[4, :] = NEG_INF
    x[4, 6000] = -1e30  # one finite entry, far below zero
    x[5, 4500:] = NEG_INF
    streams = gumbel_streams(2, torch.arange(6))
    want = gumbel_argmax_ref(x, streams, 0)
    assert want.tolist()[:5] == [17, 9, 0, 8999, 6000]
    for threads in (1, 2, 3):
        with intra_op_threads(threads):
            got = kernels.gumbel_argmax(x.to(device), streams.to(device), 0, backend=backend).cpu()
            # one row at a time: with 2+ threads the row is cut in two chunks, [0, 4500) and [4500, 9000)
            rows = [int(kernels.gumbel_argmax(x[b : b + 1].to(device), streams[b : b + 1].to(device), 0,
                                              backend=backend)) for b in range(6)]  # fmt: skip
        assert torch.equal(got, want), (threads, got.tolist(), want.tolist())
        assert rows == want.tolist(), (threads, rows, want.tolist())


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_and_low_precision_logits(backend):
    device = device_for(backend)
    B, V = 6, 2053
    streams = gumbel_streams(4, torch.arange(B))
    wide = logits_case(V, 2 * B, seed=3)  # (V, 2B): its transpose's columns are strided
    for x in (wide.t()[::2], wide.t()[1::2], logits_case(1, V, seed=4).expand(B, V),
              logits_case(B, V, seed=5, dtype=torch.bfloat16), logits_case(B, V, seed=6, dtype=torch.float16)):
        want = gumbel_argmax_ref(x, streams, 5)
        got = kernels.gumbel_argmax(x.to(device), streams.to(device), 5, backend=backend).cpu()
        assert torch.equal(got, want), (tuple(x.stride()), x.dtype, mismatches(got, want, x))


def test_empty_batch():
    for backend in ["torch", *KERNELS]:
        device = device_for(backend)
        out = kernels.gumbel_argmax(torch.zeros(0, 5, device=device), torch.zeros(0, dtype=torch.long, device=device),
                                    0, backend=backend)  # fmt: skip
        assert out.shape == (0,) and out.dtype == torch.int64


# ---- the public op ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "logits, streams, step, message",
    [
        (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long), 0, "logits must be float"),
        (torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long), 0, "logits must be (B, V)"),
        (torch.zeros(2, 0), torch.zeros(2, dtype=torch.long), 0, "the vocabulary is empty"),
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.int32), 0, "streams must be an int64 tensor"),
        (torch.zeros(2, 5), torch.zeros(3, dtype=torch.long), 0, "streams shape (3,) must be (2,)"),
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), -1, "step must be an int"),
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), 1.0, "step must be an int"),
    ],
)
def test_bad_inputs_are_one_value_error(logits, streams, step, message):
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError) as e:
            kernels.gumbel_argmax(logits, streams, step, backend=backend)
        assert message in str(e.value), str(e.value)


def test_backends_and_dispatch():
    assert documented_backends(kernels.gumbel_argmax) == set(IMPLEMENTED) | {"auto"}
    # CUDA tensors take the reference (there is no CUDA kernel)
    assert resolve("auto", torch.device("cuda"), "gumbel_argmax", IMPLEMENTED, auto=AUTO) == "torch"
    if kernels.backends()["cpp"] == "yes":
        with pytest.raises(ValueError, match="cpp runs CPU tensors"):
            resolve("cpp", torch.device("cuda"), "gumbel_argmax", IMPLEMENTED, auto=AUTO, ext="gumbel_argmax")
        assert resolve("auto", torch.device("cpu"), "gumbel_argmax", IMPLEMENTED, auto=AUTO,
                       ext="gumbel_argmax") == "cpp"  # fmt: skip

"""kernels.gumbel_argmax, the sampler's draw: python -m bench gumbel_argmax [--quick] [--json PATH]

One decode step's draw over SmolLM2-135M's vocabulary (V = 49152) on CPU: B = 32 rows (8 prompts x 4
samples, the pipeline's batch) and B = 1, each with 1 and 2 intra-op threads (the case's `threads`, set
around each call). The logits are fp32 N(0, 3^2), nothing filtered (temperature 1, no top-k / top-p: every
entry is a candidate).

Providers, in this process on the same tensors:
    cpp      our C++ kernel: one pass per row, no (B, V) noise
    torch    gumbel_argmax_ref through the op (the sampler before issue 18): the (B, V) int64 hash and
             float64 noise in torch ops, then argmax
    compile  torch.compile of gumbel_argmax_ref (inductor fuses the elementwise chain into the argmax)

Every provider's call sets the thread count and restores it afterwards (torch.set_num_threads twice): the
same overhead for all.

Roofline bytes: the logits read once (4 B per entry) and B int64 ids written; the hash and two logs per
entry make the op compute-bound on CPU, so "x roof" mostly says how far from a pure read it is.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, provider_fn
from rlhf_kernels.gumbel_argmax import IMPLEMENTED, gumbel_argmax_ref, gumbel_streams

V = 49152  # SmolLM2-135M


def cases(quick: bool, device: torch.device) -> list[Case]:
    shapes = [(32, 1)] if quick else [(32, 1), (32, 2), (1, 1), (1, 2)]  # (B, threads); the target first
    return [Case("fwd", {"B": B, "V": V}, torch.float32, bytes=4 * B * V + 8 * B, extra={"threads": t})
            for B, t in shapes]  # fmt: skip


def _with_threads(fn, threads: int):
    def step():
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(saved)

    return step


def build(case: Case, provider: str, device: torch.device):
    if device.type != "cpu":
        return "CPU bench (CUDA tensors take the torch reference)"
    ours = lambda x, s, backend: kernels.gumbel_argmax(x, s, 7, backend=backend)  # noqa: E731
    fn = provider_fn(provider, device, IMPLEMENTED, ours, lambda x, s: gumbel_argmax_ref(x, s, 7))
    if isinstance(fn, str):
        return fn
    B = case.shape["B"]
    logits = torch.randn(B, case.shape["V"], generator=torch.Generator().manual_seed(0)) * 3
    streams = gumbel_streams(0, torch.arange(B))
    return _with_threads(lambda: fn(logits, streams), case.extra["threads"])


BENCH = Bench(op="gumbel_argmax", cases=cases, providers=("cpp", "torch", "compile"), build=build)

"""kernels.masked_whiten: python -m bench whiten [--quick] [--json PATH] [--device cpu|cuda]

Baselines: "eager" = masked_whiten_ref (two-pass PyTorch reference), "compile" = torch.compile of it,
both in this process on the same tensors. Roofline bytes per token: x (4 B, fp32) and the uint8 mask
read twice (statistics, then the elementwise pass) and the fp32 output written once: 14 B. Forward
only (whitened advantages are targets).
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, provider_fn
from rlhf_kernels.whiten import IMPLEMENTED, masked_whiten_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    sizes = [16384] if quick else [1 << 20, 16384]
    return [Case("fwd", {"N": N}, torch.float32, bytes=14 * N) for N in sizes]


def build(case: Case, provider: str, device: torch.device):
    N = case.shape["N"]
    fn = provider_fn(provider, device, IMPLEMENTED, kernels.masked_whiten, masked_whiten_ref)
    if isinstance(fn, str):
        return fn
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, device=device, generator=g) * 3.0 + 1.0
    mask = torch.rand(N, device=device, generator=g) < 0.9
    return lambda: fn(x, mask)


BENCH = Bench(op="whiten", cases=cases, providers=("cpp", "triton", "eager", "compile"), build=build)

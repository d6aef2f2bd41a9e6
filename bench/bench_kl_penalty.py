"""kernels.kl_penalty (k3): python -m bench kl_penalty [--quick] [--json PATH] [--device cpu|cuda]

Baselines: "eager" = kl_penalty_ref (PyTorch; its k3 runs in float64 to dodge fp32 cancellation near
0, as the kernels do with a Taylor branch), "compile" = torch.compile of it, both in this process on
the same tensors. Roofline bytes per token: logprobs and ref_logprobs read (4 B each, fp32) and the
fp32 estimate written: 12 B; fwd+bwd also reads the inputs and the upstream gradient again and writes
the logprobs gradient: 28 B.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, grad_step, provider_fn
from rlhf_kernels.kl_penalty import IMPLEMENTED, kl_penalty_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    sizes = [16384] if quick else [1 << 20, 16384]
    out = []
    for N in sizes:
        out.append(Case("fwd", {"N": N}, torch.float32, bytes=12 * N, extra={"kind": "k3"}))
        out.append(Case("fwd+bwd", {"N": N}, torch.float32, bytes=28 * N, extra={"kind": "k3"}))
    return out


def build(case: Case, provider: str, device: torch.device):
    N, kind = case.shape["N"], case.extra["kind"]
    ours = lambda lp, ref, backend: kernels.kl_penalty(lp, ref, kind=kind, backend=backend)  # noqa: E731
    fn = provider_fn(provider, device, IMPLEMENTED, ours, lambda lp, ref: kl_penalty_ref(lp, ref, kind))
    if isinstance(fn, str):
        return fn
    g = torch.Generator(device=device).manual_seed(0)
    logprobs = torch.randn(N, device=device, generator=g) * 0.5 - 2.0
    ref_logprobs = logprobs + 0.3 * torch.randn(N, device=device, generator=g)
    if case.mode == "fwd":
        return lambda: fn(logprobs, ref_logprobs)
    logprobs.requires_grad_(True)
    up = torch.randn(N, device=device, generator=g)
    return grad_step(lambda: fn(logprobs, ref_logprobs), [logprobs], [up])


BENCH = Bench(op="kl_penalty", cases=cases, providers=("cpp", "triton", "eager", "compile"), build=build)

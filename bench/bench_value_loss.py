"""kernels.value_loss: python -m bench value_loss [--quick] [--json PATH] [--device cpu|cuda]

Baselines: "eager" = value_loss_ref (the PyTorch reference), "compile" = torch.compile of it, both in
this process on the same tensors. Roofline bytes per token: the forward reads values, old_values,
returns (4 B each in fp32) and the uint8 mask: 13 B; fwd+bwd reads them again and writes the values
gradient: 30 B.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, grad_step, provider_fn
from rlhf_kernels.value_loss import IMPLEMENTED, value_loss_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    sizes = [16384] if quick else [1 << 20, 16384]
    out = []
    for N in sizes:
        out.append(Case("fwd", {"N": N}, torch.float32, bytes=13 * N, extra={"clip": 0.2}))
        out.append(Case("fwd+bwd", {"N": N}, torch.float32, bytes=30 * N, extra={"clip": 0.2}))
    return out


def build(case: Case, provider: str, device: torch.device):
    N, clip = case.shape["N"], case.extra["clip"]
    ours = lambda v, o, r, m, backend: kernels.value_loss(v, o, r, m, clip=clip, backend=backend)[0]  # noqa: E731
    fn = provider_fn(provider, device, IMPLEMENTED, ours, lambda v, o, r, m: value_loss_ref(v, o, r, m, clip)[0])
    if isinstance(fn, str):
        return fn
    g = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(N, device=device, generator=g)
    old_values = values + 0.3 * torch.randn(N, device=device, generator=g)  # about half move past the clip
    returns = torch.randn(N, device=device, generator=g)
    mask = torch.rand(N, device=device, generator=g) < 0.9
    if case.mode == "fwd":
        return lambda: fn(values, old_values, returns, mask)
    values.requires_grad_(True)
    return grad_step(lambda: fn(values, old_values, returns, mask), [values], [torch.ones((), device=device)])


BENCH = Bench(op="value_loss", cases=cases, providers=("cpp", "triton", "eager", "compile"), build=build)

"""kernels.ppo_loss: python -m bench ppo_loss [--quick] [--json PATH] [--device cpu|cuda]

Baselines: "eager" = ppo_loss_ref (the PyTorch reference: a dozen elementwise ops and reductions),
"compile" = torch.compile of it, both in this process on the same tensors. Roofline bytes per
token: the forward reads logprobs, old_logprobs, advantages (4 B each in fp32) and the bool mask:
13 B; fwd+bwd reads them again and writes the logprobs gradient: 30 B (3 B more per mask read with a
float mask). At N=16384 the forward also runs with a float mask, which the call validates and converts.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, backend_unavailable, grad_step
from rlhf_kernels.ppo_loss import IMPLEMENTED, ppo_loss_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    sizes = [16384] if quick else [16384, 1 << 20]
    out = []
    for N in sizes:
        out.append(Case("fwd", {"N": N, "mask": "bool"}, torch.float32, bytes=13 * N, extra={"dual_clip": 3.0}))
        if N == 16384:
            out.append(Case("fwd", {"N": N, "mask": "float"}, torch.float32, bytes=16 * N, extra={"dual_clip": 3.0}))
        out.append(Case("fwd+bwd", {"N": N, "mask": "bool"}, torch.float32, bytes=30 * N, extra={"dual_clip": 3.0}))
    return out


def build(case: Case, provider: str, device: torch.device):
    N = case.shape["N"]
    dual = case.extra["dual_clip"]
    if provider in IMPLEMENTED:
        why = backend_unavailable(provider, device)
        if why:
            return why
        fn = lambda lp, o, a, m: kernels.ppo_loss(lp, o, a, m, dual_clip=dual, backend=provider)[0]  # noqa: E731
    elif provider == "eager":
        fn = lambda lp, o, a, m: ppo_loss_ref(lp, o, a, m, 0.2, 0.2, dual)[0]  # noqa: E731
    elif provider == "compile":
        fn = torch.compile(lambda lp, o, a, m: ppo_loss_ref(lp, o, a, m, 0.2, 0.2, dual)[0])
    else:
        return f"unknown provider {provider}"
    g = torch.Generator(device=device).manual_seed(0)
    logprobs = torch.randn(N, device=device, generator=g) * 0.5 - 1.0
    old_logprobs = logprobs + 0.2 * torch.randn(N, device=device, generator=g)
    advantages = torch.randn(N, device=device, generator=g)
    mask = torch.rand(N, device=device, generator=g) < 0.9
    mask = mask.float() if case.shape["mask"] == "float" else mask
    if case.mode == "fwd":
        return lambda: fn(logprobs, old_logprobs, advantages, mask)
    logprobs.requires_grad_(True)
    one = torch.ones((), device=device)
    return grad_step(lambda: fn(logprobs, old_logprobs, advantages, mask), [logprobs], [one])


BENCH = Bench(op="ppo_loss", cases=cases, providers=("cpp", "triton", "eager", "compile"), build=build)

"""kernels.gae: python -m bench gae [--quick] [--json PATH] [--device cpu|cuda]

Baseline: "loop" = gae_ref, the Python reverse loop over time that TRL / OpenRLHF / verl / torchtune
use (one batched step per time position), run in this process on the same tensors. Providers "cpp",
"triton", "cuda" are the kernels. Roofline bytes: rewards and values read (4 B each in fp32), the
mask read (1 B bool, 4 B float), advantages and returns written (4 B each): 17 B per position with a
bool mask. GAE is forward only (its outputs are targets). On CPU the B=64, T=1024 case also runs with
a float mask: the call then validates and converts the mask (the Python-side share of a small call).
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, backend_unavailable
from rlhf_kernels.gae import IMPLEMENTED, gae_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    if device.type == "cuda":
        shapes = [(512, 2048)] if quick else [(512, 2048), (8, 16384), (64, 1024)]
    else:
        shapes = [(64, 1024)] if quick else [(64, 1024), (8, 16384)]
    out = []
    for B, T in shapes:
        for mask in ("bool", "float") if (B, T) == (64, 1024) else ("bool",):
            out.append(Case("fwd", {"B": B, "T": T, "mask": mask}, torch.float32,
                            bytes=B * T * (17 if mask == "bool" else 20), extra={"gamma": 1.0, "lam": 0.95}))
    return out


def build(case: Case, provider: str, device: torch.device):
    B, T = case.shape["B"], case.shape["T"]
    gamma, lam = case.extra["gamma"], case.extra["lam"]
    if provider in IMPLEMENTED:
        why = backend_unavailable(provider, device)
        if why:
            return why
        fn = lambda r, v, m: kernels.gae(r, v, m, gamma=gamma, lam=lam, backend=provider)  # noqa: E731
    elif provider == "loop":
        fn = lambda r, v, m: gae_ref(r, v, m, gamma, lam)  # noqa: E731
    else:
        return f"unknown provider {provider}"
    g = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(B, T, device=device, generator=g)
    values = torch.randn(B, T, device=device, generator=g)
    # right-padded responses of random length in [T/2, T], as a rollout batch looks
    lengths = torch.randint(T // 2, T + 1, (B, 1), device=device, generator=g)
    mask = torch.arange(T, device=device)[None, :] < lengths
    mask = mask.float() if case.shape["mask"] == "float" else mask
    return lambda: fn(rewards, values, mask)


BENCH = Bench(op="gae", cases=cases, providers=("cpp", "triton", "cuda", "loop"), build=build)

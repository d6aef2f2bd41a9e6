"""kernels.token_stats: python -m bench token_stats [--quick] [--json PATH]

Baselines: "eager" = token_stats_ref (logprobs_ref + full_kl_ref: [N, V] temporaries), "compile" =
torch.compile of it, "unfused" = kernels.logprobs(entropy=True) + kernels.full_kl on the same
backend as "auto" (three reads of logits instead of one). Roofline bytes: fwd reads logits and
ref_logits once (2 [N, V] passes); fwd+bwd reads both twice and writes the gradient once (5 passes).
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, grad_step, provider_fn, vocab_cases
from rlhf_kernels.token_stats import IMPLEMENTED, token_stats_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    return vocab_cases(quick, device, 2, 5)


def _unfused(x, z, labels):
    logp, ent = kernels.logprobs(x, labels, entropy=True)
    return logp, ent, kernels.full_kl(x, z)


def build(case: Case, provider: str, device: torch.device):
    N, V = case.shape["N"], case.shape["V"]
    g = torch.Generator(device=device).manual_seed(0)
    fn = provider_fn(provider, device, IMPLEMENTED, kernels.token_stats, token_stats_ref, others={"unfused": _unfused})
    if isinstance(fn, str):
        return fn
    logits = torch.randn(N, V, device=device, dtype=case.dtype, generator=g)
    ref_logits = (logits.float() + torch.randn(N, V, device=device, generator=g)).to(case.dtype)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    if case.mode == "fwd":
        return lambda: fn(logits, ref_logits, labels)
    logits.requires_grad_(True)
    grads = [torch.randn(N, device=device, generator=g) for _ in range(3)]
    return grad_step(lambda: fn(logits, ref_logits, labels), [logits], grads)


BENCH = Bench(op="token_stats", cases=cases, providers=("cpp", "triton", "unfused", "eager", "compile"),
              build=build)  # fmt: skip

"""kernels.full_kl: python -m bench full_kl [--quick] [--json PATH]

Baselines: "eager" = full_kl_ref (log_softmax of both, [N, V] temporaries), "compile" = torch.compile
of it, "liger" = Liger's KLDiv on log_softmax inputs (log_target=True, reduction="none", summed over V;
CUDA only, when installed). Roofline bytes: fwd reads logits and ref_logits once (2 [N, V] passes);
fwd+bwd reads both twice and writes the gradient once (5 passes); per-token vectors are negligible.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, grad_step, provider_fn, vocab_cases
from rlhf_kernels.full_kl import IMPLEMENTED, full_kl_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    return vocab_cases(quick, device, 2, 5)


def _liger_fn():
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    loss = LigerKLDIVLoss(reduction="none", log_target=True)
    # KLDivLoss(input = log q, target = log p) = sum_v p_v (log p_v - log q_v)
    return lambda x, z: loss(torch.log_softmax(z.float(), -1), torch.log_softmax(x.float(), -1)).sum(-1)


def build(case: Case, provider: str, device: torch.device):
    N, V = case.shape["N"], case.shape["V"]
    g = torch.Generator(device=device).manual_seed(0)
    fn = provider_fn(provider, device, IMPLEMENTED, kernels.full_kl, full_kl_ref, liger=_liger_fn)
    if isinstance(fn, str):
        return fn
    logits = torch.randn(N, V, device=device, dtype=case.dtype, generator=g)
    ref_logits = (logits.float() + torch.randn(N, V, device=device, generator=g)).to(case.dtype)
    if case.mode == "fwd":
        return lambda: fn(logits, ref_logits)
    logits.requires_grad_(True)
    grads = [torch.randn(N, device=device, generator=g)]
    return grad_step(lambda: fn(logits, ref_logits), [logits], grads)


BENCH = Bench(op="full_kl", cases=cases, providers=("cpp", "triton", "eager", "compile", "liger"), build=build)

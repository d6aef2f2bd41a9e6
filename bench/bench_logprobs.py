"""kernels.logprobs (+ entropy): python -m bench logprobs [--quick] [--json PATH]

Baselines: "eager" = logprobs_ref (the PyTorch reference), "compile" = torch.compile of it, "liger" =
Liger's cross entropy with reduction="none" (its per-token -logp, no entropy; CUDA only, when
installed), "trl" = TRL's fused `selective_log_softmax_and_entropy` (trl>=1.16, Triton; CUDA only).
Roofline bytes: fwd reads the logits once; fwd+bwd reads them twice and writes the gradient once
(three [N, V] passes); the per-token vectors are negligible.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, grad_step, provider_fn, vocab_cases
from rlhf_kernels.logprobs import IMPLEMENTED, logprobs_ref


def cases(quick: bool, device: torch.device) -> list[Case]:
    return vocab_cases(quick, device, 1, 3, extra={"entropy": True})


def _liger_fn():
    from liger_kernel.transformers.functional import liger_cross_entropy

    return lambda logits, labels: -liger_cross_entropy(logits, labels, reduction="none")


def _trl_fn():
    from trl.kernels import selective_log_softmax_and_entropy

    return lambda logits, labels: selective_log_softmax_and_entropy(logits, labels)


def build(case: Case, provider: str, device: torch.device):
    N, V = case.shape["N"], case.shape["V"]
    g = torch.Generator(device=device).manual_seed(0)
    entropy = case.extra["entropy"]
    ours = lambda x, y, backend: kernels.logprobs(x, y, entropy=entropy, backend=backend)  # noqa: E731
    ref = lambda x, y: logprobs_ref(x, y, entropy=entropy)  # noqa: E731
    fn = provider_fn(provider, device, IMPLEMENTED, ours, ref, liger=_liger_fn, trl=_trl_fn)
    if isinstance(fn, str):
        return fn
    logits = torch.randn(N, V, device=device, dtype=case.dtype, generator=g)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    if case.mode == "fwd":
        return lambda: fn(logits, labels)
    logits.requires_grad_(True)
    outs = 1 if provider == "liger" or not entropy else 2
    grads = [torch.randn(N, device=device, generator=g) for _ in range(outs)]
    return grad_step(lambda: fn(logits, labels), [logits], grads)


BENCH = Bench(op="logprobs", cases=cases, providers=("cpp", "triton", "liger", "trl", "eager", "compile"),
              build=build)  # fmt: skip

"""kernels.linear_logprobs: python -m bench linear_logprobs [--quick] [--json PATH]
(kernels.linear_token_stats: python -m bench linear_token_stats, built from this module.)

Providers: our backends; "eager" = the unfused reference (F.linear to [N, V] logits, then the
PyTorch log-softmax reference), "compile" = torch.compile of it, "liger" = Liger's fused linear
cross-entropy (reduction="sum", its -logp summed: a scalar loss, so 3 GEMMs with weight gradient
where per-token outputs need 4; CUDA only, when installed), "trl" = TRL's ChunkedLogProbFunction
(trl>=1.16: per-token log-probs from hidden states, its default 32768-wide vocabulary chunks).
linear_token_stats' "trl" = TRL's ChunkedDivergenceFunction with beta = 1 (KL(policy || reference)
and the policy's entropy from both hidden states; no log-probs of the labels).
Cases: fwd; fwd+bwd with a trainable lm_head ("wgrad=1"); fwd+bwd with a frozen one ("wgrad=0",
the LoRA case). Roofline flops, as the targets define them: 2 N H V per GEMM, 3 GEMMs with weight
gradient, 2 frozen, 1 forward (linear_token_stats: one more each, for the reference logits). Our
minimum counts are in kernels/_linear.py (4 with weight gradient, since per-token upstream gradients
are only known in the backward; so 1.33x is this design's floor on that row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import rlhf_kernels as kernels
from bench.harness import Bench, Case, backend_unavailable, baseline, grad_step, liger_available
from rlhf_kernels._linear import IMPLEMENTED
from rlhf_kernels.linear_logprobs import linear_logprobs_ref
from rlhf_kernels.linear_token_stats import linear_token_stats_ref


def make_cases(extra_gemms: int):
    def cases(quick: bool, device: torch.device) -> list[Case]:
        if device.type == "cuda":
            shapes = [(2048, 2048, 32000)] if quick else [(8192, 4096, 128256), (8192, 2048, 151936)]
        else:
            shapes = [(256, 512, 8000)] if quick else [(512, 1024, 32000)]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        out = []
        for N, H, V in shapes:
            gemm = 2 * N * H * V
            for mode, wgrad, gemms in (("fwd", 0, 1), ("fwd+bwd", 1, 3), ("fwd+bwd", 0, 2)):
                shape = {"N": N, "H": H, "V": V, "wgrad": wgrad}
                out.append(Case(mode, shape, dtype, flops=(gemms + extra_gemms) * gemm))
        return out

    return cases


def _liger_fn():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, w, y: -loss(w, h, y)


def _trl_logprobs():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    # (hidden, weight, bias, targets, temperature, vocab chunk, softcap, logit scale, extra outputs)
    return lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ())[0]


def _trl_divergence():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    # beta = 1: KL(student || teacher) with the policy as the student -> (kl, entropy)
    return lambda h, r, w, y: ChunkedDivergenceFunction.apply(h, w, None, r, w.detach(), None, 1.0, 1.0)


def _inputs(case, device, ref):
    N, H, V = case.shape["N"], case.shape["H"], case.shape["V"]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=case.dtype, generator=g)
    ref_hidden = (hidden + 0.1 * torch.randn(N, H, device=device, dtype=case.dtype, generator=g)) if ref else None
    weight = (torch.randn(V, H, device=device, dtype=case.dtype, generator=g) / H**0.5).to(case.dtype)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    return hidden, ref_hidden, weight, labels, g


def _finish(case, fn, args, trainable, n_out, g, device):
    if case.mode == "fwd":
        return lambda: fn(*args)
    for t in trainable:
        t.requires_grad_(True)
    N = case.shape["N"]
    grads = [torch.randn(N, device=device, generator=g) for _ in range(n_out)]
    grads = grads or [torch.ones((), device=device)]  # a scalar loss (liger)
    return grad_step(lambda: fn(*args), trainable, grads)


def build(case: Case, provider: str, device: torch.device):
    hidden, _, weight, labels, g = _inputs(case, device, ref=False)
    entropy = False
    n_out = 1
    if provider in IMPLEMENTED:
        why = backend_unavailable(provider, device)
        if why:
            return why
        fn = lambda h, w, y: kernels.linear_logprobs(h, w, y, entropy=entropy, backend=provider)  # noqa: E731
    elif provider == "eager":
        fn = lambda h, w, y: linear_logprobs_ref(h, w, y, entropy=entropy)  # noqa: E731
    elif provider == "compile":
        fn = torch.compile(lambda h, w, y: linear_logprobs_ref(h, w, y, entropy=entropy))
    elif provider == "liger":
        if not liger_available():
            return "liger-kernel not installed or no CUDA"
        fn, n_out = _liger_fn(), 0
    elif provider == "trl":
        fn = baseline(_trl_logprobs, device)
        if isinstance(fn, str):
            return fn
    else:
        return f"unknown provider {provider}"
    trainable = [hidden, weight] if case.shape["wgrad"] else [hidden]
    return _finish(case, fn, (hidden, weight, labels), trainable, n_out, g, device)


def build_token_stats(case: Case, provider: str, device: torch.device):
    hidden, ref_hidden, weight, labels, g = _inputs(case, device, ref=True)
    n_out = 3
    if provider in IMPLEMENTED:
        why = backend_unavailable(provider, device)
        if why:
            return why
        fn = lambda h, r, w, y: kernels.linear_token_stats(h, r, w, y, backend=provider)  # noqa: E731
    elif provider == "eager":
        fn = linear_token_stats_ref
    elif provider == "compile":
        fn = torch.compile(linear_token_stats_ref)
    elif provider == "unfused":  # our token_stats on materialised logits
        fn = lambda h, r, w, y: kernels.token_stats(F.linear(h, w), F.linear(r, w).detach(), y)  # noqa: E731
    elif provider == "trl":
        fn = baseline(_trl_divergence, device)
        if isinstance(fn, str):
            return fn
        n_out = 2
    else:
        return f"unknown provider {provider}"
    trainable = [hidden, weight] if case.shape["wgrad"] else [hidden]
    return _finish(case, fn, (hidden, ref_hidden, weight, labels), trainable, n_out, g, device)


BENCH = Bench(op="linear_logprobs", cases=make_cases(0),
              providers=("cpp", "triton", "liger", "trl", "eager", "compile"), build=build)  # fmt: skip
BENCH_TOKEN_STATS = Bench(
    op="linear_token_stats", cases=make_cases(1), providers=("cpp", "triton", "unfused", "trl", "eager", "compile"),
    build=build_token_stats,
)

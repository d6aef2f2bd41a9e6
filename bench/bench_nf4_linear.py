"""kernels.nf4_linear: python -m bench nf4_linear [--quick] [--json PATH] [--providers cpp,torch,bnb,fp32]

A frozen NF4 base layer of SmolLM2-135M (hidden 576, intermediate 1536, 3 KV heads of 64: q/o proj
576x576, k/v proj 576->192, gate/up 576->1536, down 1536->576), double quant, blocksize 64, fp32 x, no
bias, on CPU. Decode shapes: M = 1..64 rows (32 = 8 prompts x 4 samples), forward only, under no_grad as
in generation; LoRA training shapes: M = 2048 and 8192, forward and forward + backward (the gradient
reaches x only: the base is frozen).

Providers, all in this process on the same quantized weight and x:
    cpp    our C++ kernel (fused dequantize-in-L1 + register-blocked FMA for M <= 64, else dequantize + mm)
    torch  nf4_linear_ref: dequantize in PyTorch, then F.linear
    bnb    bitsandbytes Linear4bit.forward (fp32 compute, avx512-bf16 repack off, as the engine loads it)
    fp32   nn.Linear holding the dequantized weight: the full-precision yardstick (target: cpp within 1.3x)

Roofline bytes: x read (4 B/elem), the packed weight (0.5 B/weight) and its 8-bit block scales (1 B per
64), y written (4 B/elem); fwd+bwd adds reading grad_y and the weight again and writing grad_x. Flops:
2 M N K forward, 4 M N K forward + backward. At decode shapes every provider but cpp also moves the fp32
weight (4 B/weight), which is why the fused kernel can meet fp32 there. The weights here stay hot in the
2 x 1 MiB L2 + 32 MiB L3 of a shared CPU; a whole model's 106 M base weights (424 MB in fp32, 60 MB in
NF4) would stream from DRAM each decode step, which favours NF4 more than these numbers show.
"""

from __future__ import annotations

import logging

import torch

import rlhf_kernels as kernels
from bench.harness import Bench, Case, grad_step, provider_fn
from rlhf_kernels.nf4_linear import IMPLEMENTED, nf4_dequantize_ref, nf4_linear_ref

# On an avx512_bf16 CPU, importing bitsandbytes warns that the hub's fused CPU gemm could not load; that
# path is the repack this bench turns off (as engine/stack.py does, which silences it the same way).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# [K, N] of each SmolLM2-135M projection
LAYERS = {"q/o_proj": (576, 576), "k/v_proj": (576, 192), "gate/up_proj": (576, 1536), "down_proj": (1536, 576)}
BLOCKSIZE = 64


def _case(mode: str, M: int, layer: str) -> Case:
    K, N = LAYERS[layer]
    weight_bytes = N * K // 2 + N * K // BLOCKSIZE
    if mode == "fwd":
        nbytes, flops = 4 * M * K + weight_bytes + 4 * M * N, 2 * M * N * K
    else:
        nbytes, flops = 2 * (4 * M * K + weight_bytes + 4 * M * N), 4 * M * N * K
    return Case(mode, {"M": M, "K": K, "N": N}, torch.float32, bytes=nbytes, flops=flops,
                extra={"layer": layer, "double_quant": True, "blocksize": BLOCKSIZE})  # fmt: skip


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [_case("fwd", 32, "q/o_proj"), _case("fwd", 1, "gate/up_proj"), _case("fwd+bwd", 256, "q/o_proj")]
    out = [_case("fwd", 32, "q/o_proj")]  # the target shape first (--target)
    out += [_case("fwd", M, layer) for M in (1, 8, 32, 64) for layer in LAYERS if (M, layer) != (32, "q/o_proj")]
    out += [_case(mode, M, layer) for M in (2048, 8192) for layer in LAYERS for mode in ("fwd", "fwd+bwd")]
    return out


def _linear4bit(K: int, N: int):
    """(Linear4bit as the engine loads it, nn.Linear holding its dequantized weight), one seed per shape."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(K * N)
    dense = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g) * K**-0.5)
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4",
                          quant_storage=torch.uint8)  # fmt: skip
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")  # quantizes (bitsandbytes' default blocksize on CPU: 64)
    assert q.weight.quant_state.blocksize == BLOCKSIZE and q.weight.quant_state.nested
    q.support_avx512bf16_for_cpu = False
    q.requires_grad_(False)
    fp32 = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        fp32.weight.copy_(nf4_dequantize_ref(q.weight))
    fp32.requires_grad_(False)
    return q, fp32


def build(case: Case, provider: str, device: torch.device):
    if device.type != "cpu":
        return "CPU bench (bitsandbytes' CPU path and the C++ kernel)"
    try:
        q, fp32 = _linear4bit(case.shape["K"], case.shape["N"])
    except ImportError as e:
        return f"bitsandbytes not importable ({e})"
    w = q.weight
    ours = lambda x, backend: kernels.nf4_linear(x, w, backend=backend)  # noqa: E731
    ref = lambda x: nf4_linear_ref(x, w)  # noqa: E731
    fn = provider_fn(provider, device, IMPLEMENTED, ours, ref, others={"bnb": q, "fp32": fp32})
    if isinstance(fn, str):
        return fn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.shape["M"], case.shape["K"], generator=g)
    if case.mode == "fwd":
        def step():
            with torch.no_grad():  # generation
                return fn(x)

        return step
    x.requires_grad_(True)
    up = torch.randn(case.shape["M"], case.shape["N"], generator=g)
    return grad_step(lambda: fn(x), [x], [up])


BENCH = Bench(op="nf4_linear", cases=cases, providers=("cpp", "torch", "bnb", "fp32"), build=build)

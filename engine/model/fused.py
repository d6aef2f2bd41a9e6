"""The base's RMSNorms and SwiGLU MLPs through rlhf_kernels' fused ops (rms_norm, swiglu).

Why: in training, most of a step's memory is what autograd keeps for the backward pass. transformers'
LlamaMLP, `down_proj(act_fn(gate_proj(x)) * up_proj(x))`, keeps four (N, I) tensors per layer: gate, up,
silu(gate) and their product (the down projection's input, kept by its base and its LoRA A). The fused MLP
keeps gate and up only: rlhf_kernels.swiglu rebuilds silu(gate) in its backward, and the product is kept
as a recipe (_Recomputed: a saved-tensor hook) that rebuilds it from the same gate and up when the down
projection's backward asks. Measured on SmolLM2-135M-Instruct (30 layers, H 576, I 1536, NF4 + LoRA r 16),
one training forward of 8 x 128 tokens keeps 1204 MiB for backward with the model's own modules and 838
MiB fused (saved_tensors_hooks, 2026-12-07); the gradients agree to fp32 rounding (tests/test_fused_layers).
The norms keep the same either way on a frozen weight (its input and one rstd per row); rms_norm is the one
Triton pass per direction on a GPU, and on a CPU the same torch math as the model's own.

Which modules: a norm with `weight` and `variance_epsilon` (or `eps`) whose own forward equals
rms_norm_ref on a probe, and an MLP with gate_proj / up_proj / down_proj and an act_fn whose own forward
equals down(silu(gate(x)) * up(x)) on a probe (whatever its activation's class). Anything else (Gemma's
1 + weight norm, a GELU MLP, silu on the wrong projection) fails its probe and keeps its own forward. One
probe per module class (and activation class), on the module itself, before LoRA wraps its linear layers
(peft replaces them as attributes, which the fused forward reads at call time).

On by default (StackConfig.fused_layers; `--fused-layers false` keeps the model's own modules). Runs with it
on are bit-reproducible: a run-to-run difference once blamed on it was the shared-prefix gathers' parallel
backward (model/prefix.py, 2026-12-08).
"""

from __future__ import annotations

import torch
from torch import nn

import rlhf_kernels as kernels

PROBE_ROWS = 3  # rows of the one-off probe per module class


def _norm_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    return None


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and _norm_eps(module) is not None)  # fmt: skip


def _is_gated_mlp(module: nn.Module) -> bool:
    """gate / up / down projections and an activation: whether it is SiLU (nn.SiLU, transformers'
    SiLUActivation, ...) and the formula is SwiGLU's, the probe decides."""
    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and callable(getattr(module, "act_fn", None)))  # fmt: skip


def _fused_norm_forward(module: nn.Module):
    eps = _norm_eps(module)
    return lambda hidden_states: kernels.rms_norm(hidden_states, module.weight, eps)


class _Recomputed:
    """silu(gate) * up, kept for backward as a recipe instead of a tensor: the down projection (its base
    and its LoRA A) saves its input, the product, which the swiglu op's own saved gate and up rebuild in
    one elementwise pass (bitwise: the same op on the same inputs). Every saved view of the product packs
    into this one holder; the first unpack of a backward rebuilds the product, the last one drops it."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, product: torch.Tensor):
        self.gate, self.up, self.ptr = gate, up, product.untyped_storage().data_ptr()
        self.packed, self.product = 0, None

    def pack(self, t: torch.Tensor):
        if t.untyped_storage().data_ptr() != self.ptr or t.dtype != self.gate.dtype:
            return t  # anything else the projection saves (its weights, LoRA's rank-r activations)
        self.packed += 1
        return self, t.shape, t.stride(), t.storage_offset()

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        _, shape, stride, offset = packed
        if self.product is None:
            with torch.no_grad():
                self.product = kernels.swiglu(self.gate, self.up).contiguous()
        view = self.product.as_strided(shape, stride, offset)
        self.packed -= 1
        if self.packed == 0:
            self.product = None
        return view


def _fused_mlp_forward(module: nn.Module):
    def forward(x):
        gate, up = module.gate_proj(x), module.up_proj(x)
        product = kernels.swiglu(gate, up)
        if not (torch.is_grad_enabled() and product.requires_grad and product.is_contiguous()):
            return module.down_proj(product)
        recomputed = _Recomputed(gate, up, product)
        with torch.autograd.graph.saved_tensors_hooks(recomputed.pack, recomputed.unpack):
            return module.down_proj(product)

    return forward


@torch.no_grad()
def _agrees(module: nn.Module, fused, width: int, dtype: torch.dtype) -> bool:
    """The fused forward equals the module's own on a probe (fp32: 1e-5 relative; 16-bit: 2e-2)."""
    device = next(module.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, width, generator=gen).to(device=device, dtype=dtype)
    own, ours = module(x).float(), fused(x).float()
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    return own.shape == ours.shape and bool((own - ours).abs().max() <= rel * max(1.0, float(own.abs().max())))


def fuse_layers(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Route every matching norm and MLP of `model` (activations in `dtype`) through the fused ops (module
    docstring); returns how many modules of each kind now run fused. Call before peft wraps the linears."""
    verdict: dict[tuple, bool] = {}  # one probe per class: instances of a class share its forward
    counts = {"rms_norm": 0, "swiglu_mlp": 0}
    for module in model.modules():
        if _is_rms_norm(module):
            kind, fused = "rms_norm", _fused_norm_forward(module)
            width = module.weight.shape[0]
        elif _is_gated_mlp(module):
            kind, fused = "swiglu_mlp", _fused_mlp_forward(module)
            width = getattr(module.gate_proj, "in_features", None)
            if not isinstance(width, int):
                continue
        else:
            continue
        key = (type(module), type(getattr(module, "act_fn", None)))
        if key not in verdict:
            verdict[key] = _agrees(module, fused, width, dtype)
        if verdict[key]:
            module.forward = fused
            counts[kind] += 1
    return counts

"""model.fused: the base's RMSNorms and SwiGLU MLPs run through rlhf_kernels.rms_norm / swiglu. The stack
computes the same hidden states and LoRA gradients as with the model's own modules, keeps less for the
backward pass, and a module whose own forward is something else keeps it.

Letters: B batch, T time, H hidden."""

import pytest
import torch
from torch import nn

from rlhf_engine.model.config import MODEL_PRESETS, StackConfig
from rlhf_engine.model.fused import fuse_layers
from rlhf_engine.model.stack import ModelStack

B, T = 3, 11


def build(fused: bool, quantization="nf4"):
    stack = ModelStack.build(StackConfig(model="tiny-llama", fused_layers=fused, quantization=quantization,
                                         adapters=("policy",)))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct LoRA weights (peft starts B at zero)
        for name, p in stack.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return stack.train()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 259, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    return ids, mask


def forward_backward(stack):
    ids, mask = batch()
    stack.model.zero_grad(set_to_none=True)
    hidden = stack.policy(ids, mask)
    upstream = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))
    (hidden * upstream * mask[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in stack.named_role_parameters("policy")}
    return hidden.detach(), grads


def saved_bytes(stack) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one training forward."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    ids, mask = batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stack.policy(ids, mask)
    return sum(seen.values())


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_fused_stack_matches_the_models_own_modules(quantization):
    fused, own = build(True, quantization), build(False, quantization)
    layers = MODEL_PRESETS["tiny-llama"]["num_hidden_layers"]
    h1, g1 = forward_backward(fused)
    h0, g0 = forward_backward(own)
    torch.testing.assert_close(h1, h0, atol=2e-5, rtol=1e-4)
    assert g1.keys() == g0.keys() and len(g1) == 7 * 2 * layers  # A and B of 7 linears per layer
    for name in g0:  # fp32 rounding of a differently ordered backward: relative to the gradient's scale
        worst = (g1[name] - g0[name]).abs().max().item()
        assert worst <= 1e-5 * g0[name].abs().max().item(), (name, worst)


def test_every_norm_and_mlp_is_fused_and_keeps_less_for_backward():
    cfg = MODEL_PRESETS["tiny-llama"]
    fused, own = build(True), build(False)
    assert fused.config.fused_layers and not own.config.fused_layers
    fused_norms = [m for m in fused.model.modules() if type(m).__name__.endswith("RMSNorm") and "forward" in m.__dict__]
    fused_mlps = [m for m in fused.model.modules() if hasattr(m, "gate_proj") and "forward" in m.__dict__]
    assert len(fused_norms) == 2 * cfg["num_hidden_layers"] + 1 and len(fused_mlps) == cfg["num_hidden_layers"]
    assert not any("forward" in m.__dict__ for m in own.model.modules() if type(m).__name__.endswith("RMSNorm"))
    # per token and layer the model's own MLP keeps silu(gate) and the product silu(gate) * up (the down
    # projection's input) besides gate and up; the fused one keeps gate and up and rebuilds the others.
    # (The norms keep the same: with a frozen weight the model's own keeps only its input and the rstd too.)
    n_tok, layers, I = B * T, cfg["num_hidden_layers"], cfg["intermediate_size"]
    saved_own, saved_fused = saved_bytes(own), saved_bytes(fused)
    assert saved_own - saved_fused >= 4 * n_tok * layers * 2 * I, (saved_own, saved_fused)


class OnePlusRMSNorm(nn.Module):
    """A Gemma-style norm: the same attributes as Llama's, but x_hat * (1 + weight)."""

    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(h))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


class PlainRMSNorm(OnePlusRMSNorm):
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class GeluMLP(nn.Module):
    def __init__(self, h, i, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(h, i), nn.Linear(h, i), nn.Linear(i, h)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SwappedMLP(GeluMLP):
    def forward(self, x):  # silu on the up projection: a different formula behind the same attributes
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_a_module_whose_forward_differs_keeps_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(OnePlusRMSNorm(8), PlainRMSNorm(8), GeluMLP(8, 12, nn.GELU()), SwappedMLP(8, 12, nn.SiLU()),
                          GeluMLP(8, 12, nn.SiLU()))  # fmt: skip
    counts = fuse_layers(model, torch.float32)
    assert counts == {"rms_norm": 1, "swiglu_mlp": 1}
    assert ["forward" in m.__dict__ for m in model] == [False, True, False, False, True]
    x = torch.randn(4, 8)
    for m in (model[1], model[4]):
        torch.testing.assert_close(m(x), type(m).forward(m, x))

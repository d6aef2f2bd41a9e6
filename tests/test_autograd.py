"""first_order_only across every op with a kernel backward: a second derivative through a kernel is
one clear error whichever way it is asked for (.backward() or torch.autograd.grad), and the first
derivative under create_graph=True is unchanged."""

import pytest
import torch
from util import device_for, kernel_backends

import rlhf_kernels as kernels

g = torch.Generator().manual_seed(0)
X = torch.randn(4, 11, generator=g)
Z = torch.randn(4, 11, generator=g)
Y = torch.randint(0, 11, (4,), generator=g)
H = torch.randn(4, 6, generator=g)
W = torch.randn(11, 6, generator=g)
LP = torch.randn(2, 5, generator=g) * 0.3 - 1
M = torch.ones(2, 5)

# name -> (the op as a function of its differentiated input (its companions follow its device and dtype),
# that input)
OPS = {
    "logprobs": (lambda x, b, d: kernels.logprobs(x, Y.to(d), entropy=True, backend=b)[1].sum(), X),
    "full_kl": (lambda x, b, d: kernels.full_kl(x, Z.to(x), backend=b).sum(), X),
    "token_stats": (lambda x, b, d: sum(o.sum() for o in kernels.token_stats(x, Z.to(x), Y.to(d), backend=b)), X),
    "linear_logprobs": (lambda h, b, d: kernels.linear_logprobs(h, W.to(h), Y.to(d), backend=b).sum(), H),
    "ppo_loss": (lambda lp, b, d: kernels.ppo_loss(lp, (LP + 0.2).to(d), LP.to(d), M.to(d), backend=b)[0], LP),
    "value_loss": (lambda v, b, d: kernels.value_loss(v, (LP + 0.3).to(d), LP.to(d), M.to(d), backend=b)[0], LP),
    "kl_penalty": (lambda lp, b, d: kernels.kl_penalty(lp, (LP + 0.2).to(d), backend=b).sum(), LP),
}


@pytest.mark.parametrize("backend", kernel_backends(("triton", "cpp")))
@pytest.mark.parametrize("op", list(OPS))
def test_second_derivative_is_a_clear_error_both_ways(op, backend):
    device = device_for(backend)
    fn, x0 = OPS[op]
    x = x0.to(device).requires_grad_(True)
    (first,) = torch.autograd.grad(fn(x, backend, device), x, create_graph=True)
    xr = x0.double().requires_grad_(True)
    (want,) = torch.autograd.grad(fn(xr, "torch", torch.device("cpu")), xr)
    torch.testing.assert_close(first.detach().double().cpu(), want, atol=1e-5, rtol=1e-4)
    message = f"{op if op != 'linear_logprobs' else 'linear_logprobs/linear_token_stats'}: double backward is not supported by backend '{backend}'"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(first.sum(), x)
    (first,) = torch.autograd.grad(fn(x, backend, device), x, create_graph=True)
    with pytest.raises(RuntimeError, match=message):
        first.sum().backward()

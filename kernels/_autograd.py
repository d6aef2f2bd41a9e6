"""What every op's autograd.Function shares: first-order gradients only, with a clear error otherwise.

The kernel backends compute gradients in fused kernels that autograd cannot differentiate again, so a
second backward through them would be silently wrong (or None). The reference backend ("torch") is
plain autograd and supports higher orders.

Gradient rule, the same on every backend: an op differentiates with respect to the policy side only
(logits, hidden / weight / bias, logprobs, values); every other input (reference logits or hidden
states, old log-probs, advantages, returns, old values, reference log-probs, masks) is a constant.
"""

from __future__ import annotations

import functools

import torch
from torch._C import _functions


def first_order_only(op: str):
    """Decorate an autograd.Function's backward (whose ctx has `backend`): under create_graph=True
    its results are handed back through a node whose own backward raises
    "<op>: double backward is not supported by backend '<backend>'"."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # create_graph=False: nothing can differentiate these
                return outputs
            single = not isinstance(outputs, tuple)
            outs = (outputs,) if single else outputs
            message = (
                f"{op}: double backward is not supported by backend {ctx.backend!r} (its gradient comes from a "
                "fused kernel); use backend='torch' for higher-order gradients"
            )
            err = _functions.DelayedError(message.encode(), len(outs))
            # Keep the results connected to the op's own (saved) inputs, so that both .backward() and
            # torch.autograd.grad(..., inputs) reach the error node: an empty slice's sum adds an exact
            # 0 (even to NaN or inf values) with a graph edge to the input.
            anchors = [t for t in ctx.saved_tensors if isinstance(t, torch.Tensor) and t.requires_grad]

            def tracked(t):
                if t is None:
                    return None
                t = t.detach()
                if anchors:
                    return t + sum(a.reshape(-1)[:0].sum() for a in anchors)
                t.requires_grad_(True)
                return t

            result = err(*[tracked(t) for t in outs])
            result = result if isinstance(result, tuple) else (result,)
            return result[0] if single else result

        return wrapper

    return decorate

"""The optimizer and its schedule, as every trainer builds them: AdamW over the trainable adapter and
head parameters, a linear warm-up then a constant rate.
"""

from __future__ import annotations

import torch


def adamw(named_params, *, lr: float, weight_decay: float, warmup_steps: int = 0):
    """(params, optimizer, scheduler): AdamW over the named trainable parameters, with warmup_schedule."""
    params = [p for _, p in named_params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return params, optimizer, warmup_schedule(optimizer, warmup_steps)


def warmup_schedule(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of step s (0-based) is lr * min(1, (s + 1) / warmup_steps): a linear rise, then
    constant."""
    if warmup_steps == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))

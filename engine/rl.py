"""RL math of the trainers as pure functions on the per-token grid (the fused kernels do the heavy
parts: rlhf_kernels.gae, masked_whiten, ppo_loss, value_loss, kl_penalty, linear_token_stats).

Letters: B sequences, R response positions. Per-token tensors are (B, R): position j is the j-th
response token (its log-prob is read from the hidden state before it); `mask` marks real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 for an empty mask); for metrics, not for losses (the kernels do those)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, R) mask -> (B,) index of each row's last real token (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * (positions + 1)).argmax(dim=1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards of RLHF's KL-shaped objective (Ziegler et al. 2019, eq. 2; Stiennon et al.
    2020): r_t = -beta * KL_t at every response token, plus the sequence score at its LAST token.

    scores (B,), kl (B, R) per-token KL estimates (exact full-vocabulary KL or a sampled one), mask
    (B, R) -> rewards (B, R), 0 outside the mask."""
    m = mask.to(kl.dtype)
    rewards = -beta * kl * m
    last = last_token_index(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_token = mask.any(dim=1)
    rewards[rows, last] += torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over the masked tokens: 1 is a perfect critic, 0 one
    no better than a constant, negative a harmful one (nan when the returns do not vary)."""
    valid = mask.bool()
    r, v = returns[valid].double(), values[valid].double()
    if r.numel() < 2:
        return float("nan")
    var = r.var(unbiased=False)
    return float(1 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")


# ---- KL control ----------------------------------------------------------------------------------


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al. 2019, section
    2.2): e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + e * n / horizon) after a batch of n
    sequences whose mean KL is KL. A checkpoint keeps its state (state_dict)."""

    beta: float  # the current coefficient
    target: float | None = None  # target KL per sequence (None: fixed beta)
    horizon: int = 10000  # sequences over which beta may move by a factor of about e^0.2

    def update(self, kl: float, n: int) -> float:
        """Adapt beta to the measured mean KL of n sequences; returns the new beta."""
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = float(state["beta"]), state["target"], int(state["horizon"])


# ---- reward normalisation ------------------------------------------------------------------------


@dataclass
class RunningMoments:
    """Running mean and variance of scores over all batches seen (Chan et al.'s parallel update), to
    normalise rewards across batches; a checkpoint keeps its state."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])

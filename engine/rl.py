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


# ---- critic-free advantages (GRPO, Dr. GRPO, RLOO) -----------------------------------------------

GROUP_ADVANTAGES = ("grpo", "drgrpo", "rloo")
GROUP_STD_EPS = 1e-4  # GRPO's std floor (TRL's): a group of near-equal rewards gives ~0, not huge advantages


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence advantages from groups of k = group_size consecutive sequences (k responses to one
    prompt), and a (B,) bool mask of the sequences whose group has no reward variation.

        grpo    (r_i - mean_g) / (std_g + eps)   (Shao et al. 2024, DeepSeekMath; std unbiased, as TRL)
        drgrpo  r_i - mean_g                     (Liu et al. 2025, Dr. GRPO: no std division)
        rloo    r_i - mean of the other k - 1 = k / (k - 1) (r_i - mean_g)   (Ahmadian et al. 2024)

    rewards (B,) with B a multiple of k -> (advantages (B,), zero_std (B,))."""
    if mode not in GROUP_ADVANTAGES:
        raise ValueError(f"group advantage {mode!r}: expected one of {', '.join(GROUP_ADVANTAGES)}")
    k = group_size
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"{rewards.numel()} rewards in groups of {k}: need k >= 2 and whole groups")
    r = rewards.double().view(-1, k)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)  # unbiased
    if mode == "grpo":
        adv = centred / (std + GROUP_STD_EPS)
    elif mode == "drgrpo":
        adv = centred
    else:
        adv = centred * k / (k - 1)
    zero_std = (r.max(dim=1).values == r.min(dim=1).values)[:, None].expand(-1, k)
    return adv.reshape(-1).to(rewards.dtype), zero_std.reshape(-1)


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")


def aggregation_weights(mask: torch.Tensor, mode: str, n_tokens: float, n_seqs: float, max_len: int) -> torch.Tensor:
    """(B, R) per-token weights w_t with sum_t w_t loss_t the configured aggregate over the GLOBAL batch
    (n_tokens real tokens, n_seqs sequences, all ranks):

        token_mean            1 / n_tokens                   every token counts the same (PPO's)
        seq_mean_token_mean   1 / (len_i * n_seqs)           every sequence counts the same (GRPO's)
        token_sum_norm        1 / (n_seqs * max_len)         token sum over a fixed normaliser (Dr. GRPO):
                                                             no length bias
    0 outside the mask."""
    m = mask.to(torch.float64)
    if mode == "token_mean":
        w = m / max(n_tokens, 1.0)
    elif mode == "seq_mean_token_mean":
        w = m / (m.sum(dim=1, keepdim=True).clamp(min=1) * max(n_seqs, 1.0))
    elif mode == "token_sum_norm":
        w = m / (max(n_seqs, 1.0) * max_len)
    else:
        raise ValueError(f"loss aggregation {mode!r}: expected one of {', '.join(LOSS_AGGREGATIONS)}")
    return w.float()

"""Advantage estimators, chosen by name from one registry (ESTIMATORS): GAE over the response tokens
with a critic, or group-relative advantages without one (GRPO, Dr. GRPO, RLOO); and the one place
advantages are whitened.

    python -m engine ppo --advantage gae|grpo|drgrpo|rloo ...

Letters: B sequences, R response positions; per-token tensors are (B, R) on the response grid.
"""

from __future__ import annotations

import torch

import rlhf_kernels as kernels

from .choices import ADVANTAGES, GROUP_ADVANTAGES
from .rollout import Trajectory, row_offset

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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over the masked tokens: 1 is a perfect critic, 0 one
    no better than a constant, negative a harmful one (nan when the returns do not vary)."""
    valid = mask.bool()
    r, v = returns[valid].double(), values[valid].double()
    if r.numel() < 2:
        return float("nan")
    var = r.var(unbiased=False)
    return float(1 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")


def whiten_advantages(adv: torch.Tensor, mask: torch.Tensor, config, dist) -> torch.Tensor:
    """The one place advantages are normalised: rlhf_kernels.masked_whiten over the GLOBAL batch (every
    rank's tokens), returning this rank's rows."""
    every, every_mask = dist.gather_rows(adv), dist.gather_rows(mask, fill=False)
    white = kernels.masked_whiten(every, every_mask, backend=config.backend)
    start = row_offset(mask.shape[0], dist)
    return white[start : start + adv.shape[0], : adv.shape[1]]


def gae_advantages(traj: Trajectory, config, dist) -> None:
    """GAE (Schulman et al. 2016): rlhf_kernels.gae over the response tokens with the critic's values,
    then whitening over the global batch when configured."""
    adv, ret = kernels.gae(traj.rewards, traj.old_values, traj.mask, gamma=config.gamma, lam=config.lam,
                           backend=config.backend)  # fmt: skip
    traj.returns = ret
    traj.advantages = whiten_advantages(adv, traj.mask, config, dist) if config.whiten_advantages else adv


def group_relative_advantages(traj: Trajectory, config, dist) -> None:
    """Each response's total reward (its score, minus beta * its summed KL with kl_in="reward") against
    its group's (group_advantages), the same advantage at every token of the response."""
    seq_rewards = traj.rewards.sum(dim=1)  # the score plus the (negative) KL rewards of every token
    adv, traj.zero_std = group_advantages(seq_rewards, config.samples_per_prompt, config.advantage)
    traj.advantages = adv[:, None] * traj.mask


# name -> estimator(traj, config, dist): fills traj.advantages (and returns, zero_std where it has them)
ESTIMATORS = {"gae": gae_advantages, **dict.fromkeys(GROUP_ADVANTAGES, group_relative_advantages)}
assert tuple(ESTIMATORS) == ADVANTAGES, "algos.choices.ADVANTAGES and the registry disagree"


def estimate_advantages(traj: Trajectory, config, dist) -> None:
    """Step 6 of PPO: the configured estimator (config.advantage) from the registry."""
    ESTIMATORS[config.advantage](traj, config, dist)

"""KL to the reference in RLHF's objective: the per-token rewards of the KL-shaped objective, the
penalty's per-token KL (the exact full-vocabulary KL, or a sampled k1 / k2 / k3 estimate), and the KL
coefficient, fixed or adaptive.

Letters: B sequences, R response positions. Per-token tensors are (B, R): position j is the j-th
response token; `mask` marks real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import rlhf_kernels as kernels

from ..core.tensors import last_token_index

# |log(pi / ref)| bound before a sampled KL estimate (k1 / k2 / k3), as verl and OpenRLHF bound their log-ratios:
# k3 = e^{-x} - 1 + x at x = -20 is 4.9e8, finite with room for the squares of whitening in fp32, where an
# unbounded x past -88 makes a reward inf and every whitened advantage NaN. A policy almost never draws a token
# it gives e^-20 of the reference's probability; a rollout scored with the wrong log-probs can reach it.
KL_LOG_RATIO_CLAMP = 20.0


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


def penalty_kl(traj, config) -> torch.Tensor | None:
    """The per-token KL the penalty uses: the exact one, or a sampled estimate (k1/k2/k3) of the rollout's
    log-probs (rlhf_kernels.kl_penalty, the log-ratio clamped to +-KL_LOG_RATIO_CLAMP); None while what it
    needs is not computed (algos.rollout step_forwards: no reference, or the policy's log-probs not yet read
    from the training forward)."""
    if config.kl_estimator == "exact":
        return traj.kl_exact
    if traj.old_logprobs is None or traj.ref_logprobs is None:
        return None
    return kernels.kl_penalty(traj.old_logprobs, traj.ref_logprobs, kind=config.kl_estimator, clamp=KL_LOG_RATIO_CLAMP,
                              backend=config.backend) * traj.mask  # fmt: skip


def assign_rewards(traj, config, beta: float) -> None:
    """Step 5 of PPO: per-token rewards: the score at the last token minus beta * KL_t (kl_in="reward"),
    or the score alone (kl_in="loss": the KL is a loss term then, or beta = 0)."""
    traj.kl = penalty_kl(traj, config)
    in_reward = beta if config.kl_in == "reward" else 0.0
    kl = traj.kl
    if kl is None:  # step 4 skipped the forwards a KL needs: only where no reward reads it
        if in_reward:
            raise ValueError("a KL penalty in the rewards needs step 4's policy and reference forwards")
        kl = torch.zeros(traj.mask.shape, device=traj.mask.device)
    traj.rewards = token_rewards(traj.scores, kl, traj.mask, in_reward)


def mean_penalty_kl(traj, dist) -> float:
    """Mean over responses of the summed penalty KL, for the adaptive controller."""
    total, n = dist.sum_floats(float(traj.kl.sum()), float(len(traj.responses)))
    return total / max(n, 1)


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

"""The losses: the reward model's Bradley-Terry loss, SFT's token-mean NLL, the DPO family, and the
clipped PPO objective (with its value loss, entropy bonus and KL term) under a loss aggregation.

Letters: B sequences or pairs, R response positions, N tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

import rlhf_kernels as kernels

from ..core.tensors import IGNORE_INDEX
from .choices import DPO_LOSSES, LOSS_AGGREGATIONS
from .kl import KL_LOG_RATIO_CLAMP
from .rollout import logprob_temperature

# ---- the reward model ---------------------------------------------------------------------------


class RewardLossStats(NamedTuple):
    accuracy: torch.Tensor  # () share of pairs with s_chosen > s_rejected
    reward_margin: torch.Tensor  # () mean of s_chosen - s_rejected


def reward_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, RewardLossStats]:
    """Pairwise Bradley-Terry loss, mean over B pairs (InstructGPT, Ouyang et al. 2022, eq. 1):

        loss = -log sigmoid(s_chosen - s_rejected - margin)

    `margin` (a float or (B,)) demands a larger gap (Llama 2, Touvron et al. 2023, eq. 2).
    Returns (loss, RewardLossStats(accuracy, reward_margin)), stats detached."""
    diff = chosen_scores.float() - rejected_scores.float()
    loss = -F.logsigmoid(diff - margin).mean()
    with torch.no_grad():
        stats = RewardLossStats((diff > 0).float().mean(), diff.mean())
    return loss, stats


def ensemble_reward_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float, weights: torch.Tensor
) -> tuple[torch.Tensor, RewardLossStats]:
    """The Bradley-Terry loss of k reward heads at once, each on its own bootstrap resample of the pairs
    (the ensemble of Coste et al. 2023 on one shared reward adapter): scores (B, k), weights (B, k) each
    pair's count in each head's resample (rewards.bootstrap_counts), margin a float or (B,):

        loss = (1 / k) sum_h (1 / B) sum_b w[b, h] * -log sigmoid(s_c[b, h] - s_r[b, h] - margin_b)

    Dividing by B, not by sum_b w[b, h], keeps each head's loss an unbiased estimate of its mean loss
    over its own resample (a batch's counts sum to B in expectation). One head with unit weights is
    reward_loss. Stats are of the ensemble mean's margin."""
    diff = chosen_scores.float() - rejected_scores.float()  # (B, k)
    m = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    m = m[:, None] if m.dim() == 1 else m
    loss = (-F.logsigmoid(diff - m) * weights.to(diff.dtype)).mean()
    with torch.no_grad():
        mean_diff = diff.mean(dim=1)
        stats = RewardLossStats((mean_diff > 0).float().mean(), mean_diff.mean())
    return loss, stats


# ---- SFT ----------------------------------------------------------------------------------------


def sft_loss(logprobs: torch.Tensor, n_tokens: int | float) -> torch.Tensor:
    """Negative log-likelihood per completion token: -sum(logprobs) / n_tokens. n_tokens counts the
    whole batch's completion tokens, so the micro-batches' losses sum to the batch's token mean."""
    return -logprobs.sum() / max(float(n_tokens), 1.0)


# ---- the DPO family ---------------------------------------------------------------------------------


def dpo_losses(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "dpo",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of the DPO family and the implicit rewards, from (B,) sequence log-probs.

    With the margin m = (pi_c - ref_c) - (pi_r - ref_r) (log pi: the policy's sequence log-prob,
    log ref: the reference's; c chosen, r rejected):

        dpo    -log sigmoid(beta m)                                   (Rafailov et al. 2023, eq. 7)
        cdpo   -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)
               (labels flipped with probability eps = label_smoothing; Mitchell 2023)
        ipo    (m - 1 / (2 beta))^2                                   (Azar et al. 2023, eq. 17)

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)): rewards are DPO's implicit
    rewards beta * (log pi - log ref) of each sequence, detached. Computed in fp32 at least; the
    reference log-probs get no gradient."""
    dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    chosen = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype).detach()  # (B,) log pi_c - log ref_c
    rejected = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype).detach()
    margin = chosen - rejected  # (B,)
    if loss_type == "dpo":
        losses = -F.logsigmoid(beta * margin)
    elif loss_type == "cdpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


# ---- the PPO objective ------------------------------------------------------------------------------


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


def minibatch_weights(traj, idx: torch.Tensor, config, dist) -> tuple[torch.Tensor, float]:
    """Aggregation weights (len(idx), R) of this rank's rows `idx` of a minibatch, normalised over the
    minibatch of every rank; groups without reward variation get 0 with drop_zero_std_groups. Also the
    minibatch's real tokens (all ranks)."""
    mask = traj.mask[idx]
    keep = mask
    if config.drop_zero_std_groups and traj.zero_std is not None:
        keep = mask & ~traj.zero_std[idx][:, None]
    n_tokens, n_seqs, n_kept_tokens, n_kept_seqs = dist.sum_floats(
        float(mask.sum()), float(len(idx)), float(keep.sum()), float(keep.any(dim=1).sum()))  # fmt: skip
    w = aggregation_weights(keep, config.loss_agg, n_kept_tokens, n_kept_seqs, config.sampling.max_new_tokens)
    return w, n_tokens


def ppo_micro_loss(stack, mb: dict, P: int, config, beta: float, weights: torch.Tensor,
                   n_total: float, tokens: dict | None = None) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """One micro-batch's share of the minibatch loss and its token-weighted stats.

    Without old log-probs (mb["old_logprobs"] None: step 4 skipped the policy's forward, one update per
    rollout: algos.rollout.step_forwards) they are this forward's own, detached: ratio = 1 exactly and
    the clipped term's gradient is -A grad logp (PPO at the sampling policy). `tokens`, when given,
    receives the detached (b, R) "logp", "ent" and "kl" (the exact KL, or None) of this forward.

    loss = sum_t w_t (pg_t - ent_coef * entropy_t + beta * KL_t) + vf_coef * vf_loss, with w the
    aggregation weights over the minibatch of every rank (aggregation_weights); the value
    loss (GAE only) is a token mean. The clipped PPO term is positively homogeneous in the advantage,
    pg(w A) = w pg(A) for w >= 0 (both branches and the dual clip scale with A), so rlhf_kernels.ppo_loss
    on advantages w_t A_t, times its token count, gives sum_t w_t pg_t exactly."""
    T, weight, b = logprob_temperature(config), stack.lm_head_weight, config.backend
    mask = mb["mask"]
    hidden = stack.policy(mb["input_ids"], mb["attention_mask"], mb.get("prompt_lengths"))  # a prompt once
    h = hidden[:, P - 1 : -1]
    kl = None
    head = stack.head(T)  # the lm_head's bias; the model's logit scale folded into the temperature
    exact = config.kl_estimator == "exact"
    # the KL term needs the reference, which step 4 skips when nothing reads it (beta = 0, no target_kl:
    # algos.rollout.step_forwards); the term is beta * KL = 0 then
    in_loss = config.kl_in == "loss" and mb["ref_hidden" if exact else "ref_logprobs"] is not None
    if in_loss and exact:
        logp, ent, kl = kernels.linear_token_stats(h, mb["ref_hidden"], weight, mb["labels"], **head,
                                                   ignore_index=IGNORE_INDEX, backend=b)  # fmt: skip
    else:
        logp, ent = kernels.linear_logprobs(h, weight, mb["labels"], **head, ignore_index=IGNORE_INDEX,
                                            entropy=True, backend=b)  # fmt: skip
        if in_loss:
            kl = kernels.kl_penalty(logp, mb["ref_logprobs"], kind=config.kl_estimator, clamp=KL_LOG_RATIO_CLAMP,
                                    backend=b)  # fmt: skip
    if tokens is not None:
        tokens.update(logp=logp.detach(), ent=ent.detach(), kl=kl.detach() if kl is not None and exact else None)
    old = mb["old_logprobs"] if mb["old_logprobs"] is not None else logp.detach()
    n = mask.sum().float()
    pg_mean, pst = kernels.ppo_loss(logp, old, mb["advantages"] * weights, mask,
                                    clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=config.dual_clip,
                                    backend=b)  # fmt: skip
    loss = pg_mean * n - config.ent_coef * (weights * ent).sum()
    if kl is not None:
        loss = loss + beta * (weights * kl).sum()
    share = float(n) / max(n_total, 1.0)
    stats = {"pg_loss": float(pg_mean.detach()) * float(n), "clipfrac": float(pst.clipfrac) * share,
             "approx_kl": float(pst.approx_kl) * share,
             "train_entropy": float((ent.detach() * mask).sum()) / max(n_total, 1.0)}  # fmt: skip
    if config.critic:
        values = stack.values(mb["input_ids"], mb["attention_mask"], policy_hidden=hidden,
                              prefix_lengths=mb.get("prompt_lengths"))[:, P - 1 : -1].float()  # fmt: skip
        vf_loss, vst = kernels.value_loss(values, mb["old_values"], mb["returns"], mask, clip=config.value_clip,
                                          backend=b)  # fmt: skip
        loss = loss + config.vf_coef * vf_loss * share
        stats.update(vf_loss=float(vf_loss.detach()) * share, vf_clipfrac=float(vst.vf_clipfrac) * share)
    return loss, stats

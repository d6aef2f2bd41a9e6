"""A rollout on the response grid: the typed container every RL step fills step by step (Trajectory),
sampling it from a role of the stack, scoring it, and its no-grad forward statistics (old and reference
log-probs, entropy, the exact KL, values) straight from hidden states through the fused kernels.

Letters: B sequences of this rank's rollout, P prompt tokens (left-padded), R response positions, H
hidden. Per-token tensors live on the response grid (B, R): position j is the j-th response token, whose
log-prob and value come from the hidden state right before it (column P - 1 + j).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.tensors import IGNORE_INDEX
from ..datasets.layout import prompt_ids, stop_token_ids
from ..model.config import SamplingConfig
from ..model.generation import sample
from ..model.logprobs import policy_reference_stats
from ..core.distributed import Dist
from .rewards import RunningMoments, StackReward, shape_scores


@dataclass
class Trajectory:
    """One rollout of this rank on the response grid; fields filled step by step."""

    input_ids: torch.Tensor  # (B, P + R) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, P + R)
    prompt_length: int  # P
    labels: torch.Tensor  # (B, R) response tokens; IGNORE_INDEX past each response's end
    mask: torch.Tensor  # (B, R) bool: real response tokens
    stopped: torch.Tensor  # (B,) bool: the response ended at EOS / a stop (not at the length limit)
    prompts: list[str]  # (B,) each row's prompt
    responses: list[str]  # (B,) decoded responses
    raw_scores: torch.Tensor | None = None  # (B,) the sources' scores, weighted and summed
    source_scores: dict | None = None  # name -> (B,) each source's own scores (logged as reward/<name>)
    scores: torch.Tensor | None = None  # (B,) after shaping: what PPO maximises
    ensemble: torch.Tensor | None = None  # (B, k) each reward head's score, when a source is the stack's RM
    proxy_scores: torch.Tensor | None = None  # (B,) raw_scores with the RM's heads' plain mean (no conservative term)
    gold_scores: torch.Tensor | None = None  # (B,) the gold scorer's, logged only (never in the update)
    old_logprobs: torch.Tensor | None = None  # (B, R) log-probs under the policy that sampled (no grad)
    ref_logprobs: torch.Tensor | None = None  # (B, R) under the reference
    entropy: torch.Tensor | None = None  # (B, R) of the policy's next-token distribution
    kl_exact: torch.Tensor | None = None  # (B, R) full-vocabulary KL(policy || reference) per token
    kl: torch.Tensor | None = None  # (B, R) the KL estimate the penalty uses (exact or k1/k2/k3)
    old_values: torch.Tensor | None = None  # (B, R)
    ref_hidden: torch.Tensor | None = None  # (B, R, H) reference hidden states (exact KL in the loss)
    rewards: torch.Tensor | None = None  # (B, R)
    advantages: torch.Tensor | None = None  # (B, R), whitened when configured
    returns: torch.Tensor | None = None  # (B, R) (GAE only)
    zero_std: torch.Tensor | None = None  # (B,) bool: the row's group has no reward variation (group modes)

    def rows(self, idx: torch.Tensor) -> dict:
        """The per-row tensors a training micro-batch needs, for rows `idx`."""
        names = ("input_ids", "attention_mask", "labels", "mask", "old_logprobs", "ref_logprobs", "old_values",
                 "advantages", "returns", "ref_hidden", "zero_std")  # fmt: skip
        return {n: (None if getattr(self, n) is None else getattr(self, n)[idx]) for n in names}


def rollout(stack, prompts: list[str], keys: list[int], sampling: SamplingConfig, *, samples_per_prompt: int = 1,
            seed: int, adapter: str | None = "policy") -> Trajectory:  # fmt: skip
    """Step 2 of PPO: samples_per_prompt responses to each prompt from `adapter` (keys name each prompt's
    randomness), on the response grid."""
    tok = stack.tokenizer
    s = sample(stack, [prompt_ids(tok, p) for p in prompts], sampling, adapter=adapter,
               samples_per_prompt=samples_per_prompt, seed=seed, keys=keys, stop_ids=stop_token_ids(tok))  # fmt: skip
    P = s.prompt_length
    mask = s.response_mask
    labels = torch.where(mask, s.input_ids[:, P:], torch.full_like(s.input_ids[:, P:], IGNORE_INDEX))
    return Trajectory(
        input_ids=s.input_ids, attention_mask=s.attention_mask, prompt_length=P, labels=labels, mask=mask,
        stopped=s.stopped, prompts=[prompts[i] for i in s.prompt_index.tolist()], responses=s.responses,
    )  # fmt: skip


def score_sources(sources: list, prompts: list[str], responses: list[str]) -> tuple[dict, torch.Tensor | None]:
    """Each source's (B,) scores by name, and (B, k) the head scores of the stack's RM when it is a source
    (its (B,) score then combines them: rewards.ENSEMBLE_REWARDS)."""
    scores, heads = {}, None
    for name, src, _ in sources:
        if isinstance(src, StackReward):
            heads = src.score_heads(prompts, responses)
            scores[name] = src.combine(heads)
        else:
            scores[name] = src.score(prompts, responses)
    return scores, heads


def weighted_scores(sources: list, scores: dict, heads: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i scores_i over the sources; given the RM's heads, the RM counts with their plain mean (the
    proxy PPO optimises, before any conservative term)."""
    return sum(w * (heads.mean(dim=1) if heads is not None and isinstance(src, StackReward) else scores[name])
               for name, src, w in sources)  # fmt: skip


def score(traj: Trajectory, sources: list, config, moments: RunningMoments, dist: Dist) -> None:
    """Step 3 of PPO: each source's scores, their weighted sum, then shaped over the GLOBAL batch
    (normalisation sees every rank's scores)."""
    device = traj.mask.device
    scores, heads = score_sources(sources, traj.prompts, traj.responses)
    traj.source_scores = {name: v.to(device) for name, v in scores.items()}
    traj.ensemble = None if heads is None else heads.to(device)
    traj.raw_scores = weighted_scores(sources, traj.source_scores)
    traj.proxy_scores = weighted_scores(sources, traj.source_scores, traj.ensemble)
    every = dist.gather_rows(traj.raw_scores)
    stopped = dist.gather_rows(traj.stopped)
    shaped = shape_scores(every, stopped, missing_eos_penalty=config.missing_eos_penalty, clip=config.reward_clip,
                          normalize=config.reward_normalization, moments=moments)  # fmt: skip
    start = row_offset(len(traj.raw_scores), dist)
    traj.scores = shaped[start : start + len(traj.raw_scores)]


def row_offset(n_rows: int, dist: Dist) -> int:
    """Where this rank's rows start among every rank's (rank order)."""
    if not dist.active:
        return 0
    counts = [0.0] * dist.world
    counts[dist.rank] = float(n_rows)
    return int(sum(dist.sum_floats(*counts)[: dist.rank]))


def logprob_temperature(config) -> float:
    """Log-probs are taken of the distribution that was sampled: logits / T (greedy counts as T = 1)."""
    return config.sampling.temperature or 1.0


@torch.no_grad()
def forward_stats(stack, traj: Trajectory, config) -> None:
    """Step 4 of PPO: in forward batches, the policy's log-probs, entropy and exact KL to the reference,
    the reference's log-probs (policy_reference_stats) and the values."""
    P, T = traj.prompt_length, logprob_temperature(config)
    keep_ref = config.kl_in == "loss" and config.kl_estimator == "exact"
    parts: dict[str, list] = {k: [] for k in ("logp", "ent", "kl", "ref_logp", "values", "ref_hidden")}
    for rows in torch.arange(traj.input_ids.shape[0], device=traj.mask.device).split(config.forward_batch_size):
        ids, am = traj.input_ids[rows], traj.attention_mask[rows]
        st = policy_reference_stats(stack, ids, am, traj.labels[rows], P, T, config.backend)
        for name in ("logp", "ent", "kl", "ref_logp"):
            parts[name].append(st[name])
        if config.critic:
            parts["values"].append(stack.values(ids, am, policy_hidden=st["hidden"])[:, P - 1 : -1].float())
        if keep_ref:
            parts["ref_hidden"].append(st["ref_hidden"])
    m = traj.mask
    traj.old_logprobs = torch.cat(parts["logp"]) * m
    traj.entropy = torch.cat(parts["ent"]) * m
    traj.kl_exact = torch.cat(parts["kl"]) * m
    traj.ref_logprobs = torch.cat(parts["ref_logp"]) * m
    traj.old_values = torch.cat(parts["values"]) * m if config.critic else None
    traj.ref_hidden = torch.cat(parts["ref_hidden"]) if keep_ref else None

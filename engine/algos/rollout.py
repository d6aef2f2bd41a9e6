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

import rlhf_kernels as kernels

from ..core.device import sync_time
from ..core.tensors import IGNORE_INDEX
from ..datasets.layout import prompt_ids, stop_token_ids
from ..model.config import SamplingConfig
from ..model.generation import sample
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
    # Steps 4 and 7 fill these; step_forwards says which step 4 skips (None until the training forward
    # fills the policy's; the reference's stay None when nothing reads the reference):
    old_logprobs: torch.Tensor | None = None  # (B, R) log-probs under the policy that sampled (no grad)
    ref_logprobs: torch.Tensor | None = None  # (B, R) under the reference
    entropy: torch.Tensor | None = None  # (B, R) of the policy's next-token distribution
    kl_exact: torch.Tensor | None = None  # (B, R) full-vocabulary KL(policy || reference) per token
    kl: torch.Tensor | None = None  # (B, R) the KL estimate the penalty uses (exact or k1/k2/k3), when known
    old_values: torch.Tensor | None = None  # (B, R)
    ref_hidden: torch.Tensor | None = None  # (B, R, H) reference hidden states (exact KL in the loss)
    rewards: torch.Tensor | None = None  # (B, R)
    advantages: torch.Tensor | None = None  # (B, R), whitened when configured
    returns: torch.Tensor | None = None  # (B, R) (GAE only)
    zero_std: torch.Tensor | None = None  # (B,) bool: the row's group has no reward variation (group modes)

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """(B,) long: each row's real prompt tokens (the first P columns, left-padded)."""
        return self.attention_mask[:, : self.prompt_length].sum(dim=1)

    def rows(self, idx: torch.Tensor) -> dict:
        """The per-row tensors a training micro-batch needs, for rows `idx`."""
        names = ("input_ids", "attention_mask", "labels", "mask", "old_logprobs", "ref_logprobs", "old_values",
                 "advantages", "returns", "ref_hidden", "zero_std", "prompt_lengths")  # fmt: skip
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


@dataclass(frozen=True)
class StepForwards:
    """Which no-grad forwards step 4 of a PPO step runs before training (step_forwards)."""

    old: bool  # the policy's: old log-probs and entropy (and, with a value head on the policy, the values)
    reference: bool  # the reference's: reference log-probs (its hidden states for an exact KL in the loss)
    values: bool  # the value adapter's own forward (GAE with value_mode="adapter")


def single_update(config) -> bool:
    """One optimizer step per rollout (one epoch, one minibatch of the whole batch): the policy the
    training forward sees is the policy that sampled."""
    return config.ppo_epochs == 1 and config.minibatch_size >= config.rollout_batch_size * config.samples_per_prompt


def step_forwards(config) -> StepForwards:
    """What step 4 must compute, and nothing more (TRL's GRPO skips the same two forwards):

    reference   only when something reads it: beta > 0 (the KL in the rewards or in the loss) or an
                adaptive beta (target_kl measures the KL). With beta = 0 and no target the per-step KL
                metrics are None and the KL is measured at held-out evaluations instead (eval_kl).
    old         unless single_update: then the old log-probs are the training forward's own, detached
                (ratio = exp(logp - logp.detach()) = 1 exactly, the PPO objective's value at the
                sampling policy, and its gradient A * grad logp), and entropy and KL are read from that
                forward too. Still needed when the rewards carry a per-token KL (kl_in="reward" with
                the reference on: rewards and advantages come before training) and when the values are
                a head on the policy's hidden states."""
    reference = config.beta > 0 or config.target_kl is not None
    head_on_policy = config.critic and config.stack.value_mode == "policy_head"
    old = not single_update(config) or (reference and config.kl_in == "reward") or head_on_policy
    return StepForwards(old=old, reference=reference, values=config.critic and not head_on_policy)


@torch.no_grad()
def forward_stats(stack, traj: Trajectory, config) -> dict:
    """Step 4 of PPO: in forward batches, whichever of step_forwards(config) the step needs: the
    policy's log-probs, entropy (and, with the reference, the exact KL to it in one fused pass over
    both hidden states: rlhf_kernels.linear_token_stats), the reference's log-probs, the values, all in
    eval mode (with LoRA dropout on, two passes of the same policy would disagree, and the first
    update's ratio would not be 1). Rows of one prompt run it once (model.prefix). What is not computed
    stays None on `traj` (optimise fills the policy's from the training forward). Returns the seconds of
    each part: {"old_s": policy forward + values, "ref_s": reference forward + its vocabulary passes}."""
    with stack.evaluating():
        return _forward_stats(stack, traj, config)


def _forward_stats(stack, traj: Trajectory, config) -> dict:
    need = step_forwards(config)
    P, T, b = traj.prompt_length, logprob_temperature(config), config.backend
    weight, device = stack.lm_head_weight, traj.mask.device
    head = stack.head(T)  # the lm_head's bias; the model's logit scale folded into the temperature
    keep_ref = need.reference and config.kl_in == "loss" and config.kl_estimator == "exact"
    parts: dict[str, list] = {k: [] for k in ("logp", "ent", "kl", "ref_logp", "values", "ref_hidden")}
    seconds = {"old_s": 0.0, "ref_s": 0.0}
    prompt_lengths = traj.prompt_lengths
    for rows in torch.arange(traj.input_ids.shape[0], device=device).split(config.forward_batch_size):
        ids, am, labels, caps = traj.input_ids[rows], traj.attention_mask[rows], traj.labels[rows], prompt_lengths[rows]
        t0 = sync_time(device)
        hidden = stack.hidden_states("policy", ids, am, caps) if need.old else None  # (b, P + R, H)
        t1 = sync_time(device)
        if need.reference:  # the same order of forwards as before the skips: policy, reference, value
            ref_hidden = stack.reference(ids, am, caps)[:, P - 1 : -1]  # (b, R, H)
            if need.old:
                logp, ent, kl = kernels.linear_token_stats(hidden[:, P - 1 : -1], ref_hidden, weight, labels,
                                                           **head, ignore_index=IGNORE_INDEX, backend=b)  # fmt: skip
                parts["logp"].append(logp), parts["ent"].append(ent), parts["kl"].append(kl)
            parts["ref_logp"].append(kernels.linear_logprobs(ref_hidden, weight, labels, **head,
                                                             ignore_index=IGNORE_INDEX, backend=b))  # fmt: skip
            if keep_ref:
                parts["ref_hidden"].append(ref_hidden)
        t2 = sync_time(device)
        if need.old and not need.reference:
            logp, ent = kernels.linear_logprobs(hidden[:, P - 1 : -1], weight, labels, **head,
                                                ignore_index=IGNORE_INDEX, entropy=True, backend=b)  # fmt: skip
            parts["logp"].append(logp), parts["ent"].append(ent)
        if config.critic:
            parts["values"].append(stack.values(ids, am, policy_hidden=hidden, prefix_lengths=caps)[:, P - 1 : -1].float())
        t3 = sync_time(device)
        seconds["old_s"] += (t1 - t0) + (t3 - t2)
        seconds["ref_s"] += t2 - t1
    m = traj.mask

    def joined(name):
        return torch.cat(parts[name]) * m if parts[name] else None

    traj.old_logprobs, traj.entropy, traj.kl_exact = joined("logp"), joined("ent"), joined("kl")
    traj.ref_logprobs, traj.old_values = joined("ref_logp"), joined("values")
    traj.ref_hidden = torch.cat(parts["ref_hidden"]) if keep_ref else None
    return seconds


def fill_from_training(traj: Trajectory, idx: torch.Tensor, logp: torch.Tensor, ent: torch.Tensor,
                       kl: torch.Tensor | None) -> None:  # fmt: skip
    """Rows `idx` of the policy's per-token statistics, from a training forward (detached), where step 4
    skipped the policy's no-grad forward (step_forwards): the old log-probs, entropy and, when the loss
    computed it, the exact KL; the first call makes the (B, R) tensors."""
    for name, value in (("old_logprobs", logp), ("entropy", ent), ("kl_exact", kl)):
        if value is None:
            continue
        if getattr(traj, name) is None:
            setattr(traj, name, torch.zeros_like(traj.mask, dtype=value.dtype))
        getattr(traj, name)[idx] = value.detach() * traj.mask[idx]

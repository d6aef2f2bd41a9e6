"""PPO with a KL penalty, on ONE shared (4-bit) base (Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022; PPO: Schulman et al. 2017).

    python -m engine ppo --preset tiny --reward-fn MODULE:FUNCTION --out runs/ppo

One base model serves every role: the LoRA policy and the value adapter + head train; the reference
is the bare base (adapters off) or a frozen copy of the starting adapter; the reward is the `reward`
adapter + head of an `engine rm` output on the same base, or an outside source (engine.rewards).
Each step of `train_ppo`:

    1. prompts      this step's prompts (a seeded order over the training prompts), this rank's share
    2. generate     k responses per prompt from the policy (engine.generation)
    3. score        the reward source, then shaped (missing-EOS penalty, normalisation, clipping)
    4. forward      old log-probs, entropy, exact KL and reference log-probs straight from hidden
                    states (rlhf_kernels.linear_token_stats / linear_logprobs: no [N, V] logits), values
    5. rewards      the score at the last token - beta * KL_t (or the KL goes into the loss instead)
    6. advantages   rlhf_kernels.gae, then rlhf_kernels.masked_whiten; or, critic-free (advantage=
                    grpo / drgrpo / rloo), each response's reward against its group's (no value adapter)
    7. optimise     PPO epochs x minibatches (x micro-batches): ppo_loss + vf_coef * value_loss
                    - ent_coef * entropy (+ beta * KL with kl_in="loss"), aggregated per loss_agg
    8. KL control   fixed beta, or adapted towards target_kl
    9. log          metrics row, held-out evaluation, stop at the reward threshold, checkpoint

Letters: B sequences of this rank's rollout, P prompt tokens (left-padded), R response positions, H
hidden, V vocabulary. Per-token tensors live on the response grid (B, R): position j is the j-th
response token, whose log-prob and value come from the hidden state right before it (column P - 1 + j).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

import rlhf_kernels as kernels
from rlhf_engine.config import ConfigError, PPOConfig, SamplingConfig
from rlhf_engine.corpus import embedded_prompts
from rlhf_engine.distributed import Dist, init_distributed
from rlhf_engine.generation import sample
from rlhf_engine.jsonl import load_prompts
from rlhf_engine.rewards import ClassifierReward, FunctionReward, StackReward, shape_scores
from rlhf_engine.rl import (
    KLController,
    RunningMoments,
    aggregation_weights,
    explained_variance,
    group_advantages,
    token_rewards,
)
from rlhf_engine.run import Run, atomic_write, dumps, peak_memory_mib, reset_peak_memory, seeded_permutation
from rlhf_engine.text import format_prompt

IGNORE = -100
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"  # the held-out prompts, beside the adapters (`engine eval` reads them)
EVAL_SEED_OFFSET = 1_000_003  # held-out evaluations sample from their own stream (the same at every evaluation)
METRIC_KEYS = (
    "reward_mean", "reward_std", "kl", "kl_k3", "entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl",
    "vf_clipfrac", "explained_variance", "response_length", "eos_fraction", "beta", "grad_norm", "tokens_per_s",
    "time_generate_s", "time_score_s", "time_logprobs_s", "time_train_s", "peak_mem_mib",
)  # fmt: skip


@dataclass
class Trajectory:
    """One rollout of this rank on the response grid; fields filled step by step."""

    input_ids: torch.Tensor  # (B, P + R) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, P + R)
    prompt_length: int  # P
    labels: torch.Tensor  # (B, R) response tokens; IGNORE past each response's end
    mask: torch.Tensor  # (B, R) bool: real response tokens
    stopped: torch.Tensor  # (B,) bool: the response ended at EOS / a stop (not at the length limit)
    prompts: list[str]  # (B,) each row's prompt
    responses: list[str]  # (B,) decoded responses
    raw_scores: torch.Tensor | None = None  # (B,) the sources' scores, weighted and summed
    source_scores: dict | None = None  # name -> (B,) each source's own scores (logged as reward/<name>)
    scores: torch.Tensor | None = None  # (B,) after shaping: what PPO maximises
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


# ---- building the stack and the reward ------------------------------------------------------------


def build_stack(config: PPOConfig):
    """The one stack for every role, and the reward sources [(name, source, weight)]. The policy
    starts from init_adapter when given, and the reference is a frozen copy of it when
    reference_mode == "init"; a value adapter (or head) exists only for GAE."""
    from rlhf_engine.stack import ModelStack, resolve_device

    adapters = ["policy"]
    value_mode = config.stack.value_mode
    if config.critic and value_mode == "adapter":
        adapters.append("value")
    if not config.critic:
        value_mode = "adapter"  # and no value adapter: no value head either
    if config.reward_model:
        adapters.append("reward")
    if config.reference_mode == "init":
        adapters.append("reference")
    stack = ModelStack.build(dataclasses.replace(config.stack, adapters=tuple(adapters), value_mode=value_mode))
    sources = []
    if config.reward_model:  # the bases match (validate)
        stack.load_roles(config.reward_model, roles=("reward",))
        sources.append(StackReward(stack, max_length=config.reward_max_length, batch_size=config.forward_batch_size))
    if config.reward_classifier:
        sources.append(ClassifierReward(config.reward_classifier, resolve_device(config.stack.device),
                                        positive_label=config.reward_positive_label or None,
                                        max_length=config.reward_max_length, batch_size=config.forward_batch_size))
    sources += [FunctionReward(spec) for spec in config.reward_fn]
    weights = config.reward_weights or (1.0,) * len(sources)
    stack.init_policy(config.init_adapter, frozen_reference=config.reference_mode == "init")
    stack.set_trainable(*trained_roles(config))
    return stack, [(s.name, s, w) for s, w in zip(sources, weights)]


def trained_roles(config: PPOConfig) -> tuple[str, ...]:
    return ("policy", "value") if config.critic else ("policy",)


def prompt_split(config: PPOConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the prompt file (or the embedded prompts), whole prompts
    held out by a seeded shuffle, eval_fraction of them (at least one stays for training)."""
    prompts = load_prompts(config.prompts) if config.prompts else embedded_prompts()
    order = seeded_permutation(len(prompts), config.seed, 0, name="eval-split")
    n_eval = min(math.ceil(config.eval_fraction * len(prompts)), len(prompts) - 1) if config.eval_fraction else 0
    held = sorted(order[:n_eval])
    train = [prompts[i] for i in sorted(order[n_eval:])]
    return train, [prompts[i] for i in held][: config.eval_prompts]


def step_prompts(n: int, batch: int, seed: int, step: int) -> list[int]:
    """Indices (into the training prompts) of step `step`'s prompts: the seeded epoch orders laid end
    to end, `batch` items per step across epoch boundaries (every step gets a full batch); a pure
    function of (n, batch, seed, step)."""
    first = step * batch
    out, perms = [], {}
    for g in range(first, first + batch):
        epoch, pos = divmod(g, n)
        if epoch not in perms:
            perms[epoch] = seeded_permutation(n, seed, epoch, name="prompts")
        out.append(perms[epoch][pos])
    return out


# ---- steps 2-6: rollout ---------------------------------------------------------------------------


def rollout(stack, prompts: list[str], keys: list[int], sampling: SamplingConfig, *, samples_per_prompt: int = 1,
            seed: int, adapter: str | None = "policy") -> Trajectory:  # fmt: skip
    """Step 2: samples_per_prompt responses to each prompt from `adapter` (keys name each prompt's
    randomness), on the response grid."""
    s = sample(stack, [format_prompt(p) for p in prompts], sampling, adapter=adapter,
               samples_per_prompt=samples_per_prompt, seed=seed, keys=keys)  # fmt: skip
    P = s.prompt_length
    mask = s.response_mask
    labels = torch.where(mask, s.input_ids[:, P:], torch.full_like(s.input_ids[:, P:], IGNORE))
    return Trajectory(
        input_ids=s.input_ids, attention_mask=s.attention_mask, prompt_length=P, labels=labels, mask=mask,
        stopped=s.stopped, prompts=[prompts[i] for i in s.prompt_index.tolist()], responses=s.responses,
    )  # fmt: skip


def score(traj: Trajectory, sources: list, config: PPOConfig, moments: RunningMoments, dist: Dist) -> None:
    """Step 3: each source's scores, their weighted sum, then shaped over the GLOBAL batch
    (normalisation sees every rank's scores)."""
    device = traj.mask.device
    traj.source_scores = {name: src.score(traj.prompts, traj.responses).to(device) for name, src, _ in sources}
    traj.raw_scores = sum(w * traj.source_scores[name] for name, _, w in sources)
    every = dist.gather_rows(traj.raw_scores)
    stopped = dist.gather_rows(traj.stopped)
    shaped = shape_scores(every, stopped, missing_eos_penalty=config.missing_eos_penalty, clip=config.reward_clip,
                          normalize=config.reward_normalization, moments=moments)  # fmt: skip
    start = _row_offset(len(traj.raw_scores), dist)
    traj.scores = shaped[start : start + len(traj.raw_scores)]


def logprob_temperature(config: PPOConfig) -> float:
    """Log-probs are taken of the distribution that was sampled: logits / T (greedy counts as T = 1)."""
    return config.sampling.temperature or 1.0


@torch.no_grad()
def policy_reference_stats(stack, ids, am, labels, P: int, temperature: float, backend: str, *,
                           adapter: str = "policy") -> dict:  # fmt: skip
    """For sequences (b, P + R) and their response labels (b, R): the policy's (`adapter`'s) log-probs,
    entropy and exact KL to the reference in one fused pass over both hidden states, and the
    reference's log-probs; plus the hidden states (b, P + R, H) and the reference's (b, R, H)."""
    weight = stack.lm_head_weight
    hidden = stack.hidden_states(adapter, ids, am)
    ref_hidden = stack.reference(ids, am)[:, P - 1 : -1]
    logp, ent, kl = kernels.linear_token_stats(hidden[:, P - 1 : -1], ref_hidden, weight, labels,
                                               temperature=temperature, ignore_index=IGNORE, backend=backend)  # fmt: skip
    ref_logp = kernels.linear_logprobs(ref_hidden, weight, labels, temperature=temperature, ignore_index=IGNORE,
                                       backend=backend)  # fmt: skip
    return {"logp": logp, "ent": ent, "kl": kl, "ref_logp": ref_logp, "hidden": hidden, "ref_hidden": ref_hidden}


@torch.no_grad()
def forward_stats(stack, traj: Trajectory, config: PPOConfig) -> None:
    """Step 4: in forward batches, the policy's log-probs, entropy and exact KL to the reference,
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


def penalty_kl(traj: Trajectory, config: PPOConfig) -> torch.Tensor:
    """The per-token KL the penalty uses: the exact one, or a sampled estimate (k1/k2/k3)."""
    if config.kl_estimator == "exact":
        return traj.kl_exact
    return kernels.kl_penalty(traj.old_logprobs, traj.ref_logprobs, kind=config.kl_estimator,
                              backend=config.backend) * traj.mask  # fmt: skip


def assign_rewards(traj: Trajectory, config: PPOConfig, beta: float) -> None:
    """Step 5: per-token rewards: the score at the last token minus beta * KL_t (kl_in="reward"), or
    the score alone (kl_in="loss": the KL is a loss term then)."""
    traj.kl = penalty_kl(traj, config)
    in_reward = beta if config.kl_in == "reward" else 0.0
    traj.rewards = token_rewards(traj.scores, traj.kl, traj.mask, in_reward)


def whiten_advantages(adv: torch.Tensor, mask: torch.Tensor, config: PPOConfig, dist: Dist) -> torch.Tensor:
    """The one place advantages are normalised: rlhf_kernels.masked_whiten over the GLOBAL batch (every
    rank's tokens), returning this rank's rows."""
    every, every_mask = dist.gather_rows(adv), dist.gather_rows(mask, fill=False)
    white = kernels.masked_whiten(every, every_mask, backend=config.backend)
    start = _row_offset(mask.shape[0], dist)
    return white[start : start + adv.shape[0], : adv.shape[1]]


def _row_offset(n_rows: int, dist: Dist) -> int:
    """Where this rank's rows start among every rank's (rank order)."""
    if not dist.active:
        return 0
    counts = [0.0] * dist.world
    counts[dist.rank] = float(n_rows)
    return int(sum(dist.sum_floats(*counts)[: dist.rank]))


def estimate_advantages(traj: Trajectory, config: PPOConfig, dist: Dist) -> None:
    """Step 6. GAE: rlhf_kernels.gae over the response tokens, then whitening. Group modes: each
    response's total reward (its score, minus beta * its summed KL with kl_in="reward") against its
    group's (engine.rl.group_advantages), the same advantage at every token of the response."""
    if config.critic:
        adv, ret = kernels.gae(traj.rewards, traj.old_values, traj.mask, gamma=config.gamma, lam=config.lam,
                               backend=config.backend)  # fmt: skip
        traj.returns = ret
        traj.advantages = whiten_advantages(adv, traj.mask, config, dist) if config.whiten_advantages else adv
        return
    seq_rewards = traj.rewards.sum(dim=1)  # the score plus the (negative) KL rewards of every token
    adv, traj.zero_std = group_advantages(seq_rewards, config.samples_per_prompt, config.advantage)
    traj.advantages = adv[:, None] * traj.mask


# ---- step 7: optimisation -------------------------------------------------------------------------


def micro_loss(stack, mb: dict, P: int, config: PPOConfig, beta: float, weights: torch.Tensor,
               n_total: float) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """One micro-batch's share of the minibatch loss and its token-weighted stats.

    loss = sum_t w_t (pg_t - ent_coef * entropy_t + beta * KL_t) + vf_coef * vf_loss, with w the
    aggregation weights over the minibatch of every rank (engine.rl.aggregation_weights); the value
    loss (GAE only) is a token mean. The clipped PPO term is positively homogeneous in the advantage,
    pg(w A) = w pg(A) for w >= 0 (both branches and the dual clip scale with A), so rlhf_kernels.ppo_loss
    on advantages w_t A_t, times its token count, gives sum_t w_t pg_t exactly."""
    T, weight, b = logprob_temperature(config), stack.lm_head_weight, config.backend
    mask = mb["mask"]
    hidden = stack.policy(mb["input_ids"], mb["attention_mask"])
    h = hidden[:, P - 1 : -1]
    kl = None
    if config.kl_in == "loss" and config.kl_estimator == "exact":
        logp, ent, kl = kernels.linear_token_stats(h, mb["ref_hidden"], weight, mb["labels"], temperature=T,
                                                   ignore_index=IGNORE, backend=b)  # fmt: skip
    else:
        logp, ent = kernels.linear_logprobs(h, weight, mb["labels"], temperature=T, ignore_index=IGNORE,
                                            entropy=True, backend=b)  # fmt: skip
        if config.kl_in == "loss":
            kl = kernels.kl_penalty(logp, mb["ref_logprobs"], kind=config.kl_estimator, backend=b)
    n = mask.sum().float()
    pg_mean, pst = kernels.ppo_loss(logp, mb["old_logprobs"], mb["advantages"] * weights, mask,
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
        values = stack.values(mb["input_ids"], mb["attention_mask"], policy_hidden=hidden)[:, P - 1 : -1].float()
        vf_loss, vst = kernels.value_loss(values, mb["old_values"], mb["returns"], mask, clip=config.value_clip,
                                          backend=b)  # fmt: skip
        loss = loss + config.vf_coef * vf_loss * share
        stats.update(vf_loss=float(vf_loss.detach()) * share, vf_clipfrac=float(vst.vf_clipfrac) * share)
    return loss, stats


def minibatch_weights(traj: Trajectory, idx: torch.Tensor, config: PPOConfig, dist: Dist) -> tuple[torch.Tensor, float]:
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


def optimise(stack, traj: Trajectory, config: PPOConfig, beta: float, run: Run, optimizer, params, dist: Dist,
             step: int) -> dict:  # fmt: skip
    """Step 7: ppo_epochs passes; each a seeded permutation of the GLOBAL batch cut into minibatches
    (one optimizer step each); this rank trains its own rows of each minibatch in micro-batches."""
    B = traj.input_ids.shape[0]
    G = int(dist.sum_floats(float(B))[0])  # sequences of every rank
    start = _row_offset(B, dist)
    totals: dict[str, float] = {}
    grad_norms = []
    for epoch in range(config.ppo_epochs):
        perm = seeded_permutation(G, config.seed, step * config.ppo_epochs + epoch, name="minibatches")
        for mb0 in range(0, G, config.minibatch_size):
            mine = [g - start for g in perm[mb0 : mb0 + config.minibatch_size] if start <= g < start + B]
            idx = torch.tensor(mine, dtype=torch.long, device=traj.mask.device)
            weights, n_total = minibatch_weights(traj, idx, config, dist)
            optimizer.zero_grad(set_to_none=True)
            for part in torch.arange(len(idx), device=idx.device).split(config.micro_batch_size):
                loss, stats = micro_loss(stack, traj.rows(idx[part]), traj.prompt_length, config, beta, weights[part],
                                         n_total)  # fmt: skip
                run.check_finite(loss=loss.detach())
                loss.backward()
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
            dist.reduce_gradients(params)
            grad_norms.append(run.optimizer_step(optimizer, params, config.max_grad_norm))
    n_mb = config.ppo_epochs * math.ceil(G / config.minibatch_size)
    summed = dist.sum_floats(*totals.values()) if totals else []
    out = {k: v / n_mb for k, v in zip(totals, summed)}
    out["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    return out


# ---- step 9: metrics and evaluation ----------------------------------------------------------------


def rollout_metrics(traj: Trajectory, config: PPOConfig, dist: Dist) -> dict:
    """Global means over the step's sequences and tokens (sums and counts reduced over ranks)."""
    m = traj.mask.float()
    k3 = kernels.kl_penalty(traj.old_logprobs, traj.ref_logprobs, kind="k3", backend=config.backend) * m
    raw = traj.raw_scores.double()
    n, tokens, s, s2, kl, kl3, ent, eos = dist.sum_floats(
        float(len(raw)), float(m.sum()), float(raw.sum()), float((raw**2).sum()), float(traj.kl_exact.sum()),
        float(k3.sum()), float(traj.entropy.sum()), float(traj.stopped.float().sum()),
    )  # fmt: skip
    var = max(s2 / n - (s / n) ** 2, 0.0) * n / max(n - 1, 1)
    row = {
        "reward_mean": s / n, "reward_std": math.sqrt(var),
        "kl": kl / n,  # exact KL(policy || reference) summed over a response, mean over responses
        "kl_k3": kl3 / n,  # the same with Schulman's k3 estimate per token
        "entropy": ent / max(tokens, 1), "response_length": tokens / n, "eos_fraction": eos / n,
    }  # fmt: skip
    for name, scores in traj.source_scores.items():
        row[f"reward/{name}"] = dist.sum_floats(float(scores.double().sum()))[0] / n
    if config.critic:
        values, returns = dist.gather_rows(traj.old_values), dist.gather_rows(traj.returns)
        row["explained_variance"] = explained_variance(values, returns, dist.gather_rows(traj.mask, fill=False))
    else:  # share of groups whose responses all scored the same (no learning signal)
        row["frac_reward_zero_std"] = dist.sum_floats(float(traj.zero_std.float().sum()))[0] / n
    return row


def evaluate_rollout(stack, prompts: list[str], sources: list, config: PPOConfig, dist: Dist, *,
                     adapter="policy") -> dict:  # fmt: skip
    """Mean (weighted) score and response length of `adapter`'s responses to the held-out prompts
    (sampled as in training, from a fixed seed: every evaluation sees the same draws); this rank's
    share of the prompts."""
    if not prompts:
        return {}
    share = dist.share(len(prompts))
    mine = prompts[share]
    n, s, length = 0.0, 0.0, 0.0
    if mine:
        traj = rollout(stack, mine, list(range(share.start, share.stop)), config.sampling,
                       seed=config.seed + EVAL_SEED_OFFSET, adapter=adapter)  # fmt: skip
        scores = sum(w * src.score(traj.prompts, traj.responses).double() for _, src, w in sources)
        n, s, length = float(len(scores)), float(scores.sum()), float(traj.mask.sum())
    n, s, length = dist.sum_floats(n, s, length)
    return {"eval_reward_mean": s / n, "eval_response_length": length / n}


class Progress:
    """What the run remembers besides weights: whether it stopped at the reward threshold."""

    def __init__(self):
        self.stopped_at: int | None = None
        self.eval_reward: float | None = None

    def state_dict(self) -> dict:
        return {"stopped_at": self.stopped_at, "eval_reward": self.eval_reward}

    def load_state_dict(self, state: dict) -> None:
        self.stopped_at, self.eval_reward = state["stopped_at"], state["eval_reward"]


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class PPOResult:
    out: str  # output directory
    steps: int  # steps done in total (resumed ones included)
    resumed_from: int  # step the run resumed from (0: fresh)
    stopped_at_threshold: bool  # the held-out reward reached reward_threshold
    eval_reward_mean: float | None  # the last held-out evaluation
    train_prompts: int
    eval_prompts: int
    files: list[str]  # adapters, heads and stack.json written at the end
    memory: dict  # stack.memory_report(): the one base vs each adapter and head (parameters, bytes)


# ---- the trainer -----------------------------------------------------------------------------------


def train_ppo(config: PPOConfig) -> PPOResult:
    """PPO from `config`; see the module docstring for the steps and the command."""
    dist = init_distributed()
    with Run("ppo", config, progress_keys=("reward_mean", "kl"), main=dist.main) as run:
        train_prompts, eval_prompts = prompt_split(config)
        if dist.main:
            atomic_write(run.path(EVAL_PROMPTS_FILE),
                         lambda f: f.write("".join(dumps({"prompt": p}) + "\n" for p in eval_prompts).encode()))
        stack, sources = build_stack(config)
        stack.train(True)
        device = stack.device
        roles = trained_roles(config)
        params = [p for role in roles for p in stack.role_parameters(role)]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        kl_ctl = KLController(config.beta, config.target_kl, config.kl_horizon)
        moments, progress = RunningMoments(), Progress()
        run.data_order(len(train_prompts), config.rollout_batch_size, name="prompts")  # recorded and vetted
        run.track(weights=[(n, p) for role in roles for n, p in stack.named_role_parameters(role)],
                  optimizer=optimizer, kl_ctl=kl_ctl, moments=moments, progress=progress)  # fmt: skip
        start = run.resume()
        if start == 0:
            run.log(0, evaluate_rollout(stack, eval_prompts, sources, config, dist))

        for step in run.steps(config.max_steps):
            if progress.stopped_at is not None:
                break
            t0 = _sync(device)
            reset_peak_memory(device)
            # step 1. this step's prompts (global indices name their randomness), this rank's share
            idx = step_prompts(len(train_prompts), config.rollout_batch_size, config.seed, step)
            share = dist.share(len(idx))
            keys = [step * config.rollout_batch_size + i for i in range(share.start, share.stop)]
            # step 2. generate
            traj = rollout(stack, [train_prompts[i] for i in idx[share]], keys, config.sampling,
                           samples_per_prompt=config.samples_per_prompt, seed=config.seed)  # fmt: skip
            t1 = _sync(device)
            # step 3. score
            score(traj, sources, config, moments, dist)
            t2 = _sync(device)
            # step 4. log-probs, entropy, KL and values, no grad
            forward_stats(stack, traj, config)
            # step 5. per-token rewards
            beta = kl_ctl.beta
            assign_rewards(traj, config, beta)
            # step 6. advantages and returns
            estimate_advantages(traj, config, dist)
            t3 = _sync(device)
            # step 7. PPO epochs over minibatches
            train_stats = optimise(stack, traj, config, beta, run, optimizer, params, dist, step)
            t4 = _sync(device)
            # step 8. KL control, from the mean KL of the step's responses
            row = rollout_metrics(traj, config, dist)
            n_seq = int(dist.sum_floats(float(len(traj.responses)))[0])
            kl_ctl.update(row["kl"] if config.kl_estimator == "exact" else _mean_penalty_kl(traj, dist), n_seq)
            # step 9. metrics, evaluation, stop, checkpoint
            tokens = row["response_length"] * n_seq
            row.update(train_stats)
            row.update(beta=beta, lr=config.lr, tokens_per_s=tokens / max(t4 - t0, 1e-9),
                       time_generate_s=t1 - t0, time_score_s=t2 - t1, time_logprobs_s=t3 - t2,
                       time_train_s=t4 - t3, peak_mem_mib=peak_memory_mib(device))  # fmt: skip
            done = step + 1
            if run.due(done, config.eval_every):
                row.update(evaluate_rollout(stack, eval_prompts, sources, config, dist))
                progress.eval_reward = row.get("eval_reward_mean")
                threshold = config.reward_threshold
                if threshold is not None and progress.eval_reward is not None and progress.eval_reward >= threshold:
                    progress.stopped_at = done
            run.end_step(done, row, log=progress.stopped_at is not None)
            if progress.stopped_at is not None and run.last_checkpoint != done:
                run.checkpoint(done)

        # every role's adapter and head (the reward's and the reference's too, for `engine eval`), the
        # base named in stack.json
        files = stack.save(config.out, roles=stack.roles) if dist.main else []
        result = PPOResult(
            out=config.out, steps=progress.stopped_at or max(config.max_steps, run.start), resumed_from=run.start,
            stopped_at_threshold=progress.stopped_at is not None, eval_reward_mean=progress.eval_reward,
            train_prompts=len(train_prompts), eval_prompts=len(eval_prompts), files=files,
            memory=stack.memory_report(),
        )  # fmt: skip
        run.finish(dataclasses.asdict(result))
    dist.barrier()
    return result


def _mean_penalty_kl(traj: Trajectory, dist: Dist) -> float:
    """Mean over responses of the summed penalty KL (k1/k2/k3), for the adaptive controller."""
    total, n = dist.sum_floats(float(traj.kl.sum()), float(len(traj.responses)))
    return total / max(n, 1)

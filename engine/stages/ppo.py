"""PPO with a KL penalty, on ONE shared (4-bit) base (Ziegler et al. 2019; Stiennon et al. 2020;
Ouyang et al. 2022; PPO: Schulman et al. 2017).

    python -m engine ppo --preset tiny --reward-fn MODULE:FUNCTION --out runs/ppo

One base model serves every role: the LoRA policy and the value adapter + head train; the reference
is the bare base (adapters off) or a frozen copy of the starting adapter; the reward is the `reward`
adapter + head of an `engine rm` output on the same base, or an outside source (algos.rewards).
Each step of `train_ppo`:

    1. prompts      this step's prompts (a seeded order over the training prompts), this rank's share
    2. generate     k responses per prompt from the policy (algos.rollout, model.generation)
    3. score        the reward source, then shaped (missing-EOS penalty, normalisation, clipping)
    4. forward      old log-probs, entropy, exact KL and reference log-probs straight from hidden
                    states (rlhf_kernels.linear_token_stats / linear_logprobs: no [N, V] logits), values;
                    only the forwards the step reads (algos.rollout.step_forwards: no reference at
                    beta = 0, the training forward's own log-probs at one update per rollout), each
                    prompt once for its k responses (model.prefix)
    5. rewards      the score at the last token - beta * KL_t (or the KL goes into the loss instead)
    6. advantages   the estimator named by --advantage (algos.advantages): rlhf_kernels.gae, then
                    rlhf_kernels.masked_whiten; or, critic-free (grpo / drgrpo / rloo), each response's
                    reward against its group's (no value adapter)
    7. optimise     PPO epochs x minibatches (x micro-batches) of algos.losses.ppo_micro_loss: ppo_loss
                    + vf_coef * value_loss - ent_coef * entropy (+ beta * KL with kl_in="loss"), per loss_agg
    8. KL control   fixed beta, or adapted towards target_kl
    9. log          metrics row, held-out evaluation (proxy, gold, ensemble disagreement, KL), the
                    over-optimisation monitor (algos.overoptimization: warn, or stop and keep the best
                    evaluation's weights), stop at the reward threshold, checkpoint

Letters: B sequences of this rank's rollout, P prompt tokens (left-padded), R response positions, H
hidden, V vocabulary. Per-token tensors live on the response grid (B, R): position j is the j-th
response token, whose log-prob and value come from the hidden state right before it (column P - 1 + j).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import rlhf_kernels as kernels

from ..algos.advantages import estimate_advantages, explained_variance
from ..algos.kl import KL_LOG_RATIO_CLAMP, KLController, assign_rewards, mean_penalty_kl, penalty_kl
from ..algos.losses import minibatch_weights, ppo_micro_loss
from ..algos.overoptimization import OverOptimizationMonitor
from ..algos.rewards import (
    ENSEMBLE_REWARDS, ClassifierReward, FunctionReward, RunningMoments, StackReward, conservative_choice, ensemble_std,
)  # fmt: skip
from ..algos.rollout import (
    Trajectory, fill_from_training, forward_stats, logprob_temperature, rollout, row_offset, score, score_sources,
    weighted_scores,
)  # fmt: skip
from ..core.device import peak_memory_mib, reset_peak_memory, resolve_device, sync_time
from ..core.distributed import Dist, init_distributed
from ..core.files import write_jsonl
from ..core.order import seeded_permutation
from ..core.progress import note
from ..core.run import Run, StageResult
from ..datasets.corpus import embedded_prompts
from ..datasets.prompts import EVAL_PROMPTS_FILE, heldout_split, load_prompts
from ..model.config import read_stack_meta
from ..model.logprobs import policy_reference_stats
from .ppo_config import PPOConfig

EVAL_SEED_OFFSET = 1_000_003  # held-out evaluations sample from their own stream (the same at every evaluation)
METRIC_KEYS = (
    "reward_mean", "reward_std", "kl", "kl_k3", "entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl",
    "vf_clipfrac", "explained_variance", "response_length", "eos_fraction", "beta", "grad_norm", "tokens_per_s",
    "step_s", "time_generate_s", "time_score_s", "time_logprobs_s", "time_old_logprobs_s", "time_ref_logprobs_s",
    "time_train_s", "peak_mem_mib",
)  # fmt: skip
# Keys that are None in a row when the step does not compute them (algos.rollout.step_forwards): "kl" (no
# reference, or no exact KL of the policy: kl_in="loss" with a sampled estimator and one update per
# rollout) and "kl_k3" (no reference). Held-out evaluations measure the exact KL always: eval_kl.


# ---- building the stack and the reward ------------------------------------------------------------


def build_stack(config: PPOConfig):
    """The one stack for every role, and the reward sources [(name, source, weight)]. The policy
    starts from init_adapter when given, and the reference is a frozen copy of it when
    reference_mode == "init"; a value adapter (or head) exists only for GAE."""
    from ..model.stack import ModelStack

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
    stack_config = dataclasses.replace(config.stack, adapters=tuple(adapters), value_mode=value_mode)
    if config.reward_model:  # as many reward heads as the RM has (an ensemble: k > 1)
        heads = read_stack_meta(config.reward_model, "reward_model")["stack"].get("reward_heads", 1)
        stack_config = dataclasses.replace(stack_config, reward_heads=heads)
    stack = ModelStack.build(stack_config)
    sources = []
    if config.reward_model:  # the bases match (validate)
        stack.load_roles(config.reward_model, roles=("reward",))
        sources.append(StackReward(stack, max_length=config.reward_max_length, batch_size=config.forward_batch_size,
                                   ensemble=config.reward_ensemble, ensemble_lambda=config.ensemble_lambda))  # fmt: skip
    if config.reward_classifier:
        sources.append(ClassifierReward(config.reward_classifier, resolve_device(config.stack.device),
                                        positive_label=config.reward_positive_label or None,
                                        max_length=config.reward_max_length, batch_size=config.forward_batch_size))
    sources += [FunctionReward(spec) for spec in config.reward_fn]
    weights = config.reward_weights or (1.0,) * len(sources)
    stack.init_policy(config.init_adapter, frozen_reference=config.reference_mode == "init")
    stack.set_trainable(*trained_roles(config))
    return stack, [(s.name, s, w) for s, w in zip(sources, weights)]


def gold_scorer(config: PPOConfig) -> FunctionReward | None:
    """The gold reward (config.gold_reward_fn): scored beside the proxy for the metrics and the
    over-optimisation monitor, never part of the reward PPO trains on."""
    return FunctionReward(config.gold_reward_fn) if config.gold_reward_fn else None


def trained_roles(config: PPOConfig) -> tuple[str, ...]:
    return ("policy", "value") if config.critic else ("policy",)


def prompt_split(config: PPOConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the prompt file (or the embedded prompts), whole prompts
    held out by a seeded shuffle, eval_fraction of them (at least one stays for training)."""
    prompts = load_prompts(config.prompts) if config.prompts else embedded_prompts()
    return heldout_split(prompts, config.eval_fraction, config.seed, config.eval_prompts)


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


# ---- step 7: optimisation -------------------------------------------------------------------------


def optimise(stack, traj: Trajectory, config: PPOConfig, beta: float, run: Run, optimizer, params, dist: Dist,
             step: int) -> dict:  # fmt: skip
    """Step 7: ppo_epochs passes; each a seeded permutation of the GLOBAL batch cut into minibatches
    (one optimizer step each); this rank trains its own rows of each minibatch in micro-batches."""
    B = traj.input_ids.shape[0]
    G = int(dist.sum_floats(float(B))[0])  # sequences of every rank
    start = row_offset(B, dist)
    totals: dict[str, float] = {}
    grad_norms = []
    from_training = traj.old_logprobs is None  # step 4 skipped the policy's forward: read it from this one
    seen: list[tuple[torch.Tensor, dict]] = []
    for epoch in range(config.ppo_epochs):
        perm = seeded_permutation(G, config.seed, step * config.ppo_epochs + epoch, name="minibatches")
        for mb0 in range(0, G, config.minibatch_size):
            mine = [g - start for g in perm[mb0 : mb0 + config.minibatch_size] if start <= g < start + B]
            if config.samples_per_prompt > 1 and config.stack.shared_prefix:
                # a prompt's k rows side by side (rows are prompt * k + sample), so a micro-batch holds
                # whole groups and runs each prompt once (model.prefix); the minibatch's sum is the same
                mine.sort()
            idx = torch.tensor(mine, dtype=torch.long, device=traj.mask.device)
            weights, n_total = minibatch_weights(traj, idx, config, dist)
            optimizer.zero_grad(set_to_none=True)
            for part in torch.arange(len(idx), device=idx.device).split(config.micro_batch_size):
                tokens = {} if from_training else None
                loss, stats = ppo_micro_loss(stack, traj.rows(idx[part]), traj.prompt_length, config, beta,
                                             weights[part], n_total, tokens)  # fmt: skip
                run.check_finite(loss=loss.detach())
                loss.backward()
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                if from_training:
                    seen.append((idx[part], tokens))
            dist.reduce_gradients(params)
            grad_norms.append(run.optimizer_step(optimizer, params, config.max_grad_norm))
    for rows, tokens in seen:  # after the loop: every micro-batch above read old_logprobs as None
        fill_from_training(traj, rows, tokens["logp"], tokens["ent"], tokens["kl"])
    if traj.kl is None:
        traj.kl = penalty_kl(traj, config)
    n_mb = config.ppo_epochs * math.ceil(G / config.minibatch_size)
    summed = dist.sum_floats(*totals.values()) if totals else []
    out = {k: v / n_mb for k, v in zip(totals, summed)}
    out["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    return out


# ---- step 9: metrics and evaluation ----------------------------------------------------------------


def rollout_metrics(traj: Trajectory, config: PPOConfig, dist: Dist) -> dict:
    """Global means over the step's sequences and tokens (sums and counts reduced over ranks)."""
    m = traj.mask.float()
    has_k3 = traj.old_logprobs is not None and traj.ref_logprobs is not None
    k3 = kernels.kl_penalty(traj.old_logprobs, traj.ref_logprobs, kind="k3", clamp=KL_LOG_RATIO_CLAMP,
                            backend=config.backend) * m if has_k3 else None  # fmt: skip
    raw = traj.raw_scores.double()
    n, tokens, s, s2, kl, kl3, ent, eos = dist.sum_floats(
        float(len(raw)), float(m.sum()), float(raw.sum()), float((raw**2).sum()),
        float(traj.kl_exact.sum()) if traj.kl_exact is not None else 0.0, float(k3.sum()) if has_k3 else 0.0,
        float(traj.entropy.sum()), float(traj.stopped.float().sum()),
    )  # fmt: skip
    var = max(s2 / n - (s / n) ** 2, 0.0) * n / max(n - 1, 1)
    row = {
        "reward_mean": s / n, "reward_std": math.sqrt(var),
        # exact KL(policy || reference) summed over a response, mean over responses (None: not computed)
        "kl": kl / n if traj.kl_exact is not None else None,
        "kl_k3": kl3 / n if has_k3 else None,  # the same with Schulman's k3 estimate per token
        "entropy": ent / max(tokens, 1), "response_length": tokens / n, "eos_fraction": eos / n,
    }  # fmt: skip
    # each source's mean; the proxy (the RM heads' plain mean), their disagreement, the gold scorer's:
    # logged, never trained on. One reduction over ranks for all of them.
    per_row = {f"reward/{name}": scores for name, scores in traj.source_scores.items()}
    per_row["reward/proxy"] = traj.proxy_scores
    if traj.ensemble is not None and traj.ensemble.shape[1] > 1:
        per_row["reward/ensemble_std"] = ensemble_std(traj.ensemble)
    if traj.gold_scores is not None:
        per_row["reward/gold"] = traj.gold_scores
    sums = dist.sum_floats(*(float(v.double().sum()) for v in per_row.values()))
    row.update({name: total / n for name, total in zip(per_row, sums)})
    if config.critic:
        values, returns = dist.gather_rows(traj.old_values), dist.gather_rows(traj.returns)
        row["explained_variance"] = explained_variance(values, returns, dist.gather_rows(traj.mask, fill=False))
    else:  # share of groups whose responses all scored the same (no learning signal)
        row["frac_reward_zero_std"] = dist.sum_floats(float(traj.zero_std.float().sum()))[0] / n
    return row


def evaluate_rollout(stack, prompts: list[str], sources: list, config: PPOConfig, dist: Dist, *,
                     adapter="policy", gold: FunctionReward | None = None) -> dict:  # fmt: skip
    """`adapter`'s responses to the held-out prompts (sampled as in training, from a fixed seed: every
    evaluation sees the same draws), this rank's share, means over every rank's responses:
    eval_reward_mean (the weighted score the run trains on), eval_reward/proxy (with the RM heads'
    plain mean), with k > 1 heads eval_reward/ensemble_std and eval_reward/conservative (the RM as
    rewards.conservative_choice), eval_reward/gold (the gold scorer), eval_kl (the exact KL to the
    reference summed over a response: the one measure of it in a run whose steps skip the reference, beta
    = 0: algos.rollout.step_forwards) and eval_response_length. Its forwards run in eval mode (no dropout,
    so no draw from the training's random stream)."""
    if not prompts:
        return {}
    share = dist.share(len(prompts))
    mine = prompts[share]
    ensemble = stack.config.reward_heads > 1 and any(isinstance(src, StackReward) for _, src, _ in sources)
    sums = dict.fromkeys(("n", "reward", "proxy", "std", "conservative", "gold", "kl", "length"), 0.0)
    if mine:
        traj = rollout(stack, mine, list(range(share.start, share.stop)), config.sampling,
                       seed=config.seed + EVAL_SEED_OFFSET, adapter=adapter)  # fmt: skip
        scores, heads = score_sources(sources, traj.prompts, traj.responses)
        sums["n"], sums["length"] = float(len(traj.responses)), float(traj.mask.sum())
        sums["reward"] = float(sum(w * scores[name].double() for name, _, w in sources).sum())
        sums["proxy"] = float(weighted_scores(sources, scores, heads).double().sum())
        if ensemble:
            conservative = ENSEMBLE_REWARDS[conservative_choice(config.reward_ensemble)](heads, config.ensemble_lambda)
            sums["std"] = float(ensemble_std(heads).double().sum())
            sums["conservative"] = float(weighted_scores(sources, {**scores, "rm": conservative}).double().sum())
        if gold is not None:
            sums["gold"] = float(gold.score(traj.prompts, traj.responses).double().sum())
        sums["kl"] = held_out_kl(stack, traj, config, adapter)
    n, reward, proxy, std, conservative, gold_sum, kl, length = dist.sum_floats(*sums.values())
    out = {"eval_reward_mean": reward / n, "eval_reward/proxy": proxy / n}
    if ensemble:
        out.update({"eval_reward/ensemble_std": std / n, "eval_reward/conservative": conservative / n})
    if gold is not None:
        out["eval_reward/gold"] = gold_sum / n
    out.update(eval_kl=kl / n, eval_response_length=length / n)
    return out


@torch.no_grad()
def held_out_kl(stack, traj: Trajectory, config: PPOConfig, adapter: str) -> float:
    """The exact KL(adapter || reference) summed over the responses of `traj` (eval mode: a fixed policy)."""
    total = 0.0
    with stack.evaluating():
        for rows in torch.arange(traj.input_ids.shape[0], device=traj.mask.device).split(config.forward_batch_size):
            st = policy_reference_stats(stack, traj.input_ids[rows], traj.attention_mask[rows], traj.labels[rows],
                                        traj.prompt_length, logprob_temperature(config), config.backend,
                                        adapter=adapter)  # fmt: skip
            total += float((st["kl"] * traj.mask[rows]).sum())
    return total


class BestWeights:
    """A copy of the trained weights at the best held-out evaluation by the watched score
    (algos.overoptimization), tracked so that a restarted run still holds it; `stop` saves these
    instead of the last step's."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]):
        self.named = dict(named)
        self.saved: dict[str, torch.Tensor] = {}

    def keep(self) -> None:
        self.saved = {n: p.detach().cpu().clone() for n, p in self.named.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(self.saved[n])

    def state_dict(self) -> dict:
        return dict(self.saved)

    def load_state_dict(self, state: dict) -> None:
        if state and set(state) != set(self.named):
            raise ValueError(f"best weights: {len(state)} tensors, the run trains {len(self.named)}")
        self.saved = dict(state)


def watch(monitor: OverOptimizationMonitor, best: BestWeights, progress, step: int, ev: dict, config: PPOConfig,
          dist: Dist) -> dict:  # fmt: skip
    """One held-out evaluation into the over-optimisation monitor: the watched score is the gold one, else
    the conservative ensemble reward, else the proxy; keep the best weights; warn or stop on an alarm.
    Returns the alarm state for the metrics row."""
    if config.on_overoptimization == "off" or not ev:
        return {}
    proxy = ev["eval_reward/proxy"]
    watched = ev.get("eval_reward/gold", ev.get("eval_reward/conservative", proxy))
    verdict = monitor.observe(step, proxy=proxy, watched=watched, kl=ev["eval_kl"])
    if verdict.new_best:
        best.keep()
    if verdict.fired:
        stop = config.on_overoptimization == "stop"
        action = (f"stopping; the saved weights are step {monitor.best_step}'s" if stop else f"the best evaluation "
                  f"so far is step {monitor.best_step}'s (--on-overoptimization stop would end the run here)")
        if dist.main:
            note(f"ppo: over-optimisation at step {step}: {monitor.reason}; {action}")
        if stop and progress.stopped_at is None:
            progress.stopped_at, progress.stopped_by = step, "overoptimization"
    return monitor.metrics()


class Progress:
    """What the run remembers besides weights: whether it stopped (at the reward threshold, or on
    over-optimisation) and where."""

    def __init__(self):
        self.stopped_at: int | None = None
        self.stopped_by: str | None = None  # "reward threshold" or "overoptimization"
        self.eval_reward: float | None = None

    def state_dict(self) -> dict:
        return {"stopped_at": self.stopped_at, "stopped_by": self.stopped_by, "eval_reward": self.eval_reward}

    def load_state_dict(self, state: dict) -> None:
        self.stopped_at, self.stopped_by = state["stopped_at"], state["stopped_by"]
        self.eval_reward = state["eval_reward"]


@dataclass
class PPOResult(StageResult):
    stopped_at_threshold: bool  # the held-out reward reached reward_threshold
    stopped_by: str | None  # "reward threshold", "overoptimization" (then the saved weights are the best evaluation's)
    overoptimization: dict | None  # the monitor at the end (OverOptimizationMonitor.summary); None when off
    eval_reward_mean: float | None  # the last held-out evaluation
    train_prompts: int
    eval_prompts: int
    memory: dict  # stack.memory_report(): the one base vs each adapter and head (parameters, bytes)


# ---- the trainer -----------------------------------------------------------------------------------


def train_ppo(config: PPOConfig) -> PPOResult:
    """PPO from `config`; see the module docstring for the steps and the command."""
    dist = init_distributed()
    with Run("ppo", config, progress_keys=("reward_mean", "kl"), main=dist.main) as run:
        train_prompts, eval_prompts = prompt_split(config)
        if dist.main:  # the held-out prompts beside the adapters: `engine eval --policy OUT` answers them
            write_jsonl(run.path(EVAL_PROMPTS_FILE), [{"prompt": p} for p in eval_prompts])
        stack, sources = build_stack(config)
        stack.train(True)
        device = stack.device
        roles = trained_roles(config)
        params = [p for role in roles for p in stack.role_parameters(role)]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        kl_ctl = KLController(config.beta, config.target_kl, config.kl_horizon)
        moments, progress = RunningMoments(), Progress()
        gold = gold_scorer(config)
        monitor = OverOptimizationMonitor(config.overopt_patience, config.overopt_tolerance, config.kl_budget)
        named = [(n, p) for role in roles for n, p in stack.named_role_parameters(role)]
        best = BestWeights(named)
        run.data_order(len(train_prompts), config.rollout_batch_size, name="prompts")  # recorded and vetted
        run.track(weights=named, optimizer=optimizer, kl_ctl=kl_ctl, moments=moments, progress=progress,
                  monitor=monitor, best=best)  # fmt: skip
        start = run.resume()
        if start == 0:
            ev = evaluate_rollout(stack, eval_prompts, sources, config, dist, gold=gold)
            run.log(0, {**ev, **watch(monitor, best, progress, 0, ev, config, dist)})

        for step in run.steps(config.max_steps):
            if progress.stopped_at is not None:
                break
            t0 = sync_time(device)
            reset_peak_memory(device)  # this step's peak; the run's is kept (result.json: core.device.PeakWindow)
            # step 1. this step's prompts (global indices name their randomness), this rank's share
            idx = step_prompts(len(train_prompts), config.rollout_batch_size, config.seed, step)
            share = dist.share(len(idx))
            keys = [step * config.rollout_batch_size + i for i in range(share.start, share.stop)]
            # step 2. generate
            traj = rollout(stack, [train_prompts[i] for i in idx[share]], keys, config.sampling,
                           samples_per_prompt=config.samples_per_prompt, seed=config.seed)  # fmt: skip
            t1 = sync_time(device)
            # step 3. score (and the gold scorer's, for the log only)
            score(traj, sources, config, moments, dist)
            if gold is not None:
                traj.gold_scores = gold.score(traj.prompts, traj.responses)
            t2 = sync_time(device)
            # step 4. log-probs, entropy, KL and values, no grad: only the forwards the step reads
            # (algos.rollout.step_forwards: no reference at beta = 0, no policy forward at one update per rollout)
            parts = forward_stats(stack, traj, config)
            # step 5. per-token rewards
            beta = kl_ctl.beta
            assign_rewards(traj, config, beta)
            # step 6. advantages and returns
            estimate_advantages(traj, config, dist)
            t3 = sync_time(device)
            # step 7. PPO epochs over minibatches
            train_stats = optimise(stack, traj, config, beta, run, optimizer, params, dist, step)
            t4 = sync_time(device)
            # step 8. KL control, from the mean KL of the step's responses
            row = rollout_metrics(traj, config, dist)
            n_seq = int(dist.sum_floats(float(len(traj.responses)))[0])
            if kl_ctl.target is not None:  # an adaptive beta: the reference ran (step_forwards), the KL is known
                kl_ctl.update(row["kl"] if config.kl_estimator == "exact" else mean_penalty_kl(traj, dist), n_seq)
            # step 9. metrics, evaluation, stop, checkpoint
            tokens = row["response_length"] * n_seq
            row.update(train_stats)
            # time_logprobs_s: step 4 (its two parts: the policy's forward + values, and the reference's
            # forward + its vocabulary passes; 0 where skipped) and steps 5-6; step_s: steps 1-7
            row.update(beta=beta, lr=config.lr, tokens_per_s=tokens / max(t4 - t0, 1e-9), step_s=t4 - t0,
                       time_generate_s=t1 - t0, time_score_s=t2 - t1, time_logprobs_s=t3 - t2,
                       time_old_logprobs_s=parts["old_s"], time_ref_logprobs_s=parts["ref_s"],
                       time_train_s=t4 - t3, peak_mem_mib=peak_memory_mib(device))  # fmt: skip
            done = step + 1
            if run.due(done, config.eval_every):
                ev = evaluate_rollout(stack, eval_prompts, sources, config, dist, gold=gold)
                row.update(ev)
                progress.eval_reward = row.get("eval_reward_mean")
                threshold = config.reward_threshold
                if threshold is not None and progress.eval_reward is not None and progress.eval_reward >= threshold:
                    progress.stopped_at, progress.stopped_by = done, "reward threshold"
                row.update(watch(monitor, best, progress, done, ev, config, dist))
            run.end_step(done, row, log=progress.stopped_at is not None)
            if progress.stopped_at is not None and run.last_checkpoint != done:
                run.checkpoint(done)

        if progress.stopped_by == "overoptimization" and best.saved:  # the best evaluation's weights, not the last
            best.restore()
        # every role's adapter and head (the reward's and the reference's too, for `engine eval`), the
        # base named in stack.json
        files = stack.save(config.out, roles=stack.roles) if dist.main else []
        result = PPOResult(
            out=config.out, steps=progress.stopped_at or max(config.max_steps, run.start), resumed_from=run.start,
            stopped_at_threshold=progress.stopped_by == "reward threshold", stopped_by=progress.stopped_by,
            overoptimization=None if config.on_overoptimization == "off" else monitor.summary(),
            eval_reward_mean=progress.eval_reward,
            train_prompts=len(train_prompts), eval_prompts=len(eval_prompts), files=files,
            memory=stack.memory_report(),
        )  # fmt: skip
        run.finish(result)
    dist.barrier()
    return result

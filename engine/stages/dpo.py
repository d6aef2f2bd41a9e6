"""The DPO family on the policy adapter: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) and
conservative DPO (label smoothing; Mitchell 2023), the reward-model-free route from preferences to a
policy.

    python -m engine dpo --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/dpo --preset tiny
    python -m engine dpo --data prefs.jsonl --model tiny-llama --out runs/dpo --preset tiny --init-adapter runs/sft

Data: the feedback JSONL of `engine rm` (pairwise {prompt, chosen, rejected}, and ranked / thumbs
records expanded to pairs by datasets.feedback's consensus: build_pairs), whole prompts held out. A
pair's `margin` field is an RM notion and is not used here.

The policy is the LoRA policy adapter; the reference is the same base with every adapter off, or a
frozen copy of the starting adapter (`--init-adapter`, reference "init": ModelStack.init_policy, as PPO
does). Sequence log-probs are sums over completion tokens of `rlhf_kernels.linear_logprobs` on hidden
states (no [N, V] logits); chosen and rejected sequences go through ONE forward (rows [0, b) and
[b, 2b)) in which their shared prompt runs once (model.prefix; stack.shared_prefix=false: every row
whole). With precompute_ref_logps the reference's sequence log-probs of every pair are computed once
at the start (the reference is frozen), which saves its forward in every step.

Each step of `train_dpo`:

    1. data         feedback -> pairs (consensus of the labelers, agreement report), held-out prompts
    2. model        the policy adapter (from --init-adapter when given), the reference, the optimizer
    3. tokenize     chosen / rejected samples (datasets.samples' layout), a seeded, length-bucketed order;
                    the reference log-probs of every pair when precomputed
    4. loss         micro-batches of pairs: one policy forward over chosen + rejected, the reference's
                    sequence log-probs, algos.losses.dpo_losses
    5. update       clip, the non-finite guard, AdamW, warm-up schedule
    6. log          metrics row, held-out evaluation, checkpoint (each when due)
    7. save         the policy adapter (+ the frozen reference copy) and stack.json, beside
                    eval_prompts.jsonl (the held-out prompts, for `engine eval --policy OUT`)

Letters: B pairs of a step, b pairs of a micro-batch, T time, N completion tokens, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algos.losses import dpo_losses
from ..algos.optim import adamw
from ..core.device import peak_memory_mib, reset_peak_memory, sync_time
from ..core.run import Run, StageResult
from ..datasets.batching import bucketed_batch, chunks, collate_pairs, fixed_batches
from ..datasets.feedback import LABELERS_FILE, build_pairs, check_completions, labeler_reports, load_feedback
from ..datasets.prompts import EVAL_PROMPTS_FILE, split_by_prompt, write_prompts
from ..datasets.samples import encode_pairs
from ..errors import ConfigError
from ..model.logprobs import completion_logprobs, sequence_logps
from ..model.stack import build_policy_stack
from .dpo_config import DPOConfig

STAT_KEYS = ("loss", "accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
             "logps_rejected")  # fmt: skip


# ---- data ---------------------------------------------------------------------------------------


def load_pairs(config: DPOConfig):
    """(pairs, labeler reports) of config.data: pairwise records as they are, ranked and thumbs records
    through datasets.feedback's consensus (build_pairs)."""
    records = load_feedback(config.data)
    check_completions(records, config.data)
    pairs, reports = build_pairs(records, config.agreement_threshold, config.exclude_flagged)
    if not pairs:
        raise ConfigError(f"{config.data}: no preference pairs (every ranked record's consensus is a tie and "
                          "no thumbs record has both an up and a down)")  # fmt: skip
    return pairs, reports


# ---- sequence log-probs -------------------------------------------------------------------------


@torch.no_grad()
def reference_logps(stack, batch, backend: str) -> torch.Tensor:
    """(2b,) sequence log-probs of the batch's completions under the reference (bare base or the
    frozen "reference" adapter: stack.reference)."""
    with stack.evaluating():
        hidden = stack.reference(batch.input_ids, batch.attention_mask, batch.prompt_lengths)
    logp, rows = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, backend, **stack.head())
    return sequence_logps(logp, rows, batch.input_ids.shape[0])


def pair_forward(stack, pairs: list, config: DPOConfig, ref: torch.Tensor | None = None):
    """For b encoded pairs: ONE policy forward over chosen (rows [0, b)) and rejected (rows [b, 2b))
    sequences; the reference's (2b,) sequence log-probs (`ref` when precomputed); dpo_losses.
    Returns (losses (b,), chosen_rewards (b,), rejected_rewards (b,), policy logps (2b,), real tokens)."""
    b = len(pairs)
    batch = collate_pairs(pairs, stack.tokenizer.pad_token_id).to(stack.device)
    hidden = stack.policy(batch.input_ids, batch.attention_mask, batch.prompt_lengths)  # (2b, T, H), prompts once
    logp, rows = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, config.backend,
                                     **stack.head())  # (N,)  # fmt: skip
    policy = sequence_logps(logp, rows, 2 * b)  # (2b,)
    if ref is None:
        ref = reference_logps(stack, batch, config.backend)
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        policy[:b], policy[b:], ref[:b], ref[b:], beta=config.beta, loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
    )  # fmt: skip
    return losses, chosen_rewards, rejected_rewards, policy, int(batch.attention_mask.sum())


@torch.no_grad()
def precompute_reference(stack, data: list, config: DPOConfig) -> torch.Tensor:
    """(n, 2) reference sequence log-probs [chosen, rejected] of every pair, in fixed batches (the same
    numbers on every run, resumed ones included)."""
    out = torch.zeros(len(data), 2, device=stack.device)
    for idx in fixed_batches([max(len(c[0]), len(r[0])) for c, r in data], config.micro_batch_size):
        batch = collate_pairs([data[i] for i in idx], stack.tokenizer.pad_token_id)
        ref = reference_logps(stack, batch.to(stack.device), config.backend)
        out[idx] = torch.stack([ref[: len(idx)], ref[len(idx) :]], dim=1)
    return out


class PairStats:
    """Sums of the per-pair statistics of a step or an evaluation; means() -> the metrics."""

    def __init__(self):
        self.n, self.sums = 0, dict.fromkeys(STAT_KEYS, 0.0)

    def add(self, losses, chosen_rewards, rejected_rewards, policy) -> None:
        b = losses.shape[0]
        self.n += b
        for key, value in (("loss", losses.detach()), ("accuracy", (chosen_rewards > rejected_rewards).float()),
                           ("reward_margin", chosen_rewards - rejected_rewards), ("rewards_chosen", chosen_rewards),
                           ("rewards_rejected", rejected_rewards), ("logps_chosen", policy[:b].detach()),
                           ("logps_rejected", policy[b:].detach())):  # fmt: skip
            self.sums[key] += float(value.double().sum())

    def means(self, prefix: str = "") -> dict:
        return {prefix + k: v / max(self.n, 1) for k, v in self.sums.items()}


@torch.no_grad()
def evaluate_dpo(stack, data: list, config: DPOConfig, ref: torch.Tensor | None) -> dict:
    """Held-out means: loss, accuracy (share of pairs whose chosen implicit reward is higher; a tie is
    not a win), reward margin, rewards and policy log-probs of chosen and rejected."""
    if not data:
        return {"eval_pairs": 0}
    stats = PairStats()
    with stack.evaluating():
        for idx in fixed_batches([max(len(c[0]), len(r[0])) for c, r in data], config.micro_batch_size):
            losses, rc, rr, policy, _ = pair_forward(stack, [data[i] for i in idx], config,
                                                     None if ref is None else ref[idx].T.reshape(-1))  # fmt: skip
            stats.add(losses, rc, rr, policy)
    return {**stats.means("eval_"), "eval_pairs": stats.n}


# ---- the trainer ---------------------------------------------------------------------------------


@dataclass
class DPOResult(StageResult):
    train_pairs: int
    eval_pairs: int
    reference: str  # "base" (adapters off) or "init" (a frozen copy of the starting adapter)
    eval_accuracy: float | None  # held-out accuracy at the end
    eval_reward_margin: float | None  # held-out mean beta * margin at the end
    flagged_labelers: list[str]


def train_dpo(config: DPOConfig) -> DPOResult:
    """DPO / IPO / cDPO from `config`; see the module docstring for the steps and the command.

    Files, lock, checkpoint/resume, metrics and progress are the run machinery's (core.run);
    the frozen reference is not tracked (it is rebuilt from the base and --init-adapter)."""
    with Run("dpo", config, progress_keys=("loss", "accuracy")) as run:
        # step 1. feedback -> pairs, the labelers' agreement, held-out prompts
        pairs, reports = load_pairs(config)
        labelers, flagged = labeler_reports(reports)
        run.write_json(LABELERS_FILE, labelers)
        train_pairs, eval_pairs = split_by_prompt(pairs, config.eval_fraction, config.seed)
        if run.main:  # the held-out prompts beside the adapter: `engine eval --policy OUT` answers them
            write_prompts(run.path(EVAL_PROMPTS_FILE), [p.prompt for p in eval_pairs])

        # step 2. the policy adapter, the reference (bare base or frozen starting adapter), the optimizer
        mode = config.reference_mode
        stack = build_policy_stack(config.stack, config.init_adapter, mode)
        stack.train(True)
        named = stack.named_role_parameters("policy")
        params, optimizer, scheduler = adamw(named, lr=config.lr, weight_decay=config.weight_decay,
                                             warmup_steps=config.warmup_steps)  # fmt: skip
        run.track(weights=named, optimizer=optimizer, scheduler=scheduler)

        # step 3. tokenize; a seeded, length-bucketed order; the reference log-probs once, if asked
        tok = stack.tokenizer
        train_data = encode_pairs(tok, train_pairs, config.max_length, config.data)
        eval_data = encode_pairs(tok, eval_pairs, config.max_length, config.data)
        lengths = [max(len(c[0]), len(r[0])) for c, r in train_data]
        order = run.data_order(len(train_data), config.batch_size)
        total_steps = config.max_steps if config.max_steps is not None else config.epochs * order.steps_per_epoch
        start = run.resume()
        ref_train = ref_eval = None
        if config.precompute_ref_logps:
            ref_train = precompute_reference(stack, train_data, config)  # (n, 2) [chosen, rejected]
            ref_eval = precompute_reference(stack, eval_data, config)
        last_eval: dict = {}
        if start == 0:  # the starting policy (margins are 0 where it equals the reference: accuracy 0)
            run.log(0, evaluate_dpo(stack, eval_data, config, ref_eval))

        device = stack.device
        for step in run.steps(total_steps):
            t0 = sync_time(device)
            reset_peak_memory(device)
            idx = bucketed_batch(order, lengths, step, config.bucket_window)
            lr = optimizer.param_groups[0]["lr"]

            # step 4. the loss: mean over the step's B pairs, micro-batch by micro-batch
            optimizer.zero_grad(set_to_none=True)
            stats, real = PairStats(), 0
            for micro in chunks(idx, config.micro_batch_size):
                ref = None if ref_train is None else ref_train[micro].T.reshape(-1)  # (2b,) chosen then rejected
                losses, rc, rr, policy, n = pair_forward(stack, [train_data[i] for i in micro], config, ref)
                loss = losses.sum() / len(idx)
                run.check_finite(loss=loss.detach())
                loss.backward()
                stats.add(losses, rc, rr, policy)
                real += n

            # step 5. clip, the non-finite guard, AdamW and the schedule
            grad_norm = run.optimizer_step(optimizer, params, config.max_grad_norm, scheduler)
            t1 = sync_time(device)

            # step 6. metrics row, held-out evaluation, checkpoint (each when due)
            done = step + 1
            row = {"epoch": done / order.steps_per_epoch, **stats.means(), "grad_norm": grad_norm, "lr": lr,
                   "tokens_per_s": real / max(t1 - t0, 1e-9), "step_s": t1 - t0,
                   "peak_mem_mib": peak_memory_mib(device)}  # fmt: skip
            evaluated = run.due(done, config.eval_every)
            if evaluated:
                last_eval = evaluate_dpo(stack, eval_data, config, ref_eval)
                run.check_finite(eval_loss=last_eval.get("eval_loss"))
                row.update(last_eval)
            run.end_step(done, row, log=evaluated)

        # step 7. the policy adapter and, in "init" mode, the frozen reference (engine eval compares them)
        if not last_eval:
            last_eval = evaluate_dpo(stack, eval_data, config, ref_eval)
        roles = ("policy", "reference") if mode == "init" else ("policy",)
        files = stack.save(config.out, roles=roles)
        result = DPOResult(
            out=config.out, steps=max(total_steps, start), resumed_from=start, train_pairs=len(train_pairs),
            eval_pairs=len(eval_pairs), reference=mode, eval_accuracy=last_eval.get("eval_accuracy"),
            eval_reward_margin=last_eval.get("eval_reward_margin"), flagged_labelers=flagged, files=files,
        )  # fmt: skip
        run.finish(result)
    return result

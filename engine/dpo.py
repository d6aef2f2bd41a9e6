"""The DPO family on the policy adapter: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) and
conservative DPO (label smoothing; Mitchell 2023), the reward-model-free route from preferences to a
policy.

    python -m engine dpo --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/dpo --preset tiny
    python -m engine dpo --data prefs.jsonl --model tiny-llama --out runs/dpo --preset tiny --init-adapter runs/sft

Data: the feedback JSONL of `engine rm` (pairwise {prompt, chosen, rejected}, and ranked / thumbs
records expanded to pairs by engine.feedback's consensus: build_pairs), whole prompts held out. A
pair's `margin` field is an RM notion and is not used here.

The policy is the LoRA policy adapter; the reference is the same base with every adapter off, or a
frozen copy of the starting adapter (`--init-adapter`, reference "init": ModelStack.init_policy, as PPO
does). Sequence log-probs are sums over completion tokens of `rlhf_kernels.linear_logprobs` on hidden
states (no [N, V] logits); chosen and rejected sequences go through ONE forward (rows [0, b) and
[b, 2b)). With precompute_ref_logps the reference's sequence log-probs of every pair are computed once
at the start (the reference is frozen), which saves its forward in every step.

Each step of `train_dpo`:

    1. data         feedback -> pairs (consensus of the labelers, agreement report), held-out prompts
    2. model        the policy adapter (from --init-adapter when given), the reference, the optimizer
    3. tokenize     chosen / rejected samples (engine.sft's layout), a seeded, length-bucketed order;
                    the reference log-probs of every pair when precomputed
    4. loss         micro-batches of pairs: one policy forward over chosen + rejected, the reference's
                    sequence log-probs, dpo_losses
    5. update       clip, the non-finite guard, AdamW, warm-up schedule
    6. log          metrics row, held-out evaluation, checkpoint (each when due)
    7. save         the policy adapter (+ the frozen reference copy) and stack.json, beside
                    eval_prompts.jsonl (the held-out prompts, for `engine eval --policy OUT`)

Letters: B pairs of a step, b pairs of a micro-batch, T time, N completion tokens, H hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_engine.config import ConfigError, DPOConfig
from rlhf_engine.feedback import FeedbackError, PreferencePair, RankedFeedback, build_pairs, load_feedback
from rlhf_engine.reward import LABELERS_FILE, split_by_prompt
from rlhf_engine.run import Run, peak_memory_mib, reset_peak_memory
from rlhf_engine.sft import (
    SFTExample,
    bucketed_batch,
    build_policy_stack,
    chunks,
    collate,
    completion_logprobs,
    encode_example,
    fixed_batches,
    sync_time,
    warmup_schedule,
    write_eval_prompts,
)

STAT_KEYS = ("loss", "accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
             "logps_rejected")  # fmt: skip


# ---- the loss --------------------------------------------------------------------------------------


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
        raise ValueError(f"loss_type={loss_type!r}: expected dpo, ipo or cdpo")
    return losses, beta * chosen.detach(), beta * rejected.detach()


# ---- data ---------------------------------------------------------------------------------------


def check_completions(records, path: str) -> None:
    """Every completion has visible text: an empty or whitespace-only one is a FeedbackError naming
    `path:line` (a pairwise record's empty strings are already refused by engine.feedback)."""
    for rec in records:
        if isinstance(rec, PreferencePair):
            texts = {"'chosen'": rec.chosen, "'rejected'": rec.rejected}
        elif isinstance(rec, RankedFeedback):
            texts = {f"completion {i}": c for i, c in enumerate(rec.completions)}
        else:  # pragma: no cover (load_feedback returns the two kinds only)
            continue
        for name, text in texts.items():
            if not text.strip():
                raise FeedbackError(f"{path}:{rec.line}: {name} is empty; DPO needs a completion to score")


def load_pairs(config: DPOConfig):
    """(pairs, labeler reports) of config.data: pairwise records as they are, ranked and thumbs records
    through engine.feedback's consensus (build_pairs)."""
    records = load_feedback(config.data)
    check_completions(records, config.data)
    pairs, reports = build_pairs(records, config.agreement_threshold, config.exclude_flagged)
    if not pairs:
        raise ConfigError(f"{config.data}: no preference pairs (every ranked record's completions tie)")
    return pairs, reports


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int, source: str):
    """[((chosen ids, P), (rejected ids, P))]: each side laid out as an SFT sample (engine.sft)."""
    return [
        (encode_example(tokenizer, SFTExample(p.prompt, p.chosen, line=p.line), max_length, source),
         encode_example(tokenizer, SFTExample(p.prompt, p.rejected, line=p.line), max_length, source))
        for p in pairs
    ]  # fmt: skip


# ---- sequence log-probs -------------------------------------------------------------------------


def sequence_logps(logp: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) sums of the (N,) token log-probs per row."""
    return logp.new_zeros(n_rows).index_add(0, rows, logp)


@contextlib.contextmanager
def _eval_mode(stack):
    """No LoRA dropout inside (the reference is a fixed function); the previous mode afterwards."""
    was_training = stack.model.training
    stack.train(False)
    try:
        yield
    finally:
        stack.train(was_training)


@torch.no_grad()
def reference_logps(stack, batch, backend: str) -> torch.Tensor:
    """(2b,) sequence log-probs of the batch's completions under the reference (bare base or the
    frozen "reference" adapter: stack.reference)."""
    with _eval_mode(stack):
        hidden = stack.reference(batch.input_ids, batch.attention_mask)
    logp, rows = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, backend)
    return sequence_logps(logp, rows, batch.input_ids.shape[0])


def pair_forward(stack, pairs: list, config: DPOConfig, ref: torch.Tensor | None = None):
    """For b encoded pairs: ONE policy forward over chosen (rows [0, b)) and rejected (rows [b, 2b))
    sequences; the reference's (2b,) sequence log-probs (`ref` when precomputed); dpo_losses.
    Returns (losses (b,), chosen_rewards (b,), rejected_rewards (b,), policy logps (2b,), real tokens)."""
    b = len(pairs)
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], stack.tokenizer.pad_token_id).to(stack.device)
    hidden = stack.policy(batch.input_ids, batch.attention_mask)  # (2b, T, H)
    logp, rows = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, config.backend)  # (N,)
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
        batch = collate([data[i][0] for i in idx] + [data[i][1] for i in idx], stack.tokenizer.pad_token_id)
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
    with _eval_mode(stack):
        for idx in fixed_batches([max(len(c[0]), len(r[0])) for c, r in data], config.micro_batch_size):
            losses, rc, rr, policy, _ = pair_forward(stack, [data[i] for i in idx], config,
                                                     None if ref is None else ref[idx].T.reshape(-1))  # fmt: skip
            stats.add(losses, rc, rr, policy)
    return {**stats.means("eval_"), "eval_pairs": stats.n}


# ---- the trainer ---------------------------------------------------------------------------------


@dataclass
class DPOResult:
    out: str  # output directory
    steps: int  # optimizer steps done in total (resumed ones included)
    resumed_from: int  # step the run resumed from (0: fresh)
    train_pairs: int
    eval_pairs: int
    reference: str  # "base" (adapters off) or "init" (a frozen copy of the starting adapter)
    eval_accuracy: float | None  # held-out accuracy at the end
    eval_reward_margin: float | None  # held-out mean beta * margin at the end
    flagged_labelers: list[str]
    files: list[str]  # what the final save wrote


def train_dpo(config: DPOConfig) -> DPOResult:
    """DPO / IPO / cDPO from `config`; see the module docstring for the steps and the command.

    Files, lock, checkpoint/resume, metrics and progress are the run machinery's (rlhf_engine.run);
    the frozen reference is not tracked (it is rebuilt from the base and --init-adapter)."""
    with Run("dpo", config, progress_keys=("loss", "accuracy")) as run:
        # step 1. feedback -> pairs, the labelers' agreement, held-out prompts
        pairs, reports = load_pairs(config)
        run.write_json(LABELERS_FILE, {name: rep.to_dict() for name, rep in reports.items()})
        flagged = sorted(name for name, rep in reports.items() if rep.flagged)
        train_pairs, eval_pairs = split_by_prompt(pairs, config.eval_fraction, config.seed)
        write_eval_prompts(run, [p.prompt for p in eval_pairs])

        # step 2. the policy adapter, the reference (bare base or frozen starting adapter), the optimizer
        mode = config.reference_mode
        stack = build_policy_stack(config.stack, config.init_adapter, mode)
        stack.train(True)
        named = stack.named_role_parameters("policy")
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = warmup_schedule(optimizer, config.warmup_steps)
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

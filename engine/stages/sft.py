"""Supervised fine-tuning (SFT) of the policy adapter on prompt -> completion data: the instruction-tuned
model RLHF starts from (InstructGPT, Ouyang et al. 2022, sec. 3.5).

    python -m engine sft --preset tiny --out runs/sft                        # the embedded corpus
    python -m engine sft --data sft.jsonl --model tiny-llama --out runs/sft --preset tiny
    python -m engine ppo --preset tiny --init-adapter runs/sft --reward-fn MODULE:FUNCTION --out runs/ppo

Data: JSONL `{"prompt", "completion"}`, or `{"messages": [{"role", "content"}, ...]}` rendered by the
tokenizer's chat template (the last message is the assistant's reply that trains; the earlier ones are
its prompt). Without --data, the embedded corpus of datasets.corpus (40 prompts, each with its own reply).

Layout: a sample is `text.encode(format_sample(prompt, completion))`, the text the reward model scores;
its first P tokens are the prompt as the policy receives it when it answers (generation.encode_prompt of
`format_prompt(prompt)`), so SFT teaches exactly the continuation PPO samples. Longer samples keep their
last max_length tokens (text.encode), the prompt losing its start first.

Loss: the token mean of -log pi(token) over completion tokens only (prompt and padding are ignored),
from the policy's hidden states at the positions before those tokens, through
`rlhf_kernels.linear_logprobs` (no [N, V] logits).

Batches are length-bucketed, not packed: the epoch's seeded permutation is cut into windows of
`bucket_window` batches, each window sorted by length and cut into batches visited in a seeded order.
Padding then costs little (the embedded corpus: README, "Engine: SFT and DPO"), the stack's attention
needs nothing special (packing needs block-diagonal masks and per-sequence positions), and a batch stays
a pure function of (seed, step), so a resumed run sees the uninterrupted run's batches.

Each step of `train_sft`:

    1. data         examples, whole prompts held out
    2. model        the policy adapter on the (4-bit) base, from --init-adapter when given
    3. tokenize     samples and their prompt lengths; a seeded, length-bucketed order
    4. loss         micro-batches: policy hidden states -> completion-token log-probs -> token mean
    5. update       clip, the non-finite guard, AdamW, warm-up schedule
    6. log          metrics row, held-out loss, checkpoint (each when due)
    7. save         the policy adapter + stack.json (`--init-adapter` of ppo and dpo reads it), beside
                    eval_prompts.jsonl (the held-out prompts, for `engine eval --policy OUT`)

Letters: B sequences, T time, N completion tokens of a batch, H hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algos.losses import sft_loss
from ..algos.optim import adamw
from ..core.device import peak_memory_mib, reset_peak_memory, sync_time
from ..core.run import Run, StageResult
from ..datasets.batching import bucketed_batch, chunks, collate, fixed_batches
from ..datasets.prompts import EVAL_PROMPTS_FILE, split_by_prompt, write_prompts
from ..datasets.samples import completion_tokens, encode_example, load_sft_data
from ..model.logprobs import completion_logprobs
from ..model.stack import build_policy_stack
from .sft_config import SFTConfig


# ---- evaluation --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_sft(stack, data: list[tuple[list[int], int]], batch_size: int, backend: str) -> dict:
    """Held-out token-mean NLL of the completion tokens (the training loss on unseen prompts)."""
    if not data:
        return {"eval_loss": None, "eval_tokens": 0}
    stack.train(False)
    total, n = 0.0, 0
    for idx in fixed_batches([len(ids) for ids, _ in data], batch_size):
        batch = collate([data[i] for i in idx], stack.tokenizer.pad_token_id).to(stack.device)
        hidden = stack.policy(batch.input_ids, batch.attention_mask)
        logp, _ = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, backend, **stack.head())
        total -= float(logp.double().sum())
        n += logp.numel()
    stack.train(True)
    return {"eval_loss": total / max(n, 1), "eval_tokens": n}


# ---- the trainer ---------------------------------------------------------------------------------------


@dataclass
class SFTResult(StageResult):
    train_examples: int
    eval_examples: int
    eval_loss_start: float | None  # held-out loss of the starting policy (the step-0 row; None: no held-out data)
    eval_loss: float | None  # held-out loss at the end


def train_sft(config: SFTConfig) -> SFTResult:
    """SFT from `config`; see the module docstring for the steps and the command.

    Files, lock, checkpoint/resume, metrics and progress are the run machinery's (core.run)."""
    with Run("sft", config, progress_keys=("loss", "eval_loss")) as run:
        # step 1. examples; whole prompts held out (split_by_prompt, as the reward model's)
        examples = load_sft_data(config.data)
        train_ex, eval_ex = split_by_prompt(examples, config.eval_fraction, config.seed)
        if run.main:  # the held-out prompts beside the adapter: `engine eval --policy OUT` answers them
            write_prompts(run.path(EVAL_PROMPTS_FILE), [e.prompt for e in eval_ex if e.messages is None])

        # step 2. the policy adapter on the base; its weights, optimizer and schedule are checkpointed
        stack = build_policy_stack(config.stack, config.init_adapter)
        stack.train(True)
        named = stack.named_role_parameters("policy")
        params, optimizer, scheduler = adamw(named, lr=config.lr, weight_decay=config.weight_decay,
                                             warmup_steps=config.warmup_steps)  # fmt: skip
        run.track(weights=named, optimizer=optimizer, scheduler=scheduler)

        # step 3. tokenize; batches follow a seeded, length-bucketed order
        tok, source = stack.tokenizer, config.data or "embedded corpus"
        train_data = [encode_example(tok, e, config.max_length, source) for e in train_ex]
        eval_data = [encode_example(tok, e, config.max_length, source) for e in eval_ex]
        lengths = [len(ids) for ids, _ in train_data]
        order = run.data_order(len(train_data), config.batch_size)
        total_steps = config.max_steps if config.max_steps is not None else config.epochs * order.steps_per_epoch
        start = run.resume()
        last_eval = {}
        if start == 0:  # the starting policy's held-out loss, so a curve starts where training did
            first_eval = evaluate_sft(stack, eval_data, config.micro_batch_size, config.backend)
            run.log(0, first_eval)
        else:  # a resumed run reports the step-0 row the interrupted run logged, as an uninterrupted run would
            first_eval = next((r for r in run.logged_rows() if r["step"] == 0), None)

        pad_id, device = tok.pad_token_id, stack.device
        for step in run.steps(total_steps):
            t0 = sync_time(device)
            reset_peak_memory(device)
            idx = bucketed_batch(order, lengths, step, config.bucket_window)
            n_tokens = sum(completion_tokens(*train_data[i]) for i in idx)
            lr = optimizer.param_groups[0]["lr"]

            # step 4. the loss, micro-batch by micro-batch (each padded to its own longest row)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, real, padded = 0.0, 0, 0
            for micro in chunks(idx, config.micro_batch_size):
                batch = collate([train_data[i] for i in micro], pad_id).to(device)
                hidden = stack.policy(batch.input_ids, batch.attention_mask)  # (b, T, H)
                logp, _ = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, config.backend,
                                              **stack.head())  # (n,)  # fmt: skip
                loss = sft_loss(logp, n_tokens)
                run.check_finite(loss=loss.detach())
                loss.backward()
                loss_sum += float(loss.detach())
                real += int(batch.attention_mask.sum())
                padded += batch.attention_mask.numel()

            # step 5. clip, the non-finite guard, AdamW and the schedule
            grad_norm = run.optimizer_step(optimizer, params, config.max_grad_norm, scheduler)
            t1 = sync_time(device)

            # step 6. metrics row, held-out loss, checkpoint (each when due)
            done = step + 1
            row = {"epoch": done / order.steps_per_epoch, "loss": loss_sum, "grad_norm": grad_norm, "lr": lr,
                   "tokens": n_tokens, "tokens_per_s": real / max(t1 - t0, 1e-9), "padding": 1 - real / padded,
                   "step_s": t1 - t0, "peak_mem_mib": peak_memory_mib(device)}  # fmt: skip
            evaluated = run.due(done, config.eval_every)
            if evaluated:
                last_eval = evaluate_sft(stack, eval_data, config.micro_batch_size, config.backend)
                run.check_finite(eval_loss=last_eval["eval_loss"])
                row.update(last_eval)
            run.end_step(done, row, log=evaluated)

        # step 7. the policy adapter (a few MB) with the base named in stack.json
        if not last_eval:
            last_eval = evaluate_sft(stack, eval_data, config.micro_batch_size, config.backend)
        files = stack.save(config.out, roles=("policy",))
        result = SFTResult(
            out=config.out, steps=max(total_steps, start), resumed_from=start, train_examples=len(train_ex),
            eval_examples=len(eval_ex), eval_loss_start=first_eval.get("eval_loss") if first_eval else None,
            eval_loss=last_eval["eval_loss"], files=files,
        )  # fmt: skip
        run.finish(result)
    return result


"""Supervised fine-tuning (SFT) of the policy adapter on prompt -> completion data: the instruction-tuned
model RLHF starts from (InstructGPT, Ouyang et al. 2022, sec. 3.5).

    python -m engine sft --preset tiny --out runs/sft                        # the embedded corpus
    python -m engine sft --data sft.jsonl --model tiny-llama --out runs/sft --preset tiny
    python -m engine ppo --preset tiny --init-adapter runs/sft --reward-fn MODULE:FUNCTION --out runs/ppo

Data: JSONL `{"prompt", "completion"}`, or `{"messages": [{"role", "content"}, ...]}` rendered by the
tokenizer's chat template (the last message is the assistant's reply that trains; the earlier ones are
its prompt). Without --data, the embedded corpus of engine.corpus (40 prompts, each with its own reply).

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

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import torch

import rlhf_kernels as kernels
from rlhf_engine.config import SFTConfig, StackConfig
from rlhf_engine.corpus import embedded_sft_examples
from rlhf_engine.generation import encode_prompt
from rlhf_engine.jsonl import DataError, check_fields, read_jsonl, require_str
from rlhf_engine.ppo import EVAL_PROMPTS_FILE
from rlhf_engine.reward import split_by_prompt
from rlhf_engine.run import (
    DataOrder,
    Run,
    atomic_write,
    dumps,
    peak_memory_mib,
    reset_peak_memory,
    seeded_permutation,
)
from rlhf_engine.text import encode, format_prompt, format_sample

IGNORE = -100
SFT_FIELDS = ("prompt", "completion")
CHAT_ROLES = ("system", "user", "assistant")


# ---- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    """One training example: `completion` is the reply to `prompt`."""

    prompt: str  # the prompt text; for a chat record, its earlier messages as JSON (held-out splits use it)
    completion: str
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) of a chat record, the reply last
    line: int = 0  # line in the data file (0: built in code)


def parse_example(obj, line: int = 0) -> SFTExample:
    """One JSON object -> SFTExample; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        check_fields(obj, "chat", ("messages",), SFT_FIELDS + ("messages",))
        messages = obj["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError("'messages' must be a list of at least 2 messages (a prompt, then the reply)")
        turns = []
        for i, m in enumerate(messages):
            try:
                turns.append(_parse_message(m))
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from e
        if turns[-1][0] != "assistant":
            raise ValueError(f"the last message is the reply that trains: its role must be 'assistant', not "
                             f"{turns[-1][0]!r}")  # fmt: skip
        key = json.dumps([list(t) for t in turns[:-1]], ensure_ascii=False)
        return SFTExample(key, turns[-1][1], tuple(turns), line)
    check_fields(obj, "sft", SFT_FIELDS, SFT_FIELDS + ("messages",))
    prompt, completion = require_str(obj, "prompt"), require_str(obj, "completion")
    if not completion.strip():
        raise ValueError("'completion' is only whitespace")
    return SFTExample(prompt, completion, None, line)


def _parse_message(m) -> tuple[str, str]:
    if not isinstance(m, dict):
        raise ValueError(f"expected an object with 'role' and 'content', got {type(m).__name__}")
    check_fields(m, "message", ("role", "content"))
    role, content = require_str(m, "role"), require_str(m, "content")
    if role not in CHAT_ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(CHAT_ROLES)}")
    if not content.strip():
        raise ValueError("'content' is only whitespace")
    return role, content


def load_sft_data(path: str) -> list[SFTExample]:
    """The SFT JSONL file, or the embedded corpus when `path` is ""; a bad line is a DataError naming
    `path:line`."""
    if not path:
        return [SFTExample(p, c) for p, c in embedded_sft_examples()]
    return read_jsonl(path, parse_example)


# ---- tokens -------------------------------------------------------------------------------------


def _with_prompt_length(ids: list[int], prompt_ids: list[int], max_length: int) -> tuple[list[int], int]:
    """(the last max_length ids, P): P = how many leading ids agree with the prompt's, less what the
    truncation dropped (a token that straddles the boundary carries completion text: it trains)."""
    P = 0
    while P < min(len(ids), len(prompt_ids)) and ids[P] == prompt_ids[P]:
        P += 1
    drop = max(0, len(ids) - max_length)
    return ids[drop:], max(P - drop, 0)


def encode_example(tokenizer, example: SFTExample, max_length: int, source: str = "data") -> tuple[list[int], int]:
    """(token ids, P): the sample's ids (ending with EOS) and how many of them are the prompt.

    prompt/completion: text.encode(format_sample(prompt, completion)), the prompt being
    generation.encode_prompt(format_prompt(prompt)) (what the policy continues in PPO). Chat: the
    tokenizer's chat template over every message, the prompt being its render of the earlier ones with
    the generation prompt; a tokenizer without a template is a DataError naming the record."""
    if example.messages is None:
        ids = encode(tokenizer, format_sample(example.prompt, example.completion), sys.maxsize)
        return _with_prompt_length(ids, encode_prompt(tokenizer, format_prompt(example.prompt), sys.maxsize),
                                   max_length)  # fmt: skip
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}:{example.line}: 'messages' records need a tokenizer with a chat template and "
                        "this model's tokenizer has none; write {\"prompt\", \"completion\"} records instead")
    messages = [{"role": r, "content": c} for r, c in example.messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])  # the template writes BOS itself
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # generation stops at EOS: the reply must teach it, as text.encode does
    return _with_prompt_length(ids, list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), max_length)


def completion_tokens(ids: list[int], P: int) -> int:
    """Tokens of a sample the loss covers: positions max(P, 1).. (position 0 has nothing before it)."""
    return len(ids) - max(P, 1)


@dataclass
class TokenBatch:
    """Right-padded sequences and their next-token labels on completion tokens only."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T - 1) long: input_ids[:, 1:] where that token is a completion token, else IGNORE

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(rows: list[tuple[list[int], int]], pad_id: int) -> TokenBatch:
    """[(ids, P)] * B -> TokenBatch (T = the longest row)."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T - 1), IGNORE, dtype=torch.long)
    for r, (ids, P) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, : len(ids)] = 1
        first = max(P, 1)  # label j is token j + 1: completion tokens sit at labels [first - 1, len - 1)
        labels[r, first - 1 : len(ids) - 1] = input_ids[r, first : len(ids)]
    return TokenBatch(input_ids, attention_mask, labels)


def completion_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(N,) log-probs of the completion tokens and (N,) their rows, from hidden (B, T, H) and labels
    (B, T - 1): only the N hidden states right before completion tokens go through
    rlhf_kernels.linear_logprobs with the lm_head weight (V, H); no [N, V] logits are kept."""
    keep = labels != IGNORE  # (B, T - 1)
    rows = keep.nonzero()[:, 0]  # (N,)
    logp = kernels.linear_logprobs(hidden[:, :-1][keep], weight, labels[keep], backend=backend)  # (N,)
    return logp, rows


def sft_loss(logprobs: torch.Tensor, n_tokens: int | float) -> torch.Tensor:
    """Negative log-likelihood per completion token: -sum(logprobs) / n_tokens. n_tokens counts the
    whole batch's completion tokens, so the micro-batches' losses sum to the batch's token mean."""
    return -logprobs.sum() / max(float(n_tokens), 1.0)


# ---- batches --------------------------------------------------------------------------------------


def bucketed_batch(order: DataOrder, lengths: list[int], step: int, window: int) -> list[int]:
    """Item indices of step `step`'s batch (0-based), length-bucketed.

    The epoch's seeded permutation (the one `order.batch` slices) is cut into windows of `window`
    batches; a window is sorted by length (ties keep the permutation's order) and cut into batches,
    visited in a seeded order of their own. Every epoch visits every item once, the epoch has
    order.steps_per_epoch batches, and the batch is a pure function of (seed, step); window=1 gives
    order.batch(step)'s items."""
    epoch, k = divmod(step, order.steps_per_epoch)
    perm = seeded_permutation(order.n, order.seed, epoch, order.name)
    w, bs = k // window, order.batch_size
    items = sorted(perm[w * window * bs : (w + 1) * window * bs], key=lambda i: lengths[i])
    n_batches = -(-len(items) // bs)
    j = seeded_permutation(n_batches, order.seed, epoch, f"{order.name}/bucket/{w}")[k - w * window]
    return items[j * bs : (j + 1) * bs]


def fixed_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Held-out / precompute batches: items sorted by length (little padding), a fixed composition."""
    ordered = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def warmup_schedule(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of step s (0-based) is lr * min(1, (s + 1) / warmup_steps): a linear rise, then
    constant."""
    if warmup_steps == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))


def build_policy_stack(stack_config: StackConfig, init_adapter: str, reference_mode: str = "base"):
    """The (4-bit) base with the trainable policy adapter, started from `init_adapter` when given; with
    reference_mode="init" a frozen "reference" adapter holds the starting weights (ModelStack.init_policy,
    as in PPO)."""
    from rlhf_engine.stack import ModelStack

    adapters = ("policy", "reference") if reference_mode == "init" else ("policy",)
    stack = ModelStack.build(dataclasses.replace(stack_config, adapters=adapters))
    stack.init_policy(init_adapter, frozen_reference=reference_mode == "init")
    stack.set_trainable("policy")
    return stack


def write_eval_prompts(run: Run, prompts: list[str]) -> None:
    """The held-out prompts beside the adapter (OUT/eval_prompts.jsonl, as PPO writes it): `engine eval
    --policy OUT` answers them with the starting and the trained policy."""
    text = "".join(dumps({"prompt": p}) + "\n" for p in dict.fromkeys(prompts))
    if run.main:
        atomic_write(run.path(EVAL_PROMPTS_FILE), lambda f: f.write(text.encode()))


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
        logp, _ = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, backend)
        total -= float(logp.double().sum())
        n += logp.numel()
    stack.train(True)
    return {"eval_loss": total / max(n, 1), "eval_tokens": n}


# ---- the trainer ---------------------------------------------------------------------------------------


@dataclass
class SFTResult:
    out: str  # output directory
    steps: int  # optimizer steps done in total (resumed ones included)
    resumed_from: int  # step the run resumed from (0: fresh)
    train_examples: int
    eval_examples: int
    eval_loss_start: float | None  # held-out loss of the starting policy (step 0 of a fresh run)
    eval_loss: float | None  # held-out loss at the end
    files: list[str]  # what the final save wrote


def train_sft(config: SFTConfig) -> SFTResult:
    """SFT from `config`; see the module docstring for the steps and the command.

    Files, lock, checkpoint/resume, metrics and progress are the run machinery's (rlhf_engine.run)."""
    with Run("sft", config, progress_keys=("loss", "eval_loss")) as run:
        # step 1. examples; whole prompts held out (split_by_prompt, as the reward model's)
        examples = load_sft_data(config.data)
        train_ex, eval_ex = split_by_prompt(examples, config.eval_fraction, config.seed)
        write_eval_prompts(run, [e.prompt for e in eval_ex if e.messages is None])

        # step 2. the policy adapter on the base; its weights, optimizer and schedule are checkpointed
        stack = build_policy_stack(config.stack, config.init_adapter)
        stack.train(True)
        named = stack.named_role_parameters("policy")
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = warmup_schedule(optimizer, config.warmup_steps)
        run.track(weights=named, optimizer=optimizer, scheduler=scheduler)

        # step 3. tokenize; batches follow a seeded, length-bucketed order
        tok, source = stack.tokenizer, config.data or "embedded corpus"
        train_data = [encode_example(tok, e, config.max_length, source) for e in train_ex]
        eval_data = [encode_example(tok, e, config.max_length, source) for e in eval_ex]
        lengths = [len(ids) for ids, _ in train_data]
        order = run.data_order(len(train_data), config.batch_size)
        total_steps = config.max_steps if config.max_steps is not None else config.epochs * order.steps_per_epoch
        start = run.resume()
        last_eval, first_eval = {}, None
        if start == 0:  # the starting policy's held-out loss, so a curve starts where training did
            first_eval = evaluate_sft(stack, eval_data, config.micro_batch_size, config.backend)
            run.log(0, first_eval)

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
                logp, _ = completion_logprobs(hidden, stack.lm_head_weight, batch.labels, config.backend)  # (n,)
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
            eval_examples=len(eval_ex), eval_loss_start=first_eval["eval_loss"] if first_eval else None,
            eval_loss=last_eval["eval_loss"], files=files,
        )  # fmt: skip
        run.finish(result)
    return result


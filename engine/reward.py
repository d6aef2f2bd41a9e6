"""Reward-model training from preference pairs: Bradley-Terry loss on the stack's reward adapter.

    python -m engine rm --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/rm

`train_reward_model(RewardConfig)` runs the numbered steps below; the RM is either the `reward`
adapter + scalar head of a ModelStack (default) or, when the model directory holds a
`...ForSequenceClassification` model with one label, that model itself (all of it trains).

Letters: B pairs in a batch, T time.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_engine.config import FLOAT32_MAX, ConfigError, RewardConfig, StackConfig
from rlhf_engine.feedback import FeedbackError, PreferencePair, build_pairs, load_feedback
from rlhf_engine.run import Run
from rlhf_engine.text import encode, format_sample

LABELERS_FILE = "labelers.json"
CLASSIFIER_DIR = "classifier"


# ---- the loss -----------------------------------------------------------------------------------


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


# ---- data ------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """B pairs packed for ONE forward: rows [0, B) are the chosen sequences, rows [B, 2B) the rejected."""

    input_ids: torch.Tensor  # (2B, T) right-padded
    attention_mask: torch.Tensor  # (2B, T)
    margins: torch.Tensor  # (B,) per-pair margin (data margin + config margin)

    def to(self, device) -> PairBatch:
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.margins.to(device))


def collate_pairs(encoded: list[tuple[list[int], list[int], float]], pad_id: int) -> PairBatch:
    """[(chosen ids, rejected ids, margin)] * B -> PairBatch."""
    seqs = [c for c, _, _ in encoded] + [r for _, r, _ in encoded]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s)
        attention_mask[row, : len(s)] = 1
    margins = torch.tensor([m for _, _, m in encoded], dtype=torch.float32)
    return PairBatch(input_ids, attention_mask, margins)


def encode_pairs(tokenizer, pairs: list[PreferencePair], config: RewardConfig) -> list[tuple[list, list, float]]:
    """Pairs -> [(chosen ids, rejected ids, margin)], the margin being the pair's plus config.margin."""
    encoded = []
    for p in pairs:
        margin = p.margin + config.margin
        if not abs(margin) <= FLOAT32_MAX:  # the loss is fp32: a larger margin is inf there
            raise FeedbackError(f"{config.data}:{p.line}: margin {p.margin} + {config.margin} overflows float32")
        encoded.append((
            encode(tokenizer, format_sample(p.prompt, p.chosen), config.max_length),
            encode(tokenizer, format_sample(p.prompt, p.rejected), config.max_length),
            margin,
        ))
    return encoded


def split_by_prompt(pairs: list[PreferencePair], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): whole prompts are held out, so held-out accuracy is on unseen prompts."""
    prompts = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(prompts)
    n_eval = math.ceil(eval_fraction * len(prompts)) if eval_fraction > 0 else 0
    n_eval = min(n_eval, len(prompts) - 1)  # keep at least one training prompt
    held = set(prompts[:n_eval])
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


# ---- reward models ---------------------------------------------------------------------------


class StackRewardModel:
    """The `reward` adapter + head of a ModelStack; only those train."""

    def __init__(self, stack):
        self.stack = stack
        self.tokenizer = stack.tokenizer
        self.device = stack.device
        stack.set_trainable("reward")

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.stack.named_role_parameters("reward")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) -> (N,) scores."""
        return self.stack.reward(input_ids, attention_mask)

    def train(self, mode: bool = True) -> None:
        self.stack.train(mode)

    def save(self, out_dir: str) -> list[str]:
        return self.stack.save(out_dir, roles=("reward",))


class ClassifierRewardModel:
    """A user's `AutoModelForSequenceClassification` directory with num_labels=1; all of it trains."""

    def __init__(self, path: str, device: torch.device):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model {path!r}: cannot load as a sequence classifier ({str(e).splitlines()[0]})") from e
        if self.model.config.num_labels != 1:
            n = self.model.config.num_labels
            raise ConfigError(f"model {path!r}: a reward model has num_labels=1, this one has {n}")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the classifier finds the last token through it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.model.requires_grad_(True)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, out_dir: str) -> list[str]:
        path = os.path.join(out_dir, CLASSIFIER_DIR)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return [path]


def is_sequence_classifier(path: str) -> bool:
    """True when path/config.json names a ...ForSequenceClassification architecture."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            archs = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(stack_config: StackConfig):
    """StackRewardModel on a (quantized) base, or ClassifierRewardModel for a classifier directory."""
    from rlhf_engine.stack import ModelStack, resolve_device

    if is_sequence_classifier(stack_config.model):
        return ClassifierRewardModel(stack_config.model, resolve_device(stack_config.device))
    if "reward" not in stack_config.adapters:
        raise ConfigError(f"adapters {stack_config.adapters}: reward-model training needs the 'reward' adapter")
    return StackRewardModel(ModelStack.build(stack_config))


@torch.no_grad()
def evaluate(rm, batches: list[PairBatch]) -> dict:
    """Held-out pairwise accuracy and loss over all pairs of `batches`."""
    if not batches:
        return {"eval_accuracy": None, "eval_loss": None, "eval_pairs": 0}
    rm.train(False)
    correct = loss_sum = n = 0.0
    for batch in batches:
        batch = batch.to(rm.device)
        scores = rm.score(batch.input_ids, batch.attention_mask)
        b = batch.margins.shape[0]
        loss, stats = reward_loss(scores[:b], scores[b:], batch.margins)
        correct += stats.accuracy.item() * b
        loss_sum += loss.item() * b
        n += b
    rm.train(True)
    return {"eval_accuracy": correct / n, "eval_loss": loss_sum / n, "eval_pairs": int(n)}


# ---- the trainer -----------------------------------------------------------------------------


@dataclass
class RewardResult:
    out: str  # output directory
    steps: int  # optimizer steps done in total (resumed ones included)
    resumed_from: int  # step the run resumed from (0: fresh)
    train_pairs: int
    eval_pairs: int
    eval_accuracy: float | None  # held-out pairwise accuracy at the end
    eval_loss: float | None
    flagged_labelers: list[str]
    files: list[str]  # what the final save wrote


def train_reward_model(config: RewardConfig) -> RewardResult:
    """Train a reward model from config.data; see the module docstring for the command.

    Files, lock, checkpoint/resume, metrics and progress are the run machinery's (rlhf_engine.run);
    this function is the data, the model, the loss and the update. The Run validates the config."""
    with Run("rm", config, progress_keys=("loss", "accuracy")) as run:
        # step 1. feedback -> pairs: consensus of the labelers, agreement report, held-out prompts
        records = load_feedback(config.data)
        pairs, reports = build_pairs(records, config.agreement_threshold, config.exclude_flagged)
        run.write_json(LABELERS_FILE, {name: rep.to_dict() for name, rep in reports.items()})
        flagged = sorted(name for name, rep in reports.items() if rep.flagged)
        train_pairs, eval_pairs = split_by_prompt(pairs, config.eval_fraction, config.seed)
        if not train_pairs:
            raise ConfigError(f"{config.data}: no preference pairs to train on")

        # step 2. the reward model (the stack's reward adapter + head, or a classifier), initialised
        # from the seeded RNGs; its trainable weights and optimizer are what the checkpoint carries
        rm = load_reward_model(config.stack)
        rm.train(True)
        params = [p for _, p in rm.named_trainable_parameters()]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        run.track(weights=rm.named_trainable_parameters(), optimizer=optimizer)

        # step 3. tokenize; batches follow a seeded order, a pure function of (seed, epoch)
        pad_id = rm.tokenizer.pad_token_id
        train_data = encode_pairs(rm.tokenizer, train_pairs, config)
        eval_data = encode_pairs(rm.tokenizer, eval_pairs, config)
        eval_batches = [
            collate_pairs(eval_data[i : i + config.batch_size], pad_id)
            for i in range(0, len(eval_data), config.batch_size)
        ]
        order = run.data_order(len(train_data), config.batch_size)
        total_steps = config.max_steps if config.max_steps is not None else config.epochs * order.steps_per_epoch
        start = run.resume()
        if start == 0 and eval_batches:  # the untrained baseline, so a curve starts at chance
            run.log(0, evaluate(rm, eval_batches))

        last_eval: dict = {}
        for step in run.steps(total_steps):
            # step 4. one forward over chosen and rejected together: rows [0, B) and [B, 2B)
            batch = collate_pairs([train_data[i] for i in order.batch(step)], pad_id).to(rm.device)
            b = batch.margins.shape[0]
            scores = rm.score(batch.input_ids, batch.attention_mask)  # (2B,)
            loss, stats = reward_loss(scores[:b], scores[b:], batch.margins)

            # step 5. update the reward parameters; a non-finite loss or gradient norm stops the run
            grad_norm = run.update(loss, optimizer, params, config.max_grad_norm)

            # step 6. log, evaluate on held-out prompts, checkpoint (each when due)
            done = step + 1
            row = {
                "epoch": done / order.steps_per_epoch, "loss": loss, "accuracy": stats.accuracy,
                "reward_margin": stats.reward_margin, "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"],
            }
            evaluated = run.due(done, config.eval_every)
            if evaluated:
                last_eval = evaluate(rm, eval_batches)
                run.check_finite(eval_loss=last_eval["eval_loss"])
                row.update(last_eval)
            run.end_step(done, row, log=evaluated)

        # step 7. save the trained RM: adapter + head (a few MB) with the base named in stack.json
        if not last_eval:
            last_eval = evaluate(rm, eval_batches)
        files = rm.save(config.out)
        result = RewardResult(
            out=config.out, steps=max(total_steps, start), resumed_from=start, train_pairs=len(train_pairs),
            eval_pairs=len(eval_pairs), eval_accuracy=last_eval["eval_accuracy"], eval_loss=last_eval["eval_loss"],
            flagged_labelers=flagged, files=files,
        )
        run.finish(result)
    return result

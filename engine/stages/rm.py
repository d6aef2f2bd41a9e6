"""Reward-model training from preference pairs: Bradley-Terry loss on the stack's reward adapter.

    python -m engine rm --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/rm

`train_reward_model(RewardConfig)` runs the numbered steps below; the RM is either the `reward`
adapter + scalar head of a ModelStack (default) or, when the model directory holds a
`...ForSequenceClassification` model with one label, that model itself (all of it trains).

An ensemble (`--reward-heads k`, k > 1): k scalar heads on the one reward adapter's hidden state, each
with its own random init and its own bootstrap resample of the training pairs (algos.rewards.
bootstrap_counts weighs each pair per head in algos.losses.ensemble_reward_loss); one forward serves
every head, and a head costs H + 1 parameters. The held-out metrics are the ensemble mean's, plus how
far the heads disagree (eval_ensemble_std against the spread of the scores, eval_head_correlation).

Letters: B pairs in a batch, T time, k reward heads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..algos.losses import ensemble_reward_loss, reward_loss
from ..algos.rewards import bootstrap_counts, ensemble_std, load_classifier
from ..core.config import FLOAT32_MAX
from ..core.files import atomic_write_dir
from ..core.device import peak_memory_mib, reset_peak_memory, sync_time
from ..core.run import Run, StageResult
from ..datasets.batching import TokenBatch, collate_pairs
from ..datasets.feedback import LABELERS_FILE, build_pairs, labeler_reports, load_feedback
from ..datasets.prompts import split_by_prompt
from ..datasets.samples import encode_pairs
from ..errors import ConfigError, FeedbackError
from ..model.config import StackConfig
from .rm_config import RewardConfig

CLASSIFIER_DIR = "classifier"


# ---- reward models ---------------------------------------------------------------------------


class StackRewardModel:
    """The `reward` adapter + head of a ModelStack; only those train."""

    def __init__(self, stack):
        self.stack = stack
        self.tokenizer = stack.tokenizer
        self.device = stack.device
        stack.set_trainable("reward")
        stack.release_lm_head()  # scores read hidden states only: the (V, H) head is dead weight here

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.stack.named_role_parameters("reward")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(N, T) -> (N,) scores, (N, k) with k reward heads; rows with equal prompts (prompt_lengths (N,)) run
        them once (model.prefix)."""
        return self.stack.reward(input_ids, attention_mask, prompt_lengths)

    def train(self, mode: bool = True) -> None:
        self.stack.train(mode)

    def save(self, out_dir: str) -> list[str]:
        return self.stack.save(out_dir, roles=("reward",))


class ClassifierRewardModel:
    """A user's `AutoModelForSequenceClassification` directory with num_labels=1; all of it trains."""

    def __init__(self, path: str, device: torch.device):
        self.model, self.tokenizer = load_classifier(path, device, "model")
        if self.model.config.num_labels != 1:
            n = self.model.config.num_labels
            raise ConfigError(f"model {path!r}: a reward model has num_labels=1, this one has {n}")
        self.device = device
        self.model.requires_grad_(True)

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.model.named_parameters())

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(N, T) -> (N,) scores; every row whole (a user's classifier takes no KV cache of ours)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def save(self, out_dir: str) -> list[str]:
        """OUT/classifier, written whole or not at all (core.files.atomic_write_dir)."""
        path = os.path.join(out_dir, CLASSIFIER_DIR)

        def write(directory: str) -> None:
            self.model.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)

        atomic_write_dir(path, write)
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
    from ..core.device import resolve_device
    from ..model.stack import ModelStack

    if is_sequence_classifier(stack_config.model):
        if stack_config.reward_heads != 1:
            raise ConfigError(f"reward_heads={stack_config.reward_heads}: a sequence classifier is one reward model; "
                              "an ensemble of heads needs a base with a reward adapter")  # fmt: skip
        return ClassifierRewardModel(stack_config.model, resolve_device(stack_config.device))
    if "reward" not in stack_config.adapters:
        raise ConfigError(f"adapters {stack_config.adapters}: reward-model training needs the 'reward' adapter")
    return StackRewardModel(ModelStack.build(stack_config))


# ---- data ------------------------------------------------------------------------------------


def encode_rm_pairs(tokenizer, pairs, config: RewardConfig) -> list[tuple]:
    """Pairs -> [((chosen ids, P), (rejected ids, P), margin)]: each side laid out as a sample of the
    pair's prompt (datasets.samples), the margin being the pair's plus config.margin."""
    encoded = []
    for p, (chosen, rejected) in zip(pairs, encode_pairs(tokenizer, pairs, config.max_length, config.data)):
        margin = p.margin + config.margin
        if not abs(margin) <= FLOAT32_MAX:  # the loss is fp32: a larger margin is inf there
            raise FeedbackError(f"{config.data}:{p.line}: margin {p.margin} + {config.margin} overflows float32")
        encoded.append((chosen, rejected, margin))
    return encoded


def pair_batch(encoded: list[tuple], pad_id: int) -> tuple[TokenBatch, torch.Tensor]:
    """b encoded pairs -> (one batch of 2b rows: chosen in [0, b), rejected in [b, 2b); (b,) margins)."""
    return collate_pairs([(c, r) for c, r, _ in encoded], pad_id), torch.tensor([m for *_, m in encoded])


@torch.no_grad()
def evaluate(rm, batches: list[tuple[TokenBatch, torch.Tensor]]) -> dict:
    """Held-out pairwise accuracy and loss over all pairs of `batches` (of the ensemble mean when the RM
    has k heads, plus how much the heads disagree: ensemble_diversity)."""
    if not batches:
        return {"eval_accuracy": None, "eval_loss": None, "eval_pairs": 0}
    rm.train(False)
    correct = loss_sum = n = 0.0
    heads, diffs = [], []  # (2B, k) scores and (B, k) chosen - rejected of every batch, for an ensemble
    for batch, margins in batches:
        batch, margins = batch.to(rm.device), margins.to(rm.device)
        scores = rm.score(batch.input_ids, batch.attention_mask, batch.prompt_lengths)
        b = margins.shape[0]
        if scores.dim() == 2:
            heads.append(scores.float().cpu())
            diffs.append((scores[:b] - scores[b:]).float().cpu())
            scores = scores.float().mean(dim=1)
        loss, stats = reward_loss(scores[:b], scores[b:], margins)
        correct += stats.accuracy.item() * b
        loss_sum += loss.item() * b
        n += b
    rm.train(True)
    out = {"eval_accuracy": correct / n, "eval_loss": loss_sum / n, "eval_pairs": int(n)}
    if heads:
        out.update(ensemble_diversity(torch.cat(heads), torch.cat(diffs)))
    return out


DIVERSITY = ("eval_ensemble_std", "eval_score_std", "eval_head_correlation", "eval_head_accuracy_min",
             "eval_head_accuracy_max")  # fmt: skip


def ensemble_diversity(heads: torch.Tensor, diffs: torch.Tensor) -> dict:
    """How different k heads are on held-out sequences: heads (N, k) scores, diffs (P, k) each pair's
    chosen - rejected score per head. eval_ensemble_std: the heads' std per sequence, mean over
    sequences; eval_score_std: the std of the ensemble mean across sequences (the scale to read the
    disagreement against); eval_head_correlation: the mean Pearson correlation of two heads' scores
    over the sequences (1: the heads rank everything alike); each head's pairwise accuracy, worst and best."""
    k = heads.shape[1]
    corr = torch.corrcoef(heads.double().T)  # (k, k)
    off = corr[~torch.eye(k, dtype=torch.bool)]
    accuracy = (diffs > 0).double().mean(dim=0)  # (k,)
    return {
        "eval_ensemble_std": float(ensemble_std(heads).double().mean()),
        "eval_score_std": float(heads.double().mean(dim=1).std()) if heads.shape[0] > 1 else 0.0,
        "eval_head_correlation": float(off.mean()),
        "eval_head_accuracy_min": float(accuracy.min()), "eval_head_accuracy_max": float(accuracy.max()),
    }  # fmt: skip


# ---- the trainer -----------------------------------------------------------------------------


@dataclass
class RewardResult(StageResult):
    train_pairs: int
    eval_pairs: int
    eval_accuracy: float | None  # held-out pairwise accuracy at the end
    eval_loss: float | None
    flagged_labelers: list[str]
    ensemble: dict | None = None  # k > 1 heads: their count and how much they disagree at the end (ensemble_diversity)


def train_reward_model(config: RewardConfig) -> RewardResult:
    """Train a reward model from config.data; see the module docstring for the command.

    Files, lock, checkpoint/resume, metrics and progress are the run machinery's (core.run);
    this function is the data, the model, the loss and the update. The Run validates the config."""
    with Run("rm", config, progress_keys=("loss", "accuracy")) as run:
        # step 1. feedback -> pairs: consensus of the labelers, agreement report, held-out prompts
        records = load_feedback(config.data)
        pairs, reports = build_pairs(records, config.agreement_threshold, config.exclude_flagged)
        labelers, flagged = labeler_reports(reports)
        run.write_json(LABELERS_FILE, labelers)
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
        train_data = encode_rm_pairs(rm.tokenizer, train_pairs, config)
        eval_data = encode_rm_pairs(rm.tokenizer, eval_pairs, config)
        eval_batches = [pair_batch(eval_data[i : i + config.batch_size], pad_id)
                        for i in range(0, len(eval_data), config.batch_size)]  # fmt: skip
        order = run.data_order(len(train_data), config.batch_size)
        k = config.stack.reward_heads
        counts = bootstrap_counts(len(train_data), k, config.seed).T if k > 1 else None  # (pairs, k)
        total_steps = config.max_steps if config.max_steps is not None else config.epochs * order.steps_per_epoch
        start = run.resume()
        if start == 0 and eval_batches:  # the untrained baseline, so a curve starts at chance
            run.log(0, evaluate(rm, eval_batches))

        last_eval: dict = {}
        for step in run.steps(total_steps):
            t0 = sync_time(rm.device)
            reset_peak_memory(rm.device)
            # step 4. one forward over chosen and rejected together: rows [0, B) and [B, 2B), the prompt
            # a pair shares run once (model.prefix)
            batch, margins = pair_batch([train_data[i] for i in order.batch(step)], pad_id)
            batch, margins = batch.to(rm.device), margins.to(rm.device)
            b = margins.shape[0]
            scores = rm.score(batch.input_ids, batch.attention_mask, batch.prompt_lengths)  # (2B,), or (2B, k) for k heads
            if counts is None:
                loss, stats = reward_loss(scores[:b], scores[b:], margins)
            else:  # each head on its own bootstrap resample of the pairs
                weights = counts[order.batch(step)].to(rm.device)
                loss, stats = ensemble_reward_loss(scores[:b], scores[b:], margins, weights)

            # step 5. update the reward parameters; a non-finite loss or gradient norm stops the run
            grad_norm = run.update(loss, optimizer, params, config.max_grad_norm)
            t1 = sync_time(rm.device)

            # step 6. log, evaluate on held-out prompts, checkpoint (each when due)
            done = step + 1
            row = {
                "epoch": done / order.steps_per_epoch, "loss": loss, "accuracy": stats.accuracy,
                "reward_margin": stats.reward_margin, "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"],
                "tokens_per_s": int(batch.attention_mask.sum()) / max(t1 - t0, 1e-9), "step_s": t1 - t0,
                "peak_mem_mib": peak_memory_mib(rm.device),
            }  # fmt: skip
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
            ensemble=None if counts is None else {
                "heads": k, **{key.removeprefix("eval_"): v for key, v in last_eval.items() if key in DIVERSITY}},
        )  # fmt: skip
        run.finish(result)
    return result

"""The reward-model stage's config (`python -m engine rm`; stages/rm.py runs it) and its presets.

Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import (
    FLOAT32_MAX, Command, RunConfig, check_agreement_threshold, check_at_least, check_fraction, preset,
)  # fmt: skip
from ..datasets.feedback import load_feedback
from ..errors import ConfigError
from ..model.config import StackConfig


@dataclass
class RewardConfig(RunConfig):
    """Reward-model training from pairwise or ranked feedback (`python -m engine rm`): the reward adapter
    + scalar head on one (4-bit) base, or a whole ...ForSequenceClassification model.

    Inherits out, seed, log_every, checkpoint_every, resume and progress from RunConfig."""

    data: str = ""  # JSONL of pairwise and/or ranked records (README: "Feedback data")
    # the base + reward adapter; a ...ForSequenceClassification directory as model trains that model instead
    stack: StackConfig = field(default_factory=lambda: StackConfig(adapters=("reward",)))
    epochs: int = 1  # passes over the training pairs (ignored when max_steps is set)
    max_steps: int | None = None  # stop after this many optimizer steps; a later run with more steps resumes
    batch_size: int = 8  # preference pairs per step; the forward sees 2 * batch_size sequences
    lr: float = 1e-4  # AdamW learning rate of the trainable reward parameters (constant)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    max_length: int = 512  # tokens per prompt+completion; longer ones keep their last max_length tokens
    margin: float = 0.0  # added to every pair's own margin in -log sigmoid(s_chosen - s_rejected - margin)
    eval_fraction: float = 0.1  # share of prompts (not pairs) held out for pairwise accuracy
    agreement_threshold: float = 0.3  # flag labelers whose Kendall tau with the consensus is below this
    exclude_flagged: bool = False  # drop flagged labelers' rankings before building the consensus
    eval_every: int = 0  # held-out evaluation every this many steps; 0: only at the end

    RESUMABLE_CHANGES = RunConfig.RESUMABLE_CHANGES + ("epochs", "max_steps", "eval_every")
    INPUT_FILES = ("data",)

    def validate(self) -> RewardConfig:
        super().validate()
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ConfigError(f"epochs={self.epochs}, max_steps={self.max_steps}: must be >= 1")
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError(f"batch_size={self.batch_size}, max_length={self.max_length}: too small")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"weight_decay={self.weight_decay}, max_grad_norm={self.max_grad_norm}: must be >= 0")
        if not abs(self.margin) <= FLOAT32_MAX:  # margins go into the fp32 loss
            raise ConfigError(f"margin={self.margin}: outside the float32 range")
        check_fraction("eval_fraction", self.eval_fraction)
        check_at_least(0, eval_every=self.eval_every)
        check_agreement_threshold(self.agreement_threshold)
        self.stack.validate(classifier_ok=True)  # a ...ForSequenceClassification directory trains whole
        return self

    def check_inputs(self) -> None:
        """The feedback file, read strictly before a model loads: a bad line is one error naming it."""
        load_feedback(self.data)


REWARD_PRESETS: dict[str, RewardConfig] = {
    # A real run: LoRA RM on a 4-bit base, InstructGPT-like learning rate, one epoch.
    "default": RewardConfig(),
    # CPU smoke run on the tiny preset base: a higher rate so a few dozen steps learn something.
    "tiny": RewardConfig(
        stack=StackConfig(model="tiny-llama", adapters=("reward",)),
        batch_size=8, lr=3e-3, max_length=128, epochs=3, checkpoint_every=20,
    ),
}


def reward_preset(name: str, **overrides) -> RewardConfig:
    """A copy of REWARD_PRESETS[name] with fields replaced; `stack` overrides go in `stack=dict(...)`."""
    return preset(REWARD_PRESETS, name, **overrides)


COMMAND = Command(
    name="rm", presets=REWARD_PRESETS, run="stages.rm:train_reward_model",
    help="train a reward model from pairwise or ranked feedback",
    description=(
        "Train the reward adapter + scalar head on one (4-bit) base from a feedback JSONL file "
        "(pairwise {prompt, chosen, rejected} and/or ranked {prompt, completions, rankings}; see README). "
        "Ranked records become the C(n,2) pairs of the labelers' mean-rank consensus; labelers whose "
        "Kendall tau with the consensus is below --agreement-threshold are flagged in OUT/labelers.json. "
        "--model may also be a ...ForSequenceClassification directory with num_labels=1 (trained whole). "
        "Writes OUT/adapter_reward.safetensors, OUT/heads.safetensors, OUT/stack.json, OUT/metrics.jsonl, "
        "OUT/result.json and OUT/checkpoint.pt; rerunning with the same OUT resumes from the checkpoint "
        "(refused when the config or the data file's content changed). OUT is locked while a run uses it. "
        "Settings: the preset, then --config FILE (JSON/YAML, stack nested), then the flags."
    ),
    epilog="example: python -m engine rm --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/rm --preset tiny",
)  # fmt: skip

"""Configs of the engine: dataclasses with one comment per field, and named presets.

Every training stage's config subclasses RunConfig (where the run lives, how it is seeded, logged,
checkpointed and resumed; `rlhf_engine.run.Run` reads it) and validates through it: every float field
finite, every int field within int64, the seed in [0, 2**63), OUT creatable.

Two kinds of preset live here:
- MODEL_PRESETS name tiny-to-1B transformers configs that are built locally (no hub access), so
  `StackConfig(model="tiny-llama")` works anywhere; any other `model` is a local directory written
  by `save_pretrained`.
- REWARD_PRESETS name whole reward-model training configs (`python -m engine rm --preset tiny`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field


class EngineError(Exception):
    """An error the user can fix (bad path, bad config, bad data); the CLI prints it as one line."""


class ConfigError(EngineError, ValueError):
    """A config value or model path that cannot work."""


SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; the stack seeds its init with seed + 1
INT_MAX = 2**63 - 1  # every int field must fit an int64 (torch sizes, counters)
FLOAT32_MAX = 3.4028234663852886e38  # losses are fp32: a larger margin is inf there


def short_repr(value) -> str:
    """repr of a value cut to one readable piece (a 400-digit number would flood the one-line error)."""
    r = repr(value)
    return r if len(r) <= 40 else f"{r[:24]}...{r[-8:]} ({len(r)} characters)"


def check_numbers(config, prefix: str = "") -> None:
    """Every float field of a config dataclass (nested ones too) finite, every int field within int64.

    A NaN or inf learning rate or margin trains a NaN model without a single error (issue 8, item 17);
    bools are ints in Python and are skipped."""
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_numbers(value, name + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value}: not a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT_MAX - 1 <= value <= INT_MAX:
            raise ConfigError(f"{name}={short_repr(value)}: outside the int64 range")


def check_seed(seed: int, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{name}={short_repr(seed)}: expected an integer with 0 <= {name} < 2**63")


def check_out_dir(out: str) -> None:
    """OUT is a directory or can become one: the nearest existing ancestor must be a directory.
    (Whether it can really be created, e.g. under /proc, is found when the run creates it.)"""
    if not out:
        raise ConfigError("out: an output directory is required")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out {out!r}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"out {out!r}: {parent!r} is a file, not a directory")


# Llama-architecture configs. Vocabulary 259 = the byte-level tokenizer (256 bytes + pad/eos/unk)
# that presets use, since no hub tokenizer can be fetched here; `llama-1b` keeps the Llama-3.2-1B
# shapes (vocab 128256) for memory measurements, its byte tokenizer uses only the first 259 ids.
MODEL_PRESETS: dict[str, dict] = {
    "tiny-llama": dict(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "small-llama": dict(
        vocab_size=259, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    ),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
}

VALUE_MODES = ("adapter", "policy_head")
ADAPTERS = ("policy", "value", "reward", "reference")
QUANTIZATIONS = ("nf4", None)
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class StackConfig:
    """One base model, quantized once, with LoRA adapters for the policy, value and reward roles."""

    model: str = "tiny-llama"  # a MODEL_PRESETS name, or a local directory holding a causal LM
    quantization: str | None = "nf4"  # "nf4": 4-bit NF4 base with double quant; None: unquantized
    compute_dtype: str = "auto"  # dtype of activations and of the unquantized parts; auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    lora_r: int = 8  # LoRA rank of every adapter
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input; 0 keeps a resumed run bit-identical
    target_modules: str | tuple[str, ...] = "all-linear"  # peft target modules; "all-linear" skips lm_head
    value_mode: str = "adapter"  # "adapter": own value adapter; "policy_head": value head on the policy's hidden state
    # LoRA adapters to create on the base; "reference" holds a frozen copy of the policy's starting
    # weights (stack.reference() then uses it instead of the bare base)
    adapters: tuple[str, ...] = ("policy", "value", "reward")
    seed: int = 0  # seeds the random init of a preset base and of the adapters and heads

    def validate(self) -> StackConfig:
        if self.model not in MODEL_PRESETS and not os.path.isdir(self.model):
            raise ConfigError(
                f"model {self.model!r}: not a preset ({', '.join(MODEL_PRESETS)}) and no such directory"
            )
        if self.model not in MODEL_PRESETS and not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ConfigError(f"model {self.model!r}: no config.json (expected a save_pretrained directory)")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {self.quantization!r}: expected 'nf4' or None")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype {self.compute_dtype!r}: expected one of {DTYPES}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r}: expected auto, cpu or cuda")
        if self.value_mode not in VALUE_MODES:
            raise ConfigError(f"value_mode {self.value_mode!r}: expected one of {VALUE_MODES}")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ConfigError(f"lora_r={self.lora_r}, lora_alpha={self.lora_alpha}: both must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout}: expected 0 <= p < 1")
        unknown = set(self.adapters) - set(ADAPTERS)
        if unknown or not self.adapters:
            raise ConfigError(f"adapters {self.adapters}: expected a non-empty subset of {', '.join(ADAPTERS)}")
        if "reference" in self.adapters and "policy" not in self.adapters:
            raise ConfigError("adapters: a 'reference' adapter is a frozen copy of the policy's; add 'policy'")
        check_numbers(self, "stack.")
        check_seed(self.seed, "stack.seed")
        return self


@dataclass
class RunConfig:
    """What every training stage's config carries: where the run lives and how it is seeded, logged,
    checkpointed and resumed (`rlhf_engine.run.Run` reads these fields). A stage's config subclasses
    it, adds its own fields, names its input files in INPUT_FILES and extends RESUMABLE_CHANGES."""

    out: str = ""  # output directory: checkpoint.pt, metrics.jsonl, result.json, the stage's files; locked in use
    seed: int = 0  # seeds python/numpy/torch when the run opens, the data order and the init; 0 <= seed < 2**63
    log_every: int = 1  # write a metrics row every this many steps (and at the last one)
    checkpoint_every: int = 50  # write checkpoint.pt every this many steps (and at the last one)
    resume: bool = True  # continue from OUT/checkpoint.pt when it exists; False starts over and deletes it
    progress: bool = True  # tqdm bar; False also silences transformers' and huggingface_hub's loading bars

    # Fields a resumed run may change; any other difference from the checkpoint's config is refused.
    RESUMABLE_CHANGES = ("out", "log_every", "checkpoint_every", "resume", "progress")
    # Fields naming input files: their sha256 goes into the checkpoint, and a resumed run refuses a file
    # whose content changed (the path itself may change: a moved file with the same bytes resumes).
    INPUT_FILES = ()

    def validate(self) -> RunConfig:
        check_seed(self.seed)
        check_numbers(self)
        check_out_dir(self.out)
        if min(self.log_every, self.checkpoint_every) < 1:
            raise ConfigError(
                f"log_every={self.log_every}, checkpoint_every={self.checkpoint_every}: both must be >= 1"
            )
        for name in self.INPUT_FILES:
            path = getattr(self, name)
            if not path:
                raise ConfigError(f"{name}: an input file is required")
            if not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r}: no such file")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RewardConfig(RunConfig):
    """Reward-model training from pairwise or ranked feedback (`python -m engine rm`).

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
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction}: expected 0 <= f < 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every}: must be >= 0")
        if not -1.0 <= self.agreement_threshold <= 1.0:
            raise ConfigError(f"agreement_threshold={self.agreement_threshold}: Kendall tau lies in [-1, 1]")
        self.stack.validate()
        return self

    @classmethod
    def from_dict(cls, d: dict) -> RewardConfig:
        d = dict(d)
        d["stack"] = stack_config_from_dict(d.get("stack", {}))
        return cls(**d)


def stack_config_from_dict(d: dict) -> StackConfig:
    d = dict(d)
    for key in ("adapters", "target_modules"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    return StackConfig(**d)


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
    if name not in REWARD_PRESETS:
        raise ConfigError(f"preset {name!r}: expected one of {', '.join(REWARD_PRESETS)}")
    base = REWARD_PRESETS[name]
    stack_over = overrides.pop("stack", {}) or {}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(RewardConfig)}
    unknown |= set(stack_over) - {f.name for f in dataclasses.fields(StackConfig)}
    if unknown:
        raise ConfigError(f"unknown config fields: {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, stack=dataclasses.replace(base.stack, **stack_over), **overrides)

"""Configs of the engine: dataclasses with one comment per field, and named presets.

Two kinds of preset live here:
- MODEL_PRESETS name tiny-to-1B transformers configs that are built locally (no hub access), so
  `StackConfig(model="tiny-llama")` works anywhere; any other `model` is a local directory written
  by `save_pretrained`.
- REWARD_PRESETS name whole reward-model training configs (`python -m engine rm --preset tiny`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field


class EngineError(Exception):
    """An error the user can fix (bad path, bad config, bad data); the CLI prints it as one line."""


class ConfigError(EngineError, ValueError):
    """A config value or model path that cannot work."""


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
    adapters: tuple[str, ...] = ("policy", "value", "reward")  # LoRA adapters to create on the base
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
        unknown = set(self.adapters) - {"policy", "value", "reward"}
        if unknown or not self.adapters:
            raise ConfigError(f"adapters {self.adapters}: expected a non-empty subset of policy, value, reward")
        return self


@dataclass
class RewardConfig:
    """Reward-model training from pairwise or ranked feedback (`python -m engine rm`)."""

    data: str = ""  # JSONL of pairwise and/or ranked records (README: "Feedback data")
    out: str = ""  # output directory: adapter + head, metrics.jsonl, labelers.json, checkpoint.pt
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
    log_every: int = 1  # write a metrics row every this many steps
    eval_every: int = 0  # held-out evaluation every this many steps; 0: only at the end
    checkpoint_every: int = 50  # write checkpoint.pt every this many steps (and at the end)
    resume: bool = True  # continue from out/checkpoint.pt when it exists
    progress: bool = True  # show a tqdm progress bar
    seed: int = 0  # seeds the held-out split, the data order and the adapter/head init

    # Fields a resumed run may change; any other difference from the checkpoint is an error.
    RESUMABLE_CHANGES = (
        "epochs", "max_steps", "log_every", "eval_every", "checkpoint_every", "resume", "progress", "out",
    )

    def validate(self) -> RewardConfig:
        if not self.data:
            raise ConfigError("data: a feedback JSONL file is required")
        if not os.path.isfile(self.data):
            raise ConfigError(f"data {self.data!r}: no such file")
        if not self.out:
            raise ConfigError("out: an output directory is required")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"out {self.out!r}: exists and is not a directory")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ConfigError(f"epochs={self.epochs}, max_steps={self.max_steps}: must be >= 1")
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError(f"batch_size={self.batch_size}, max_length={self.max_length}: too small")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction}: expected 0 <= f < 1")
        if min(self.log_every, self.checkpoint_every) < 1 or self.eval_every < 0:
            raise ConfigError("log_every and checkpoint_every must be >= 1, eval_every >= 0")
        if not -1.0 <= self.agreement_threshold <= 1.0:
            raise ConfigError(f"agreement_threshold={self.agreement_threshold}: Kendall tau lies in [-1, 1]")
        self.stack.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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

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
    # small-llama with a 32000-row vocabulary (its byte tokenizer uses the first 259): the CPU size at
    # which the [N, V] vocabulary work is a real share of a step (python -m bench ppo_step on CPU)
    "small-llama-32k": dict(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    ),
    # the pipeline's base (`python -m engine pipeline`): a small Llama over a byte-level BPE
    # tokenizer trained on the embedded world's text (PRESET_TOKENIZERS), so a word is about one token
    "world-llama": dict(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    ),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
}

# The tokenizer each preset is built with (stack.build_preset); "byte" for the others.
PRESET_TOKENIZERS: dict[str, str] = {"world-llama": "world"}

VALUE_MODES = ("adapter", "policy_head")
ADAPTERS = ("policy", "value", "reward", "reference")
CACHES = ("dynamic", "static")
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

    @classmethod
    def from_dict(cls, d: dict):
        """A config from plain data (a JSON/YAML config file, a checkpoint, the CLI): see from_data."""
        return from_data(cls, d)


def from_data(cls, d: dict, what: str = "config"):
    """A `cls` config dataclass from plain data: unknown fields are an error naming the known ones,
    nested configs (stack, sampling) come from nested objects, lists become tuples."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: expected an object of fields, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {what} fields: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    values = {}
    for name, value in d.items():
        nested = _nested_type(cls, fields[name])
        if nested is not None and isinstance(value, dict):
            value = from_data(nested, value, name)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def _nested_type(cls, f):
    """The config dataclass a field holds (from its default), or None."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
        return type(default) if dataclasses.is_dataclass(default) else None
    return type(f.default) if dataclasses.is_dataclass(f.default) else None


def preset(presets: dict, name: str, **overrides):
    """A copy of presets[name] with fields replaced; nested configs (stack, sampling) take dicts whose
    keys replace theirs. Unknown names are an error."""
    if name not in presets:
        raise ConfigError(f"preset {name!r}: expected one of {', '.join(presets)}")
    data = dataclasses.asdict(presets[name])
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return from_data(type(presets[name]), data)


def resolve_reference(reference: str, init_adapter: str) -> str:
    """"base" or "init" for a config's `reference` ("auto": init iff there is a starting adapter)."""
    if reference == "auto":
        return "init" if init_adapter else "base"
    return reference


@dataclass
class SamplingConfig:
    """How responses are sampled (the knobs of transformers' generate that RLHF uses)."""

    max_new_tokens: int = 64  # response length limit, in tokens
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_k: int = 0  # keep only the k most likely tokens (0: all)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with total probability >= top_p (1: all)
    stop_strings: tuple[str, ...] = ()  # a response ends once its text contains one (kept in the response)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end a response, besides the tokenizer's EOS
    max_prompt_length: int = 256  # longer prompts keep their LAST tokens
    cache: str = "dynamic"  # KV cache: "dynamic", or "static" (transformers' StaticCache; compiled on CUDA)

    def validate(self) -> SamplingConfig:
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}, max_prompt_length={self.max_prompt_length}: "
                              "both must be >= 1")  # fmt: skip
        if not (0.0 <= self.temperature < float("inf")):
            raise ConfigError(f"temperature={self.temperature}: expected a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: expected >= 0 (0 = off)")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p={self.top_p}: expected 0 < top_p <= 1")
        if self.cache not in CACHES:
            raise ConfigError(f"cache={self.cache!r}: expected one of {', '.join(CACHES)}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings={self.stop_strings!r}: expected non-empty strings")
        return self


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


def stack_config_from_dict(d: dict) -> StackConfig:
    return from_data(StackConfig, d, "stack")


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


KL_ESTIMATORS = ("exact", "k1", "k2", "k3")
KL_PLACEMENTS = ("reward", "loss")
REFERENCES = ("auto", "base", "init")
REWARD_NORMALIZATIONS = ("none", "batch", "running")


@dataclass
class PPOConfig(RunConfig):
    """PPO on one (4-bit) base (`python -m engine ppo`): the policy and value adapters train; the
    reference (the bare base or a frozen copy of the starting adapter) and the reward adapter are the
    same base. Exactly one reward source: reward_model, reward_fn or reward_classifier.

    Inherits out, seed, log_every, checkpoint_every, resume and progress from RunConfig."""

    prompts: str = ""  # JSONL of {"prompt": ...}; "" = the embedded prompts of engine.corpus
    eval_fraction: float = 0.1  # share of prompts held out: evaluation and the reward threshold
    advantage: str = "gae"  # "gae": PPO with a value adapter; "grpo", "drgrpo", "rloo": group-relative, no critic
    stack: StackConfig = field(default_factory=lambda: StackConfig(adapters=("policy", "value")))
    init_adapter: str = ""  # start the policy from a saved adapter (an `engine sft` or `engine ppo` output)
    reference: str = "auto"  # "base": adapters off; "init": frozen copy of the starting adapter; auto: init iff init_adapter
    # ---- reward (one source or several, weighted) ----
    reward_model: str = ""  # an `engine rm` output directory: its reward adapter + head join this stack
    reward_fn: tuple[str, ...] = ()  # MODULE:FUNCTION or PATH.py:FUNCTION each: score(prompts, responses) -> list[float]
    reward_classifier: str = ""  # a ...ForSequenceClassification directory (a separate model)
    reward_positive_label: str = ""  # the classifier's positive class (name or index) when it has 2+ labels
    reward_weights: tuple[float, ...] = ()  # one per source (model or classifier first, then each reward_fn); () = all 1
    reward_max_length: int = 512  # tokens of prompt + response the reward model reads (the last ones)
    missing_eos_penalty: float | None = None  # added to the score of a response that never stopped (e.g. -1.0)
    reward_clip: float | None = None  # scores clipped to [-c, c] after normalisation
    reward_normalization: str = "none"  # "none", "batch" (this batch's mean/std) or "running" (all batches so far)
    # ---- rollout ----
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))
    samples_per_prompt: int = 1  # responses per prompt (the group size of grpo / drgrpo / rloo: --group-size)
    rollout_batch_size: int = 16  # prompts per step; the step's sequences are this x samples_per_prompt
    forward_batch_size: int = 16  # sequences per no-grad forward (old / reference log-probs, values)
    # ---- optimisation ----
    ppo_epochs: int = 1  # passes over each rollout
    minibatch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate up to the minibatch
    lr: float = 1e-5  # AdamW learning rate of the policy and value parameters (constant)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping of the policy and value parameters together; 0 disables it
    # ---- losses ----
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high (DAPO's clip-higher: > clip_low)
    dual_clip: float | None = None  # c > 1: tokens with negative advantages are capped at -A * c
    value_clip: float = 0.2  # values may move this far from the rollout's before the clipped branch takes over
    vf_coef: float = 0.1  # weight of the value loss
    ent_coef: float = 0.0  # weight of the entropy bonus (subtracted from the loss)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise GAE's advantages over the batch (mean 0, std 1); groups normalise themselves
    loss_agg: str = "token_mean"  # "token_mean", "seq_mean_token_mean" (GRPO's) or "token_sum_norm" (Dr. GRPO's)
    drop_zero_std_groups: bool = False  # leave groups whose rewards are all equal (no signal) out of the loss
    # ---- KL to the reference ----
    kl_coef: float | None = None  # beta, the KL weight (its start with target_kl); None: 0.05 for gae, 0 for the group modes
    kl_estimator: str = "exact"  # "exact": full-vocabulary KL; "k1", "k2", "k3": sampled estimates from log-probs
    kl_in: str = "reward"  # "reward": -beta KL_t in every token's reward; "loss": + beta mean KL in the loss
    target_kl: float | None = None  # adaptive beta (Ziegler et al. 2019) towards this KL per sequence; None: fixed
    kl_horizon: int = 10000  # sequences over which the adaptive beta moves by about e^0.2
    # ---- run ----
    max_steps: int = 100  # rollout + optimisation rounds
    eval_every: int = 10  # held-out evaluation every this many steps (and at 0 and the end); 0: start and end
    reward_threshold: float | None = None  # stop once the held-out mean score reaches this
    eval_prompts: int = 64  # held-out prompts used per evaluation (at most)
    backend: str = "auto"  # rlhf_kernels backend for every op ("torch": the unfused references)

    RESUMABLE_CHANGES = RunConfig.RESUMABLE_CHANGES + ("max_steps", "eval_every", "reward_threshold")

    @property
    def INPUT_FILES(self) -> tuple[str, ...]:  # noqa: N802 (the RunConfig attribute)
        return ("prompts",) if self.prompts else ()

    @property
    def reward_sources(self) -> list[tuple[str, str]]:
        """The configured reward sources in weight order: (field, value), model or classifier first."""
        out = [(k, getattr(self, k)) for k in ("reward_model", "reward_classifier") if getattr(self, k)]
        return out + [("reward_fn", spec) for spec in self.reward_fn]

    @property
    def beta(self) -> float:
        """The KL coefficient to start from."""
        if self.kl_coef is not None:
            return self.kl_coef
        return 0.05 if self.advantage == "gae" else 0.0

    @property
    def critic(self) -> bool:
        """Whether a value adapter (or head) is trained: GAE needs one, the group advantages do not."""
        return self.advantage == "gae"

    @property
    def reference_mode(self) -> str:
        """"base" or "init" ("auto" resolved)."""
        return resolve_reference(self.reference, self.init_adapter)

    def validate(self) -> PPOConfig:
        super().validate()
        self.stack.validate()
        self.sampling.validate()
        if isinstance(self.reward_fn, str):  # one spec given as a string (Python callers)
            self.reward_fn = (self.reward_fn,) if self.reward_fn else ()
        sources = self.reward_sources
        if not sources:
            raise ConfigError("reward: give --reward-model, --reward-classifier and/or --reward-fn")
        if self.reward_model and self.reward_classifier:
            raise ConfigError("reward: --reward-model and --reward-classifier are two reward models; give one")
        if self.reward_weights and len(self.reward_weights) != len(sources):
            raise ConfigError(f"reward_weights: {len(self.reward_weights)} weights for {len(sources)} sources "
                              f"({', '.join(v for _, v in sources)})")  # fmt: skip
        if self.advantage not in ("gae", "grpo", "drgrpo", "rloo"):
            raise ConfigError(f"advantage={self.advantage!r}: expected one of gae, grpo, drgrpo, rloo")
        if not self.critic and self.samples_per_prompt < 2:
            raise ConfigError(f"advantage={self.advantage!r} compares the responses of a group: --group-size >= 2 "
                              f"(got samples_per_prompt={self.samples_per_prompt})")  # fmt: skip
        if self.loss_agg not in ("token_mean", "seq_mean_token_mean", "token_sum_norm"):
            raise ConfigError(f"loss_agg={self.loss_agg!r}: expected token_mean, seq_mean_token_mean or token_sum_norm")
        if self.reward_classifier and not os.path.isfile(os.path.join(self.reward_classifier, "config.json")):
            raise ConfigError(f"reward_classifier {self.reward_classifier!r}: no config.json (a save_pretrained directory)")
        check_init_adapter(self.init_adapter, self.stack.model)
        if self.reward_model:
            check_same_base(self.reward_model, "reward_model", self.stack.model)
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference={self.reference!r}: expected one of {', '.join(REFERENCES)}")
        if self.reference == "init" and not self.init_adapter:
            raise ConfigError("reference='init' needs --init-adapter (the adapter the reference copies)")
        for name, allowed in (("kl_estimator", KL_ESTIMATORS), ("kl_in", KL_PLACEMENTS),
                              ("reward_normalization", REWARD_NORMALIZATIONS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.backend not in ("auto", "torch", "triton", "cpp", "cuda"):
            raise ConfigError(f"backend={self.backend!r}: expected auto, torch, triton, cpp or cuda")
        positive = {"samples_per_prompt": self.samples_per_prompt, "rollout_batch_size": self.rollout_batch_size,
                    "forward_batch_size": self.forward_batch_size, "ppo_epochs": self.ppo_epochs,
                    "minibatch_size": self.minibatch_size, "micro_batch_size": self.micro_batch_size,
                    "max_steps": self.max_steps, "eval_prompts": self.eval_prompts,
                    "reward_max_length": self.reward_max_length, "kl_horizon": self.kl_horizon}  # fmt: skip
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name}={value}: must be >= 1")
        sequences = self.rollout_batch_size * self.samples_per_prompt
        if self.minibatch_size > sequences:
            raise ConfigError(f"minibatch_size={self.minibatch_size} is larger than the batch of {sequences} "
                              f"sequences (rollout_batch_size x samples_per_prompt)")  # fmt: skip
        if self.micro_batch_size > self.minibatch_size:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} > minibatch_size={self.minibatch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"lr={self.lr} must be > 0; weight_decay, max_grad_norm >= 0")
        if not (0 <= self.clip_low < 1) or self.clip_high < 0 or self.value_clip < 0:
            raise ConfigError(f"clip_low={self.clip_low} in [0, 1), clip_high={self.clip_high} and "
                              f"value_clip={self.value_clip} >= 0")  # fmt: skip
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(f"dual_clip={self.dual_clip}: must be > 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma={self.gamma}, lam={self.lam}: both in [0, 1]")
        if self.beta < 0 or (self.target_kl is not None and not self.target_kl > 0):
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0 and target_kl={self.target_kl} > 0")
        if self.vf_coef < 0 or self.ent_coef < 0:
            raise ConfigError(f"vf_coef={self.vf_coef}, ent_coef={self.ent_coef}: must be >= 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction}: expected 0 <= f < 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every}: must be >= 0")
        if self.reward_normalization != "none" and self.reward_clip is not None and not self.reward_clip > 0:
            raise ConfigError(f"reward_clip={self.reward_clip}: must be > 0")

        return self

    @classmethod
    def from_dict(cls, d: dict) -> PPOConfig:
        """As RunConfig.from_dict; one reward_fn may be a string."""
        d = dict(d)
        if isinstance(d.get("reward_fn"), str):
            d["reward_fn"] = (d["reward_fn"],) if d["reward_fn"] else ()
        return from_data(cls, d)


def saved_base(path: str, name: str) -> str:
    """The base model named in a saved stack directory's stack.json (ConfigError when it has none)."""
    import json

    meta = os.path.join(path, "stack.json")
    if not os.path.isfile(meta):
        raise ConfigError(f"{name} {path!r}: not a saved stack directory (no stack.json)")
    try:
        with open(meta, encoding="utf-8") as f:
            return json.load(f)["stack"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{name} {path!r}: unreadable stack.json ({type(e).__name__}: {e})") from e


PPO_PRESETS: dict[str, PPOConfig] = {
    # A real run on a GPU: NF4 base, LoRA policy and value, 64 prompts x 128 new tokens per step.
    "default": PPOConfig(
        sampling=SamplingConfig(max_new_tokens=128, temperature=1.0), rollout_batch_size=64, forward_batch_size=32,
        minibatch_size=16, micro_batch_size=8, ppo_epochs=2, lr=1e-5, max_steps=200, eval_every=20,
    ),
    # CPU smoke run on the tiny preset base: short responses, a few prompts, a high rate.
    "tiny": PPOConfig(
        stack=StackConfig(model="tiny-llama", adapters=("policy", "value")),
        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0, max_prompt_length=64),
        rollout_batch_size=8, forward_batch_size=16, minibatch_size=8, micro_batch_size=4, ppo_epochs=2,
        lr=3e-3, vf_coef=0.5, kl_coef=0.02, max_steps=20, eval_every=5, eval_prompts=16, checkpoint_every=5,
        reward_max_length=128,
    ),
}  # fmt: skip


def ppo_preset(name: str, **overrides) -> PPOConfig:
    """A copy of PPO_PRESETS[name] with fields replaced; `stack` and `sampling` overrides are dicts."""
    if isinstance(overrides.get("reward_fn"), str):  # one spec
        overrides["reward_fn"] = (overrides["reward_fn"],) if overrides["reward_fn"] else ()
    return preset(PPO_PRESETS, name, **overrides)


@dataclass
class EvalConfig:
    """Before/after evaluation on held-out prompts (`python -m engine eval`): the reference and the
    trained policy of a saved stack answer the same prompts with the same randomness; every reward
    source scores both; KL to the reference and response length come along."""

    policy: str = ""  # a saved stack directory with a policy adapter (an `engine ppo` output)
    prompts: str = ""  # JSONL of {"prompt": ...}; "" = the embedded prompts
    out: str = ""  # where eval.json goes ("" = POLICY/eval.json)
    reward_model: str = ""  # an `engine rm` directory; "" = the policy directory's own reward adapter, if saved
    reward_fn: tuple[str, ...] = ()  # user scorers, each MODULE:FUNCTION or PATH.py:FUNCTION (one column each)
    reward_classifier: str = ""  # a ...ForSequenceClassification directory
    reward_positive_label: str = ""  # its positive class when it has 2+ labels
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.0))
    max_prompts: int = 64  # prompts evaluated (the first ones of the file)
    samples: int = 1  # completions per prompt and policy (the means are over all of them)
    show: int = 3  # prompts whose two completions are printed side by side
    batch_size: int = 16  # prompts per generation / scoring batch
    seed: int = 0  # sampling seed (both policies draw the same randomness)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    backend: str = "auto"  # rlhf_kernels backend for the KL
    progress: bool = True  # transformers' loading bars (False silences them)

    def validate(self) -> EvalConfig:
        check_seed(self.seed)
        check_numbers(self)
        self.sampling.validate()
        if not self.policy or not os.path.isfile(os.path.join(self.policy, "stack.json")):
            raise ConfigError(f"policy {self.policy!r}: not a saved stack directory (no stack.json)")
        if not os.path.isfile(os.path.join(self.policy, "adapter_policy.safetensors")):
            raise ConfigError(f"policy {self.policy!r}: has no policy adapter (adapter_policy.safetensors)")
        if self.prompts and not os.path.isfile(self.prompts):
            raise ConfigError(f"prompts {self.prompts!r}: no such file")
        if self.reward_model and not os.path.isfile(os.path.join(self.reward_model, "stack.json")):
            raise ConfigError(f"reward_model {self.reward_model!r}: not an `engine rm` output directory (no stack.json)")
        if self.reward_classifier and not os.path.isfile(os.path.join(self.reward_classifier, "config.json")):
            raise ConfigError(f"reward_classifier {self.reward_classifier!r}: no config.json")
        if min(self.max_prompts, self.batch_size, self.samples) < 1 or self.show < 0:
            raise ConfigError(f"max_prompts={self.max_prompts}, batch_size={self.batch_size}, samples={self.samples}: "
                              f"each must be >= 1; show={self.show} >= 0")  # fmt: skip
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r}: expected auto, cpu or cuda")
        if self.out:
            check_out_dir(os.path.dirname(os.path.abspath(self.out)) or ".")
        return self


# ---- Constitutional AI (python -m engine cai revise | label; engine/cai.py) --------------------------

# The section headers of the shipped templates (engine/data/cai): a model that starts the next section
# has finished this one. The text from the stop string on is cut (engine.constitution.clean).
CAI_STOP_STRINGS = ("\n\nHuman:", "\n\nCritique request:", "\n\nRevision request:")


@dataclass
class CAIConfig(RunConfig):
    """What both Constitutional AI stages share (`python -m engine cai revise | label`): the prompts, the
    constitution, the model that answers and how it samples. One run step is one batch of prompts; the
    checkpoint holds every record done so far, so a rerun resumes after the last checkpointed batch.

    Inherits out, seed, log_every, checkpoint_every, resume and progress from RunConfig."""

    prompts: str = ""  # JSONL of {"prompt": ...} (red-team prompts); "" = the embedded ones (engine.corpus)
    max_prompts: int = 0  # use the first N prompts only (0: all)
    constitution: str = ""  # JSONL of principles {critique_request, revision_request, choice_question}; "" = shipped
    stack: StackConfig = field(default_factory=lambda: StackConfig(adapters=("policy",)))
    init_adapter: str = ""  # the answering policy's saved adapter (`engine sft` / `engine ppo` output); "" = the base
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(
            max_new_tokens=128, max_prompt_length=1024, stop_strings=CAI_STOP_STRINGS
        )
    )
    batch_size: int = 16  # prompts per step (one batched generation per phase)
    checkpoint_every: int = 10  # write checkpoint.pt every this many steps (and at the last one)

    TEMPLATE_FIELDS = ()  # the stage's template-path fields (input files, like prompts and constitution)

    @property
    def INPUT_FILES(self) -> tuple[str, ...]:  # noqa: N802 (the RunConfig attribute)
        return tuple(name for name in ("prompts", "constitution", *self.TEMPLATE_FIELDS) if getattr(self, name))

    def validate(self) -> CAIConfig:
        super().validate()
        self.stack.validate()
        self.sampling.validate()
        if self.max_prompts < 0 or self.batch_size < 1:
            raise ConfigError(f"max_prompts={self.max_prompts} must be >= 0 and batch_size={self.batch_size} >= 1")
        check_init_adapter(self.init_adapter, self.stack.model)
        return self


@dataclass
class CAIReviseConfig(CAIConfig):
    """Critique -> revision -> SFT data (`python -m engine cai revise`): for each prompt the model
    answers, critiques its answer against a principle drawn for the prompt and round, and revises it;
    OUT/sft.jsonl pairs each prompt with its final revision."""

    rounds: int = 1  # critique-revision rounds; each round critiques the previous revision under a new draw
    critique_template: str = ""  # text file with {prompt} {response} {critique_request}; "" = shipped
    revision_template: str = ""  # text file with {prompt} {response} {critique} {revision_request}; "" = shipped

    TEMPLATE_FIELDS = ("critique_template", "revision_template")

    def validate(self) -> CAIReviseConfig:
        super().validate()
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds}: must be >= 1")
        return self


@dataclass
class CAILabelConfig(CAIConfig):
    """AI preference labels (RLAIF) (`python -m engine cai label`): the model samples several completions
    per prompt; a judge answers, for every pair and in both orders, a multiple-choice question drawn from
    the constitution; its choice-token log-probs give the preference. OUT/preferences.jsonl holds pairwise
    feedback records that `engine rm` and `engine dpo` read as they are."""

    judge: str = ""  # judge model, a preset or a save_pretrained directory; "" = the answering policy itself
    judge_template: str = ""  # text file with {prompt} {question} {response_a} {response_b}; "" = shipped
    samples_per_prompt: int = 2  # completions per prompt; every pair of distinct ones is judged
    choices: tuple[str, ...] = ("A", "B")  # the two option labels; each must be one token of the judge's tokenizer
    margin_scale: float = 1.0  # margin of a record = margin_scale * |the judge's log-odds| (0: plain pairs)
    judge_batch_size: int = 16  # questions per judge forward
    judge_max_length: int = 1024  # tokens of a question the judge reads (the last ones)

    TEMPLATE_FIELDS = ("judge_template",)

    def validate(self) -> CAILabelConfig:
        super().validate()
        judge_dir = os.path.isfile(os.path.join(self.judge, "config.json"))
        if self.judge and self.judge not in MODEL_PRESETS and not judge_dir:
            raise ConfigError(f"judge {self.judge!r}: not a preset ({', '.join(MODEL_PRESETS)}) and no "
                              "save_pretrained directory (no config.json)")  # fmt: skip
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt={self.samples_per_prompt}: the judge compares at least 2")
        if len(self.choices) != 2 or len(set(self.choices)) != 2 or not all(self.choices):
            raise ConfigError(f"choices={self.choices!r}: expected two distinct non-empty labels, e.g. A,B")
        if self.margin_scale < 0:
            raise ConfigError(f"margin_scale={self.margin_scale}: must be >= 0")
        if self.judge_batch_size < 1 or self.judge_max_length < 1:
            raise ConfigError(f"judge_batch_size={self.judge_batch_size}, judge_max_length={self.judge_max_length}: "
                              "both must be >= 1")  # fmt: skip
        return self


_CAI_TINY_SAMPLING = SamplingConfig(max_new_tokens=16, max_prompt_length=384, stop_strings=CAI_STOP_STRINGS)
CAI_PRESETS: dict[str, dict[str, CAIConfig]] = {
    "revise": {
        # A real run on a GPU: 128-token answers, critiques and revisions, 16 prompts per batch.
        "default": CAIReviseConfig(),
        # CPU smoke run on the tiny preset base (512 positions): short texts, small batches.
        "tiny": CAIReviseConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)),
                                sampling=_CAI_TINY_SAMPLING, batch_size=4, checkpoint_every=2),
    },
    "label": {
        "default": CAILabelConfig(),
        "tiny": CAILabelConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)),
                               sampling=_CAI_TINY_SAMPLING, batch_size=4, checkpoint_every=2, judge_max_length=384),
    },
}  # fmt: skip


# ---- the supervised stages: SFT and the DPO family (`python -m engine sft` / `dpo`) ----------------------

DPO_LOSSES = ("dpo", "ipo", "cdpo")


def check_init_adapter(path: str, model: str) -> None:
    """A starting policy adapter: a saved stack directory with a policy adapter, trained on `model`
    (an adapter only fits the base it was trained on)."""
    if not path:
        return
    check_same_base(path, "init_adapter", model)
    if not os.path.isfile(os.path.join(path, "adapter_policy.safetensors")):
        raise ConfigError(f"init_adapter {path!r}: has no policy adapter (adapter_policy.safetensors); "
                          "expected an `engine sft`, `dpo` or `ppo` output")  # fmt: skip


def check_same_base(path: str, name: str, model: str) -> None:
    """A saved stack directory `path` (field `name`) was trained on base `model`."""
    base = saved_base(path, name)
    if base != model:
        raise ConfigError(f"{name} {path!r} was trained on base {base!r}; this run's base is {model!r} "
                          "(--model): one base serves every role")  # fmt: skip


@dataclass
class SupervisedConfig(RunConfig):
    """What SFT and DPO share: the data, the policy adapter on one (4-bit) base, batching and the
    optimizer. Inherits out, seed, log_every, checkpoint_every, resume and progress from RunConfig."""

    data: str = ""  # JSONL training data (README: "Engine: SFT and DPO")
    stack: StackConfig = field(default_factory=lambda: StackConfig(adapters=("policy",)))
    init_adapter: str = ""  # start the policy from a saved adapter (an `engine sft`, `dpo` or `ppo` output)
    eval_fraction: float = 0.1  # share of prompts (not examples) held out for the held-out metrics
    epochs: int = 1  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # stop after this many optimizer steps; a later run with more steps resumes
    batch_size: int = 8  # examples (SFT) or preference pairs (DPO) per optimizer step
    micro_batch_size: int = 8  # examples / pairs per forward-backward; gradients accumulate up to batch_size
    bucket_window: int = 8  # length buckets: a batch comes from a seeded window of this many batches, by length (1: off)
    lr: float = 1e-4  # AdamW learning rate of the policy adapter
    warmup_steps: int = 0  # the learning rate rises linearly over this many steps, then stays constant
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    max_length: int = 512  # tokens per prompt+completion; longer ones keep their last max_length tokens
    eval_every: int = 0  # held-out evaluation every this many steps (and at 0 and the end); 0: start and end
    backend: str = "auto"  # rlhf_kernels backend of the log-probs: auto (fused kernels), torch (unfused reference)

    RESUMABLE_CHANGES = RunConfig.RESUMABLE_CHANGES + ("epochs", "max_steps", "eval_every")

    @property
    def init_adapter_file(self) -> str:
        """The starting adapter's weights: an input file (hashed; changed content refuses a resume)."""
        return os.path.join(self.init_adapter, "adapter_policy.safetensors")

    @property
    def INPUT_FILES(self) -> tuple[str, ...]:  # noqa: N802 (the RunConfig attribute)
        return (("data",) if self.data else ()) + (("init_adapter_file",) if self.init_adapter else ())

    def validate(self) -> SupervisedConfig:
        self.stack.validate()
        check_init_adapter(self.init_adapter, self.stack.model)
        super().validate()
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                    "bucket_window": self.bucket_window, "max_steps": 1 if self.max_steps is None else self.max_steps}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name}={value}: must be >= 1")
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} > batch_size={self.batch_size}")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length}: must be >= 2 (a prompt token and a completion token)")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise ConfigError(f"lr={self.lr} must be > 0; weight_decay={self.weight_decay}, max_grad_norm="
                              f"{self.max_grad_norm}, warmup_steps={self.warmup_steps} >= 0")  # fmt: skip
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction={self.eval_fraction}: expected 0 <= f < 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every}: must be >= 0")
        if self.backend not in ("auto", "torch", "triton", "cpp", "cuda"):
            raise ConfigError(f"backend={self.backend!r}: expected auto, torch, triton, cpp or cuda")
        if set(self.stack.adapters) != {"policy"}:
            raise ConfigError(f"stack.adapters={self.stack.adapters}: {type(self).__name__} trains the policy "
                              "adapter alone (the DPO reference copy is added by `reference`)")  # fmt: skip
        return self


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning of the policy adapter on prompt -> completion data (`python -m engine
    sft`): token-mean negative log-likelihood of the completion tokens.

    Inherits every field of SupervisedConfig; `data` may be omitted."""

    data: str = ""  # JSONL of {"prompt", "completion"} or {"messages": [...]}; "" = the embedded corpus (engine.corpus)


@dataclass
class DPOConfig(SupervisedConfig):
    """Direct preference optimisation of the policy adapter (`python -m engine dpo`): DPO (Rafailov et
    al. 2023), IPO (Azar et al. 2023) or conservative DPO (label smoothing, Mitchell 2023) against a
    reference that is the bare base or a frozen copy of the starting adapter.

    Inherits every field of SupervisedConfig."""

    data: str = ""  # feedback JSONL: pairwise and/or ranked records (README: "Feedback data"); required

    loss_type: str = "dpo"  # "dpo": -log sigmoid(beta m); "ipo": (m - 1/(2 beta))^2; "cdpo": label-smoothed DPO
    beta: float = 0.1  # scale of the implicit reward beta * (log pi - log ref); IPO's regulariser
    label_smoothing: float = 0.0  # cdpo: the assumed share of flipped labels, 0 < eps < 0.5
    reference: str = "auto"  # "base": adapters off; "init": frozen copy of the starting adapter; auto: init iff init
    precompute_ref_logps: bool = False  # the reference sequence log-probs once, at the start: a forward less per step
    agreement_threshold: float = 0.3  # ranked data: flag labelers whose Kendall tau with the consensus is below this
    exclude_flagged: bool = False  # ranked data: drop flagged labelers' rankings before building the consensus

    @property
    def INPUT_FILES(self) -> tuple[str, ...]:  # noqa: N802 (the RunConfig attribute)
        return ("data",) + (("init_adapter_file",) if self.init_adapter else ())

    @property
    def reference_mode(self) -> str:
        """"base" or "init" ("auto" resolved), as PPOConfig.reference_mode."""
        return resolve_reference(self.reference, self.init_adapter)

    def validate(self) -> DPOConfig:
        if not self.data:
            raise ConfigError("data: a feedback file is required (--data FILE)")
        super().validate()
        if self.loss_type not in DPO_LOSSES:
            raise ConfigError(f"loss_type={self.loss_type!r}: expected one of {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta}: must be > 0")
        if self.loss_type == "cdpo" and not 0.0 < self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing}: cdpo needs 0 < label_smoothing < 0.5")
        if self.loss_type != "cdpo" and self.label_smoothing != 0.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing}: only loss_type='cdpo' smooths labels")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference={self.reference!r}: expected one of {', '.join(REFERENCES)}")
        if self.reference == "init" and not self.init_adapter:
            raise ConfigError("reference='init' needs --init-adapter (the adapter the reference copies)")
        if not -1.0 <= self.agreement_threshold <= 1.0:
            raise ConfigError(f"agreement_threshold={self.agreement_threshold}: Kendall tau lies in [-1, 1]")
        return self


SFT_PRESETS: dict[str, SFTConfig] = {
    # A real run on a GPU: NF4 base, LoRA policy, a LoRA-SFT learning rate with a short warm-up.
    "default": SFTConfig(batch_size=16, micro_batch_size=8, lr=2e-4, warmup_steps=20, epochs=2, max_length=1024,
                         eval_every=100),
    # CPU smoke run on the tiny preset base (the embedded corpus when --data is omitted): a high rate.
    "tiny": SFTConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)), batch_size=8, micro_batch_size=8,
                      lr=3e-3, max_length=256, max_steps=40, eval_fraction=0.2, eval_every=10, checkpoint_every=10),
}  # fmt: skip

DPO_PRESETS: dict[str, DPOConfig] = {
    # A real run on a GPU: NF4 base, LoRA policy, beta 0.1 (Rafailov et al. 2023), one epoch.
    "default": DPOConfig(batch_size=16, micro_batch_size=8, lr=5e-5, warmup_steps=10, max_length=1024, eval_every=100),
    # CPU smoke run on the tiny preset base: a high rate so a few dozen steps learn a preference.
    "tiny": DPOConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)), batch_size=8, micro_batch_size=8,
                      lr=3e-3, max_length=256, epochs=3, eval_every=10, checkpoint_every=10),
}  # fmt: skip


def sft_preset(name: str, **overrides) -> SFTConfig:
    """A copy of SFT_PRESETS[name] with fields replaced; `stack` overrides go in `stack=dict(...)`."""
    return preset(SFT_PRESETS, name, **overrides)


def dpo_preset(name: str, **overrides) -> DPOConfig:
    """A copy of DPO_PRESETS[name] with fields replaced; `stack` overrides go in `stack=dict(...)`."""
    return preset(DPO_PRESETS, name, **overrides)


# ---- the end-to-end pipeline (`python -m engine pipeline`; engine/pipeline.py) ----------------------------


@dataclass
class PipelineConfig:
    """The whole RLHF story end to end on one base: SFT -> sample -> simulated labelers -> reward model ->
    PPO -> before/after evaluation (`python -m engine pipeline`). Every stage is the engine's own stage,
    writing to OUT/<stage>; the hyperparameters below are the world-llama preset's (a user's --model
    usually wants smaller learning rates: set them with --config or the flags)."""

    out: str = "runs/pipeline"  # output directory: a subdirectory per stage; report.json, report.md, curves.png
    model: str = "world-llama"  # the one base of every role: a MODEL_PRESETS name or a local save_pretrained directory
    data: str = ""  # JSONL of {"prompt", "completion"} replacing the embedded world corpus ("" = engine.world)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    seed: int = 0  # seeds the prompt split, the labelers' noise and every stage
    quantization: str | None = "nf4"  # the base's weights: "nf4" (4-bit) or None (unquantized)
    heldout_prompts: int = 16  # prompts no stage trains on: the before/after evaluation's
    lora_r: int = 16  # LoRA rank of every adapter (policy, value, reward)
    sft_steps: int = 400  # SFT optimizer steps
    sft_lr: float = 3e-3  # SFT learning rate
    samples_per_prompt: int = 8  # completions of the SFT policy per training prompt that the labelers rank (n)
    labeler_noise: float = 0.3  # std of the Gaussian noise each labeler adds to the hidden score
    rm_epochs: int = 3  # reward-model passes over the labelers' pairs
    rm_lr: float = 3e-3  # reward-model learning rate
    ppo_steps: int = 60  # PPO step cap (rollout + optimisation rounds)
    ppo_lr: float = 1e-4  # PPO learning rate of the policy and value adapters
    rollout_batch_size: int = 16  # prompts per PPO step
    kl_coef: float = 0.1  # beta of the KL penalty against the SFT policy (per token, in the reward; RM scores normalised)
    max_new_tokens: int = 40  # tokens per sampled completion (every stage)
    temperature: float = 1.0  # sampling temperature (every stage)
    eval_samples: int = 4  # completions per held-out prompt and policy in the before/after evaluation
    resume: bool = True  # rerun on OUT: every stage resumes or, when done, is reused; False starts every stage over
    progress: bool = True  # progress bars; False also silences transformers' loading bars

    def validate(self) -> PipelineConfig:
        check_seed(self.seed)
        check_numbers(self)
        check_out_dir(self.out)
        StackConfig(model=self.model, device=self.device, quantization=self.quantization, lora_r=self.lora_r,
                    lora_alpha=2 * self.lora_r).validate()  # fmt: skip
        if self.data and not os.path.isfile(self.data):
            raise ConfigError(f"data {self.data!r}: no such file")
        if self.samples_per_prompt < 3:
            raise ConfigError(f"samples_per_prompt={self.samples_per_prompt}: the labelers rank n >= 3 completions")
        counts = ("heldout_prompts", "sft_steps", "rm_epochs", "ppo_steps", "rollout_batch_size", "max_new_tokens",
                  "eval_samples")  # fmt: skip
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if min(self.sft_lr, self.rm_lr, self.ppo_lr) <= 0 or self.kl_coef < 0 or self.labeler_noise < 0:
            raise ConfigError("sft_lr, rm_lr, ppo_lr must be > 0; kl_coef and labeler_noise >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature}: must be > 0 (the completions are sampled)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        return from_data(cls, d)


PIPELINE_PRESETS: dict[str, PipelineConfig] = {
    # at most 5 minutes on a 2-core CPU (set-up excluded); the same command on a GPU
    "default": PipelineConfig(),
    # the test size, under 90 s on a 2-core CPU (`--quick`)
    "quick": PipelineConfig(sft_steps=250, rm_epochs=2, ppo_steps=20, eval_samples=2),
}

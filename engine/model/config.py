"""What a model stack is made of, as configs: the base (a preset built locally, or a directory), its
quantisation and LoRA adapters (StackConfig), how responses are sampled (SamplingConfig), and the
checks on saved stack directories (an adapter only fits the base it was trained on).

MODEL_PRESETS name tiny-to-1B transformers configs that are built locally (no hub access), so
`StackConfig(model="tiny-llama")` works anywhere; any other `model` is a local directory written by
`save_pretrained`.

Pure Python: no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..core.config import DEVICES, check_choice, check_fields, check_seed
from ..core.files import check_safetensors
from ..errors import ConfigError
from .named import NAMED_BASES, is_named

STACK_FILE = "stack.json"  # in a saved stack directory: the base and the LoRA config its adapters need


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

    model: str = "tiny-llama"  # a MODEL_PRESETS name, a named real base (smollm2-135m-instruct), or a local directory holding a causal LM
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
    reward_heads: int = 1  # scalar heads on the reward adapter's hidden state: k > 1 is an ensemble (engine rm trains each on its own bootstrap of the pairs)
    seed: int = 0  # seeds the random init of a preset base and of the adapters and heads
    shared_prefix: bool = True  # rows that share a prompt run it once (model/prefix.py); False: every row whole
    fused_layers: bool = True  # RMSNorm and SwiGLU MLPs through rlhf_kernels' fused ops (model/fused.py): less memory kept for backward; False: the model's own modules

    def validate(self, *, classifier_ok: bool = False) -> StackConfig:
        """The checks of every field; `classifier_ok`: the model may be a ...ForSequenceClassification
        directory (the rm stage trains one), else it must be a causal LM."""
        check_fields(self, "stack.")
        check_model(self.model, "model", "causal LM" if not classifier_ok else "causal LM or classifier")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {self.quantization!r}: expected 'nf4' or None")
        if self.compute_dtype not in DTYPES:
            raise ConfigError(f"compute_dtype {self.compute_dtype!r}: expected one of {DTYPES}")
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r}: expected auto, cpu or cuda")
        if self.value_mode not in VALUE_MODES:
            raise ConfigError(f"value_mode {self.value_mode!r}: expected one of {VALUE_MODES}")
        if self.reward_heads < 1:
            raise ConfigError(f"reward_heads={self.reward_heads}: must be >= 1")
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ConfigError(f"lora_r={self.lora_r}, lora_alpha={self.lora_alpha}: both must be positive")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout}: expected 0 <= p < 1")
        unknown = set(self.adapters) - set(ADAPTERS)
        if unknown or not self.adapters:
            raise ConfigError(f"adapters {self.adapters}: expected a non-empty subset of {', '.join(ADAPTERS)}")
        if "reference" in self.adapters and "policy" not in self.adapters:
            raise ConfigError("adapters: a 'reference' adapter is a frozen copy of the policy's; add 'policy'")
        check_seed(self.seed, "stack.seed")
        return self


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
        check_fields(self, "sampling.")
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}, max_prompt_length={self.max_prompt_length}: "
                              "both must be >= 1")  # fmt: skip
        if not (0.0 <= self.temperature < float("inf")):
            raise ConfigError(f"temperature={self.temperature}: expected a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k}: expected >= 0 (0 = off)")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p={self.top_p}: expected 0 < top_p <= 1")
        check_choice("cache", self.cache, CACHES)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings={self.stop_strings!r}: expected non-empty strings")
        return self


# ---- model directories --------------------------------------------------------------------------------

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers' names of decoder LMs (GPT2LMHeadModel)
CLASSIFIER_SUFFIX = "ForSequenceClassification"


def architectures(path: str) -> list[str]:
    """The `architectures` of a save_pretrained directory's config.json ([] when it names none)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
    except OSError as e:
        raise ConfigError(f"{path!r}: cannot read config.json ({e.strerror})") from e
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{path!r}: config.json is not a JSON object of settings ({e})") from e
    return [str(a) for a in archs] if isinstance(archs, list) else []


def check_model_dir(path: str, name: str, need: str) -> None:
    """A save_pretrained directory (field `name`) holding what the role needs (`need`: "causal LM",
    "classifier" or "causal LM or classifier", read from config.json's architectures), every safetensors
    file in it whole. A BERT checkpoint loads as a causal LM through transformers' auto classes, and a
    ...ForSequenceClassification directory would train as a policy on a random output layer: both are
    refused here, naming what the directory holds."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{name} {path!r}: no config.json (expected a save_pretrained directory)")
    archs = architectures(path)
    kinds = {"causal LM": archs and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs),
             "classifier": not any(a.endswith(CLASSIFIER_SUFFIX) for a in archs)}  # fmt: skip
    wrong = kinds["causal LM"] and kinds["classifier"] if need == "causal LM or classifier" else kinds[need]
    if wrong:
        wanted = {"causal LM": "a causal language model (...ForCausalLM)",
                  "classifier": f"a sequence classifier (...{CLASSIFIER_SUFFIX})",
                  "causal LM or classifier": f"a causal language model (...ForCausalLM) or a reward model "
                                             f"(...{CLASSIFIER_SUFFIX}, num_labels=1)"}[need]  # fmt: skip
        found = ", ".join(archs) or "no architectures"
        hint = (" (a reward model: train it with `engine rm --model`, score with it through --reward-classifier)"
                if need == "causal LM" and not kinds["classifier"] else "")  # fmt: skip
        raise ConfigError(f"{name} {path!r} holds {found} (config.json); this role needs {wanted}{hint}")
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            check_safetensors(os.path.join(path, file))


def check_model(model: str, name: str, need: str = "causal LM") -> None:
    """`model` is a preset, a named base (fetched when first loaded, not here) or a save_pretrained directory
    holding what the role needs (check_model_dir)."""
    if model in MODEL_PRESETS or is_named(model):
        return
    if not os.path.isdir(model):
        raise ConfigError(f"{name} {model!r}: not a preset ({', '.join(MODEL_PRESETS)}), not a named base "
                          f"({', '.join(NAMED_BASES)}) and no such directory")  # fmt: skip
    check_model_dir(model, name, need)


# ---- saved stack directories ----------------------------------------------------------------------


def read_stack_meta(path: str, name: str = "saved stack") -> dict:
    """The stack.json of a saved stack directory (ModelStack.save); ConfigError naming `name` when it has
    none or it cannot be read."""
    meta = os.path.join(path, STACK_FILE)
    if not os.path.isfile(meta):
        raise ConfigError(f"{name} {path!r}: not a saved stack directory (no {STACK_FILE})")
    try:
        with open(meta, encoding="utf-8") as f:
            data = json.load(f)
        data["stack"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{name} {path!r}: unreadable {STACK_FILE} ({type(e).__name__}: {e})") from e
    return data


def saved_stack_files(path: str, roles: tuple[str, ...]) -> dict[str, str]:
    """The files of a saved stack directory that a run reads for `roles`, name -> path: stack.json, each
    role's adapter and the heads file, where they exist (a run's input_paths: their hashes vet a resume).
    Each safetensors file must be whole (check_safetensors)."""
    names = [STACK_FILE] + [f"adapter_{role}.safetensors" for role in roles]
    if set(roles) & {"value", "reward"}:
        names.append("heads.safetensors")
    files = {n: os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))}
    for n, file in files.items():
        if n.endswith(".safetensors"):
            check_safetensors(file)
    return files


def adapter_inputs(field: str, path: str, roles: tuple[str, ...]) -> dict[str, str]:
    """A config's input_paths() entries for the saved stack directory in `field` ("" = none):
    "<field>/<file>" -> path for each file a run reads (saved_stack_files)."""
    return {f"{field}/{name}": file for name, file in saved_stack_files(path, roles).items()} if path else {}


def directory_inputs(field: str, path: str) -> dict[str, str]:
    """input_paths() entries for every file of a save_pretrained directory in `field` ("" = none): a
    reward classifier's weights, config and tokenizer."""
    if not path or not os.path.isdir(path):
        return {}
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    return {f"{field}/{n}": os.path.join(path, n) for n in names}


def saved_base(path: str, name: str) -> str:
    """The base model named in a saved stack directory's stack.json."""
    return read_stack_meta(path, name)["stack"]["model"]


def check_init_adapter(path: str, model: str) -> None:
    """A starting policy adapter: a saved stack directory with a policy adapter, trained on `model`
    (an adapter only fits the base it was trained on)."""
    if not path:
        return
    check_same_base(path, "init_adapter", model)
    if not os.path.isfile(os.path.join(path, "adapter_policy.safetensors")):
        raise ConfigError(f"init_adapter {path!r}: has no policy adapter (adapter_policy.safetensors); "
                          "expected an `engine sft`, `dpo` or `ppo` output")  # fmt: skip
    saved_stack_files(path, ("policy",))


def check_same_base(path: str, name: str, model: str) -> None:
    """A saved stack directory `path` (field `name`) was trained on base `model`."""
    base = saved_base(path, name)
    if base != model:
        raise ConfigError(f"{name} {path!r} was trained on base {base!r}; this run's base is {model!r} "
                          "(--model): one base serves every role")  # fmt: skip

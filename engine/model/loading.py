"""Loading a base causal LM: a preset built locally and seeded (no hub), or a save_pretrained directory;
quantised to 4-bit NF4 through bitsandbytes or left in full precision; every base weight frozen.

    python -m engine sft --model tiny-llama ...        (a MODEL_PRESETS name)
    python -m engine sft --model path/to/model ...     (a save_pretrained directory)
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile

import torch
from torch import nn

from ..core.allocator import use_chosen_cpu_allocator
from ..errors import ConfigError
from .config import MODEL_PRESETS, PRESET_TOKENIZERS, StackConfig
from .fused import fuse_layers
from .named import is_named, resolve_named
from .tokenizers import TOKENIZERS

MADV_DONTNEED = 4  # Linux madvise advice: drop these pages (a clean file mapping reads them back on access)
LM_HEAD_ROW_NORM = 2.0  # preset bases: |logit| <= 2 |h| with |h| ~ sqrt(H) after the final RMSNorm
# Config fields of a constant factor on the logits, and whether the model divides by it: Cohere's logit_scale,
# Granite's (and MiniCPM3's) logits_scaling, Falcon-H1's lm_head_multiplier.
LOGIT_SCALES = (("logit_scale", False), ("logits_scaling", True), ("lm_head_multiplier", False))
# Config fields of a final logit soft-cap c * tanh(logits / c) (Gemma 2 and 3), which no fused kernel computes
LOGIT_SOFTCAPS = ("final_logit_softcapping",)
PROBE_TOKENS = 8  # tokens of the load-time check that the model's logits are what the engine computes

# On an avx512_bf16 CPU, importing bitsandbytes (peft and transformers do) warns that the hub's
# "kernels-community" fused CPU gemm could not load; the stack switches that path off on every
# Linear4bit (disable_bnb_cpu_repack), so for the engine the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def build_preset(name: str, seed: int, out_dir: str) -> None:
    """Write a randomly initialised preset base (and its tokenizer) to out_dir with save_pretrained.

    Going through save/from_pretrained makes a preset load exactly like a user's directory,
    quantization included. The init is seeded, so (preset, seed) names the same base everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = TOKENIZERS[PRESET_TOKENIZERS.get(name, "byte")]()
    config = LlamaConfig(
        **MODEL_PRESETS[name], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Rows of norm LM_HEAD_ROW_NORM, as a trained model's output layer has: the default init
        # (std 0.02) caps |logit| at |h| |w_v| ~ 0.16 sqrt(H) after the final norm, so a LoRA policy over
        # the frozen head could not make any distribution peaked (SFT and PPO on a preset would not learn).
        w = model.get_output_embeddings().weight
        w.mul_(LM_HEAD_ROW_NORM / w.norm(dim=1, keepdim=True))
    # Under torch.distributed transformers writes checkpoint files on rank 0 only; every rank builds its
    # own copy of the preset in its own temporary directory, so every rank writes.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def disable_bnb_cpu_repack(model: nn.Module) -> int:
    """Turn off bitsandbytes' avx512-bf16 weight repack on every Linear4bit; returns how many.

    On a CPU with avx512_bf16 the first eval-mode no-grad forward of a Linear4bit repacks its weight
    in place, and later backward passes through that layer lose the input gradient: LoRA grads
    upstream of it come back wrong or None, silently (tests/test_stack.py reproduces it by forcing
    the flag on)."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def route_nf4_through_kernels(model: nn.Module) -> int:
    """On CPU, every Linear4bit's forward becomes rlhf_kernels.nf4_linear (a C++ dequantise-and-multiply
    over bitsandbytes' own NF4 storage, gradient to the input) instead of bitsandbytes' path, which
    dequantises the whole weight into a new fp32 tensor at every call: sampling 32 rows x 64 tokens from
    SmolLM2-135M took 1.17x the fp32 model's time that way, and 0.70x through the kernel (2 threads;
    bench/RESULTS.md, "A real model on CPU"). peft's LoRA layers call the base layer, so they go through it too.
    Returns how many layers were routed. (On CUDA bitsandbytes' own kernels stay.)"""
    import bitsandbytes as bnb

    import rlhf_kernels as kernels

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.forward = lambda x, m=module: kernels.nf4_linear(x, m.weight, m.bias)
            n += 1
    return n


def _checkpoint_mappings() -> list[tuple[int, int, bool]]:
    """(start, end, clean) of every memory-mapped safetensors file of this process (Linux:
    /proc/self/smaps; [] elsewhere); clean: no page of it was ever written (no anonymous copy-on-write
    page), so its pages can be dropped and read again from the file."""
    out = []
    with contextlib.suppress(OSError):
        with open("/proc/self/smaps") as f:
            current = None
            for line in f:
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                    current = None
                    if len(head) == 6 and ".safetensors" in head[5]:
                        start, end = (int(x, 16) for x in head[0].split("-"))
                        current = [start, end, True]
                        out.append(current)
                elif current is not None and line.startswith("Anonymous:") and int(line.split()[1]) > 0:
                    current[2] = False
    return [tuple(m) for m in out]


def copy_off_checkpoint_file(model: nn.Module) -> int:
    """Copy every parameter and buffer that still reads the memory-mapped checkpoint into process memory;
    returns the bytes copied.

    from_pretrained maps the safetensors file and hands out tensors that view it where no conversion
    was needed (with NF4: the embeddings and the norms); while one of them lives, the whole mapping
    stays, with every page the quantiser read still resident. Measured on SmolLM2-135M (fp32 file,
    538 MB): 405 MiB of the file resident after loading, for 108 MiB of tensors that still read it;
    after the copy the mapping closes and the resident set is 300 MiB smaller for the rest of the run.
    The resident pages are dropped first (madvise DONTNEED on a mapping nobody wrote: they read back
    from the file), so the copy itself raises the peak by its own bytes, not the mapping's."""
    mappings = _checkpoint_mappings()
    if not mappings:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    for start, end, clean in mappings:
        if clean:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
    copied, seen = 0, set()
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for t in table.values():
                    if t is None or t.device.type != "cpu" or id(t) in seen:
                        continue
                    seen.add(id(t))  # a tied weight is one Parameter in two modules: copied once
                    ptr = t.untyped_storage().data_ptr()
                    if any(start <= ptr < end for start, end, _ in mappings):
                        t.data = t.data.clone()  # in place: the Parameter (and whoever holds it) stays
                        copied += t.numel() * t.element_size()
    return copied


def load_causal_lm(config: StackConfig, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) for config.model, quantized as configured, every base weight frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if device.type == "cpu":
        use_chosen_cpu_allocator()  # large CPU tensors through the caching allocator (core/allocator.py)
    with contextlib.ExitStack() as stack:
        path = config.model
        if config.model in MODEL_PRESETS:
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="engine-preset-"))
            build_preset(config.model, config.seed, path)
        elif is_named(config.model):
            from transformers.utils import logging as hf_logging

            path = resolve_named(config.model, progress=hf_logging.is_progress_bar_enabled())
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"model {path!r}: no config.json (expected a save_pretrained directory)")
        kwargs = dict(dtype=dtype, device_map={"": str(device)} if device.type == "cuda" else "cpu")
        if config.quantization == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model {config.model!r}: cannot load ({str(e).splitlines()[0]})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.quantization == "nf4":
        disable_bnb_cpu_repack(model)
        if device.type == "cpu":
            route_nf4_through_kernels(model)
    if config.fused_layers:
        fuse_layers(model, dtype)
    copy_off_checkpoint_file(model)
    model.requires_grad_(False)
    return model, tokenizer


def logit_scale(model, name: str) -> float:
    """The constant s with the model's logits = s * (hidden @ lm_head.weight.T + lm_head.bias), checked.

    The engine never materialises logits: log-probs, entropy and KL come from hidden states and the lm_head
    weight (and bias) through rlhf_kernels, and s folds into the temperature (softmax(s x / T) =
    softmax(x / (T / s))). Any other transform of the logits would make every log-prob and sample silently
    wrong, so it is refused here: a soft-cap by name (LOGIT_SOFTCAPS), anything else by a probe that
    compares the model's own logits on PROBE_TOKENS tokens with that formula."""
    config = model.config
    for field in LOGIT_SOFTCAPS:
        cap = getattr(config, field, None)
        if cap:
            raise ConfigError(f"model {name!r}: {field}={cap} soft-caps its logits (c * tanh(logits / c)), which the "
                              "fused log-prob kernels and the sampler do not compute; refusing to train on wrong "
                              "log-probs")  # fmt: skip
    scale = 1.0
    for field, divides in LOGIT_SCALES:
        value = getattr(config, field, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            if not value > 0:
                raise ConfigError(f"model {name!r}: {field}={value}; expected a positive logit scale")
            scale = scale / value if divides else scale * value
    check_logits(model, name, scale)
    return float(scale)


@torch.no_grad()
def check_logits(model, name: str, scale: float) -> None:
    """ConfigError unless the model's own logits on a probe equal scale * (hidden @ W.T + b) up to rounding
    (1e-4 relative in fp32; 16-bit logits round to 2^-8 relative, so 2e-2 there)."""
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    device = head.weight.device
    ids = (torch.arange(1, PROBE_TOKENS + 1, device=device) % head.weight.shape[0])[None, :]
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        own = model(input_ids=ids, attention_mask=mask).logits.float()  # (1, PROBE_TOKENS, V)
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        model.train(was_training)
    ours = nn.functional.linear(hidden, head.weight, head.bias).float() * scale
    rel = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    worst = float((own - ours).abs().max())
    if not worst <= rel * max(1.0, float(own.abs().max())):
        raise ConfigError(f"model {name!r}: its logits are not {scale:g} * (hidden @ lm_head.weight.T + bias) (off by "
                          f"up to {worst:.3g} on a probe): a transform the fused log-prob kernels do not compute; "
                          "refusing to train on wrong log-probs")  # fmt: skip

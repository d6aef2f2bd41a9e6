"""TRL's side of `python -m bench trainers`: run in the peer environment (.venv-bench, `make bench-venv`) by
trainer_sides' worker entry, never by hand. Imports nothing of ours beyond trainer_sides' constants and
reward: rlhf_engine is not installed there, and TRL is not installed in ours.

TRL 1.16 differs from our trainers in ways the bench keeps (they are how TRL works) and in ways it turns
off (they would make the comparison unequal); the report lists both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import time

from bench.trainer_sides import DPO_BETA, GRPO_KL_BETA, LR, SEED, SEPARATOR, reward

TRAINERS = {"dpo": "DPOTrainer", "dpo_precomputed": "DPOTrainer", "grpo": "GRPOTrainer", "grpo_kl": "GRPOTrainer",
            "sft": "SFTTrainer", "rm": "RewardTrainer", "ppo": "PPOTrainer"}  # fmt: skip


def probe() -> dict:
    """Versions of the peer environment and which of the bench's kinds its TRL can run."""
    import importlib.metadata as md

    import torch
    import trl

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("trl", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        versions[name] = md.version(name)
    kinds, unavailable = [], {}
    for kind, trainer in TRAINERS.items():
        if kind == "ppo":  # TRL 1.x dropped PPOTrainer; no experimental copy is benchmarked here either
            has = hasattr(trl, "PPOTrainer") or importlib.util.find_spec("trl.experimental.ppo") is not None
            unavailable[kind] = (f"unavailable: TRL {trl.__version__} has a PPO trainer, not benchmarked here" if has
                                 else f"unavailable: TRL {trl.__version__} has no PPO trainer (no trl.PPOTrainer, "
                                      "no trl.experimental.ppo)")  # fmt: skip
        elif hasattr(trl, trainer):
            kinds.append(kind)
        else:
            unavailable[kind] = f"unavailable: TRL {trl.__version__} has no {trainer}"
    return {"status": "ok", "versions": versions, "kinds": kinds, "unavailable": unavailable}


def trl_reward(prompts, completions, **kwargs):
    """trainer_sides.reward with TRL's reward-function signature (keyword arguments); conversational
    records (a chat template) come as message lists: the user's prompt and the assistant's reply texts."""
    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x

    return reward([text(p) for p in prompts], [text(c) for c in completions])


_FOLDED_MIB = [0.0]  # the largest VmHWM seen before a reset: the process's peak survives the step resets


def _reset_hwm() -> None:
    _FOLDED_MIB[0] = max(_FOLDED_MIB[0], _hwm_mib() or 0.0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def disable_bnb_cpu_repack(model) -> int:
    """bitsandbytes' avx512-bf16 repack off on every Linear4bit, as our stack does (rlhf_engine.stack:
    the repack silently breaks input gradients on such CPUs, and both sides must run the same kernels)."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_initial_weights(model, spec: dict, role: str) -> int:
    """Copy our saved initial adapter (and, for the reward model, its head) into TRL's peft model: every
    trainable tensor of TRL's must get a value of the same shape; returns how many were copied."""
    import torch
    from safetensors.torch import load_file

    init = spec["init"][role]
    ours = load_file(os.path.join(init, f"adapter_{role}.safetensors"))
    mapped = {name.replace(f".{role}.", ".default."): t for name, t in ours.items()}
    if role == "reward":
        heads = load_file(os.path.join(init, "heads.safetensors"))
        bias = heads.get("heads.reward.proj.bias")
        if bias is not None and bool(bias.abs().max() > 0):
            raise RuntimeError("our reward head has a non-zero bias; TRL's score head has none")
        head = heads["heads.reward.proj.weight"]  # (1, H): TRL's `score` (no bias; ours starts at 0 and
        # cancels in r_chosen - r_rejected, so it never moves the pairwise loss)
        for name, p in model.named_parameters():
            if p.requires_grad and "score" in name and name.endswith("weight"):
                mapped[name] = head
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(mapped))
    if missing:
        raise RuntimeError(f"no initial weight for TRL's {missing[0]} (and {len(missing) - 1} more); ours: "
                           f"{sorted(ours)[:2]}")  # fmt: skip
    with torch.no_grad():
        for name, p in trainable.items():
            if mapped[name].shape != p.shape:
                raise RuntimeError(f"{name}: ours {tuple(mapped[name].shape)}, TRL's {tuple(p.shape)}")
            p.copy_(mapped[name].to(p.dtype))
    return len(trainable)


def run_trl(spec: dict) -> dict:
    """TRL's trainer for spec["kind"] on the same base, data, adapter and sizes as ours; -> per-step times,
    peaks, losses (the same fields as trainer_sides.run_ours)."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              BitsAndBytesConfig, TrainerCallback)  # fmt: skip

    kind, sh = spec["kind"], spec["shape"]
    notes = []
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # the engine's NF4 on CPU (fp32 compute)
    load = dict(dtype=torch.float32, device_map="cpu", quantization_config=quant)
    if kind == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, **load)
        model.config.pad_token_id = tok.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], **load)
    disable_bnb_cpu_repack(model)
    lora = LoraConfig(r=sh["lora_r"], lora_alpha=sh["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="SEQ_CLS" if kind == "rm" else "CAUSAL_LM")  # fmt: skip
    n_steps = spec["warmup"] + spec["steps"]
    max_length = 4 * (sh["prompt_tokens"] + sh["completion_tokens"])  # as ours: no truncation on either side
    common = dict(output_dir=spec["out"], max_steps=n_steps, learning_rate=LR, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False,
                  use_cpu=True, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                  seed=SEED, disable_tqdm=True, dataloader_num_workers=0)  # fmt: skip
    files = spec["data"]
    # the records as ours lays them out (rlhf_engine.datasets.layout): with a chat template (an instruct
    # model) a prompt is a user turn and a completion the assistant's reply, which TRL renders through the
    # same template when its records are conversational; without one, the prompt, a newline, the completion
    chat = bool(getattr(tok, "chat_template", None))
    if chat:
        notes.append("chat template: conversational records on TRL's side (user prompt, assistant completion), as ours")

    def prompt_of(text: str):
        return [{"role": "user", "content": text}] if chat else text + SEPARATOR

    def reply_of(text: str):
        return [{"role": "assistant", "content": text}] if chat else text

    pairs = [{"prompt": prompt_of(r["prompt"]), "chosen": reply_of(r["chosen"]), "rejected": reply_of(r["rejected"])}
             for r in _read_jsonl(files["pairs"])]  # fmt: skip
    grpo = kind in ("grpo", "grpo_kl")
    if kind in ("dpo", "dpo_precomputed", "sft") and hasattr(tok, "_add_eos_if_not_present"):
        notes.append("byte tokenizer: TRL's 'tokenized prompt is not a prefix' warning is the EOS it appends to the "
                     "prompt alone, which TRL drops: the training ids are ours")  # fmt: skip
    if kind in ("dpo", "dpo_precomputed"):
        args = trl.DPOConfig(**common, per_device_train_batch_size=sh["micro"],
                             gradient_accumulation_steps=sh["pairs"] // sh["micro"], beta=DPO_BETA,
                             loss_type=["sigmoid"], max_length=max_length,
                             precompute_ref_log_probs=kind == "dpo_precomputed", precompute_ref_batch_size=sh["micro"])
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                                 peft_config=lora)  # fmt: skip
    elif kind == "sft":
        data = [{"prompt": prompt_of(r["prompt"]), "completion": reply_of(r["completion"])}
                for r in _read_jsonl(files["sft"])]  # fmt: skip
        args = trl.SFTConfig(**common, per_device_train_batch_size=sh["micro"],
                             gradient_accumulation_steps=sh["pairs"] // sh["micro"], max_length=max_length,
                             packing=False, completion_only_loss=True)  # fmt: skip
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok,
                                 peft_config=lora)  # fmt: skip
    elif kind == "rm":
        # our RM stage's own token ids and a pad id absent from them (trainer_sides.write_pair_ids says why)
        pad = files["pair_pad_id"]
        model.config.pad_token_id = pad
        notes.append(f"reward model: TRL gets our token ids (processed records) and pad id {pad}, so both score the "
                     "same last token")  # fmt: skip
        args = trl.RewardConfig(**common, per_device_train_batch_size=sh["pairs"], gradient_accumulation_steps=1,
                                max_length=max_length, pad_token=tok.convert_ids_to_tokens(pad))  # no RM micro-batches
        trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(_read_jsonl(files["pair_ids"])),
                                    processing_class=tok, peft_config=lora)  # fmt: skip
    elif grpo:
        if hasattr(tok, "_add_eos_if_not_present"):
            # ByT5's tokenizer appends EOS to every text; TRL's GRPO tokenizes prompts with it, ours strips it
            # (rlhf_engine.generation.encode_prompt): without this TRL's prompts would end with EOS
            tok._add_eos_if_not_present = lambda ids: ids
            notes.append("byte tokenizer: trailing EOS of TRL's prompts removed, as ours")
        gen_kwargs = None
        if model.config.vocab_size > len(tok):
            # a preset's embedding has more rows than its byte tokenizer has ids: ours samples only the
            # tokenizer's (rlhf_engine.generation), and TRL could not decode the others
            gen_kwargs = {"suppress_tokens": list(range(len(tok), model.config.vocab_size))}
            notes.append(f"ids >= {len(tok)} suppressed in TRL's sampling (ours masks them)")
        sequences = sh["prompts"] * sh["group"]
        args = trl.GRPOConfig(**common, per_device_train_batch_size=sh["seq_micro"],
                              gradient_accumulation_steps=sequences // sh["seq_micro"], num_generations=sh["group"],
                              max_completion_length=sh["new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                              beta=GRPO_KL_BETA if kind == "grpo_kl" else 0.0, loss_type="dapo", scale_rewards="group",
                              epsilon=0.2, use_bias_correction_kl=False, num_iterations=1, generation_kwargs=gen_kwargs,
                              log_completions=False)  # fmt: skip
        prompts = [{"prompt": prompt_of(r["prompt"])} for r in _read_jsonl(files["prompts"])]
        trainer = trl.GRPOTrainer(model=model, reward_funcs=trl_reward, args=args,
                                  train_dataset=Dataset.from_list(prompts), processing_class=tok, peft_config=lora)
    else:
        return {"status": f"unavailable: no TRL trainer for {kind} here"}

    # QLoRA: TRL casts the trainable tensors to bf16 when the base is quantized (the QLoRA paper's recipe);
    # ours keeps them fp32, so the cast is undone before the optimizer exists (train() creates it)
    cast = 0
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    if cast:
        notes.append(f"TRL's bf16 cast of {cast} trainable tensors (QLoRA) undone: fp32 adapters, as ours")
    trainable = load_initial_weights(trainer.model, spec, "reward" if kind == "rm" else "policy")

    class Clock(TrainerCallback):
        """Per optimizer step: wall time since the previous step's end, peak resident memory since the
        step's start, the summed training_step losses (the Trainer's step loss), generation time."""

        def __init__(self):
            self.steps, self.t, self.loss, self.gen = [], None, 0.0, 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            _reset_hwm()

        def on_step_end(self, args, state, control, **kwargs):
            t = time.perf_counter()
            row = {"step": state.global_step, "wall_s": t - self.t, "peak_mib": _hwm_mib(), "loss": self.loss,
                   "generate_s": self.gen if grpo else None, "response_length": None}  # fmt: skip
            if grpo:  # TRL's own metric of the step (cleared at its log, which runs after this)
                lengths = getattr(trainer, "_metrics", {}).get("train", {}).get("completions/mean_length") or []
                row["response_length"] = lengths[-1] if lengths else None
            self.steps.append(row)
            self.t, self.loss, self.gen = t, 0.0, 0.0

    clock = Clock()
    trainer.add_callback(clock)
    training_step = trainer.training_step

    def timed_training_step(*args, **kwargs):
        out = training_step(*args, **kwargs)
        clock.loss += float(out)  # already scaled for gradient accumulation: the sum is the step's loss
        return out

    trainer.training_step = timed_training_step
    if grpo:
        generate = trainer._generate

        def timed_generate(*args, **kwargs):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            clock.gen += time.perf_counter() - t0
            return out

        trainer._generate = timed_generate
    trainer.train()
    peak = max(_FOLDED_MIB[0], _hwm_mib() or 0.0) or None  # as ours: every step's peak and the setup's
    return {"status": "ok", "steps": clock.steps, "notes": notes, "trainable_params": trainable,
            "reported_peak_mib": peak}  # fmt: skip

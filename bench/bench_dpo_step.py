"""One DPO step: python -m bench dpo_step [--quick] [--device cpu|cuda] [--json PATH] [--providers auto,torch]
[--steps N] [--precompute]

The real trainer (rlhf_engine.stages.dpo.train_dpo) on a preset base with random weights, NF4 + LoRA policy,
the bare base as the reference: 1 warm-up step, then timed steps, each row being one step's own metrics
(seconds, tokens/s, peak memory). A step is one policy forward + backward over the chosen and rejected
sequences together and one no-grad reference forward over the same (none with --precompute: the
reference log-probs are computed once before the loop). Providers: "auto" = the fused kernels
(rlhf_kernels.linear_logprobs from hidden states), "torch" = the PyTorch reference (the [N, V] logits
materialised). Shapes: on GPU the issue's llama-1b (Llama-3.2-1B shapes, V = 128256), LoRA r = 16,
16 pairs x (256 prompt + 256 completion tokens) per step in micro-batches of 4 pairs; on CPU
small-llama-32k (H = 256, V = 32000: the vocabulary is a real share of the step), 8 pairs x (64 + 64)
in micro-batches of 4 (--quick: tiny-llama, 4 pairs x (32 + 16)).

Memory yardstick: a DPO trainer that holds the policy and the reference as two bf16 models holds at
least 2 x 2 bytes x parameters of weights before any activation; the row reports our peak against
that lower bound (`x_two_bf16_weights`).
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import tempfile

import numpy as np
import torch

from bench.harness import (
    bf16_weight_bytes,
    device_name,
    trainer_step_args,
    trainer_step_parser,
    versions,
    write_rows,
)  # fmt: skip


def shapes(quick: bool, device: torch.device, model: str | None = None) -> dict:
    if model:  # a real (chat) model: 4 pairs of the world's prompts with a helpful and a rude reply
        return dict(model=model, pairs=4, prompt_tokens=None, completion_tokens=None, lora_r=16, micro=4)
    if device.type == "cuda":
        return dict(model="llama-1b", pairs=16, prompt_tokens=256, completion_tokens=256, lora_r=16, micro=4)
    if quick:
        return dict(model="tiny-llama", pairs=4, prompt_tokens=32, completion_tokens=16, lora_r=8, micro=4)
    return dict(model="small-llama-32k", pairs=8, prompt_tokens=64, completion_tokens=64, lora_r=16, micro=4)


def make_pairs(n: int, shape: dict) -> list[dict]:
    """n pairwise records whose samples are prompt_tokens + completion_tokens long with the byte tokenizer
    (one token per byte): prompt_tokens - 1 bytes of prompt + the newline, completion_tokens - 1 bytes of
    each completion + EOS. A real model (prompt_tokens None): the pipeline world's prompts, each with its
    helpful reply chosen over its rude one."""
    if shape["prompt_tokens"] is None:
        from rlhf_engine.pipeline import world

        prompts = world.prompts()
        return [{"prompt": p, "chosen": world.replies(p)["helpful"][0], "rejected": world.replies(p)["rude"][0]}
                for p in (prompts[i % len(prompts)] for i in range(n))]  # fmt: skip
    text = "Describe the weather in a city you like, and say why you like it. "
    P, C = shape["prompt_tokens"] - 1, shape["completion_tokens"] - 1
    rows = []
    for i in range(n):
        prompt = (f"{i}: " + text * (P // len(text) + 1))[:P]
        rows.append({"prompt": prompt, "chosen": ("Sunny and warm. " * C)[:C], "rejected": ("RAIN AND COLD. " * C)[:C]})
    return rows


def run_provider(provider: str, shape: dict, args, device: torch.device, out_dir: str) -> list[dict]:
    from rlhf_engine.stages.dpo import train_dpo
    from rlhf_engine.stages.dpo_config import dpo_preset

    data = f"{out_dir}/pairs.jsonl"
    with open(data, "w") as f:
        for r in make_pairs(shape["pairs"] * (args.steps + 1), shape):
            f.write(json.dumps(r) + "\n")
    config = dpo_preset(
        "default", data=data, out=f"{out_dir}/{provider}", eval_fraction=0.0, eval_every=0, max_steps=args.steps + 1,
        checkpoint_every=10**9, progress=False, backend=provider, batch_size=shape["pairs"],
        micro_batch_size=shape["micro"], max_length=(shape["prompt_tokens"] or 256) + (shape["completion_tokens"] or 256),
        precompute_ref_logps=args.precompute, warmup_steps=0,
        stack=dict(model=shape["model"], lora_r=shape["lora_r"], lora_alpha=2 * shape["lora_r"], device=device.type),
    )  # fmt: skip
    train_dpo(config)
    with open(f"{config.out}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["step"] >= 2]  # step 1 warms up (allocator, caches)


def main(argv: list[str] | None = None) -> int:
    parser = trainer_step_parser("python -m bench dpo_step", __doc__, default_steps=3)
    parser.add_argument("--precompute", action="store_true",
                        help="reference log-probs computed once before the loop (precompute_ref_logps)")
    args, providers, device = trainer_step_args(parser, argv)
    shape = shapes(args.quick, device, args.model)
    meta = {"device": device_name(device), "versions": versions(), "date": _dt.date.today().isoformat()}
    yardstick = 2 * bf16_weight_bytes(shape["model"]) / 2**20  # policy and reference as bf16 copies
    print(f"# dpo_step on {meta['device']} | {meta['versions']} | {meta['date']}")
    print(f"# {shape}, reference {'precomputed' if args.precompute else 'forward per step'}; "
          f"two bf16 models' weights alone: {yardstick:.0f} MiB")  # fmt: skip
    print(f"{'provider':9} {'step s (p20-p80)':>24} {'tokens/s':>9} {'peak MiB':>9} {'x 2xbf16':>9}")
    out_rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        for provider in providers:
            rows = run_provider(provider, shape, args, device, tmp)
            steps = [r["step_s"] for r in rows]
            p20, p80 = (float(np.percentile(steps, q)) for q in (20, 80))
            med = {k: statistics.median(r[k] for r in rows) for k in ("step_s", "tokens_per_s", "peak_mem_mib")}
            row = {"op": "dpo_step", "provider": provider, "shape": shape, "precompute_ref_logps": args.precompute,
                   **med, "step_s_p20": p20, "step_s_p80": p80, "two_bf16_weights_mib": yardstick,
                   "x_two_bf16_weights": med["peak_mem_mib"] / yardstick, "steps_timed": len(rows), **meta}  # fmt: skip
            out_rows.append(row)
            print(f"{provider:9} {med['step_s']:9.3f} ({p20:.3f}-{p80:.3f}) {med['tokens_per_s']:9.1f} "
                  f"{med['peak_mem_mib']:9.0f} {row['x_two_bf16_weights']:9.2f}")  # fmt: skip
    if len(out_rows) == 2:
        a, t = out_rows
        print(f"# step: torch / auto = {t['step_s'] / a['step_s']:.2f}x; peak: torch - auto = "
              f"{t['peak_mem_mib'] - a['peak_mem_mib']:.0f} MiB")  # fmt: skip
    if args.json:
        write_rows(args.json, out_rows)
    return 0

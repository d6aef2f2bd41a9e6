"""One PPO iteration, phase by phase: python -m bench ppo_step [--quick] [--device cpu|cuda] [--json PATH]
[--providers auto,torch] [--steps N] [--cache dynamic|static] [--advantage gae|grpo|drgrpo|rloo]

The real trainer (rlhf_engine.stages.ppo.train_ppo) on a preset base with random weights, NF4 + LoRA, a
rule-based reward (the share of lowercase letters: no reward model, so the "score" phase is the
reward function alone): 1 warm-up step, then timed steps, each row being one step's own metrics
(seconds per phase, tokens/s, peak memory). Providers: "auto" = the fused kernels on every hot path,
"torch" = every op's PyTorch reference (the [N, V] logits materialised). Shapes: on GPU the issue's
llama-1b (Llama-3.2-1B shapes), LoRA r = 16, 64 prompts x 128 prompt tokens x 128 new tokens; on CPU
small-llama-32k (H = 256, V = 32000: the vocabulary work is a real share of the step), 16 prompts x
64 x 32 (--quick: tiny-llama, 8 x 32 x 16). `--model smollm2-135m-instruct` (or a directory): a real chat
model, 8 of the pipeline world's prompts x 4 samples each (both modes), up to 64 new tokens.

Memory yardstick: four separate bf16 models (policy, reference, value, reward) hold at least
4 x 2 bytes x parameters of weights before any activation; the row reports our peak against that
lower bound (`x_four_bf16_weights`).
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import tempfile

import torch

from bench.harness import (
    bf16_weight_bytes,
    device_name,
    trainer_step_args,
    trainer_step_parser,
    versions,
    write_rows,
)  # fmt: skip

PHASES = ("time_generate_s", "time_score_s", "time_logprobs_s", "time_train_s")


def reward(prompts, responses):
    """The benchmark's rule-based reward: the share of ASCII lowercase letters in the response."""
    return [sum("a" <= c <= "z" for c in r) / max(1, len(r)) for r in responses]


def shapes(quick: bool, device: torch.device, model: str | None = None) -> dict:
    if model:  # a real model (issue 18's step): 8 prompts x 4 samples, up to 64 new tokens, NF4 + LoRA r = 16
        return dict(model=model, prompts=32, group=4, prompt_tokens=None, new_tokens=64, lora_r=16, micro=8)
    if device.type == "cuda":
        return dict(model="llama-1b", prompts=64, prompt_tokens=128, new_tokens=128, lora_r=16, micro=16)
    if quick:
        return dict(model="tiny-llama", prompts=8, prompt_tokens=32, new_tokens=16, lora_r=8, micro=8)
    return dict(model="small-llama-32k", prompts=16, prompt_tokens=64, new_tokens=32, lora_r=16, micro=8)


def make_prompts(n: int, length: int) -> list[str]:
    """n distinct prompts of `length` bytes (one token each for the byte tokenizer)."""
    base = "Describe the weather in a city you like, and say why you like it. "
    return [(f"{i}: " + base * (length // len(base) + 1))[:length] for i in range(n)]


def run_provider(provider: str, shape: dict, args, device: torch.device, out_dir: str) -> list[dict]:
    from rlhf_engine.stages.ppo import train_ppo
    from rlhf_engine.stages.ppo_config import ppo_preset

    prompts_file = f"{out_dir}/prompts.jsonl"
    if shape["prompt_tokens"] is None:  # a real (chat) model: the pipeline world's situations
        from rlhf_engine.pipeline import world

        prompts = world.prompts()
    else:
        prompts = make_prompts(shape["prompts"] * (args.steps + 1), shape["prompt_tokens"] - 1)
    with open(prompts_file, "w") as f:
        f.write("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    # the same number of sequences either way; a real model samples `group` responses per prompt in both modes
    k = shape.get("group") or (1 if args.advantage == "gae" else args.group_size)
    config = ppo_preset(
        "default", out=f"{out_dir}/{provider}", prompts=prompts_file, reward_fn="bench.bench_ppo_step:reward",
        eval_fraction=0.0, eval_every=0, max_steps=args.steps + 1, checkpoint_every=10**9, progress=False,
        backend=provider, rollout_batch_size=shape["prompts"] // k, samples_per_prompt=k, advantage=args.advantage,
        forward_batch_size=shape["micro"], minibatch_size=shape["prompts"], micro_batch_size=shape["micro"], ppo_epochs=1,
        stack=dict(model=shape["model"], lora_r=shape["lora_r"], lora_alpha=2 * shape["lora_r"], device=device.type),
        sampling=dict(max_new_tokens=shape["new_tokens"], temperature=1.0,
                      max_prompt_length=shape["prompt_tokens"] or 256, cache=args.cache),
    )  # fmt: skip
    train_ppo(config)
    with open(f"{config.out}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["step"] >= 2]  # step 1 warms up (allocator, compiles, caches)


def main(argv: list[str] | None = None) -> int:
    parser = trainer_step_parser("python -m bench ppo_step", __doc__, default_steps=2)
    parser.add_argument("--advantage", default="gae", choices=("gae", "grpo", "drgrpo", "rloo"),
                        help="gae: PPO with a value adapter; grpo / drgrpo / rloo: critic-free (no value adapter)")
    parser.add_argument("--group-size", type=int, default=4,
                        help="responses per prompt for the critic-free modes (prompts / group-size prompts)")
    parser.add_argument("--cache", default="dynamic", choices=("dynamic", "static"),
                        help="generation's KV cache: dynamic, or transformers' StaticCache (+ torch.compile on CUDA)")
    args, providers, device = trainer_step_args(parser, argv)
    shape = shapes(args.quick, device, args.model)
    meta = {"device": device_name(device), "versions": versions(), "date": _dt.date.today().isoformat()}
    yardstick = 4 * bf16_weight_bytes(shape["model"]) / 2**20  # policy, reference, value, reward as bf16
    print(f"# ppo_step ({args.advantage}) on {meta['device']} | {meta['versions']} | {meta['date']}")
    print(f"# {shape}; four bf16 models' weights alone: {yardstick:.0f} MiB")
    print(f"{'provider':9} {'generate s':>11} {'score s':>9} {'logprobs s':>11} {'train s':>9} {'step s':>8} "
          f"{'tokens/s':>9} {'peak MiB':>9} {'x 4xbf16':>9}")  # fmt: skip
    out_rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        for provider in providers:
            rows = run_provider(provider, shape, args, device, tmp)
            med = {k: statistics.median(r[k] for r in rows) for k in PHASES + ("tokens_per_s", "peak_mem_mib")}
            step_s = sum(med[k] for k in PHASES)
            row = {"op": "ppo_step", "provider": provider, "shape": shape, "cache": args.cache,
                   "advantage": args.advantage, **med,
                   "step_s": step_s, "non_generation_s": step_s - med["time_generate_s"],
                   "four_bf16_weights_mib": yardstick, "x_four_bf16_weights": med["peak_mem_mib"] / yardstick,
                   "steps_timed": len(rows), **meta}  # fmt: skip
            out_rows.append(row)
            print(f"{provider:9} {med['time_generate_s']:11.3f} {med['time_score_s']:9.3f} "
                  f"{med['time_logprobs_s']:11.3f} {med['time_train_s']:9.3f} {step_s:8.3f} "
                  f"{med['tokens_per_s']:9.1f} {med['peak_mem_mib']:9.0f} {row['x_four_bf16_weights']:9.2f}")  # fmt: skip
    if len(out_rows) == 2:
        a, t = out_rows
        print(f"# non-generation phases: torch / auto = {t['non_generation_s'] / a['non_generation_s']:.2f}x")
    if args.json:
        write_rows(args.json, out_rows)
    return 0

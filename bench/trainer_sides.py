"""One side of `python -m bench trainers` (bench_trainers.py runs the processes and writes the report):
the settings both sides share, the inputs made once (the base directory, the data, the initial adapters),
our trainer's step (run_ours), and the worker entry every child process runs (`python -m
bench.trainer_sides --worker SPEC`: ours here, TRL's through bench.trl_peer in the peer environment)."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEER_PYTHON = os.path.join(ROOT, ".venv-bench", "bin", "python")
KINDS = ("dpo", "dpo_precomputed", "grpo", "grpo_kl", "sft", "rm", "ppo")
SEPARATOR = "\n"  # ours joins prompt and completion with it (rlhf_engine.datasets.layout.format_sample); TRL gets prompt + it
INIT_B_STD = 2e-3  # LoRA B of the shared initial policy adapter: a few % of the base's output, so policy != reference
LR = 1e-5  # the same constant rate on both sides (its value does not change the time of a step)
DPO_BETA = 0.1
GRPO_KL_BETA = 0.04  # DeepSeekMath's beta, for the grpo_kl kind
SEED = 0
POLL_S = 0.05  # how often the parent reads a child's VmHWM


def shapes(quick: bool) -> dict:
    """Per-step sizes. CPU: small-llama-32k (H = 256, V = 32000: the vocabulary is a real share of a step),
    8 pairs / examples x (64 prompt + 64 completion) tokens in micro-batches of 4; GRPO 4 prompts x 4
    generations x 32 new tokens after 64 prompt tokens in micro-batches of 8 (as bench ppo_step --advantage
    grpo). --quick: tiny-llama and a few tokens (a smoke run)."""
    if quick:
        return dict(model="tiny-llama", pairs=4, prompt_tokens=16, completion_tokens=8, micro=2, prompts=2, group=2,
                    new_tokens=4, seq_micro=2, lora_r=16, lora_alpha=32)  # fmt: skip
    return dict(model="small-llama-32k", pairs=8, prompt_tokens=64, completion_tokens=64, micro=4, prompts=4, group=4,
                new_tokens=32, seq_micro=8, lora_r=16, lora_alpha=32)  # fmt: skip


def samples_per_step(kind: str, shape: dict) -> int:
    """Pairs (dpo, rm), examples (sft) or sequences (grpo, ppo) in one optimizer step."""
    if kind in ("grpo", "grpo_kl", "ppo"):
        return shape["prompts"] * shape["group"]
    return shape["pairs"]


def reward(prompts, responses):
    """The GRPO / PPO reward of both sides: the share of ASCII lowercase letters in the response."""
    return [sum("a" <= c <= "z" for c in r) / max(1, len(r)) for r in responses]


# --------------------------------------------------------------------------------------------------
# Inputs made once: the base directory, the data, the shared initial adapters
# --------------------------------------------------------------------------------------------------
def _text(prefix: str, base: str, n: int) -> str:
    return (prefix + base * (n // max(1, len(base)) + 1))[:n]


def write_data(work: str, shape: dict, n_steps: int) -> dict:
    """JSONL files of both sides. With the byte tokenizer a sample is exactly prompt_tokens (prompt_tokens - 1
    bytes + the newline) + completion_tokens (completion_tokens - 1 bytes + EOS) tokens. DPO, RM and SFT get
    exactly one batch of records, so every step (the first included) sees the same set on both sides."""
    P, C = shape["prompt_tokens"] - 1, shape["completion_tokens"] - 1
    ask = "Describe the weather in a city you like, and say why you like it. "
    pairs = [{"prompt": _text(f"{i}: ", ask, P), "chosen": _text("", "Sunny and warm. ", C),
              "rejected": _text("", "RAIN AND COLD. ", C)} for i in range(shape["pairs"])]  # fmt: skip
    files = {"pairs": os.path.join(work, "pairs.jsonl"), "sft": os.path.join(work, "sft.jsonl"),
             "prompts": os.path.join(work, "prompts.jsonl")}  # fmt: skip
    with open(files["pairs"], "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    with open(files["sft"], "w") as f:
        f.writelines(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in pairs)
    with open(files["prompts"], "w") as f:  # distinct prompts for every step (as bench ppo_step)
        f.writelines(json.dumps({"prompt": _text(f"{i}: ", ask, P)}) + "\n"
                     for i in range(shape["prompts"] * shape["group"] * n_steps))  # fmt: skip
    return files


def write_pair_ids(work: str, model: str, files: dict) -> dict:
    """The reward model's pairs as our RM stage lays them out (rlhf_engine.datasets.samples.encode_pairs: the
    chat template where the tokenizer has one, ending at the end-of-turn token), written as TRL's processed
    records (chosen_ids / rejected_ids), so that TRL's RewardTrainer scores the very sequences ours does: a
    conversational record is rendered by TRL with a newline after the end-of-turn token, and its classifier
    reads the last token, so the two sides would score different positions. Also the pad id TRL's model must
    use: one no pair contains (with pad == EOS, as SmolLM2's <|im_end|>, transformers' sequence classifier
    would score the last token that is not EOS, i.e. skip the end-of-turn token ours scores)."""
    from transformers import AutoTokenizer

    from rlhf_engine.datasets.feedback import build_pairs, load_feedback
    from rlhf_engine.datasets.samples import encode_pairs

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # as rlhf_engine.model.loading
    pairs, _ = build_pairs(load_feedback(files["pairs"]))  # read as the RM stage reads them
    encoded = encode_pairs(tok, pairs, max_length=sys.maxsize)
    used = {i for (c, _), (r, _) in encoded for i in c + r}
    pad = tok.pad_token_id if tok.pad_token_id not in used else min(set(range(len(tok))) - used)
    path = os.path.join(work, "pair_ids.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"chosen_ids": c, "rejected_ids": r}) + "\n" for (c, _), (r, _) in encoded)
    return {**files, "pair_ids": path, "pair_pad_id": pad}


def save_preset(name: str, out_dir: str) -> None:
    """A MODEL_PRESETS base (seed SEED) written with save_pretrained, as the engine builds its presets."""
    from rlhf_engine.model.loading import build_preset  # the engine's own writer: the same base as --model NAME

    build_preset(name, SEED, out_dir)


def stack_overrides(model: str, shape: dict, adapters: tuple) -> dict:
    return dict(model=model, quantization="nf4", compute_dtype="float32", device="cpu", lora_r=shape["lora_r"],
                lora_alpha=shape["lora_alpha"], lora_dropout=0.0, target_modules="all-linear", adapters=adapters,
                seed=SEED, fused_layers=shape.get("fused_layers", True))  # fmt: skip  (the bench measures ours fused)


def write_initial_adapters(work: str, model: str, shape: dict, roles: set) -> dict:
    """The initial weights both sides start from, saved as our stack directories: the policy adapter (fresh
    LoRA A, B ~ N(0, INIT_B_STD^2), seeded) and the fresh reward adapter + head that train_reward_model
    builds (ModelStack.build seeds its init from the stack seed)."""
    import torch

    import rlhf_engine as rl

    out = {role: os.path.join(work, f"init-{role}") for role in sorted(roles)}
    if "policy" in roles:
        stack = rl.ModelStack.build(rl.StackConfig(**stack_overrides(model, shape, ("policy",))))
        gen = torch.Generator().manual_seed(SEED)
        with torch.no_grad():
            for name, p in stack.named_role_parameters("policy"):
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * INIT_B_STD)
        stack.save(out["policy"], roles=("policy",))
        del stack
    if "reward" in roles:
        stack = rl.ModelStack.build(rl.StackConfig(**stack_overrides(model, shape, ("reward",))))
        stack.save(out["reward"], roles=("reward",))
    return out


# --------------------------------------------------------------------------------------------------
# Our side (a child process in this environment)
# --------------------------------------------------------------------------------------------------
def run_ours(spec: dict) -> dict:
    """Our trainer for spec["kind"] through the stable API; -> per-step times, peaks, losses."""
    import rlhf_engine as rl

    kind, sh, files = spec["kind"], spec["shape"], spec["data"]
    n_steps = spec["warmup"] + spec["steps"]
    max_length = 4 * (sh["prompt_tokens"] + sh["completion_tokens"])  # no truncation on either side
    common = dict(out=spec["out"], seed=SEED, progress=False, checkpoint_every=10**9, log_every=1, lr=LR,
                  max_grad_norm=1.0, weight_decay=0.0)  # fmt: skip
    model = spec["model"]
    if kind in ("dpo", "dpo_precomputed"):
        rl.train_dpo(rl.dpo_preset(
            "default", data=files["pairs"], eval_fraction=0.0, eval_every=0, max_steps=n_steps,
            batch_size=sh["pairs"], micro_batch_size=sh["micro"], bucket_window=1, max_length=max_length,
            warmup_steps=0, loss_type="dpo", beta=DPO_BETA, precompute_ref_logps=kind == "dpo_precomputed",
            init_adapter=spec["init"]["policy"], reference="base",
            stack=stack_overrides(model, sh, ("policy",)), **common,
        ))  # fmt: skip
    elif kind == "sft":
        rl.train_sft(rl.sft_preset(
            "default", data=files["sft"], eval_fraction=0.0, eval_every=0, max_steps=n_steps, batch_size=sh["pairs"],
            micro_batch_size=sh["micro"], bucket_window=1, max_length=max_length, warmup_steps=0,
            init_adapter=spec["init"]["policy"], stack=stack_overrides(model, sh, ("policy",)), **common,
        ))  # fmt: skip
    elif kind == "rm":
        rl.train_reward_model(rl.reward_preset(
            "default", data=files["pairs"], eval_fraction=0.0, eval_every=0, max_steps=n_steps,
            batch_size=sh["pairs"], max_length=max_length, stack=stack_overrides(model, sh, ("reward",)), **common,
        ))  # fmt: skip
    elif kind in ("grpo", "grpo_kl", "ppo"):
        group = kind != "ppo"
        k = sh["group"] if group else 1
        n_prompts = sh["prompts"] if group else sh["prompts"] * sh["group"]  # ppo: the same sequences, one each
        extra = dict(advantage="grpo", kl_coef=GRPO_KL_BETA if kind == "grpo_kl" else 0.0, kl_estimator="k3",
                     kl_in="loss", loss_agg="token_mean") if group else dict(advantage="gae")  # fmt: skip
        rl.train_ppo(rl.ppo_preset(
            "default", prompts=files["prompts"], reward_fn=("bench.bench_trainers:reward",), eval_fraction=0.0,
            eval_every=0, max_steps=n_steps, samples_per_prompt=k, rollout_batch_size=n_prompts,
            forward_batch_size=sh["seq_micro"], minibatch_size=n_prompts * k, micro_batch_size=sh["seq_micro"],
            ppo_epochs=1, clip_low=0.2, clip_high=0.2, init_adapter=spec["init"]["policy"], reference="base",
            stack=stack_overrides(model, sh, ("policy",) if group else ("policy", "value")),
            sampling=dict(max_new_tokens=sh["new_tokens"], temperature=1.0, top_k=0, top_p=1.0,
                          max_prompt_length=max_length, cache="dynamic"),
            **extra, **common,
        ))  # fmt: skip
    else:
        raise ValueError(f"kind {kind!r}")
    with open(os.path.join(spec["out"], "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f) if r.get("step", 0) >= 1}
    steps = []
    for k in sorted(rows):
        row = rows[k]
        wall = row["elapsed_s"] - rows[k - 1]["elapsed_s"] if k - 1 in rows else None  # step 1: no earlier row
        steps.append({"step": k, "wall_s": wall, "peak_mib": row.get("peak_mem_mib"),
                      "generate_s": row.get("time_generate_s"), "loss": row.get("loss"),
                      "response_length": row.get("response_length"), "engine_step_s": row.get("step_s"),
                      "old_logprobs_s": row.get("time_old_logprobs_s"),
                      "ref_logprobs_s": row.get("time_ref_logprobs_s")})  # fmt: skip
    with open(os.path.join(spec["out"], "result.json")) as f:
        peak = json.load(f).get("peak_rss_mib")  # the whole run's, every step's peak folded in
    return {"status": "ok", "steps": steps, "reported_peak_mib": peak}


# --------------------------------------------------------------------------------------------------
# Worker entry: python -m bench.trainer_sides --worker SPEC | --probe OUT (run by main, never by hand)
# --------------------------------------------------------------------------------------------------
def worker(argv: list[str]) -> int:
    if argv[:1] == ["--probe"]:
        from bench.trl_peer import probe

        with open(argv[1], "w") as f:
            json.dump(probe(), f)
        return 0
    with open(argv[1]) as f:
        spec = json.load(f)
    if spec["side"] == "ours":
        # before torch, as the engine's own command line does: it sets its OpenMP wait policy while
        # libgomp is not yet loaded (rlhf_engine.core.threads); TRL's side runs with the library default
        import rlhf_engine  # noqa: F401
    policy = os.environ.get("OMP_WAIT_POLICY") or "default"  # what libgomp reads when torch loads it
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["side"] == "trl":
        from bench.trl_peer import run_trl

        result = run_trl(spec)
    else:
        result = run_ours(spec)
    result["omp_wait_policy"] = policy
    if spec["side"] == "ours":  # which allocator served its large CPU tensors (rlhf_engine.core.allocator)
        from rlhf_engine.core.allocator import cpu_allocator_stats

        result["cpu_allocator"] = "caching" if cpu_allocator_stats() else "system"
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))

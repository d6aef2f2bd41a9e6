"""The engine's command line; one subcommand per stage, and the pipeline of them all.

    python -m engine pipeline --quick
    python -m engine sft --model tiny-llama --out runs/sft
    python -m engine rm --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/rm
    python -m engine dpo --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/dpo
    python -m engine ppo --preset tiny --reward-fn MODULE:FUNCTION --out runs/ppo
    python -m engine eval --policy runs/ppo --reward-fn MODULE:FUNCTION
    python -m engine cai revise --model tiny-llama --out runs/cai-sft
    python -m engine cai label --model tiny-llama --out runs/cai-prefs

Every error a user can act on prints one `error: ...` line, never a traceback. Exit status: 0 done;
2 a bad option, path, config, data line or checkpoint, or OUT in use by another run; 3 the run
stopped on a non-finite loss, gradient norm or weight (the last good checkpoint is kept); 130
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import sys

from rlhf_engine.cli import stage_config
from rlhf_engine.config import MODEL_PRESETS, REWARD_PRESETS, ConfigError, EngineError, RewardConfig, reward_preset

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's status for SIGINT


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of the CLI."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _add_rm(sub) -> None:
    d = RewardConfig()
    p = sub.add_parser(
        "rm",
        help="train a reward model from pairwise or ranked feedback",
        description=(
            "Train the reward adapter + scalar head on one (4-bit) base from a feedback JSONL file "
            "(pairwise {prompt, chosen, rejected} and/or ranked {prompt, completions, rankings}; see README). "
            "Ranked records become the C(n,2) pairs of the labelers' mean-rank consensus; labelers whose "
            "Kendall tau with the consensus is below --agreement-threshold are flagged in OUT/labelers.json. "
            "Writes OUT/adapter_reward.safetensors, OUT/heads.safetensors, OUT/stack.json, OUT/metrics.jsonl, "
            "OUT/result.json and OUT/checkpoint.pt; rerunning with the same OUT resumes from the checkpoint "
            "(refused when the config or the data file's content changed). OUT is locked while a run uses it."
        ),
        epilog=(
            "example: python -m engine rm --data examples/feedback_ranked.jsonl --model tiny-llama "
            "--out runs/rm --preset tiny"
        ),
    )
    p.add_argument("--data", required=True, help="feedback JSONL file")
    p.add_argument(
        "--model", required=True,
        help=f"a preset ({', '.join(MODEL_PRESETS)}) or a local save_pretrained directory: a causal LM "
        "(gets a LoRA reward adapter + head) or a ...ForSequenceClassification model with num_labels=1 "
        "(trained whole)",
    )
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument(
        "--preset", default="default", choices=sorted(REWARD_PRESETS),
        help="training preset the flags below override (default: default; tiny: CPU smoke run)",
    )
    p.add_argument("--epochs", type=int, help=f"passes over the training pairs (default preset: {d.epochs})")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, help=f"preference pairs per step (default preset: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default preset: {d.lr})")
    p.add_argument(
        "--max-length", type=int,
        help=f"tokens per prompt+completion, the end is kept (default preset: {d.max_length})",
    )
    p.add_argument(
        "--margin", type=float,
        help="margin added to every pair in -log sigmoid(s_chosen - s_rejected - margin) (default: 0)",
    )
    p.add_argument(
        "--eval-fraction", type=float,
        help=f"share of prompts held out for accuracy (default preset: {d.eval_fraction})",
    )
    p.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (0: at the end)")
    p.add_argument(
        "--checkpoint-every", type=int,
        help=f"checkpoint every N steps (default preset: {d.checkpoint_every})",
    )
    p.add_argument(
        "--agreement-threshold", type=float,
        help=f"flag labelers with Kendall tau below this (default: {d.agreement_threshold})",
    )
    p.add_argument(
        "--exclude-flagged", action="store_true", default=None,
        help="leave flagged labelers out of the consensus",
    )
    p.add_argument("--quantization", choices=["nf4", "none"], help="base weights: 4-bit NF4 (default) or unquantized")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: auto)")
    p.add_argument("--lora-r", type=int, help=f"LoRA rank (default: {d.stack.lora_r})")
    p.add_argument("--seed", type=int, help="seed of the split, data order and init, 0 <= seed < 2**63 (default: 0)")
    p.add_argument(
        "--no-resume", dest="resume", action="store_false", default=None,
        help="start over: delete OUT/checkpoint.pt instead of resuming from it",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None,
        help="no progress bars (transformers' and huggingface_hub's loading bars included)",
    )
    p.set_defaults(func=_run_rm)


def _rm_config(args) -> RewardConfig:
    fields = (
        "epochs", "max_steps", "batch_size", "lr", "max_length", "margin", "eval_fraction", "eval_every",
        "checkpoint_every", "agreement_threshold", "exclude_flagged", "seed", "resume", "progress",
    )
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    stack = {"model": args.model, "adapters": ("reward",)}
    if args.quantization is not None:
        stack["quantization"] = None if args.quantization == "none" else args.quantization
    if args.device is not None:
        stack["device"] = args.device
    if args.lora_r is not None:
        stack["lora_r"] = args.lora_r
        stack["lora_alpha"] = 2 * args.lora_r
    if args.seed is not None:
        stack["seed"] = args.seed
    return reward_preset(args.preset, data=args.data, out=args.out, stack=stack, **overrides).validate()


def _run_rm(args) -> int:
    config = _rm_config(args)  # config and data are checked before the heavy imports: a typo fails fast
    from rlhf_engine.feedback import load_feedback

    load_feedback(config.data)
    from rlhf_engine.reward import train_reward_model

    result = train_reward_model(config)
    acc = "n/a" if result.eval_accuracy is None else f"{result.eval_accuracy:.3f}"
    print(
        f"rm: {result.steps} steps ({result.train_pairs} train pairs), held-out accuracy {acc} "
        f"on {result.eval_pairs} pairs; flagged labelers: {', '.join(result.flagged_labelers) or 'none'}; "
        f"saved to {result.out}"
    )
    return 0


def _add_ppo(sub) -> None:
    from rlhf_engine.cli import add_stage
    from rlhf_engine.config import PPO_PRESETS

    p = add_stage(
        sub, "ppo", PPO_PRESETS, _run_ppo, adjust=_group_size,
        help="RLHF with PPO: the policy and value adapters against a reward, with a KL penalty",
        description=(
            "PPO on one (4-bit) base: the LoRA policy and value adapters train; the reference is the bare base "
            "or a frozen copy of --init-adapter; the reward is an `engine rm` output (--reward-model), a "
            "classifier directory (--reward-classifier) or a Python function (--reward-fn MODULE:FUNCTION or "
            "PATH.py:FUNCTION, score(prompts, responses) -> list[float]). Log-probs, the exact full-vocabulary "
            "KL, GAE, whitening and the losses run on rlhf_kernels. Writes OUT/metrics.jsonl (one row per step), "
            "the adapters, OUT/eval_prompts.jsonl and OUT/checkpoint.pt; rerunning with the same OUT resumes. "
            "Settings come from the preset, then --config FILE (JSON/YAML of these fields, stack and sampling "
            "nested), then the flags. Batch sizes are global (all data-parallel ranks together)."
        ),
        epilog=(
            "example: python -m engine ppo --preset tiny --reward-fn tests/_reward_fns.py:lowercase_share "
            "--out runs/ppo --max-steps 20"
        ),
    )  # fmt: skip
    p.add_argument("--group-size", type=int, metavar="K",
                   help="responses per prompt: the group of grpo / drgrpo / rloo (= --samples-per-prompt)")


def _group_size(args, data: dict) -> None:
    """--group-size is --samples-per-prompt under the name the group estimators use."""
    if args.group_size is not None:
        if args.samples_per_prompt not in (None, args.group_size):
            raise ConfigError(f"--group-size {args.group_size} and --samples-per-prompt {args.samples_per_prompt} "
                              "name the same thing; give one")  # fmt: skip
        data["samples_per_prompt"] = args.group_size


def _run_ppo(args) -> int:
    config = stage_config(args)  # config, files and reward spec are checked before the heavy imports
    if config.prompts:
        from rlhf_engine.jsonl import load_prompts

        load_prompts(config.prompts)
    from rlhf_engine.ppo import train_ppo

    r = train_ppo(config)
    stop = " (reward threshold reached)" if r.stopped_at_threshold else ""
    ev = "n/a" if r.eval_reward_mean is None else f"{r.eval_reward_mean:.4f}"
    if os.environ.get("RANK", "0") == "0":  # one summary line per job (torchrun starts one process per rank)
        print(f"ppo: {r.steps} steps{stop}, held-out reward {ev} on {r.eval_prompts} prompts; saved to {r.out}")
    return 0


def _add_eval(sub) -> None:
    from rlhf_engine.cli import add_config_flags
    from rlhf_engine.config import EvalConfig, SamplingConfig

    d = EvalConfig()
    p = sub.add_parser(
        "eval",
        help="before/after: the reference vs the trained policy on held-out prompts",
        description=(
            "The reference and the trained policy of a saved stack (an `engine ppo` output) answer the same "
            "held-out prompts (--prompts, else the run's OUT/eval_prompts.jsonl) with the same randomness; each "
            "reward source scores both (the policy directory's reward adapter when no source is given), sampling as "
            "the training run did (POLICY/config.json) unless the sampling flags say otherwise. Prints "
            "the table (mean scores, exact KL to the reference, response length) and a few completions side "
            "by side, and writes it to --out (default POLICY/eval.json)."
        ),
        epilog="example: python -m engine eval --policy runs/ppo --reward-fn tests/_reward_fns.py:lowercase_share",
    )
    top = add_config_flags(p, EvalConfig, d)
    sampling = add_config_flags(p.add_argument_group("sampling"), SamplingConfig, d.sampling)
    p.set_defaults(func=_run_eval, flags={"top": top, "sampling": sampling})


def _run_eval(args) -> int:
    import dataclasses

    from rlhf_engine.cli import given
    from rlhf_engine.config import EvalConfig

    from rlhf_engine.evaluate import trained_sampling

    base = EvalConfig()
    if getattr(args, "policy", None):
        base = dataclasses.replace(base, sampling=trained_sampling(args.policy) or base.sampling)
    config = dataclasses.replace(
        base, **given(args, args.flags["top"]),
        sampling=dataclasses.replace(base.sampling, **given(args, args.flags["sampling"])),
    ).validate()  # fmt: skip
    from rlhf_engine.evaluate import evaluate, format_report

    print(format_report(evaluate(config)))
    return 0


def _add_cai(sub) -> None:
    p = sub.add_parser(
        "cai",
        help="Constitutional AI: critique -> revision -> SFT data; AI preference labels -> RM / DPO data",
        description=(
            "Constitutional AI (Bai et al. 2022) on one (4-bit) base. `cai revise`: the model answers each prompt, "
            "critiques its answer against a principle of the constitution and revises it -> OUT/sft.jsonl "
            "({prompt, completion}, for `engine sft`) and OUT/transcript.jsonl. `cai label`: the model samples "
            "several completions per prompt and a judge model says which better follows a principle, read from "
            "its choice-token log-probs in both orders -> OUT/preferences.jsonl (pairwise feedback for `engine rm` "
            "and `engine dpo`) and OUT/judgements.jsonl."
        ),
        epilog="example: python -m engine cai revise --preset tiny --out runs/cai-sft (see `cai revise --help`)",
    )
    stages = p.add_subparsers(dest="cai_stage", required=True, metavar="STAGE")
    _add_cai_stage(
        stages, "revise", _run_cai_revise,
        help="answer, critique against a principle, revise -> OUT/sft.jsonl, OUT/transcript.jsonl",
        description=(
            "For each prompt (--prompts JSONL of {prompt}; default: the embedded red-team prompts) the model (the "
            "base, or --init-adapter's policy on it) answers; then, for --rounds rounds, it critiques the current "
            "response against a principle drawn per prompt and round (seeded) from --constitution (JSONL of "
            "{critique_request, revision_request, choice_question}; default: the shipped one) and revises it, "
            "through the critique and revision templates (text files with {field} placeholders; defaults ship). "
            "Writes OUT/sft.jsonl ({prompt, completion}: the prompt and its final revision), OUT/transcript.jsonl "
            "(answer, then principle, critique and revision per round), OUT/metrics.jsonl, OUT/result.json, "
            "OUT/config.json and OUT/checkpoint.pt; rerunning with the same OUT resumes after the last "
            "checkpointed batch. The datasets are written once, atomically, when every prompt is done. Settings "
            "come from the preset, then --config FILE (JSON/YAML, stack and sampling nested), then the flags."
        ),
        epilog=("example: python -m engine cai revise --preset tiny --model tiny-llama --out runs/cai-sft "
                "--max-prompts 8"),
    )  # fmt: skip
    _add_cai_stage(
        stages, "label", _run_cai_label,
        help="AI preference labels from a judge's choice-token log-probs -> OUT/preferences.jsonl",
        description=(
            "For each prompt the model samples --samples-per-prompt completions; for every pair of distinct ones a "
            "judge (--judge: a preset or a save_pretrained directory; default: the answering policy itself) answers "
            "the prompt's drawn choice question of the constitution as a multiple-choice question (the judge "
            "template), once with each completion as option A. Its log-probs of the two choice tokens (--choices) "
            "at the question's last position give the preference; the two orders' log-odds are averaged, which "
            "cancels a position bias. Writes OUT/preferences.jsonl ({prompt, chosen, rejected, margin}, margin = "
            "--margin-scale x |log-odds|: what `engine rm --data` and `engine dpo` read), OUT/judgements.jsonl "
            "(log-probs and probabilities per pair), metrics, result and checkpoint as `cai revise` does."
        ),
        epilog=(
            "example: python -m engine cai label --preset tiny --model tiny-llama --out runs/cai-prefs; then "
            "python -m engine rm --data runs/cai-prefs/preferences.jsonl --model tiny-llama --out runs/rm"
        ),
    )  # fmt: skip


def _add_cai_stage(stages, name, func, *, help, description, epilog) -> None:
    from rlhf_engine.cli import add_stage
    from rlhf_engine.config import CAI_PRESETS

    add_stage(stages, name, CAI_PRESETS[name], func, help=help, description=description, epilog=epilog)


def _run_cai_revise(args) -> int:
    config = stage_config(args)
    from rlhf_engine.constitution import revise_inputs

    revise_inputs(config)  # prompts, constitution and templates are checked before the heavy imports
    from rlhf_engine.cai import cai_revise

    r = cai_revise(config)
    print(f"cai revise: {r.prompts} prompts -> {r.sft_records} SFT records ({r.empty_revisions} empty revisions "
          f"left out); wrote {', '.join(r.files)}")  # fmt: skip
    return 0


def _run_cai_label(args) -> int:
    config = stage_config(args)
    from rlhf_engine.constitution import label_inputs

    label_inputs(config)  # prompts, constitution and the judge template are checked before the heavy imports
    from rlhf_engine.cai import cai_label

    r = cai_label(config)
    agree = "n/a" if r.consistent_fraction is None else f"{r.consistent_fraction:.3f}"
    print(f"cai label: {r.prompts} prompts, {r.comparisons} comparisons (both orders agree on {agree}) -> "
          f"{r.preference_records} preference records; wrote {', '.join(r.files)}")  # fmt: skip
    return 0


def _add_sft(sub) -> None:
    from rlhf_engine.cli import add_stage
    from rlhf_engine.config import SFT_PRESETS

    add_stage(
        sub, "sft", SFT_PRESETS, _run_sft,
        help="supervised fine-tuning of the policy adapter on prompt -> completion data",
        description=(
            "SFT of the LoRA policy adapter on one (4-bit) base: the token mean of -log p over completion tokens "
            "only, from hidden states through rlhf_kernels.linear_logprobs (no [N, V] logits), length-bucketed "
            "batches. Data: JSONL {\"prompt\", \"completion\"} or {\"messages\": [{\"role\", \"content\"}, ...]} "
            "(the tokenizer's chat template; the last message, the assistant's, trains); without --data the "
            "embedded corpus. Whole prompts are held out for the held-out loss. Writes OUT/adapter_policy.safetensors "
            "+ OUT/stack.json (the --init-adapter of ppo and dpo), OUT/metrics.jsonl, OUT/result.json and "
            "OUT/checkpoint.pt; rerunning with the same OUT resumes. Settings: the preset, then --config FILE, "
            "then the flags."
        ),
        epilog="example: python -m engine sft --model tiny-llama --out runs/sft --preset tiny",
    )  # fmt: skip


def _run_sft(args) -> int:
    config = stage_config(args)  # config and data are checked before a model loads
    from rlhf_engine.sft import load_sft_data, train_sft

    load_sft_data(config.data)
    r = train_sft(config)
    show = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"sft: {r.steps} steps ({r.train_examples} train examples), held-out loss {show(r.eval_loss_start)} -> "
          f"{show(r.eval_loss)} on {r.eval_examples} examples; saved to {r.out}")  # fmt: skip
    return 0


def _add_dpo(sub) -> None:
    from rlhf_engine.cli import add_stage
    from rlhf_engine.config import DPO_PRESETS

    add_stage(
        sub, "dpo", DPO_PRESETS, _run_dpo,
        help="DPO / IPO / conservative DPO of the policy adapter from preference data",
        description=(
            "Direct preference optimisation of the LoRA policy adapter on one (4-bit) base: --loss-type dpo "
            "(-log sigmoid(beta m)), ipo ((m - 1/(2 beta))^2) or cdpo (label smoothing), m = (log pi_c - log ref_c) "
            "- (log pi_r - log ref_r). The reference is the bare base, or a frozen copy of --init-adapter "
            "(--reference). Data: the feedback JSONL of `engine rm` (pairwise, ranked or thumbs; see README). "
            "Sequence log-probs from hidden states through rlhf_kernels.linear_logprobs, chosen and rejected in "
            "one forward. Writes OUT/adapter_policy.safetensors (+ adapter_reference) + OUT/stack.json, "
            "OUT/metrics.jsonl, OUT/labelers.json, OUT/result.json and OUT/checkpoint.pt; rerunning with the "
            "same OUT resumes. Settings: the preset, then --config FILE, then the flags."
        ),
        epilog=(
            "example: python -m engine dpo --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/dpo "
            "--preset tiny"
        ),
    )  # fmt: skip


def _run_dpo(args) -> int:
    config = stage_config(args)  # config and data are checked before a model loads
    from rlhf_engine.dpo import check_completions
    from rlhf_engine.feedback import load_feedback

    check_completions(load_feedback(config.data), config.data)
    from rlhf_engine.dpo import train_dpo

    r = train_dpo(config)
    acc = "n/a" if r.eval_accuracy is None else f"{r.eval_accuracy:.3f}"
    print(f"dpo ({config.loss_type}, reference {r.reference}): {r.steps} steps ({r.train_pairs} train pairs), "
          f"held-out accuracy {acc} on {r.eval_pairs} pairs; flagged labelers: "
          f"{', '.join(r.flagged_labelers) or 'none'}; saved to {r.out}")  # fmt: skip
    return 0


def _add_pipeline(sub) -> None:
    from rlhf_engine.cli import add_stage
    from rlhf_engine.config import PIPELINE_PRESETS

    p = add_stage(
        sub, "pipeline", PIPELINE_PRESETS, _run_pipeline,
        preset_help="default: at most 5 minutes on a 2-core CPU; quick: the test size, under 90 s",
        help="the whole RLHF story end to end: SFT -> feedback -> reward model -> PPO -> before/after",
        description=(
            "RLHF end to end on ONE (4-bit) base, each stage the engine's own: (1) SFT of the policy adapter on a "
            "corpus of prompts with helpful, dismissive and rude replies (the embedded world, or --data: JSONL of "
            "{\"prompt\", \"completion\"}); (2) n completions per training prompt from the SFT policy, ranked by "
            "simulated labelers who follow a hidden score plus noise (one misunderstood the instructions) -> "
            "OUT/feedback.jsonl; (3) the reward adapter on the consensus pairs, the odd labeler flagged and left "
            "out; (4) PPO of the policy against the RM with the exact KL penalty against a frozen copy of the SFT "
            "adapter; (5) held-out prompts, SFT vs PPO, scored by the hidden score, the toxicity rule and the RM. "
            "Writes OUT/report.json, OUT/report.md, OUT/curves.png and each stage's directory (OUT/sft, OUT/rm, "
            "OUT/ppo: metrics.jsonl, adapters, checkpoint); rerunning on the same OUT resumes every stage."
        ),
        epilog="example: python -m engine pipeline --quick --out runs/pipeline-quick",
    )  # fmt: skip
    p.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the quick preset: the test size (under 90 s on a 2-core CPU)")


def _run_pipeline(args) -> int:
    config = stage_config(args)  # config and data are checked before a model loads
    from rlhf_engine.pipeline import corpus_records, run_pipeline, split_corpus

    split_corpus(corpus_records(config), config.heldout_prompts, config.seed)
    from rlhf_engine.report import format_table

    report = run_pipeline(config)
    print(f"\n{format_table(report)}\n\npipeline: {report['total_seconds']:.0f} s; report in "
          f"{os.path.join(config.out, 'report.md')}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m engine",
        description="Kernel-backed RLHF engine: one 4-bit base serves the policy, reference, value and reward roles.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pipeline(sub)
    _add_sft(sub)
    _add_rm(sub)
    _add_ppo(sub)
    _add_eval(sub)
    _add_dpo(sub)
    _add_cai(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever the message
        return getattr(e, "exit_status", EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted; the same command resumes from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

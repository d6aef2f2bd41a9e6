"""The main job: the whole RLHF story end to end on ONE base (`python -m engine pipeline`, `make run`).

    python -m engine pipeline [--quick] [--out runs/pipeline] [--model DIR] [--data FILE]
                              [--device auto|cpu|cuda] [--seed N] [--kl-sweep]

Every stage is the engine's own stage (this module trains nothing itself; it wires them together):

    1. sft       the policy adapter on the corpus's prompt -> reply pairs, helpful, dismissive and rude
                 (pipeline.world), so the SFT policy answers in every register           -> OUT/sft/
    2. feedback  n completions per training prompt from the SFT policy; the simulated labelers rank
                 them by the hidden score plus noise, one of them backwards             -> OUT/feedback.jsonl
    3. rm        the reward adapter + head on the consensus pairs (datasets.feedback flags the odd
                 labeler and leaves it out)                                              -> OUT/rm/
    4. ppo       the policy (from the SFT adapter) and value adapters against the RM, with the exact
                 KL penalty against a frozen copy of the SFT adapter, until the held-out RM reward
                 reaches the labelers' favourite completions' mean or the step cap       -> OUT/ppo/
    5. eval      held-out prompts no stage trained on: the SFT policy (before) vs the PPO policy
                 (after), scored by the hidden score, the toxicity rule and the RM       -> OUT/eval.json
       sweep     with --kl-sweep: PPO again from the same SFT and RM per KL setting, each evaluated
                 the same way (pipeline.sweep)                                            -> OUT/sweep/
    6. report    OUT/report.json, OUT/report.md, OUT/curves.png, OUT/hacking.png (pipeline.report)

PPO logs the hidden score as its gold reward beside the RM at every held-out evaluation (never trained
on) and watches for over-optimisation (--on-overoptimization, algos.overoptimization).

OUT/data/ holds what the stages read: sft.jsonl, prompts.jsonl (training prompts), heldout.jsonl.
Rerunning on the same OUT resumes: each stage resumes from its own checkpoint, or returns at once
when it is done; OUT itself is locked while a pipeline uses it. A stage whose inputs changed starts
over, and so does everything downstream of it: a training stage's checkpoint records the hashes of
its inputs (its data, the starting adapter, the reward model) and refuses a resume when they differ
(StaleCheckpointError, caught here), and the feedback and the evaluation, which are not runs, are
reused only when the key of their inputs (OUT/pipeline.json) is the same. OUT/pipeline.json also keeps
each stage's seconds, so a rerun that reuses a stage reports the run that made it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.files import dumps, probe_writable, sha256_file, write_json, write_jsonl, writing
from ..core.lock import OutputLock
from ..core.order import epoch_seed, seeded_permutation
from ..core.progress import bar, hub_progress
from ..datasets.feedback import consensus_ranking, load_feedback
from ..datasets.layout import prompt_ids, stop_token_ids
from ..errors import ConfigError, StaleCheckpointError
from ..model.config import MODEL_PRESETS, SamplingConfig
from ..stages.eval_config import EvalConfig
from ..stages.ppo_config import PPOConfig
from ..stages.rm_config import RewardConfig
from ..stages.sft_config import SFTConfig
from . import world
from .pipeline_config import PipelineConfig, corpus_records, distinct_prompts, stack_config

DATA_DIR = "data"
FEEDBACK_FILE = "feedback.jsonl"
STATE_FILE = "pipeline.json"  # each stage's seconds, and the input keys of the feedback and the evaluation


@dataclass
class Corpus:
    """The prompts and SFT records of a run, split once: held-out prompts appear in no stage's data."""

    train_prompts: list[str]
    heldout_prompts: list[str]
    sft_records: list[dict]  # {"prompt", "completion"} of the training prompts only


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, under OUT."""

    out: str
    sft_data: str  # OUT/data/sft.jsonl: the SFT records of the training prompts
    prompts: str  # OUT/data/prompts.jsonl: the training prompts (PPO's)
    heldout: str  # OUT/data/heldout.jsonl: the held-out prompts (the evaluation's)
    feedback: str  # OUT/feedback.jsonl: what the labelers did (ranked records)
    sft: str  # OUT/sft/, OUT/rm/, OUT/ppo/: the stages' output directories
    rm: str
    ppo: str
    eval: str  # OUT/eval.json: the before/after evaluation

    @classmethod
    def under(cls, out: str) -> Paths:
        def at(*parts: str) -> str:
            return os.path.join(out, *parts)

        return cls(out=out, sft_data=at(DATA_DIR, "sft.jsonl"), prompts=at(DATA_DIR, "prompts.jsonl"),
                   heldout=at(DATA_DIR, "heldout.jsonl"), feedback=at(FEEDBACK_FILE), sft=at("sft"), rm=at("rm"),
                   ppo=at("ppo"), eval=at("eval.json"))  # fmt: skip


# ---- step 0: the corpus ------------------------------------------------------------------------------


def split_corpus(records: list[dict], heldout: int, seed: int) -> Corpus:
    """Distinct prompts in order of appearance; a seeded `heldout` of them (at most all but 2) held out."""
    prompts = distinct_prompts(records)
    k = min(heldout, len(prompts) - 2)
    held = set(seeded_permutation(len(prompts), seed, 0, name="pipeline-split")[:k])
    train = [p for i, p in enumerate(prompts) if i not in held]
    train_set = set(train)
    return Corpus(train_prompts=train, heldout_prompts=[p for i, p in enumerate(prompts) if i in held],
                  sft_records=[r for r in records if r["prompt"] in train_set])  # fmt: skip


def write_corpus(corpus: Corpus, paths: Paths) -> None:
    write_jsonl(paths.sft_data, corpus.sft_records)
    write_jsonl(paths.prompts, [{"prompt": p} for p in corpus.train_prompts])
    write_jsonl(paths.heldout, [{"prompt": p} for p in corpus.heldout_prompts])


# ---- the stages' configs: pure functions of the pipeline's -------------------------------------------------


def sampling_config(config: PipelineConfig) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature)


def _common(config: PipelineConfig, out: str) -> dict:
    return dict(out=out, seed=config.seed, resume=config.resume, progress=config.progress)


def sft_config(config: PipelineConfig, paths: Paths) -> SFTConfig:
    return SFTConfig(**_common(config, paths.sft), stack=stack_config(config, ("policy",)), data=paths.sft_data,
                     max_steps=config.sft_steps, lr=config.sft_lr, batch_size=16, micro_batch_size=16,
                     max_length=config.max_length, eval_fraction=0.1, eval_every=50, checkpoint_every=100)  # fmt: skip


def rm_config(config: PipelineConfig, paths: Paths) -> RewardConfig:
    return RewardConfig(**_common(config, paths.rm), stack=stack_config(config, ("reward",)), data=paths.feedback,
                        epochs=config.rm_epochs, lr=config.rm_lr, batch_size=16, max_length=config.max_length,
                        eval_fraction=0.15, eval_every=5, checkpoint_every=50, exclude_flagged=True)  # fmt: skip


def ppo_config(config: PipelineConfig, paths: Paths, threshold: float | None) -> PPOConfig:
    """PPO from the SFT adapter with a frozen copy of it as the reference, or (no SFT) from the bare base
    with the base as the reference."""
    k = 1 if config.advantage == "gae" else config.group_size  # responses per prompt
    sequences = config.rollout_batch_size * k
    return PPOConfig(
        **_common(config, paths.ppo), stack=stack_config(config, ("policy", "value")), prompts=paths.prompts,
        eval_fraction=0.25, init_adapter=paths.sft if config.sft_steps else "",
        reference="init" if config.sft_steps else "base", reward_model=paths.rm, reward_max_length=config.max_length,
        reward_normalization="running",  # the RM's scale is arbitrary: kl_coef weighs KL against unit-variance scores
        sampling=sampling_config(config), advantage=config.advantage, samples_per_prompt=k,
        rollout_batch_size=config.rollout_batch_size, forward_batch_size=32, minibatch_size=min(8, sequences),
        micro_batch_size=min(8, sequences), ppo_epochs=config.ppo_epochs, lr=config.ppo_lr, vf_coef=0.5,
        kl_coef=config.kl_coef, max_steps=config.ppo_steps, eval_every=5, eval_prompts=config.ppo_eval_prompts,
        reward_threshold=threshold, checkpoint_every=10,
        gold_reward_fn=world.SCORE_FN, on_overoptimization=config.on_overoptimization,  # logged, never trained on
    )  # fmt: skip


def eval_config(config: PipelineConfig, paths: Paths) -> EvalConfig:
    return EvalConfig(policy=paths.ppo, prompts=paths.heldout, out=paths.eval, reward_model=paths.rm,
                      reward_fn=(world.SCORE_FN, world.TOXICITY_FN), sampling=sampling_config(config), max_prompts=10**6,
                      samples=config.eval_samples, show=3, seed=config.seed, device=config.device,
                      progress=config.progress)  # fmt: skip


# ---- step 2: the simulated labelers ---------------------------------------------------------------------


@torch.no_grad()
def collect_feedback(config: PipelineConfig, paths: Paths, prompts: list[str]) -> dict:
    """n completions per prompt from the starting policy (the SFT adapter, or the base when there is no
    SFT), ranked by the simulated labelers; records with fewer than two distinct completions carry no
    preference and are left out. Writes OUT/feedback.jsonl."""
    from ..model.generation import sample
    from ..model.stack import ModelStack

    if config.sft_steps:  # the SFT policy
        stack, adapter = ModelStack.from_saved(paths.sft, device=config.device).eval(), "policy"
    else:  # no SFT: the base itself (an instruct model)
        stack, adapter = ModelStack.build(stack_config(config, ("policy",))).eval(), None
    n, batch = config.samples_per_prompt, 16
    seed = epoch_seed(config.seed, 0, "pipeline/feedback")
    records, single = [], 0
    starts = range(0, len(prompts), batch)
    progress = bar(len(starts), "feedback", enabled=config.progress)
    for start in starts:
        chunk = prompts[start : start + batch]
        tok = stack.tokenizer
        s = sample(stack, [prompt_ids(tok, p) for p in chunk], sampling_config(config), adapter=adapter,
                   samples_per_prompt=n, seed=seed, keys=list(range(start, start + len(chunk))),
                   stop_ids=stop_token_ids(tok))  # fmt: skip
        progress.update()
        for i, prompt in enumerate(chunk):
            completions = list(dict.fromkeys(s.responses[i * n : (i + 1) * n]))  # distinct, in order
            if len(completions) < 2:
                single += 1
                continue
            label_seed = epoch_seed(config.seed, start + i, "pipeline/labelers")
            records.append(world.label(prompt, completions, seed=label_seed, noise=config.labeler_noise))
    progress.close()
    if not records:
        raise ConfigError("the SFT policy gave one distinct completion per prompt: nothing for the labelers to rank "
                          "(raise temperature or samples_per_prompt)")  # fmt: skip
    write_jsonl(paths.feedback, records)
    return {"records": len(records), "completions": sum(len(r["completions"]) for r in records),
            "prompts_without_choice": single}  # fmt: skip


@torch.no_grad()
def favourite_reward(config: PipelineConfig, paths: Paths) -> float:
    """The RM's mean score of each record's consensus-best completion: PPO stops once its held-out
    reward reaches it (the policy answers as well as the labelers' favourite of n SFT samples)."""
    from ..algos.rewards import StackReward
    from ..model.stack import ModelStack

    records = load_feedback(paths.feedback)
    stack = ModelStack.from_saved(paths.rm, device=config.device).eval()
    best = []
    for r in records:
        ranks = consensus_ranking(r.rankings)
        best.append(r.completions[ranks.index(min(ranks))])
    scores = StackReward(stack, max_length=256).score([r.prompt for r in records], best)
    return float(scores.double().mean())


# ---- the pipeline ---------------------------------------------------------------------------------------


def run_pipeline(config: PipelineConfig) -> dict:
    """Every stage in order; returns the report (also written to OUT/report.json, .md and curves.png)."""
    config.validate()
    probe_writable(config.out)  # under /proc or read-only: one line before any stage starts
    lock = OutputLock(config.out)
    lock.acquire()
    try:
        # transformers' own bars (each stage writes and loads a preset base) only for a user's model, whose load is long
        with hub_progress(config.progress and config.model not in MODEL_PRESETS), \
                writing(config.out, "every finished stage is kept; the same command goes on once it can write"):
            return _run(config, Paths.under(config.out))
    finally:
        lock.release()


def _say(line: str) -> None:
    print(line, flush=True)


# ---- reruns: which stage starts over, and what a reused stage reports -------------------------------------


def input_key(files: list[str], settings: dict) -> str:
    """sha256 of the content of `files` and of `settings` (plain data): what a stage that is not a run
    (the feedback, the evaluation) was made from."""
    h = hashlib.sha256(dumps(settings, sort_keys=True).encode())
    for path in files:
        h.update(f"{os.path.basename(path)}:{sha256_file(path) if os.path.isfile(path) else 'absent'};".encode())
    return h.hexdigest()


class State:
    """OUT/pipeline.json: per stage its seconds (the run that made its current output) and, for the
    feedback and the evaluation, the key of their inputs and their summary."""

    def __init__(self, path: str, resume: bool):
        self.path, self.stages = path, {}
        if resume and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    self.stages = json.load(f)["stages"]
            except (OSError, ValueError, KeyError, TypeError):
                self.stages = {}  # unreadable: every stage is timed (and keyed) anew

    def reusable(self, name: str, key: str) -> dict | None:
        """The stored summary of `name` when it was made from inputs with this key."""
        entry = self.stages.get(name)
        return entry if entry is not None and entry.get("key") == key else None

    def record(self, name: str, seconds: float, **entry) -> float:
        self.stages[name] = {"seconds": seconds, **entry}
        write_json(self.path, {"stages": self.stages})
        return seconds


def train_stage(name: str, train: Callable, config):
    """A training stage, resumed from its checkpoint; started over when the checkpoint was written with
    another config or other inputs (an upstream stage changed)."""
    try:
        return train(config)
    except StaleCheckpointError as e:
        _say(f"      {name}: {str(e).split('; ')[0]}; starting it over")
        return train(dataclasses.replace(config, resume=False))


def stage_seconds(state: State, name: str, result, seconds: float) -> float:
    """This run's seconds for a stage that trained, else (reused: it resumed at its end) those of the
    run that made it."""
    if result.resumed_from == result.steps and name in state.stages:
        return state.stages[name]["seconds"]
    return state.record(name, seconds)


def _run(config: PipelineConfig, paths: Paths) -> dict:
    from ..stages.eval import evaluate
    from ..stages.ppo import train_ppo
    from ..stages.rm import train_reward_model
    from ..stages.sft import train_sft
    from .report import build_report, number, side, write_report

    state = State(os.path.join(paths.out, STATE_FILE), config.resume)
    seconds: dict[str, float] = {}
    reused: list[str] = []
    t = time.perf_counter()
    # step 0. the corpus, split once into training and held-out prompts
    corpus = split_corpus(corpus_records(config), config.heldout_prompts, config.seed)
    write_corpus(corpus, paths)

    # step 1. SFT: the policy adapter learns every register of reply (none for an instruct model: sft_steps 0)
    sft = None
    if config.sft_steps:
        sft = train_stage("sft", train_sft, sft_config(config, paths))
        seconds["sft"] = stage_seconds(state, "sft", sft, time.perf_counter() - t)
        _say(f"[1/6] sft: {sft.steps} steps on {sft.train_examples} examples, held-out loss "
             f"{number(sft.eval_loss_start)} -> {number(sft.eval_loss)} ({seconds['sft']:.1f} s)")  # fmt: skip
    else:
        seconds["sft"] = 0.0
        _say(f"[1/6] sft: none, {config.model} is the starting policy")

    # step 2. the labelers rank n completions of the starting policy per training prompt (reused while the
    # starting policy and the sampling settings are the same)
    t = time.perf_counter()
    settings = {k: getattr(config, k) for k in ("seed", "samples_per_prompt", "labeler_noise", "max_new_tokens",
                                                 "temperature", "model", "quantization")}  # fmt: skip
    train = corpus.train_prompts[: config.feedback_prompts or None]
    sft_files = [os.path.join(paths.sft, n) for n in ("adapter_policy.safetensors", "stack.json")] if sft else []
    key = input_key(sft_files, {**settings, "prompts": train})
    stored = state.reusable("feedback", key) if os.path.isfile(paths.feedback) else None
    if stored is not None:
        feedback, seconds["feedback"] = stored["summary"], stored["seconds"]
        reused.append("feedback")
    else:
        feedback = collect_feedback(config, paths, train)
        seconds["feedback"] = state.record("feedback", time.perf_counter() - t, key=key, summary=feedback)
    _say(f"[2/6] feedback: {len(world.LABELERS)} labelers ranked {feedback['completions']} completions of "
         f"{feedback['records']} prompts -> {paths.feedback} ({seconds['feedback']:.1f} s)")  # fmt: skip

    # step 3. the reward model on the consensus pairs
    t = time.perf_counter()
    rm = train_stage("rm", train_reward_model, rm_config(config, paths))
    threshold = favourite_reward(config, paths)
    seconds["rm"] = stage_seconds(state, "rm", rm, time.perf_counter() - t)
    _say(f"[3/6] rm: {rm.steps} steps on {rm.train_pairs} pairs, held-out accuracy {number(rm.eval_accuracy)}; "
         f"flagged labelers: {', '.join(rm.flagged_labelers) or 'none'} ({seconds['rm']:.1f} s)")  # fmt: skip

    # step 4. PPO against the RM, KL to the starting policy (a frozen copy of the SFT adapter, or the base)
    t = time.perf_counter()
    ppo = train_stage("ppo", train_ppo, ppo_config(config, paths, threshold))
    seconds["ppo"] = stage_seconds(state, "ppo", ppo, time.perf_counter() - t)
    stop = "reward threshold reached" if ppo.stopped_at_threshold else "step cap"
    _say(f"[4/6] ppo: {ppo.steps} steps ({stop}; threshold {threshold:.3f}), held-out RM reward "
         f"{number(ppo.eval_reward_mean)} ({seconds['ppo']:.1f} s)")  # fmt: skip
    reused += [name for name, r in (("sft", sft), ("rm", rm), ("ppo", ppo)) if r and r.resumed_from == r.steps]

    # step 5. before / after on the held-out prompts (reused while the policies, the RM and the prompts are)
    t = time.perf_counter()
    ev_config = eval_config(config, paths)
    files = [os.path.join(d, n) for d, names in ((paths.ppo, ("adapter_policy.safetensors",
             "adapter_reference.safetensors", "stack.json")), (paths.rm, ("adapter_reward.safetensors",
             "heads.safetensors", "stack.json"))) for n in names] + [paths.heldout]  # fmt: skip
    key = input_key(files, {k: v for k, v in dataclasses.asdict(ev_config).items() if k != "progress"})  # bars only
    stored = state.reusable("eval", key) if os.path.isfile(paths.eval) else None
    if stored is not None:
        with open(paths.eval, encoding="utf-8") as f:
            ev, seconds["eval"] = json.load(f), stored["seconds"]
        reused.append("eval")
    else:
        ev = evaluate(ev_config)
        seconds["eval"] = state.record("eval", time.perf_counter() - t, key=key)
    _say(f"[5/6] eval: {ev['prompts']} held-out prompts x {ev['samples_per_prompt']} samples, "
         f"{'SFT' if sft else 'base'} vs PPO ({seconds['eval']:.1f} s)")  # fmt: skip
    sweep = None
    if config.kl_sweep:  # PPO again per KL setting from the same SFT and RM, each evaluated as above
        from .sweep import run_sweep

        t = time.perf_counter()
        sweep = {"lr": config.sweep_lr, "steps": config.sweep_steps, "before": side(ev["before"]),
                 "rows": run_sweep(config, ppo_config(config, paths, None), eval_config(config, paths), _say,
                                   train=lambda c: train_stage(f"sweep {os.path.basename(c.out)}", train_ppo, c))}  # fmt: skip
        seconds["sweep"] = time.perf_counter() - t

    # step 6. the report
    reused = [name for name in seconds if name in reused]  # in stage order
    report = build_report(config, ev, sft=sft, rm=rm, ppo=ppo, feedback=feedback, threshold=threshold,
                          seconds=seconds, corpus=corpus, paths=paths, reused=reused, sweep=sweep)  # fmt: skip
    files = write_report(report, paths)
    _say(f"[6/6] report: {', '.join(files)}")
    return report

"""Before and after, on held-out prompts: the reference and the trained policy of ONE saved stack answer
the same prompts with the same randomness; every reward source scores both; the exact KL to the
reference and the response length come along; a few completions are shown side by side.

    python -m engine eval --policy runs/ppo --reward-fn MODULE:FUNCTION

Without --prompts, the prompts are the ones the training run held out (POLICY/eval_prompts.jsonl), or
else the embedded prompts; the CLI samples as the training run did (POLICY/config.json). Without a
reward source, the policy directory's own reward adapter scores. The reference is the stack's: its
frozen "reference" adapter if it has one, else the bare base.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..algos.rewards import ClassifierReward, FunctionReward, StackReward
from ..algos.rollout import rollout
from ..core.files import probe_writable, write_json, writing
from ..core.progress import bar, hub_progress
from ..datasets.corpus import embedded_prompts
from ..datasets.prompts import EVAL_PROMPTS_FILE, load_prompts
from ..errors import ConfigError
from ..model.config import read_stack_meta
from ..model.logprobs import policy_reference_stats
from .eval_config import EvalConfig


def eval_prompts(config: EvalConfig) -> list[str]:
    if config.prompts:
        prompts = load_prompts(config.prompts)
    elif os.path.isfile(os.path.join(config.policy, EVAL_PROMPTS_FILE)):
        prompts = load_prompts(os.path.join(config.policy, EVAL_PROMPTS_FILE))
    else:
        prompts = embedded_prompts()
    return prompts[: config.max_prompts]


def build_sources(config: EvalConfig, stack) -> list:
    """Every configured reward source (each a column); the stack's own RM when none is given."""
    sources = []
    if config.reward_model:
        stack.load_roles(config.reward_model, roles=("reward",))
    if config.reward_model or ("reward" in stack.config.adapters and not (config.reward_fn or config.reward_classifier)):
        sources.append(StackReward(stack, max_length=512, batch_size=config.batch_size))
    if config.reward_classifier:
        sources.append(ClassifierReward(config.reward_classifier, stack.device,
                                        positive_label=config.reward_positive_label or None))  # fmt: skip
    sources += [FunctionReward(spec) for spec in config.reward_fn]
    if not sources:
        raise ConfigError("eval needs a reward source: --reward-fn, --reward-model or --reward-classifier "
                          f"({config.policy} has no reward adapter of its own)")  # fmt: skip
    return sources


@torch.no_grad()
def evaluate(config: EvalConfig) -> dict:
    """The before/after report (also written to config.out or POLICY/eval.json)."""
    config.validate()
    # the report's directory must take a file before the evaluation runs, not only after it
    probe_writable(os.path.dirname(os.path.abspath(config.out_file)))
    with hub_progress(config.progress):
        return _evaluate(config)


def _evaluate(config: EvalConfig) -> dict:
    from ..model.stack import ModelStack

    saved = read_stack_meta(config.policy, "policy")
    adapters = tuple(saved["stack"]["adapters"])
    if config.reward_model and "reward" not in adapters:
        adapters += ("reward",)
    heads = {}  # as many reward heads as the reward model has (an ensemble: k > 1)
    if config.reward_model:
        heads["reward_heads"] = read_stack_meta(config.reward_model, "reward_model")["stack"].get("reward_heads", 1)
    stack = ModelStack.from_saved(config.policy, device=config.device, adapters=adapters, **heads).eval()
    prompts = eval_prompts(config)
    sources = build_sources(config, stack)
    temperature = config.sampling.temperature or 1.0
    roles = {"reference": stack.reference_adapter, "policy": "policy"}
    starts = range(0, len(prompts), config.batch_size)
    progress = bar(len(roles) * len(starts), "eval", enabled=config.progress)
    report, responses = {}, {}
    for name, adapter in roles.items():
        totals = {s.name: 0.0 for s in sources}
        kl = length = 0.0
        responses[name] = []
        for start in starts:
            batch = prompts[start : start + config.batch_size]
            traj = rollout(stack, batch, list(range(start, start + len(batch))), config.sampling, seed=config.seed,
                           samples_per_prompt=config.samples, adapter=adapter)  # fmt: skip
            st = policy_reference_stats(stack, traj.input_ids, traj.attention_mask, traj.labels, traj.prompt_length,
                                        temperature, config.backend, adapter=adapter)  # fmt: skip
            kl += float((st["kl"] * traj.mask).sum())
            length += float(traj.mask.sum())
            for s in sources:
                totals[s.name] += float(s.score(traj.prompts, traj.responses).double().sum())
            responses[name] += traj.responses
            progress.update()
        n = len(prompts) * config.samples
        report[name] = {
            "scores": {k: v / n for k, v in totals.items()},
            "kl": kl / n,  # exact KL(this policy || reference) summed over a response, mean over responses
            "response_length": length / n,
        }
    progress.close()
    result = {
        "policy": config.policy, "prompts": len(prompts), "samples_per_prompt": config.samples,
        "sampling": dataclasses.asdict(config.sampling),
        "reference": "adapter" if stack.reference_adapter else "base",
        "before": report["reference"], "after": report["policy"],
        "samples": [{"prompt": p, "before": b, "after": a}
                    for p, b, a in list(zip(prompts, responses["reference"][:: config.samples],
                                            responses["policy"][:: config.samples]))[: config.show]],
    }  # fmt: skip
    with writing(config.out_file, "nothing else was written; rerun once it can write"):
        write_json(config.out_file, result)
    return result


def format_report(result: dict) -> str:
    """The before/after table and the samples, for the terminal."""
    names = list(result["before"]["scores"])
    width = max([len("response_length")] + [len(n) for n in names])
    lines = [f"eval: {result['prompts']} prompts x {result['samples_per_prompt']} samples; reference = {result['reference']}",
             ""]  # fmt: skip
    lines.append(f"{'':10}" + "".join(f"{n:>{width + 2}}" for n in names + ["kl", "response_length"]))
    for label, row in (("before", result["before"]), ("after", result["after"])):
        cells = [row["scores"][n] for n in names] + [row["kl"], row["response_length"]]
        lines.append(f"{label:10}" + "".join(f"{c:>{width + 2}.4f}" for c in cells))
    for s in result["samples"]:
        lines += ["", f"prompt: {s['prompt']}", f"  before: {json.dumps(s['before'])}",
                  f"  after:  {json.dumps(s['after'])}"]  # fmt: skip
    return "\n".join(lines)


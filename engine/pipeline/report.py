"""The pipeline's report: OUT/report.json (the numbers), OUT/report.md (the before/after table, the
stages, the labelers, the memory line and a few completions side by side; with --kl-sweep one row per
KL setting) and OUT/curves.png (reward, KL and entropy over the PPO steps; the proxy against the gold
score and the RM ensemble's disagreement at the held-out evaluations, the over-optimisation alarm; the
reward model's held-out accuracy over its steps); with --kl-sweep OUT/hacking.png (pipeline.sweep).

Pure functions of the stages' results and metrics files; matplotlib only for the figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
from importlib import metadata

from ..core.files import atomic_write, read_metrics, write_json
from .world import SCORE_FN, TOXICITY_FN

VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "rlhf-engine")


def versions() -> dict:
    """python and the installed versions of the packages a run's numbers depend on."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# The before/after rows: report key, label, the eval source or field it comes from.
METRICS = (
    ("true_score", "true score (hidden rule, mean)", SCORE_FN),
    ("rm_reward", "reward model score (mean)", "rm"),
    ("toxicity_rate", "toxicity rate (share of rude replies)", TOXICITY_FN),
    ("kl", "KL to the starting policy (nats per response)", None),
    ("response_length", "response length (tokens)", None),
)


def side(row: dict) -> dict:
    """One side (before or after) of an `engine eval` result as the report's five numbers."""
    return {key: row["scores"][source] if source else row[key] for key, _, source in METRICS}


def memory_line(memory: dict) -> dict:
    """Bytes of the one base vs bytes of every adapter and head together (from stack.memory_report)."""
    parts = {k: v["bytes"] for k, v in memory.items() if k != "total"}
    extra = sum(v for k, v in parts.items() if k != "base")
    return {"base_bytes": parts["base"], "adapters_and_heads_bytes": extra, "parts": parts}


def build_report(config, ev: dict, *, sft, rm, ppo, feedback: dict, threshold: float, seconds: dict, corpus,
                 paths, reused: list[str] = (), sweep: dict | None = None) -> dict:  # fmt: skip
    """The report as plain data (what report.json holds); `reused`: the stages this run took as they were
    (their numbers and seconds are those of the run that made them); `sweep`: the KL sweep's rows
    (pipeline.sweep)."""
    import torch

    from ..core.device import resolve_device

    before, after = side(ev["before"]), side(ev["after"])
    with open(os.path.join(paths.rm, "labelers.json"), encoding="utf-8") as f:
        labelers = json.load(f)
    device = resolve_device(config.device).type
    return {
        "before": before,
        "after": after,
        "change": {k: after[k] - before[k] for k in before},
        "prompts": {"train": len(corpus.train_prompts), "heldout": len(corpus.heldout_prompts),
                    "samples_per_heldout_prompt": ev["samples_per_prompt"]},  # fmt: skip
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "reused": list(reused),
        "total_seconds": round(sum(seconds.values()), 2),
        "sft": None if sft is None else {"steps": sft.steps, "train_examples": sft.train_examples,
                                         "heldout_loss_start": sft.eval_loss_start, "heldout_loss": sft.eval_loss},
        "starting_policy": "SFT" if sft is not None else "base",
        "feedback": feedback,
        "labelers": {"flagged": rm.flagged_labelers,
                     "kendall_tau": {name: rep["tau"] for name, rep in labelers.items()}},  # fmt: skip
        "rm": {"steps": rm.steps, "train_pairs": rm.train_pairs, "heldout_pairs": rm.eval_pairs,
               "heldout_accuracy": rm.eval_accuracy, "ensemble": rm.ensemble},  # fmt: skip
        "ppo": {"steps": ppo.steps, "stopped_at_threshold": ppo.stopped_at_threshold, "reward_threshold": threshold,
                "heldout_rm_reward": ppo.eval_reward_mean, "stopped_by": ppo.stopped_by,
                "overoptimization": ppo.overoptimization},  # fmt: skip
        "kl_sweep": sweep,
        "memory": memory_line(ppo.memory),
        "samples": ev["samples"],
        "model": config.model,
        "device": device if device == "cpu" else f"cuda ({torch.cuda.get_device_name()})",
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "config": dataclasses.asdict(config),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_table(report: dict) -> str:
    """The before/after table as Markdown (also what the CLI prints at the end)."""
    lines = [f"| | before ({report.get('starting_policy', 'SFT')}) | after (PPO) | change |", "|---|---:|---:|---:|"]
    for key, label, _ in METRICS:
        b, a, c = report["before"][key], report["after"][key], report["change"][key]
        lines.append(f"| {label} | {b:.3f} | {a:.3f} | {c:+.3f} |")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    m, p = report["memory"], report["prompts"]
    lab = report["labelers"]
    taus = ", ".join(f"{name} {tau:+.2f}" for name, tau in lab["kendall_tau"].items())
    lines = [
        "# RLHF pipeline report", "",
        f"{report['model']} on {report['device']}, seed {report['config']['seed']}, {report['date']}: "
        f"{p['train']} training prompts, {p['heldout']} held-out prompts x {p['samples_per_heldout_prompt']} "
        "completions per policy.", "",
        format_table(report), "",
        "## Stages", "",
        "| stage | seconds | |", "|---|---:|---|",
        f"| sft | {report['stage_seconds']['sft']:.1f} | " + (
            f"{report['sft']['steps']} steps, held-out loss {number(report['sft']['heldout_loss_start'])} -> "
            f"{number(report['sft']['heldout_loss'])} |" if report["sft"] else "none: the base is the starting policy |"),
        f"| feedback | {report['stage_seconds']['feedback']:.1f} | {report['feedback']['completions']} completions "
        f"of {report['feedback']['records']} prompts ranked by the labelers |",
        f"| rm | {report['stage_seconds']['rm']:.1f} | {report['rm']['steps']} steps on {report['rm']['train_pairs']} "
        f"pairs, held-out accuracy {number(report['rm']['heldout_accuracy'])} |",
        f"| ppo | {report['stage_seconds']['ppo']:.1f} | {report['ppo']['steps']} steps, "
        f"{'stopped at the reward threshold' if report['ppo']['stopped_at_threshold'] else 'step cap'} "
        f"({report['ppo']['reward_threshold']:.3f}){alarm_note(report['ppo'])} |",
        f"| eval | {report['stage_seconds']['eval']:.1f} | |", "",
        f"Labelers (Kendall tau with the consensus): {taus}; flagged and left out: "
        f"{', '.join(lab['flagged']) or 'none'}.", "",
        f"Memory: the one base {_mib(m['base_bytes'])}; every adapter and head together "
        f"{_mib(m['adapters_and_heads_bytes'])} ({', '.join(k for k in m['parts'] if k != 'base')}).", "",
        "![curves](curves.png)", "",
        "## Held-out completions, before and after", "",
    ]  # fmt: skip
    for s in report["samples"]:
        lines += [f"**{s['prompt']}**", "", f"- before: {json.dumps(s['before'])}",
                  f"- after: {json.dumps(s['after'])}", ""]  # fmt: skip
    if report.get("kl_sweep"):
        from .sweep import format_sweep

        lines += format_sweep(report["kl_sweep"])
    return "\n".join(lines)


def alarm_note(ppo: dict) -> str:
    """What the over-optimisation monitor said of the pipeline's PPO run, for its stage row."""
    over = ppo.get("overoptimization") or {}
    if over.get("alarm_step") is None:
        return ""
    stopped = "; stopped, the best evaluation's weights saved" if ppo.get("stopped_by") == "overoptimization" else ""
    return f"; over-optimisation alarm at step {over['alarm_step']}: {over['reason']}{stopped}"


def number(x: float | None) -> str:
    """A metric that a stage may not have produced (no held-out data): 3 decimals, or n/a."""
    return "n/a" if x is None else f"{x:.3f}"


def plot_curves(ppo_metrics: list[dict], rm_metrics: list[dict], threshold: float | None, path: str) -> None:
    """curves.png: PPO reward (train and held-out), the held-out proxy against the gold score, KL,
    entropy and the RM ensemble's disagreement per step (the over-optimisation alarm marked); RM
    held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [s for s, _ in pts], [v for _, v in pts]

    alarm = next((r["step"] for r in ppo_metrics if r.get("alarm")), None)
    fig, ax = plt.subplots(2, 3, figsize=(15, 7))
    steps, values = series(ppo_metrics, "reward_mean")
    ax[0, 0].plot(steps, values, label="rollout")
    steps, values = series(ppo_metrics, "eval_reward_mean")
    ax[0, 0].plot(steps, values, "o-", label="held-out")
    if threshold is not None:
        ax[0, 0].axhline(threshold, ls="--", c="gray", label="threshold")
    ax[0, 0].set(title="PPO: reward model score", xlabel="step")
    ax[0, 0].legend()
    a = ax[0, 1]  # proxy and gold on the held-out prompts, each on its own scale
    a.plot(*series(ppo_metrics, "eval_reward/proxy"), "o-", c="C0", label="proxy: RM")
    a.set(title="PPO held-out: proxy vs gold", xlabel="step")
    a.set_ylabel("proxy (RM)", color="C0")
    gold = series(ppo_metrics, "eval_reward/gold")
    if gold[0]:
        g = a.twinx()
        g.plot(*gold, "s-", c="C3", label="gold: hidden score")
        g.set_ylabel("gold (hidden score)", color="C3")
    for a, keys, title in ((ax[0, 2], ("kl", "eval_kl"), "PPO: exact KL to the starting policy (per response)"),
                           (ax[1, 0], ("entropy",), "PPO: policy entropy (per token)"),
                           (ax[1, 1], ("reward/ensemble_std", "eval_reward/ensemble_std"),
                            "PPO: RM ensemble disagreement (std of the heads)")):  # fmt: skip
        for key, style in zip(keys, ("-", "o-")):
            steps, values = series(ppo_metrics, key)
            if steps:
                a.plot(steps, values, style, label="held-out" if key.startswith("eval_") else "rollout")
        if len(keys) > 1 and a.lines:
            a.legend()
        if not a.lines:
            a.text(0.5, 0.5, "one reward head: no ensemble", ha="center", va="center", transform=a.transAxes)
        a.set(title=title, xlabel="step")
    if alarm is not None:
        for a in (ax[0, 0], ax[0, 1], ax[0, 2], ax[1, 0], ax[1, 1]):
            a.axvline(alarm, ls=":", c="red")
        ax[0, 1].text(alarm, 1.0, " over-optimisation alarm", color="red", va="top", transform=ax[0, 1].get_xaxis_transform())
    steps, values = series(rm_metrics, "eval_accuracy")
    ax[1, 2].plot(steps, values, "o-")
    ax[1, 2].set(title="reward model: held-out pairwise accuracy", xlabel="step", ylim=(0, 1))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def write_report(report: dict, paths) -> list[str]:
    """OUT/report.json, OUT/report.md, OUT/curves.png (and OUT/hacking.png with a KL sweep); returns their paths."""
    out = paths.out
    files = [os.path.join(out, name) for name in ("report.json", "report.md", "curves.png")]
    write_json(files[0], report)
    md = format_markdown(report)
    atomic_write(files[1], lambda f: f.write(md.encode()))
    plot_curves(read_metrics(os.path.join(paths.ppo, "metrics.jsonl")),
                read_metrics(os.path.join(paths.rm, "metrics.jsonl")), report["ppo"]["reward_threshold"], files[2])  # fmt: skip
    if report.get("kl_sweep"):
        from .sweep import HACKING_PNG, plot_hacking

        files.append(os.path.join(out, HACKING_PNG))
        plot_hacking(report["kl_sweep"], files[-1])
    return files

"""Reward hacking made visible: `python -m engine pipeline --kl-sweep`.

Why RLHF keeps a frozen reference and a KL penalty: a policy that is free to move finds text the reward
model over-scores. After the pipeline's stages, PPO runs again from the same SFT adapter against the
same reward model once per KL setting, each its own run directory (resumable like every stage):

    OUT/sweep/beta-0/             beta = 0: no KL penalty
    OUT/sweep/beta-<kl_coef>/     the pipeline's fixed beta
    OUT/sweep/adaptive-<target>/  the adaptive controller (Ziegler et al. 2019) towards sweep_target_kl

at the sweep's learning rate (high enough for beta = 0 to over-optimise the toy world's RM), with no
reward threshold (each runs to sweep_steps, or to its over-optimisation alarm under `stop`), the
hidden score as the gold scorer beside the RM at every held-out evaluation. Each run is then evaluated
like the pipeline's PPO (held-out prompts, the hidden score, the toxicity rule and the RM:
OUT/sweep/<setting>/eval.json); the report gets one row per setting and OUT/hacking.png, proxy and gold
reward against sqrt(KL) over training (Gao et al. 2022, "Scaling laws for reward model
overoptimization", fig. 1: gold rises, peaks and falls while the proxy keeps rising).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

from ..core.files import atomic_write, read_metrics
from ..stages.ppo_config import PPOConfig
from .pipeline_config import PipelineConfig

SWEEP_DIR = "sweep"
HACKING_PNG = "hacking.png"
# The adaptive setting's horizon, in PPO steps' worth of sequences: beta moves by at most a factor
# 1 +- 0.2 / KL_HORIZON_STEPS per step (KLController), about 3x over 60 steps, so it can act in a short run
# (the stage's default horizon of 10000 sequences would move it by 2% in the whole sweep).
KL_HORIZON_STEPS = 10


@dataclass(frozen=True)
class Setting:
    """One KL setting of the sweep."""

    name: str  # its directory under OUT/sweep and its row in the report
    kl_coef: float  # beta (the adaptive controller's start)
    target_kl: float | None  # None: fixed beta


def settings(config: PipelineConfig) -> list[Setting]:
    """beta = 0, the pipeline's beta, and the adaptive controller from it towards sweep_target_kl."""
    return [Setting("beta-0", 0.0, None), Setting(f"beta-{config.kl_coef:g}", config.kl_coef, None),
            Setting(f"adaptive-{config.sweep_target_kl:g}", config.kl_coef, config.sweep_target_kl)]  # fmt: skip


def sweep_ppo_config(base: PPOConfig, config: PipelineConfig, out: str, setting: Setting) -> PPOConfig:
    """The pipeline's PPO config (`base`, with no threshold) at the sweep's learning rate and steps."""
    sequences = base.rollout_batch_size * base.samples_per_prompt
    return dataclasses.replace(
        base, out=os.path.join(out, SWEEP_DIR, setting.name), lr=config.sweep_lr, max_steps=config.sweep_steps,
        reward_threshold=None, kl_coef=setting.kl_coef, target_kl=setting.target_kl,
        kl_horizon=KL_HORIZON_STEPS * sequences if setting.target_kl is not None else base.kl_horizon,
    )  # fmt: skip


def run_sweep(config: PipelineConfig, base_ppo: PPOConfig, base_eval, say, train=None) -> list[dict]:
    """Every setting's PPO run and evaluation; returns the report's rows (row_of). `train`: how a PPO
    config is run (the pipeline's: started over when its checkpoint is stale); stages.ppo.train_ppo by default."""
    from ..stages.eval import evaluate
    from ..stages.ppo import train_ppo

    train = train or train_ppo
    rows = []
    for i, setting in enumerate(settings(config)):
        ppo_cfg = sweep_ppo_config(base_ppo, config, config.out, setting)
        ppo = train(ppo_cfg)
        ev = evaluate(dataclasses.replace(base_eval, policy=ppo_cfg.out, out=os.path.join(ppo_cfg.out, "eval.json")))
        rows.append(row_of(setting, ppo_cfg.out, ev, dataclasses.asdict(ppo)))
        r = rows[-1]
        say(f"      sweep {i + 1}/{len(settings(config))} {setting.name}: {r['steps']} steps"
            f"{' (stopped: over-optimisation)' if r['stopped_by'] == 'overoptimization' else ''}, held-out gold "
            f"{r['true_score']:.3f}, RM {r['rm_reward']:.3f}, KL {r['kl']:.2f}; during training gold peaked at "
            f"{r['peak_gold']:.3f} (step {r['peak_step']}), ended at {r['final_gold']:.3f}")  # fmt: skip
    return rows


def row_of(setting: Setting, run_dir: str, ev: dict, ppo: dict) -> dict:
    """One report row: the setting, how its run ended (ppo: its result.json), its held-out evaluation
    (ev: its eval.json, the policy it saved against the SFT policy) and its training curve (its
    metrics.jsonl: curve_summary)."""
    from .report import side

    over = ppo.get("overoptimization") or {}
    return {"setting": setting.name, "dir": run_dir, "kl_coef": setting.kl_coef, "target_kl": setting.target_kl,
            "steps": ppo["steps"], "stopped_by": ppo["stopped_by"], "alarm_step": over.get("alarm_step"),
            "best_step": over.get("best_step"), "alarm": over.get("reason") or None, **side(ev["after"]),
            **curve_summary(curve(read_metrics(os.path.join(run_dir, "metrics.jsonl"))))}  # fmt: skip


def curve_summary(c: dict) -> dict:
    """A run's held-out evaluations during training (curve) in a few numbers: the gold score's peak and
    where, the proxy there, the last evaluation's gold, proxy and KL, and `hacked`: after the gold peak the
    proxy ended higher while the gold ended lower (Gao et al.'s over-optimisation, read off the run)."""
    gold = [(g, i) for i, g in enumerate(c["gold"]) if g is not None]
    if not gold:
        return {"peak_gold": None, "peak_step": None, "proxy_at_peak": None, "final_gold": None,
                "final_proxy": None, "final_kl": None, "hacked": None}  # fmt: skip
    peak, i = max(gold, key=lambda t: (t[0], -t[1]))  # the first evaluation at the highest gold
    final = len(c["step"]) - 1
    return {"peak_gold": peak, "peak_step": c["step"][i], "proxy_at_peak": c["proxy"][i],
            "final_gold": c["gold"][final], "final_proxy": c["proxy"][final], "final_kl": c["kl"][final],
            "hacked": c["gold"][final] < peak and c["proxy"][final] > c["proxy"][i]}  # fmt: skip


def load_rows(out: str, config: PipelineConfig) -> list[dict]:
    """The rows again from the runs' own files (result.json, eval.json): what a reader can check them against."""
    rows = []
    for setting in settings(config):
        run_dir = os.path.join(out, SWEEP_DIR, setting.name)
        rows.append(row_of(setting, run_dir, _json(os.path.join(run_dir, "eval.json")),
                           _json(os.path.join(run_dir, "result.json"))))  # fmt: skip
    return rows


def _json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- the report's part ------------------------------------------------------------------------------


def format_sweep(sweep: dict) -> list[str]:
    """The report.md section: one row per setting (held-out prompts; the SFT policy first)."""
    lines = ["## Reward hacking: the KL sweep", "",
             f"PPO from the same SFT adapter against the same reward model at learning rate {sweep['lr']:g}, "
             f"{sweep['steps']} steps at most, one run per KL setting (`{SWEEP_DIR}/<setting>/`); held-out "
             "prompts as above. The proxy is the reward model, the gold score the hidden rule it learned from.", "",
             "Columns: the saved policy on the held-out prompts (as the before/after table); then, from each run's "
             "own held-out evaluations during training (its metrics.jsonl), the gold score's peak (at step), the "
             "last evaluation's gold and proxy, and whether the proxy ended higher while the gold ended lower than "
             "at that peak.", "",
             "| setting | steps | RM score (proxy) | true score (gold) | toxicity | KL | length | training: gold peak "
             "(step) -> last | proxy at peak -> last | proxy up, gold down | over-optimisation |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    b = sweep["before"]
    lines.append(f"| before (SFT) | 0 | {b['rm_reward']:.3f} | {b['true_score']:.3f} | {b['toxicity_rate']:.3f} | "
                 f"{b['kl']:.3f} | {b['response_length']:.1f} | | | | |")  # fmt: skip
    for r in sweep["rows"]:
        alarm = "none" if r["alarm_step"] is None else f"alarm at step {r['alarm_step']} (best: step {r['best_step']})"
        if r["stopped_by"] == "overoptimization":
            alarm += ", stopped; saved the best"
        curve_cells = "n/a | n/a | n/a" if r.get("peak_gold") is None else (
            f"{r['peak_gold']:.3f} ({r['peak_step']}) -> {r['final_gold']:.3f} | {r['proxy_at_peak']:.3f} -> "
            f"{r['final_proxy']:.3f} | {'yes' if r['hacked'] else 'no'}")  # fmt: skip
        lines.append(f"| {r['setting']} | {r['steps']} | {r['rm_reward']:.3f} | {r['true_score']:.3f} | "
                     f"{r['toxicity_rate']:.3f} | {r['kl']:.3f} | {r['response_length']:.1f} | {curve_cells} | "
                     f"{alarm} |")  # fmt: skip
    lines += ["", f"![hacking]({HACKING_PNG})", ""]
    return lines


def curve(rows: list[dict]) -> dict:
    """A run's held-out evaluations from its metrics rows: steps, KL, sqrt(KL), proxy, gold."""
    pts = [r for r in rows if r.get("eval_kl") is not None and r.get("eval_reward/proxy") is not None]
    return {"step": [r["step"] for r in pts], "kl": [r["eval_kl"] for r in pts],
            "sqrt_kl": [math.sqrt(max(r["eval_kl"], 0.0)) for r in pts],
            "proxy": [r["eval_reward/proxy"] for r in pts], "gold": [r.get("eval_reward/gold") for r in pts]}  # fmt: skip


def plot_hacking(sweep: dict, path: str) -> None:
    """hacking.png: gold (left) and proxy (right) reward at each held-out evaluation against sqrt(KL to the
    SFT policy), one line per setting; a square where each run stopped, a cross where its alarm fired."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, r in enumerate(sweep["rows"]):
        c = curve(read_metrics(os.path.join(r["dir"], "metrics.jsonl")))
        color = f"C{i}"
        for a, key in ((ax[0], "gold"), (ax[1], "proxy")):
            pts = [(x, y, s) for x, y, s in zip(c["sqrt_kl"], c[key], c["step"]) if y is not None]
            if not pts:
                continue
            a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=color, label=r["setting"])
            a.plot(pts[-1][0], pts[-1][1], "s", ms=9, mfc="none", color=color)
            fired = [p for p in pts if p[2] == r["alarm_step"]]
            if fired:
                a.plot(fired[0][0], fired[0][1], "x", ms=10, mew=2, color=color)
    ax[0].set(title="gold: the hidden score (held-out)", xlabel="sqrt(KL to the SFT policy), nats^0.5", ylabel="mean score")
    ax[1].set(title="proxy: the reward model (held-out)", xlabel="sqrt(KL to the SFT policy), nats^0.5")
    ax[0].legend(title="square: end, cross: alarm", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)

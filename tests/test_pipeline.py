"""`python -m engine pipeline` (issue 11): the whole RLHF story end to end, in --quick size, through the CLI.

The quick run (~10 s on 2 cores) is shared by the tests of this module: its artifacts, its report, the
improvement of the hidden score on held-out prompts, and a rerun on the same OUT that reuses every stage
and reproduces the report. A user's --data and --model DIR run the same stages at a few steps."""

import json
import os

import pytest

from rlhf_engine.cli import main
from rlhf_engine.pipeline.report import METRICS

KEYS = [key for key, _, _ in METRICS]

QUICK_MARGIN = 1.0  # measured on seed 0 (2026-11-24, CPU): true score -1.054 -> 2.180 (+3.23), toxicity 0.625 -> 0.062


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "out"
    assert main(["pipeline", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def load(path):
    with open(path) as f:
        return json.load(f)


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_artifact_exists(quick):
    for name in ("report.json", "report.md", "eval.json", "feedback.jsonl", "data/sft.jsonl", "data/prompts.jsonl",
                 "data/heldout.jsonl", "sft/adapter_policy.safetensors", "rm/adapter_reward.safetensors",
                 "rm/heads.safetensors", "rm/labelers.json", "ppo/adapter_policy.safetensors",
                 "ppo/adapter_value.safetensors", "ppo/adapter_reference.safetensors"):  # fmt: skip
        assert (quick / name).is_file() and (quick / name).stat().st_size > 0, name
    for stage in ("sft", "rm", "ppo"):
        rows = jsonl(quick / stage / "metrics.jsonl")
        assert len(rows) > 1 and all("step" in r for r in rows), stage
    with open(quick / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_hidden_score_improves_on_held_out_prompts(quick):
    report = load(quick / "report.json")
    before, after = report["before"], report["after"]
    assert set(before) == set(after) == set(KEYS) == {"true_score", "rm_reward", "toxicity_rate", "kl", "response_length"}
    assert after["true_score"] > before["true_score"] + QUICK_MARGIN
    assert after["toxicity_rate"] < before["toxicity_rate"]
    assert after["rm_reward"] > before["rm_reward"]
    assert before["kl"] == 0.0 and 0.0 < after["kl"] < 10.0  # bounded by the KL penalty against the SFT policy
    for k in KEYS:
        assert report["change"][k] == pytest.approx(after[k] - before[k])


def test_report_names_the_odd_labeler_and_every_stage(quick):
    report = load(quick / "report.json")
    assert report["labelers"]["flagged"] == ["cy"]
    assert report["labelers"]["kendall_tau"]["cy"] < 0 < report["labelers"]["kendall_tau"]["ana"]
    assert report["rm"]["heldout_accuracy"] >= 0.8
    assert set(report["stage_seconds"]) == {"sft", "feedback", "rm", "ppo", "eval"}
    assert {"python", "torch", "transformers", "peft"} <= set(report["versions"])
    assert report["ppo"]["steps"] >= 1 and report["ppo"]["reward_threshold"] is not None
    memory = report["memory"]
    assert memory["base_bytes"] > 0 and memory["adapters_and_heads_bytes"] == sum(
        v for k, v in memory["parts"].items() if k != "base")  # fmt: skip
    text = (quick / "report.md").read_text()
    assert "| true score" in text and "before:" in text and "after:" in text and "flagged and left out: cy" in text


def test_held_out_prompts_reach_no_stage(quick):
    held = {r["prompt"] for r in jsonl(quick / "data" / "heldout.jsonl")}
    train = {r["prompt"] for r in jsonl(quick / "data" / "prompts.jsonl")}
    assert len(held) == 16 and train and not held & train
    assert not held & {r["prompt"] for r in jsonl(quick / "data" / "sft.jsonl")}
    feedback = jsonl(quick / "feedback.jsonl")
    assert not held & {r["prompt"] for r in feedback}
    for r in feedback:  # what the labelers did: >= 2 distinct completions, every labeler ranked them
        assert len(set(r["completions"])) == len(r["completions"]) >= 2
        assert len(r["labelers"]) == len(r["rankings"]) >= 3
        assert all(sorted(k) == list(range(1, len(r["completions"]) + 1)) for k in r["rankings"])
    ev = load(quick / "eval.json")
    assert ev["prompts"] == 16 and ev["samples_per_prompt"] == 2  # quick: 2 completions per prompt and policy


def test_rerun_on_the_same_out_reuses_every_stage_and_reproduces_the_report(quick, capsys):
    first = load(quick / "report.json")
    mtime = os.stat(quick / "feedback.jsonl").st_mtime_ns
    assert main(["pipeline", "--quick", "--out", str(quick)]) == 0  # progress on: the bars' code path too
    captured = capsys.readouterr()
    printed = captured.out
    assert "Loading weights" not in captured.err  # transformers' bars stay off for a preset base
    assert [line[:5] for line in printed.splitlines() if line.startswith("[")] == [f"[{i}/6]" for i in range(1, 7)]
    assert "| true score" in printed and "held-out loss n/a" not in printed
    second = load(quick / "report.json")
    assert first["reused"] == [] and second["reused"] == ["sft", "feedback", "rm", "ppo", "eval"]
    assert os.stat(quick / "feedback.jsonl").st_mtime_ns == mtime
    # a reused stage reports the run that made it: its numbers (the SFT's step-0 held-out loss too) and seconds
    assert first["sft"]["heldout_loss_start"] is not None
    for key in ("before", "after", "change", "samples", "sft", "feedback", "rm", "ppo", "labelers", "memory",
                "stage_seconds", "total_seconds"):  # fmt: skip
        assert second[key] == first[key], key



# ---- reward hacking (issue 19), on the quick run's SFT adapter and reward model -------------------------

# PPO at beta = 0 from the quick run's SFT policy, held-out evaluations every 2 steps, measured on seed 0
# (2026-12-08, CPU, 2 threads, fused layers on): at learning rate 1.5e-3 the hidden score rose from -1.00
# to 2.08 (step 4), then fell to 1.87 and 1.80 (steps 6, 8) while the RM's score rose from 6.90 to 7.91 and
# 8.58: the alarm fires at step 8. (At 2e-3 the hidden score peaked at step 4 and fell, but the RM's score
# fell with it: no alarm in 12 steps. The run is chaotic: fp32 rounding moves it, e.g. the fused layers'.)
HACK_LR = 1.5e-3


def test_beta_0_hacks_the_reward_model_and_stop_keeps_the_best_policy(quick):
    from dataclasses import replace

    from rlhf_engine.algos.rewards import FunctionReward
    from rlhf_engine.core.distributed import Dist
    from rlhf_engine.datasets.prompts import EVAL_PROMPTS_FILE, load_prompts
    from rlhf_engine.model.stack import ModelStack
    from rlhf_engine.pipeline import sweep, world
    from rlhf_engine.pipeline.pipeline import Paths, ppo_config
    from rlhf_engine.pipeline.pipeline_config import PIPELINE_PRESETS
    from rlhf_engine.stages.ppo import evaluate_rollout, train_ppo

    cfg = replace(PIPELINE_PRESETS["quick"], out=str(quick), sweep_lr=HACK_LR, sweep_steps=12)
    beta_0 = sweep.settings(cfg)[0]
    assert beta_0.kl_coef == 0.0 and beta_0.target_kl is None
    ppo = replace(sweep.sweep_ppo_config(ppo_config(cfg, Paths.under(str(quick)), None), cfg, str(quick), beta_0),
                  out=str(quick / "hack"), eval_every=2, on_overoptimization="stop", progress=False)  # fmt: skip
    result = train_ppo(ppo)
    over = result.overoptimization
    assert result.stopped_by == "overoptimization" and result.steps == over["alarm_step"] < 12, over
    evals = {r["step"]: r for r in jsonl(quick / "hack" / "metrics.jsonl") if "eval_reward/gold" in r}
    gold = {s: r["eval_reward/gold"] for s, r in evals.items()}
    proxy = {s: r["eval_reward/proxy"] for s, r in evals.items()}
    best, alarm = over["best_step"], over["alarm_step"]
    assert max(evals) == alarm and gold[best] == max(gold.values()) == over["best_watched"]
    # the hump: the gold rose from the SFT policy, then fell while the proxy rose past its value at the peak
    assert gold[0] < gold[best] and gold[alarm] < gold[best] and proxy[alarm] > proxy[best]
    assert all(gold[s] < gold[best] and proxy[s] > proxy[best] for s in evals if s > best)
    # what `stop` saved is the peak's policy, not the last step's: its held-out gold, evaluated again (the
    # same prompts and draws), is the peak's, above what the last step's weights scored
    stack = ModelStack.from_saved(ppo.out)
    prompts = load_prompts(os.path.join(ppo.out, EVAL_PROMPTS_FILE))
    again = evaluate_rollout(stack, prompts, [("gold", FunctionReward(world.SCORE_FN), 1.0)], ppo, Dist())
    assert again["eval_reward_mean"] == pytest.approx(gold[best], abs=1e-9) and again["eval_reward_mean"] > gold[alarm]


def test_the_kl_sweep_reports_rows_of_its_own_runs(quick, capsys):
    from rlhf_engine.pipeline import sweep
    from rlhf_engine.pipeline.pipeline_config import PIPELINE_PRESETS
    from rlhf_engine.pipeline.report import side

    # the quick run again with the sweep: every stage is reused, then 3 PPO runs of 4 steps from its SFT and RM
    assert main(["pipeline", "--quick", "--out", str(quick), "--no-progress", "--kl-sweep", "--sweep-steps", "4"]) == 0
    assert "sweep 3/3 adaptive-4" in capsys.readouterr().out
    report = load(quick / "report.json")
    rows = report["kl_sweep"]["rows"]
    assert [r["setting"] for r in rows] == ["beta-0", "beta-0.1", "adaptive-4"]
    assert report["kl_sweep"]["before"] == report["before"]
    md = (quick / "report.md").read_text()
    for r in rows:
        run = quick / "sweep" / r["setting"]
        assert r["dir"] == str(run) and load(run / "result.json")["steps"] == r["steps"] == 4
        # the row's held-out numbers are its own run's evaluation (eval.json) ...
        after = side(load(run / "eval.json")["after"])
        assert {k: r[k] for k in after} == after
        # ... and its training numbers its own metrics file's held-out evaluations
        metrics = jsonl(run / "metrics.jsonl")
        evals = [m for m in metrics if "eval_reward/gold" in m]
        peak = max(evals, key=lambda m: m["eval_reward/gold"])
        assert (r["peak_gold"], r["peak_step"], r["proxy_at_peak"]) == (
            peak["eval_reward/gold"], peak["step"], peak["eval_reward/proxy"])  # fmt: skip
        assert (r["final_gold"], r["final_proxy"], r["final_kl"]) == (
            evals[-1]["eval_reward/gold"], evals[-1]["eval_reward/proxy"], evals[-1]["eval_kl"])  # fmt: skip
        line = next(x for x in md.splitlines() if x.startswith(f"| {r['setting']} |"))
        assert f"| {r['true_score']:.3f} |" in line and f"| {r['kl']:.3f} |" in line
        betas = {m["beta"] for m in metrics if m.get("beta") is not None}
        assert betas == {0.0} if r["setting"] == "beta-0" else len(betas) > 1 if r["target_kl"] else betas == {0.1}
    cfg = replace_quick(out=str(quick), sweep_steps=4)
    assert sweep.load_rows(str(quick), cfg) == rows  # the rows again from the runs' files alone
    with open(quick / "hacking.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert PIPELINE_PRESETS["quick"].kl_sweep is False  # the sweep is asked for, never a default


def replace_quick(**kw):
    from dataclasses import replace

    from rlhf_engine.pipeline.pipeline_config import PIPELINE_PRESETS

    return replace(PIPELINE_PRESETS["quick"], **kw)


def test_user_data_and_model_directory(tmp_path, capsys):
    from rlhf_engine.model.loading import build_preset

    model = tmp_path / "my-model"
    build_preset("tiny-llama", 0, str(model))
    data = tmp_path / "corpus.jsonl"
    with open(data, "w") as f:
        for i in range(6):
            for reply in (f"You could try step {i}. Good luck!", "Nothing you can do.", "Stupid question."):
                f.write(json.dumps({"prompt": f"Help me with task {i}.", "completion": reply}) + "\n")
    out = tmp_path / "out"
    args = ["pipeline", "--data", str(data), "--model", str(model), "--out", str(out), "--no-progress",
            "--quantization", "none", "--heldout-prompts", "2", "--sft-steps", "30", "--samples-per-prompt", "4",
            "--rm-epochs", "1", "--ppo-steps", "2", "--rollout-batch-size", "4", "--max-new-tokens", "12",
            "--eval-samples", "1"]  # fmt: skip
    assert main(args) == 0
    report = load(out / "report.json")
    assert report["model"] == str(model) and report["prompts"] == {"train": 4, "heldout": 2, "samples_per_heldout_prompt": 1}
    assert len(jsonl(out / "data" / "sft.jsonl")) == 12
    assert set(report["after"]) == set(KEYS)


def small_pipeline(tmp_path, out, sft_steps) -> dict:
    """A few-step pipeline on the tiny-llama preset and a small corpus; returns its report."""
    data = tmp_path / "corpus.jsonl"
    if not data.exists():
        with open(data, "w") as f:
            for i in range(8):
                for reply in (f"You could try step {i}. Good luck!", "Nothing you can do.", "Stupid question."):
                    f.write(json.dumps({"prompt": f"Help me with task {i}.", "completion": reply}) + "\n")
    args = ["pipeline", "--data", str(data), "--model", "tiny-llama", "--out", str(out), "--no-progress",
            "--heldout-prompts", "2", "--sft-steps", str(sft_steps), "--samples-per-prompt", "3", "--rm-epochs", "1",
            "--ppo-steps", "1", "--rollout-batch-size", "4", "--max-new-tokens", "6", "--eval-samples", "1"]  # fmt: skip
    assert main(args) == 0
    return load(out / "report.json")


def test_a_rerun_with_a_longer_sft_redoes_every_stage_downstream(tmp_path, capsys):
    # issue 21: PPO used to resume on the old reward model and policy while its reference adapter changed
    # under it. Now SFT resumes and trains on; the feedback (its key holds the SFT adapter's hash), the reward
    # model (its data changed), PPO (its starting adapter and reward model changed) and the evaluation start
    # over, and the rerun ends where a fresh run with the longer SFT ends.
    first = small_pipeline(tmp_path, tmp_path / "out", sft_steps=10)
    second = small_pipeline(tmp_path, tmp_path / "out", sft_steps=20)
    printed = capsys.readouterr().out
    assert "rm: " in printed and "starting it over" in printed
    assert second["reused"] == [] and second["sft"]["steps"] == 20
    assert second["before"] != first["before"] and second["after"] != first["after"]
    fresh = small_pipeline(tmp_path, tmp_path / "fresh", sft_steps=20)
    for key in ("before", "after", "samples", "sft", "feedback", "rm", "ppo"):
        assert second[key] == fresh[key], key


def bad_args(tmp_path, data):
    return ["pipeline", "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "completion": "c"}\n{"prompt": "p"', "2: "),
        ('{"prompt": "p", "completion": "c"}\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
         "2: the pipeline takes {\"prompt\", \"completion\"} records"),
    ],
)  # fmt: skip
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(line + "\n")
    assert main(bad_args(tmp_path, data)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing starts on bad data


def test_too_few_prompts_and_bad_settings_are_one_line(tmp_path, capsys):
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "c"}) + "\n" for p in ("a", "b")))
    assert main(bad_args(tmp_path, data)) == 2
    assert capsys.readouterr().err.strip() == "error: the corpus has 2 distinct prompts; the pipeline needs at least 3"
    assert main(["pipeline", "--samples-per-prompt", "2", "--out", str(tmp_path / "o")]) == 2
    assert "n >= 3 completions" in capsys.readouterr().err
    assert main(["pipeline", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_help_is_complete():
    from rlhf_engine.cli import build_parser
    from rlhf_engine.pipeline.pipeline_config import PipelineConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert list(sub)[:6] == ["pipeline", "sft", "rm", "ppo", "eval", "dpo"]
    text = sub["pipeline"].format_help()
    for name in PipelineConfig.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        assert flag in text or f"--no-{name.replace('_', '-')}" in text, flag
    assert "--quick" in text and "report.json" in text

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

"""`python -m rlhf_engine` (`python -m engine` from a checkout's root): complete help, one-line errors
with exit status 2, an end-to-end rm run."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_engine.__main__ import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLES = os.path.join(ROOT, "examples", "feedback_ranked.jsonl")


def run_cli(*args, module="rlhf_engine", cwd=None):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_rm_option():
    top = run_cli("--help")
    assert top.returncode == 0 and "rm" in top.stdout
    out = run_cli("rm", "--help")
    assert out.returncode == 0
    for flag in ("--data", "--model", "--out", "--preset", "--epochs", "--max-steps", "--batch-size", "--lr",
                 "--max-length", "--margin", "--eval-fraction", "--checkpoint-every", "--agreement-threshold",
                 "--exclude-flagged", "--quantization", "--device", "--lora-r", "--seed", "--no-resume",
                 "--no-progress", "tiny-llama", "example: python -m engine rm"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.jsonl", "--model", "tiny-llama"], "error: data 'missing.jsonl': no such file"),
        (["--data", EXAMPLES, "--model", "/no/such/model"], "error: model '/no/such/model': not a preset"),
        (["--data", EXAMPLES, "--model", "tiny-llama", "--lr", "-1"], "error: lr=-1.0: must be > 0"),
        (["--data", EXAMPLES, "--model", "tiny-llama", "--eval-fraction", "1.5"], "error: eval_fraction=1.5"),
    ],
)
def test_bad_path_or_config_is_one_line_and_exit_2(tmp_path, args, message):
    out = run_cli("rm", *args, "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # exactly one line
    assert out.stderr.startswith(message), out.stderr


def test_model_directory_without_a_model_is_one_line(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = run_cli("rm", "--data", EXAMPLES, "--model", str(empty), "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: model {str(empty)!r}: no config.json (expected a save_pretrained directory)"


def test_bad_data_line_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "completions": ["a", "b", "c"], "rankings": [[1, 2]]}) + "\n")
    out = run_cli("rm", "--data", str(data), "--model", "tiny-llama", "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {data}:2: ranking 0 has 2 ranks for 3 completions"


@pytest.mark.parametrize("name, cwd", [("rlhf_engine", None), ("engine", ROOT)])
def test_import_engine_stays_light(name, cwd):
    # rlhf_engine as installed, and the checkout folder imported by its own name from the repo root:
    # there it only forwards names, so `engine.X` is `rlhf_engine.X` (one copy of every class)
    code = (
        f"import sys, {name} as e, rlhf_engine; assert e.consensus_ranking([[2, 1, 3]]) == [2, 1, 3]; "
        "assert e.FeedbackError is rlhf_engine.FeedbackError; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    assert "ModelStack" in __import__("rlhf_engine").__all__


def test_python_m_engine_from_the_checkout_root():
    out = run_cli("rm", "--help", module="engine", cwd=ROOT)
    assert out.returncode == 0 and "--data" in out.stdout, out.stderr


def test_unknown_flag_is_a_usage_error():
    out = run_cli("rm", "--data", EXAMPLES, "--model", "tiny-llama", "--out", "x", "--learning-rate", "1")
    assert out.returncode == 2 and "unrecognized arguments: --learning-rate" in out.stderr


def test_rm_end_to_end_on_the_example_file(tmp_path, capsys):
    out = tmp_path / "rm"
    args = ["rm", "--data", EXAMPLES, "--model", "tiny-llama", "--out", str(out), "--preset", "tiny",
            "--eval-fraction", "0.25", "--no-progress", "--max-steps"]
    assert main(args + ["2"]) == 0
    printed = capsys.readouterr().out
    assert "rm: 2 steps" in printed and "flagged labelers: cy" in printed
    for name in ("adapter_reward.safetensors", "heads.safetensors", "stack.json", "metrics.jsonl",
                 "labelers.json", "result.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    labelers = json.loads((out / "labelers.json").read_text())
    assert labelers["cy"]["flagged"] and not labelers["ana"]["flagged"]
    # rerun with more steps: resumes from the checkpoint at step 2
    assert main(args + ["4"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == 2 and result["steps"] == 4

"""`python -m rlhf_engine` (`python -m engine` from a checkout's root): complete help, one-line errors
with exit status 2 for every bad input (issue 8, items 15-20), exit status 3 for a diverged run, an
end-to-end rm run.

Errors found before torch is imported (options, config, data) run the real command in a subprocess
(~0.1 s); errors found later, and training runs, call `main` in this process (a subprocess costs ~3 s
of imports)."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_engine.cli import main
from rlhf_engine.core.files import CHECKPOINT_FILE, METRICS_FILE
from rlhf_engine.core.lock import OutputLock

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


def test_rm_has_the_flags_of_every_stage(tmp_path):
    # rm's flags come from its config like every other stage's: the ones its old hand-written parser lacked
    # are there, with --config, and every stage shares the generated run and stack flags
    helps = {stage: run_cli(*stage.split(), "--help").stdout for stage in ("rm", "sft", "dpo", "ppo", "cai revise")}
    for flag in ("--config", "--weight-decay", "--max-grad-norm", "--log-every", "--lora-alpha", "--lora-dropout",
                 "--compute-dtype"):
        assert flag in helps["rm"], flag
    shared = ("--config", "--out", "--seed", "--log-every", "--checkpoint-every", "--no-resume", "--no-progress",
              "--model", "--quantization", "--device", "--lora-r", "--lora-alpha")  # fmt: skip
    for stage, text in helps.items():
        assert all(flag in text for flag in shared), (stage, [f for f in shared if f not in text])
    # --config for rm: the file's fields, then the flags (a flag wins), validated as one config
    cfg = tmp_path / "rm.json"
    cfg.write_text(json.dumps({"lr": "fast", "stack": {"lora_r": 4}}))
    out = run_cli("rm", "--data", EXAMPLES, "--model", "tiny-llama", "--out", str(tmp_path / "o"), "--config", str(cfg))
    assert out.returncode == 2 and one_error_line(out.stderr).startswith("error: lr="), out.stderr
    cfg.write_text(json.dumps({"max_steps": 2, "weight_decay": 0.5, "stack": {"lora_r": 4}}))
    from rlhf_engine.cli import build_parser, stage_config

    args = build_parser().parse_args(["rm", "--data", EXAMPLES, "--model", "tiny-llama", "--out", str(tmp_path / "o"),
                                      "--config", str(cfg), "--max-steps", "3", "--quantization", "none"])  # fmt: skip
    config = stage_config(args)
    assert (config.max_steps, config.weight_decay, config.stack.lora_r) == (3, 0.5, 4)
    assert config.stack.quantization is None and config.stack.adapters == ("reward",)


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


def one_error_line(stderr: str) -> str:
    """The single line of stderr, which must be an `error: ...` line (no traceback, no usage block)."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


HUGE = "1" + "0" * 400  # a 401-digit number


@pytest.mark.parametrize(
    "args, message",
    [
        # item 17: non-finite values never reach training
        (["--lr", "inf"], "error: lr=inf: not a finite number"),
        (["--lr", "nan"], "error: lr=nan: not a finite number"),
        (["--margin", "nan"], "error: margin=nan: not a finite number"),
        (["--margin", "inf"], "error: margin=inf: not a finite number"),
        (["--margin", "1e39"], "error: margin=1e+39: outside the float32 range"),
        (["--margin", HUGE], "error: margin=inf: not a finite number"),  # float("1000...") is inf
        # item 18: a seed range, and argparse's own errors on one line too
        (["--seed", HUGE], "error: seed=100000000000000000000000...00000000 (401 characters): expected an "
                           "integer with 0 <= seed < 2**63"),
        (["--seed", "-1"], "error: seed=-1: expected an integer with 0 <= seed < 2**63"),
        (["--seed", "1.5"], "error: argument --seed: invalid int value: '1.5' (see python -m engine rm --help)"),
        (["--max-steps", HUGE], "error: max_steps=100000000000000000000000...00000000 (401 characters): outside "
                                "the int64 range"),
    ],
)
def test_bad_numbers_are_one_line_and_exit_2(tmp_path, args, message):
    out = run_cli("rm", "--data", EXAMPLES, "--model", "tiny-llama", "--out", str(tmp_path / "out"), *args)
    assert out.returncode == 2 and one_error_line(out.stderr) == message


def test_out_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    out = run_cli("rm", "--data", EXAMPLES, "--model", "tiny-llama", "--out", str(tmp_path / "file" / "rm"))
    assert out.returncode == 2
    file, out_dir = str(tmp_path / "file"), str(tmp_path / "file" / "rm")
    assert one_error_line(out.stderr) == f"error: out {out_dir!r}: {file!r} is a file, not a directory"


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', ":2: not UTF-8 (byte 0xe9 at column 16)"),
        (b'{"prompt": "p", "completions": ["a", "b"], "thumbs": null}', ":2: 'thumbs' must be a list of 2 entries"),
        (b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + HUGE.encode() + b"}",
         ":2: 'margin' must be a finite number within float32 range"),
        (b'{"prompt": "p", "completions": ["a", "b"], "rankings": [[' + HUGE.encode() + b", 1]]}",
         ":2: ranking 0 gives completion 0 rank 100000000000000000000000...00000000 (401 characters), outside 1..2"),
        (b"[" * 50000 + b"]" * 50000, ":2: not valid JSON (nested too deeply)"),
        (b'{"prompt": "p", "completions": ["a", "b"], "rankings": [[1, 2]], "labeller": ["x"]}',
         ":2: unknown field 'labeller' (did you mean 'labelers'?); ranked records have: prompt, completions, "
         "rankings, labelers, thumbs"),
    ],
)
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode() + b"\n" + line + b"\n")
    out = run_cli("rm", "--data", str(data), "--model", "tiny-llama", "--out", str(tmp_path / "out"))
    assert out.returncode == 2
    assert one_error_line(out.stderr).startswith(f"error: {data}{message}"), out.stderr


def rm_args(out, *more):
    return ["rm", "--data", EXAMPLES, "--model", "tiny-llama", "--out", str(out), "--preset", "tiny",
            "--no-progress", *more]


def test_out_in_proc_is_one_line(capsys):
    assert main(rm_args("/proc/rlhf-engine-rm")) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("error: out '/proc/rlhf-engine-rm': cannot create the output directory"), err


@pytest.mark.parametrize("content, message", [(b"", "empty file, not a checkpoint"),
                                              (b"PK\x03\x04 cut short", "truncated or not a checkpoint")])
def test_empty_or_truncated_checkpoint_is_one_line(tmp_path, capsys, content, message):
    out = tmp_path / "rm"
    out.mkdir()
    (out / CHECKPOINT_FILE).write_bytes(content)
    assert main(rm_args(out)) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err == f"error: {out / CHECKPOINT_FILE}: {message}; delete it or rerun with --no-resume"


def test_out_in_use_by_another_process(tmp_path):
    # item 16: this process holds OUT; the command, another process, fails at once naming us
    out = tmp_path / "rm"
    out.mkdir()
    lock = OutputLock(str(out))
    lock.acquire()
    try:
        res = run_cli(*rm_args(out))
    finally:
        lock.release()
    assert res.returncode == 2 and one_error_line(res.stderr) == f"error: {out} is in use by pid {os.getpid()}"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import rlhf_engine.stages.rm

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhf_engine.stages.rm, "train_reward_model", interrupted)
    assert main(rm_args(tmp_path / "rm")) == 130
    assert one_error_line(capsys.readouterr().err) == (
        "error: interrupted; the same command resumes from the last checkpoint"
    )


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    # item 17: --lr 1e30 moves the weights to ~1e30 at step 1; step 2's loss is NaN
    out = tmp_path / "rm"
    assert main(rm_args(out, "--lr", "1e30", "--max-steps", "5", "--checkpoint-every", "1")) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert errors == [
        f"error: step 2: loss is nan; stopped; the last good checkpoint is {out / CHECKPOINT_FILE} (step 1)"
    ]
    import torch

    ckpt = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    assert ckpt["step"] == 1 and all(torch.isfinite(t).all() for t in ckpt["state"]["weights"].values())
    for line in (out / METRICS_FILE).read_text().splitlines():  # strict JSON: no NaN token anywhere
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    assert not (out / "result.json").exists()


def test_no_progress_silences_the_loading_bars_too(tmp_path, capsys):
    # item 20: with progress on, transformers shows "Writing model shards" / "Loading weights" bars
    from transformers.utils import logging as hf_logging

    assert main([a for a in rm_args(tmp_path / "bars", "--max-steps", "1") if a != "--no-progress"]) == 0
    shown = capsys.readouterr().err
    assert "Loading weights" in shown and "rm: 100%" in shown
    assert main(rm_args(tmp_path / "quiet", "--max-steps", "1")) == 0
    quiet = capsys.readouterr().err
    for bar in ("Loading weights", "Writing model shards", "it/s]", "%|"):
        assert bar not in quiet, quiet
    assert hf_logging.is_progress_bar_enabled()  # restored after the run


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
    # a crash mid-row leaves a partial last metrics line: tolerated on resume (item 18)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.6')
    # rerun with more steps: resumes from the checkpoint at step 2
    assert main(args + ["4"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == 2 and result["steps"] == 4

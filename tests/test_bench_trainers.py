"""`python -m bench trainers`: our side at the --quick size writes complete rows, and a TRL peer that is not
installed is a row that says so (CI has no .venv-bench; the peer side is run by hand: README "Benchmarks")."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args, timeout=300):
    # bench/ is not installed: it runs from the checkout's root, as the README says
    return subprocess.run([sys.executable, "-m", "bench", "trainers", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_our_side_runs_and_a_missing_peer_is_a_clear_row(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"  # whether or not .venv-bench exists here
    out = bench("--quick", "--kinds", "dpo", "--threads", "1", "--peer-python", str(missing), "--json",
                str(tmp_path / "rows.jsonl"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "rows.jsonl")]
    assert [(r["kind"], r["side"]) for r in rows] == [("dpo", "ours"), ("dpo", "trl")]
    for r in rows:
        assert r["op"] == "trainers" and r["threads"] == 1 and r["device"] and r["date"], r
        assert r["versions"]["ours"]["torch"] and r["versions"]["trl"] is None, r
        assert r["loadavg_start"] and r["loadavg_end"] and r["samples_per_step"] == 4, r
        if r["side"] == "ours":
            assert r["status"] == "ok" and r["steps_timed"] == 1 and r["repeats"] == 1, r
            assert 0 < r["s_per_step_min"] <= r["s_per_step_median"], r
            assert r["samples_per_s"] == pytest.approx(4 / r["s_per_step_median"]), r
            assert r["process_peak_mib"] > 100 and r["step_peak_mib"] > 100, r  # torch alone is ~300 MiB
            assert math.isfinite(r["step1_loss"]) and r["s_per_step_p20"] <= r["s_per_step_p80"], r
        else:
            assert r["status"].startswith("not installed: no ") and "make bench-venv" in r["status"], r
            assert "s_per_step_median" not in r and "ratio_trl_over_ours" not in r, r
    assert "(not installed: no " in out.stdout
    assert "dpo (1 thread): n/a: trl: not installed" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kinds", "dpo,nosuch"], "--kinds: unknown nosuch; choose from dpo,dpo_precomputed,grpo"),
        (["--threads", "0"], "--threads '0': expected positive integers"),
        (["--warmup", "0"], "--repeats, --steps and --warmup: at least 1"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    out = bench(*args, timeout=60)
    assert out.returncode == 2 and message in out.stderr.strip().splitlines()[-1], out.stderr

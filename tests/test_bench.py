"""The benchmark harness: one-line usage errors, every op's bench runs and writes complete JSON rows,
and gpu-check's target evaluation (the GPU runs themselves need a GPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*args, timeout=300):
    # bench/ is not installed: it runs from the checkout's root, as the README says
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def gpu_check():
    sys.path.insert(0, ROOT)
    try:
        import bench.gpu_check as module

        yield module
    finally:
        sys.path.remove(ROOT)


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "logprobs", "--providers", "nosuch,cpp"], "--providers: unknown nosuch; choose from"),
        (["bench", "logprobs", "--modes", "bwd"], "--modes: unknown bwd; choose from fwd,fwd+bwd"),
        (["bench", "logprobs", "--device", "tpu"], "--device 'tpu': expected cpu or cuda"),
        (["bench", "nosuch"], "unknown op 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line(args, message):
    out = bench(*args)
    assert out.returncode == 2
    assert message in out.stderr.strip().splitlines()[-1], out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
@pytest.mark.parametrize("args", [["bench", "gae", "--device", "cuda"], ["bench.gpu_check", "--out", "x"]])
def test_cuda_without_a_gpu_is_a_clear_error(args):
    out = bench(*args)
    assert out.returncode == 2 and "no CUDA device" in out.stderr.strip().splitlines()[-1], out.stderr


def test_every_op_bench_runs_and_writes_complete_rows(tmp_path):
    own_tests = ("ppo_step", "dpo_step", "trainers", "generate")  # benches with own flags: tested on their own
    ops = [o for o in bench("bench", "--list").stdout.split("ops:")[1].split() if o not in own_tests]
    assert {"logprobs", "full_kl", "token_stats", "linear_logprobs", "linear_token_stats", "gae", "ppo_loss",
            "value_loss", "whiten", "kl_penalty"} <= set(ops)  # fmt: skip
    # one process for all ops (imports once); our C++ backend only, forward only, smallest shapes
    code = (
        "import sys\nfrom bench.__main__ import main\n"
        f"for op in {ops!r}:\n"
        f"    main([op, '--quick', '--device', 'cpu', '--providers', 'cpp', '--modes', 'fwd', '--target',"
        f" '--json', {str(tmp_path)!r} + '/' + op + '.jsonl'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for op in ops:
        rows = [json.loads(line) for line in open(tmp_path / f"{op}.jsonl")]
        assert rows, op
        for row in rows:
            assert row["op"] == op and row["provider"] == "cpp" and row["mode"] == "fwd"
            for key in ("median_ms", "p20_ms", "p80_ms", "x_roofline", "peak_extra_mib", "device", "versions",
                        "date", "roofline"):
                assert row.get(key) is not None, (op, key)
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]


def _row(op, mode, shape, provider, **values):
    return {"op": op, "mode": mode, "shape": shape, "provider": provider, "dtype": "bfloat16", "median_ms": 1.0,
            "p20_ms": 0.9, "p80_ms": 1.1, "gb_s": None, "tflop_s": None, "x_roofline": None,
            "peak_extra_mib": None, **values}  # fmt: skip


def test_gpu_check_evaluates_targets(gpu_check, tmp_path):
    shape = {"N": 16384, "V": 128256}
    lin = {"N": 8192, "H": 4096, "V": 128256, "wgrad": 0}
    rows = [
        _row("logprobs", "fwd", shape, "triton", x_roofline=1.08),  # met: 1.08 <= 1.10
        _row("logprobs", "fwd", shape, "eager", x_roofline=0.5),  # a baseline never counts
        _row("logprobs", "fwd+bwd", shape, "triton", x_roofline=1.25),  # missed: > 1.20
        _row("logprobs", "fwd+bwd", {"N": 4096, "V": 151936}, "triton", x_roofline=1.0),  # another shape
        _row("linear_logprobs", "fwd+bwd", lin, "triton", x_roofline=1.2, peak_extra_mib=300.0),  # too much memory
        _row("gae", "fwd", {"B": 512, "T": 2048, "mask": "bool"}, "triton", median_ms=0.060),
        _row("gae", "fwd", {"B": 512, "T": 2048, "mask": "bool"}, "cuda", median_ms=0.040),  # the best of triton/cuda counts
    ]
    results = {r["target"]: r for r in gpu_check.evaluate(gpu_check.TARGETS, rows)}
    status = {k: v["status"] for k, v in results.items()}
    assert status["log-prob forward <= 1.10x HBM roofline"] == "met"
    assert status["log-prob fwd+bwd <= 1.20x HBM roofline"] == "missed"
    assert status["full-vocab KL forward <= 1.15x HBM roofline"] == "not measured"
    assert status[gpu_check.TARGETS[3].what] == "missed"
    assert results["GAE at B=512, T=2048 under 50 us"]["provider"] == "cuda"
    assert status["GAE at B=512, T=2048 under 50 us"] == "met"
    meta = {"device": "H200", "versions": {"torch": "2.11"}, "date": "2026-11-24", "tests": "passed (exit 0): x"}
    text = gpu_check.write_summary(str(tmp_path), rows, list(results.values()), meta)
    assert "| log-prob fwd+bwd <= 1.20x HBM roofline | missed | triton | 1.250 x roof |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["targets"][0]["status"] == "met"


def test_ppo_step_bench_times_every_phase(tmp_path):
    out = bench("bench", "ppo_step", "--quick", "--device", "cpu", "--steps", "1", "--json", str(tmp_path / "r.jsonl"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert [r["provider"] for r in rows] == ["auto", "torch"]
    for r in rows:
        assert r["steps_timed"] == 1 and r["step_s"] > 0 and r["time_generate_s"] > 0 and r["time_train_s"] > 0
        assert r["non_generation_s"] == pytest.approx(r["step_s"] - r["time_generate_s"])
        assert r["peak_mem_mib"] > 0 and r["four_bf16_weights_mib"] > 0 and r["device"] and r["date"]
    assert "non-generation phases: torch / auto" in out.stdout


def test_generate_bench_compares_our_sampler_with_generate_in_both_precisions(tmp_path):
    out = bench("bench", "generate", "--model", "tiny-llama", "--batch", "2", "--new-tokens", "3", "--repeats", "1",
                "--json", str(tmp_path / "g.jsonl"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "g.jsonl")]
    assert [(r["precision"], r["provider"]) for r in rows] == [
        ("nf4", "ours"), ("nf4", "generate"), ("nf4", "bnb"), ("none", "ours"), ("none", "generate")]
    for r in rows:
        assert r["median_s"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 3 / r["median_s"]) and r["threads"] >= 1

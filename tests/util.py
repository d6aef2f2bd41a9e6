"""Shared test helpers: which backends a run covers and where their inputs live, and verbose
comparisons against float64 references."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

import rlhf_kernels as kernels

EPS32 = torch.finfo(torch.float32).eps
ALL_BACKENDS = ("torch", "triton", "cpp", "cuda")
ENV_TEST_BACKENDS = "RLHF_TEST_BACKENDS"


def expected_backends() -> tuple[str, ...]:
    """The backends this run covers: RLHF_TEST_BACKENDS (comma-separated) or all of them."""
    listed = os.environ.get(ENV_TEST_BACKENDS, "").strip()
    if not listed:
        return ALL_BACKENDS
    names = tuple(b.strip() for b in listed.split(",") if b.strip())
    unknown = set(names) - set(ALL_BACKENDS)
    if unknown:
        raise ValueError(f"{ENV_TEST_BACKENDS}={listed!r}: unknown backends {sorted(unknown)}")
    return names


def kernel_backends(implemented: tuple[str, ...]) -> list[str]:
    """The op's kernel backends to parametrize over: every one it implements except the reference
    (comparing the reference with itself proves nothing). The list never depends on this machine:
    `device_for` decides, per case, between running, skipping (cuda without a GPU) and failing."""
    return [b for b in implemented if b != "torch"]


def device_for(backend: str) -> torch.device:
    """Where `backend`'s test inputs go. A backend this run covers (expected_backends) that cannot run
    fails the test; "cuda" skips without a GPU or without CUDA in the extension."""
    if backend not in expected_backends():
        pytest.skip(f"{backend} is not in {ENV_TEST_BACKENDS}={os.environ.get(ENV_TEST_BACKENDS)}")
    status = kernels.backends()[backend]
    if backend == "cuda":
        if status != "yes":
            pytest.skip(f"cuda: {status}")
        return torch.device("cuda")
    if not status.startswith("yes"):
        pytest.fail(
            f"backend {backend!r} is expected in this run but cannot run: {status} "
            f"(declare a narrower run with {ENV_TEST_BACKENDS}=...)"
        )
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def on(device: torch.device, *tensors):
    """The tensors moved to `device` (None stays None); one tensor in, one out."""
    moved = tuple(None if t is None else t.to(device) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = "", equal_nan=False
) -> None:
    """Compare in float64; infinities must match exactly and NaN fails unless `equal_nan` (then NaN
    must meet NaN). On failure report the count of mismatches, the first indices and their values,
    and the worst error."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    same_inf = (a == e) & torch.isinf(e)
    finite = torch.isfinite(e)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = (finite & ~(err <= atol + rtol * e.abs())) | (~finite & ~same_inf & ~(equal_nan & torch.isnan(a) & torch.isnan(e)))
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        shown = "; ".join(f"{tuple(i)}: got {a[tuple(i)].item():.8g}, want {e[tuple(i)].item():.8g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (atol={atol:.3g}, rtol={rtol:.3g}); "
            f"worst finite error {err.max().item():.3g}; first: {shown}"
        )


def assert_rel_norm(actual: torch.Tensor, expected: torch.Tensor, *, bound: float, name: str = "") -> None:
    """Norm-wise relative error ||actual - expected|| / ||expected|| <= bound, in float64. For
    low-precision gradients, where an elementwise atol that admits the dtype's rounding would also
    admit an all-zero tensor (relative error 1)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite entries"
    denom = e.norm().item()
    err = (a - e).norm().item() / (denom if denom > 0 else 1.0)
    assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} (||expected|| = {denom:.4g})"


def synthetic_ranked(path, n_prompts: int, seed: int = 0, *, lengths=(6, 10), backwards_labeler: bool = True) -> str:
    """Ranked feedback JSONL with a learnable preference: the more letters from a-m, the better. Each prompt
    has 3 completions of one length in `lengths` (all a-m, mixed, all n-z) in shuffled order, ranked by two
    faithful labelers (ana, ben) and, with `backwards_labeler`, a third (cy) who ranks backwards (flagged
    and excluded by the consensus). The consensus gives 3 pairs per prompt (datasets.feedback.build_pairs)."""
    rng = random.Random(seed)
    lo, hi = "abcdefghijklm", "nopqrstuvwxyz"

    def word(letters, n):
        return "".join(rng.choice(letters) for _ in range(n))

    rows = []
    for i in range(n_prompts):
        n = rng.randint(*lengths)
        good, mixed, bad = word(lo, n), word(lo, n // 2) + word(hi, n - n // 2), word(hi, n)
        completions = [good, mixed, bad]
        rng.shuffle(completions)
        truth = [[good, mixed, bad].index(c) + 1 for c in completions]
        rankings, labelers = [truth, truth], ["ana", "ben"]
        if backwards_labeler:
            rankings, labelers = rankings + [[4 - r for r in truth]], labelers + ["cy"]
        rows.append({"prompt": f"q{i} {word(lo + hi, 4)}", "completions": completions, "rankings": rankings,
                     "labelers": labelers})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- the stage tests' helpers -------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARD = os.path.join(ROOT, "tests", "_reward_fns.py") + ":lowercase_share"  # a rule-based reward for PPO tests
# metrics that depend on the machine's speed and memory, not on the run: left out where runs are compared
TIMING = ("elapsed_s", "tokens_per_s", "step_s", "peak_mem_mib", "time_generate_s", "time_score_s", "time_logprobs_s",
          "time_old_logprobs_s", "time_ref_logprobs_s", "time_train_s")  # fmt: skip


def tiny(preset, tmp_path, name="out", **kw):
    """A stage's "tiny" preset writing to tmp_path/name, with no progress bars and no held-out evaluation
    unless asked; `preset` is the stage's preset function (sft_preset, ppo_preset, ...)."""
    kw.setdefault("progress", False)
    kw.setdefault("eval_every", 0)
    return preset("tiny", out=str(tmp_path / name), **kw)


def rows(out) -> list[dict]:
    """OUT/metrics.jsonl as a list of rows."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def untimed(rs):
    """Metrics rows without the TIMING keys."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]


def saved_weights(out, names=("adapter_policy.safetensors",)) -> dict:
    """The tensors of saved adapter / head files in OUT."""
    w = {}
    for name in names:
        w.update(load_file(os.path.join(out, name)))
    return w

"""stages.dpo: the DPO / IPO / conservative-DPO losses against hand-derived values, the stage on the run
machinery (learning a synthetic preference on held-out prompts, kernels on vs off, precomputed reference
log-probs, the two reference modes, resume after SIGKILL), bad data on the command line, and the
dpo_step benchmark. Letters: B pairs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.algos.losses import dpo_losses
from rlhf_engine.cli import main
from rlhf_engine.errors import ConfigError
from rlhf_engine.stages.dpo import train_dpo
from rlhf_engine.stages.dpo_config import dpo_preset
from rlhf_engine.stages.sft import train_sft
from rlhf_engine.stages.sft_config import sft_preset
from util import ROOT, assert_rel_norm, rows, saved_weights, synthetic_ranked, tiny, untimed

# sigmoid(1) and sigmoid(-1), for the hand-derived cases
S1, SM1 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))


# ---- the losses --------------------------------------------------------------------------------------


def _losses(pi_c, ref_c, pi_r, ref_r, dtype=torch.float64, **kw):
    t = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (pi_c, ref_c, pi_r, ref_r)]
    losses, rc, rr = dpo_losses(t[0], t[2], t[1], t[3], **kw)  # (policy c, policy r, reference c, reference r)
    losses.sum().backward()
    return losses, rc, rr, t


# Each case: policy and reference log-probs of 2 pairs, beta, the loss type, and the hand-derived losses and
# d loss / d pi_chosen per pair (d / d pi_rejected is its negative: every loss depends on m alone).
# Pair 0: pi_c - ref_c = -3 - (-4) = 1, pi_r - ref_r = -5 - (-4) = -1, so m = 2 and, with beta = 0.5, beta m = 1.
# Pair 1: the policy equals the reference: m = 0.
CASES = [
    # dpo: loss = -log sigmoid(beta m) = log(1 + e^{-beta m}): log(1 + e^-1) = 0.3132616875 and log 2.
    # d/d pi_c = d/dm = -beta sigmoid(-beta m): -0.5 sigmoid(-1) and -0.5 / 2.
    ("dpo", 0.0, [math.log(1 + math.exp(-1)), math.log(2)], [-0.5 * SM1, -0.25]),
    # cdpo, eps = 0.25: loss = -(1 - eps) log sigmoid(x) - eps log sigmoid(-x), x = beta m. Since
    # log sigmoid(-x) = log sigmoid(x) - x, loss = -log sigmoid(x) + eps x: log(1 + e^-1) + 0.25 at x = 1,
    # log 2 at x = 0. d/dx = -sigmoid(-x) + eps (with sigmoid(x) = 1 - sigmoid(-x)), times beta for d/d pi_c.
    ("cdpo", 0.25, [math.log(1 + math.exp(-1)) + 0.25, math.log(2)], [0.5 * (-SM1 + 0.25), 0.5 * (-0.5 + 0.25)]),
    # ipo: loss = (m - 1/(2 beta))^2 with 1/(2 beta) = 1: (2 - 1)^2 = 1 and (0 - 1)^2 = 1; d/dm = 2 (m - 1):
    # 2 and -2 (beta does not scale m in IPO).
    ("ipo", 0.0, [1.0, 1.0], [2.0, -2.0]),
]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("loss_type, eps, want, want_grad", CASES)
def test_losses_against_hand_derived_values(loss_type, eps, want, want_grad, dtype, tol):
    losses, rc, rr, (pi_c, ref_c, pi_r, ref_r) = _losses([-3.0, -7.0], [-4.0, -7.0], [-5.0, -2.0], [-4.0, -2.0],
                                                         dtype, beta=0.5, loss_type=loss_type,
                                                         label_smoothing=eps)  # fmt: skip
    assert losses.dtype == dtype
    torch.testing.assert_close(losses.detach().double(), torch.tensor(want, dtype=torch.float64), atol=tol, rtol=tol)
    torch.testing.assert_close(pi_c.grad.double(), torch.tensor(want_grad, dtype=torch.float64), atol=tol, rtol=tol)
    torch.testing.assert_close(pi_r.grad, -pi_c.grad)
    # the implicit rewards beta (log pi - log ref): 0.5 * 1, 0.5 * 0 and 0.5 * -1, 0; the reference gets no gradient
    assert rc.tolist() == [0.5, 0.0] and rr.tolist() == [-0.5, 0.0] and not rc.requires_grad
    assert ref_c.grad is None and ref_r.grad is None


def test_ipo_is_zero_at_its_target_margin_and_symmetric_around_it():
    # m = 1/(2 beta) = 2.5 for beta = 0.2: loss 0 and gradient 0; m = 2.5 +- 1: loss 1 either way
    losses, _, _, (pi_c, *_) = _losses([2.5, 3.5, 1.5], [0.0] * 3, [0.0] * 3, [0.0] * 3, beta=0.2, loss_type="ipo")
    assert losses.tolist() == pytest.approx([0.0, 1.0, 1.0]) and pi_c.grad.tolist() == pytest.approx([0.0, 2.0, -2.0])


def test_losses_stay_finite_at_extreme_margins():
    # beta m = +-200 in fp32: -log sigmoid(200) = log(1 + e^-200) underflows to 0 (not NaN), -log sigmoid(-200) = 200
    losses, _, _, (pi_c, *_) = _losses([2000.0, -2000.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], torch.float32, beta=0.1)
    assert losses.tolist() == [0.0, pytest.approx(200.0)] and torch.isfinite(pi_c.grad).all()
    assert pi_c.grad.tolist() == [pytest.approx(0.0, abs=1e-30), pytest.approx(-0.1)]


def test_preferring_the_chosen_lowers_every_loss_and_swapping_sides_mirrors_dpo():
    # a policy that moved towards the chosen answer (m > 0) has a lower DPO/cDPO loss than at m = 0, and
    # DPO's loss of the swapped pair is the loss at -m: -log sigmoid(-x) = -log sigmoid(x) + x
    for loss_type, eps in (("dpo", 0.0), ("cdpo", 0.1)):
        better, *_ = _losses([-1.0], [-2.0], [-3.0], [-2.0], beta=1.0, loss_type=loss_type, label_smoothing=eps)
        tie, *_ = _losses([-2.0], [-2.0], [-2.0], [-2.0], beta=1.0, loss_type=loss_type, label_smoothing=eps)
        assert better.item() < tie.item() == pytest.approx(math.log(2))
    fwd, *_ = _losses([-1.0], [-2.0], [-3.0], [-2.0], beta=1.0)
    back, *_ = _losses([-3.0], [-2.0], [-1.0], [-2.0], beta=1.0)
    assert back.item() == pytest.approx(fwd.item() + 2.0)
    with pytest.raises(ValueError, match="loss_type='kto'"):
        dpo_losses(*(torch.zeros(1),) * 4, beta=0.1, loss_type="kto")


# ---- data -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    # two faithful labelers, completions of 8-12 letters
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    return synthetic_ranked(path, n_prompts=32, lengths=(8, 12), backwards_labeler=False)


def config(tmp_path, data, name="out", **kw):
    return tiny(dpo_preset, tmp_path, name, data=data, **kw)


# ---- the stage ------------------------------------------------------------------------------------------


def test_dpo_learns_a_synthetic_preference_on_held_out_prompts(tmp_path, prefs):
    # 24 training prompts x 3 pairs, 8 held-out prompts (24 pairs) the policy never sees. The reference is
    # the bare base and the fresh policy equals it, so at step 0 every margin is exactly 0 (accuracy 0: a
    # tie is not a win, loss log 2). After one epoch (9 steps) the policy's own log-prob margin of chosen
    # over rejected on the held-out pairs has grown (measured: -0.5 -> 29.1 nats), they are ordered right
    # (measured: accuracy 1.0) and the held-out loss fell (0.693 -> 0.103).
    result = train_dpo(config(tmp_path, prefs, max_steps=9, eval_fraction=0.25))
    rs = rows(result.out)
    assert result.train_pairs == 72 and result.eval_pairs == 24 and result.reference == "base"
    first, last = rs[0], rs[-1]
    assert first["step"] == 0 and first["eval_accuracy"] == 0.0 and first["eval_reward_margin"] == 0.0
    assert first["eval_loss"] == pytest.approx(math.log(2))
    before = first["eval_logps_chosen"] - first["eval_logps_rejected"]
    after = last["eval_logps_chosen"] - last["eval_logps_rejected"]
    assert after > before + 10.0, (before, after)
    assert last["eval_accuracy"] >= 0.9 and last["eval_reward_margin"] > 1.0 and last["eval_loss"] < 0.3, last
    for key in ("loss", "accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
                "logps_rejected", "grad_norm", "lr", "tokens_per_s", "step_s", "peak_mem_mib"):  # fmt: skip
        assert all(key in r for r in rs[1:]), key
    # the training margin is chosen - rejected rewards, step by step
    for r in rs[1:]:
        assert r["reward_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"], abs=1e-6)
    assert json.load(open(os.path.join(result.out, "stack.json")))["roles"] == ["policy"]
    held = [json.loads(line)["prompt"] for line in open(os.path.join(result.out, "eval_prompts.jsonl"))]
    assert len(held) == 8 and all(h.startswith("q") for h in held)  # for `engine eval --policy OUT`


def test_kernels_on_vs_off_and_the_precomputed_reference(tmp_path, prefs):
    # The same 3 DPO steps with the fused kernels ("auto": C++ here) and with the PyTorch reference ([N, V]
    # logits): the same losses, statistics and adapter weights. Tolerance: both are fp32 computations of
    # the same math in different orders (~1e-6 relative per op); sequence log-probs are sums of ~12 token
    # log-probs and the margin a difference of four of them, so metrics agree to 1e-4; weights compare
    # norm-wise as in tests/test_ppo.py (Adam amplifies fp32 differences where a gradient is near 0).
    # The reference log-probs computed once at the start (precompute_ref_logps) give the same run up to
    # the fp32 order of the reference forward over other batches (1e-5).
    on = train_dpo(config(tmp_path, prefs, "on", max_steps=3, backend="auto"))
    off = train_dpo(config(tmp_path, prefs, "off", max_steps=3, backend="torch"))
    pre = train_dpo(config(tmp_path, prefs, "pre", max_steps=3, precompute_ref_logps=True))
    ron = untimed(rows(on.out))
    assert [r["step"] for r in ron] == [0, 1, 2, 3]
    for other, rel in ((off, 1e-4), (pre, 1e-5)):
        for a, b in zip(ron, untimed(rows(other.out)), strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=rel, abs=10 * rel), (other.out, a["step"], k)
        wa, wb = saved_weights(on.out), saved_weights(other.out)
        for k in wa:
            assert_rel_norm(wa[k], wb[k], bound=1e-3, name=k)


@pytest.mark.parametrize("loss_type, eps, first_loss", [("ipo", 0.0, 1 / (4 * 0.1**2)), ("cdpo", 0.1, math.log(2))])
def test_ipo_and_cdpo_runs(tmp_path, prefs, loss_type, eps, first_loss):
    # step 1's batch is scored before any update by a policy equal to the reference (m = 0): IPO's loss is
    # (0 - 1/(2 beta))^2 = 1 / (4 beta^2) = 25 at beta 0.1, conservative DPO's log 2; then it trains
    result = train_dpo(config(tmp_path, prefs, max_steps=3, loss_type=loss_type, label_smoothing=eps))
    rs = rows(result.out)
    assert rs[1]["loss"] == pytest.approx(first_loss, rel=1e-6)
    assert rs[-1]["loss"] < first_loss and all(math.isfinite(r["grad_norm"]) for r in rs[1:])


def test_the_reference_as_a_frozen_copy_of_the_starting_adapter(tmp_path, prefs):
    # A policy that starts from an SFT adapter: with the reference "init" (the default with --init-adapter)
    # the reference is that adapter frozen, so at step 0 every held-out margin is exactly 0 and the loss is
    # log 2; with the bare base as the reference it is not. The saved stack holds the frozen copy (what
    # `engine eval` compares the policy with).
    sft = train_sft(sft_preset("tiny", out=str(tmp_path / "sft"), progress=False, max_steps=3, eval_every=0))
    init = train_dpo(config(tmp_path, prefs, "init", max_steps=1, init_adapter=sft.out))
    base = train_dpo(config(tmp_path, prefs, "base", max_steps=1, init_adapter=sft.out, reference="base"))
    assert init.reference == "init" and base.reference == "base"
    r0 = rows(init.out)[0]
    assert r0["eval_reward_margin"] == 0.0 and r0["eval_rewards_chosen"] == 0.0 and r0["eval_accuracy"] == 0.0
    assert r0["eval_loss"] == pytest.approx(math.log(2))
    assert abs(rows(base.out)[0]["eval_rewards_chosen"]) > 0.1
    start, ref = saved_weights(sft.out), load_file(os.path.join(init.out, "adapter_reference.safetensors"))
    assert start.keys() and all(torch.equal(v, ref[k.replace(".policy.", ".reference.")]) for k, v in start.items())
    assert json.load(open(os.path.join(init.out, "stack.json")))["roles"] == ["policy", "reference"]
    # a starting adapter must come from this base; a reference "init" needs one
    with pytest.raises(ConfigError, match="trained on base 'tiny-llama'; this run's base is 'small-llama'"):
        config(tmp_path, prefs, "x", init_adapter=sft.out, stack={"model": "small-llama"}).validate()
    with pytest.raises(ConfigError, match="reference='init' needs --init-adapter"):
        config(tmp_path, prefs, "x", reference="init").validate()


# ---- the command line: resume after SIGKILL, bad data --------------------------------------------------


def dpo_args(data, out, *extra):
    return ["dpo", "--preset", "tiny", "--data", data, "--model", "tiny-llama", "--out", str(out), "--no-progress",
            *extra]  # fmt: skip


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, prefs):
    # The killed run is a child process (SIGKILL after its step-2 row); the uninterrupted run and the resume
    # run here, on one thread like the child (the C++ kernels and GEMMs then add in the same order). The
    # reference log-probs are precomputed: a resumed run recomputes them (the reference is not tracked).
    steps = ["--max-steps", "30", "--checkpoint-every", "1", "--precompute-ref-logps", "true"]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(dpo_args(prefs, tmp_path / "straight", *steps)) == 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("TRITON_INTERPRET", None)
        child = subprocess.Popen([sys.executable, "-P", "-m", "rlhf_engine", *dpo_args(prefs, tmp_path / "killed",
                                  *steps)], env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
        metrics = tmp_path / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # steps 0, 1, 2 logged
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert not (tmp_path / "killed" / "result.json").exists()  # it died mid-run
        assert main(dpo_args(prefs, tmp_path / "killed", *steps)) == 0
    finally:
        torch.set_num_threads(saved)
    assert json.loads((tmp_path / "killed" / "result.json").read_text())["resumed_from"] >= 1
    assert untimed(rows(tmp_path / "killed")) == untimed(rows(tmp_path / "straight"))
    a, b = saved_weights(tmp_path / "killed"), saved_weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "chosen": "a"}, ":2: missing key 'rejected'"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, ":2: 'chosen' must be a non-empty string"),
        ({"prompt": "p", "chosen": "a", "rejected": " \n"}, ":2: 'rejected' is empty; DPO needs a completion"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, ":2: 'chosen' and 'rejected' are the same text"),
        ({"prompt": "p", "completions": ["a", ""], "rankings": [[1, 2]]}, ":2: completion 1 is empty"),
        ({"chosen": "a", "rejected": "b"}, ":2: missing key 'prompt'"),
    ],
)
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, record, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    assert main(dpo_args(str(data), tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}{message}"), err
    assert not (tmp_path / "out").exists()  # refused before the run opened OUT


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss-type", "kto"], "loss_type='kto': expected one of dpo, ipo, cdpo"),
        (["--loss-type", "cdpo"], "label_smoothing=0.0: cdpo needs 0 < label_smoothing < 0.5"),
        (["--label-smoothing", "0.1"], "label_smoothing=0.1: only loss_type='cdpo' smooths labels"),
        (["--beta", "0"], "beta=0.0: must be > 0"),
        (["--init-adapter", "/no/such/dir"], "init_adapter '/no/such/dir': not a saved stack directory"),
        (["--micro-batch-size", "16"], "micro_batch_size=16 > batch_size=8"),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, prefs, extra, message):
    assert main(dpo_args(prefs, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_file_of_ties_has_no_pairs(tmp_path, capsys):
    # every ranked record's consensus ties (two labelers voting [1, 2] and [2, 1]): no preference to learn
    data = tmp_path / "ties.jsonl"
    rows_ = [{"prompt": f"p{i}", "completions": ["a", "b"], "rankings": [[1, 2], [2, 1]]} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    assert main(dpo_args(str(data), tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data}: no preference pairs (every ranked record's"), err


def test_dpo_needs_data(tmp_path, capsys):
    assert main(["dpo", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: data: a feedback file is required (--data FILE)\n"


def test_config_file_then_flags(tmp_path, prefs):
    from rlhf_engine.cli import build_parser, stage_config

    cfg_file = tmp_path / "dpo.yaml"
    cfg_file.write_text("beta: 0.2\nloss_type: ipo\nstack:\n  lora_r: 4\n")
    c = stage_config(build_parser().parse_args(dpo_args(prefs, tmp_path / "o", "--config", str(cfg_file),
                                                              "--beta", "0.3", "--seed", "5")))  # fmt: skip
    assert (c.beta, c.loss_type, c.stack.lora_r, c.seed, c.stack.seed) == (0.3, "ipo", 4, 5, 5)
    assert c.lr == 3e-3 and c.stack.model == "tiny-llama"  # the tiny preset's, untouched
    (tmp_path / "bad.json").write_text(json.dumps({"temperature": 1}))
    with pytest.raises(ConfigError, match="unknown config fields: temperature"):
        stage_config(build_parser().parse_args(dpo_args(prefs, tmp_path / "o", "--config",
                                                              str(tmp_path / "bad.json"))))  # fmt: skip


def test_help_names_every_knob():
    out = subprocess.run([sys.executable, "-P", "-m", "rlhf_engine", "dpo", "--help"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0
    for f in ("--data", "--model", "--out", "--preset", "--max-steps", "--backend", "--init-adapter", "--reference",
              "--loss-type", "--beta", "--label-smoothing", "--precompute-ref-logps", "--batch-size",
              "--micro-batch-size", "--bucket-window", "--lr", "--warmup-steps", "--eval-fraction", "--eval-every",
              "--checkpoint-every", "--seed", "--config", "--no-resume", "--no-progress", "--lora-r",
              "--agreement-threshold", "--exclude-flagged"):  # fmt: skip
        assert f in out.stdout, f


# ---- the benchmark ---------------------------------------------------------------------------------------


def test_dpo_step_bench_times_both_providers(tmp_path):
    sys.path.insert(0, ROOT)  # bench/ runs from the checkout's root (README)
    try:
        from bench.bench_dpo_step import main as bench_main

        assert bench_main(["--quick", "--device", "cpu", "--steps", "1", "--json", str(tmp_path / "r.jsonl")]) == 0
    finally:
        sys.path.remove(ROOT)
    rs = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert [r["provider"] for r in rs] == ["auto", "torch"]
    for r in rs:
        assert r["steps_timed"] == 1 and r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mib"] > 0
        assert r["device"] and r["date"] and r["versions"] and r["shape"]["model"] == "tiny-llama"

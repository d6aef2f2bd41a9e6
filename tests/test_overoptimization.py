"""Reward over-optimisation (issue 19): the reward-model ensemble (k heads on one adapter, each on its own
bootstrap of the pairs), its disagreement and conservative rewards, the monitor's alarm, and PPO acting
on it: the gold scorer logged, `stop` keeping the best evaluation's weights, the alarm state surviving a
restart, every data-parallel rank deciding alike. The embedded world's hacking run and the KL sweep
are in tests/test_pipeline.py (they reuse its quick pipeline). Letters: B sequences or pairs, k heads."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.algos.losses import ensemble_reward_loss, reward_loss
from rlhf_engine.algos.overoptimization import OverOptimizationMonitor
from rlhf_engine.algos.rewards import ENSEMBLE_REWARDS, bootstrap_counts, ensemble_std
from rlhf_engine.stages.ppo import train_ppo
from rlhf_engine.stages.ppo_config import ppo_preset
from rlhf_engine.stages.rm import train_reward_model
from rlhf_engine.stages.rm_config import reward_preset
from util import REWARD, ROOT, rows, saved_weights, synthetic_ranked, tiny, untimed

GOLD = os.path.join(ROOT, "tests", "_reward_fns.py") + ":not_lowercase"  # 1 - the proxy: always falls as it rises

# ---- the ensemble's rewards ---------------------------------------------------------------------------


def test_conservative_rewards_match_their_formulas():
    # 3 sequences x 2 heads, by hand (population std over the k = 2 heads):
    #   (1, 3):      mean 2,    std sqrt(((1-2)^2 + (3-2)^2) / 2) = 1, min 1
    #   (-2, -2):    mean -2,   std 0 (equal heads),                   min -2
    #   (0.5, -1.5): mean -0.5, std 1,                                  min -1.5
    # mean_minus_std, lambda 0.5: 2 - 0.5 = 1.5, -2 - 0 = -2, -0.5 - 0.5 = -1
    heads = torch.tensor([[1.0, 3.0], [-2.0, -2.0], [0.5, -1.5]])
    assert ensemble_std(heads).tolist() == [1.0, 0.0, 1.0]
    assert ENSEMBLE_REWARDS["mean"](heads, 0.5).tolist() == [2.0, -2.0, -0.5]
    assert ENSEMBLE_REWARDS["mean_minus_std"](heads, 0.5).tolist() == [1.5, -2.0, -1.0]
    assert ENSEMBLE_REWARDS["min"](heads, 0.5).tolist() == [1.0, -2.0, -1.5]
    # 4 heads against a float64 reference of the formulas, a non-trivial lambda
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 4, generator=g) * 3
    d = h.double()
    std = ((d - d.mean(1, keepdim=True)) ** 2).mean(1).sqrt()
    torch.testing.assert_close(ensemble_std(h).double(), std, atol=1e-6, rtol=0)
    torch.testing.assert_close(ENSEMBLE_REWARDS["mean_minus_std"](h, 1.7).double(), d.mean(1) - 1.7 * std,
                               atol=1e-5, rtol=0)  # fmt: skip


def test_equal_heads_disagree_by_exactly_zero():
    # k copies of one head: the std is 0 (not a rounding residue) and every combination is that head;
    # one head (B, 1) has no disagreement either
    one = torch.tensor([0.3, -1.7, 2.2, 1e4])
    heads = one[:, None].expand(4, 5)
    assert torch.equal(ensemble_std(heads), torch.zeros(4))
    for kind in ("mean", "mean_minus_std", "min"):
        assert torch.equal(ENSEMBLE_REWARDS[kind](heads, 2.0), one), kind
    assert torch.equal(ensemble_std(one[:, None]), torch.zeros(4))


def test_ensemble_loss_against_a_float64_reference():
    # loss = (1/k) sum_h (1/B) sum_b w[b,h] * -log sigmoid(s_c[b,h] - s_r[b,h] - m_b), written as loops in
    # float64; its gradient to s_c[b,h] is -w[b,h] sigmoid(-(d - m)) / (B k)
    g = torch.Generator().manual_seed(1)
    B, k = 5, 3
    chosen = torch.randn(B, k, generator=g, requires_grad=True)
    rejected = torch.randn(B, k, generator=g)
    margin = torch.tensor([0.0, 0.5, -0.25, 1.0, 0.0])
    w = torch.tensor([[1, 0, 2], [0, 1, 1], [3, 1, 0], [1, 2, 1], [0, 0, 1]], dtype=torch.float32)
    loss, stats = ensemble_reward_loss(chosen, rejected, margin, w)
    want, grad = 0.0, torch.zeros(B, k, dtype=torch.float64)
    c = chosen.detach()
    for b in range(B):
        for h in range(k):
            d = float(c[b, h]) - float(rejected[b, h]) - float(margin[b])
            want += float(w[b, h]) * math.log1p(math.exp(-d)) / (B * k)
            grad[b, h] = -float(w[b, h]) / (1 + math.exp(d)) / (B * k)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(chosen.grad.double(), grad, atol=1e-7, rtol=0)
    mean_diff = (chosen - rejected).mean(1)
    assert stats.accuracy.item() == float((mean_diff > 0).float().mean())
    # one head with unit weights is the plain Bradley-Terry loss
    one, _ = ensemble_reward_loss(chosen[:, :1], rejected[:, :1], margin, torch.ones(B, 1))
    assert one.item() == pytest.approx(reward_loss(chosen[:, 0], rejected[:, 0], margin)[0].item(), abs=1e-7)


def test_bootstrap_counts_are_resamples_of_their_own():
    counts = bootstrap_counts(50, 4, seed=3)
    assert counts.shape == (4, 50) and counts.sum(1).tolist() == [50] * 4  # n draws each
    assert all(not torch.equal(counts[i], counts[j]) for i in range(4) for j in range(i))  # a resample per head
    assert torch.equal(counts, bootstrap_counts(50, 4, seed=3)) and not torch.equal(counts, bootstrap_counts(50, 4, 4))
    assert (counts == 0).float().mean().item() == pytest.approx(math.exp(-1), abs=0.1)  # ~37% of pairs left out


def test_k_heads_train_to_different_weights_and_ppo_logs_their_mean_and_disagreement(tmp_path):
    data = synthetic_ranked(tmp_path / "prefs.jsonl", 16)
    result = train_reward_model(tiny(reward_preset, tmp_path, data=data, epochs=2, eval_every=3,
                                     stack=dict(model="tiny-llama", adapters=("reward",), reward_heads=3)))  # fmt: skip
    heads = load_file(os.path.join(result.out, "heads.safetensors"))["heads.reward.proj.weight"]  # (k, H)
    assert heads.shape[0] == 3
    for i in range(3):
        for j in range(i):
            assert (heads[i] - heads[j]).norm() > 0.1 * heads[i].norm(), (i, j)
    ens = result.ensemble
    assert ens["heads"] == 3 and 0 < ens["ensemble_std"] and -1 <= ens["head_correlation"] <= 1
    assert 0 <= ens["head_accuracy_min"] <= ens["head_accuracy_max"] <= 1
    assert "eval_ensemble_std" in rows(result.out)[-1]
    saved = json.load(open(os.path.join(result.out, "stack.json")))
    assert saved["stack"]["reward_heads"] == 3
    # PPO against the 3 heads, trained on mean - lambda * std: the proxy (their plain mean) and their
    # disagreement are logged per step and at held-out evaluations, and with no gold scorer the monitor
    # watches the conservative reward
    lam = 0.5
    ppo = train_ppo(config(tmp_path, "ens", max_steps=1, reward_fn="", gold_reward_fn="", reward_model=result.out,
                           reward_ensemble="mean_minus_std", ensemble_lambda=lam))  # fmt: skip
    r = rows(ppo.out)[-1]
    assert r["reward/ensemble_std"] > 0 and r["eval_reward/ensemble_std"] > 0 and "reward/gold" not in r
    assert r["reward/rm"] == pytest.approx(r["reward/proxy"] - lam * r["reward/ensemble_std"], abs=1e-5)
    assert r["eval_reward_mean"] == pytest.approx(r["eval_reward/conservative"], abs=1e-6)
    assert r["eval_reward/conservative"] == pytest.approx(r["eval_reward/proxy"] - lam * r["eval_reward/ensemble_std"],
                                                          abs=1e-5)  # fmt: skip
    watched = {row["step"]: row["eval_reward/conservative"] for row in rows(ppo.out)}
    assert ppo.overoptimization["best_watched"] == watched[ppo.overoptimization["best_step"]] == max(watched.values())


# ---- the monitor ----------------------------------------------------------------------------------------


def test_the_alarm_fires_when_the_watched_score_falls_while_the_proxy_rises():
    m = OverOptimizationMonitor(patience=2)
    seen = [(0, 0.0, 0.0), (5, 1.0, 1.0), (10, 2.0, 0.8), (15, 2.5, 0.9), (20, 3.0, 0.5)]
    verdicts = [m.observe(s, proxy=p, watched=w, kl=1.0) for s, p, w in seen]
    assert [v.new_best for v in verdicts] == [True, True, False, False, False]  # the best: step 5
    assert [v.fired for v in verdicts] == [False, False, False, True, False]  # 10 and 15 below it: fires at 15, once
    assert m.alarm_step == 15 and m.best_step == 5 and m.streak == 3
    assert "fell from 1.000 (step 5) to 0.900 over 2 evaluations while the proxy rose from 1.000 to 2.500" in m.reason
    assert m.metrics() == {"alarm": 1, "alarm_streak": 3, "best_step": 5}


def test_no_alarm_when_the_proxy_falls_too_or_the_drop_is_within_tolerance():
    both = OverOptimizationMonitor(patience=2)
    for s, p, w in [(0, 1.0, 1.0), (5, 0.5, 0.5), (10, 0.2, 0.2), (15, 0.1, 0.1)]:  # a run getting worse at both
        both.observe(s, proxy=p, watched=w, kl=1.0)
    assert both.alarm_step is None and both.best_step == 0
    noisy = OverOptimizationMonitor(patience=2, tolerance=0.1)
    for s, p, w in [(0, 1.0, 1.0), (5, 2.0, 0.95), (10, 3.0, 0.92)]:  # gold flat within noise, proxy rising
        noisy.observe(s, proxy=p, watched=w, kl=1.0)
    assert noisy.alarm_step is None and noisy.streak == 0
    interrupted = OverOptimizationMonitor(patience=2)
    for s, p, w in [(0, 1.0, 1.0), (5, 2.0, 0.5), (10, 0.9, 0.5), (15, 2.0, 0.5)]:  # the streak needs a row
        interrupted.observe(s, proxy=p, watched=w, kl=1.0)
    assert interrupted.alarm_step is None and interrupted.streak == 1


def test_the_kl_budget_fires_and_bounds_the_best():
    m = OverOptimizationMonitor(patience=5, kl_budget=4.0)
    m.observe(0, proxy=0.0, watched=0.0, kl=0.0)
    m.observe(5, proxy=1.0, watched=1.0, kl=3.5)
    v = m.observe(10, proxy=2.0, watched=2.0, kl=4.5)  # better, but past the budget: not the best
    assert v.fired and not v.new_best and m.best_step == 5 and m.alarm_step == 10
    assert m.reason == "the KL to the reference, 4.500 nats per response, passed the budget of 4"


def test_the_monitor_state_round_trips_mid_streak():
    m = OverOptimizationMonitor(patience=3, tolerance=0.05)
    for s, p, w in [(0, 0.0, 1.0), (5, 1.0, 0.5)]:
        m.observe(s, proxy=p, watched=w, kl=1.0)
    again = OverOptimizationMonitor()
    again.load_state_dict(m.state_dict())
    assert again == m and again.streak == 1
    for x in (m, again):
        x.observe(10, proxy=2.0, watched=0.4, kl=1.0)
        x.observe(15, proxy=3.0, watched=0.3, kl=1.0)
    assert m.alarm_step == again.alarm_step == 15


# ---- PPO acting on it -----------------------------------------------------------------------------------


# a small rollout (4 prompts, 8 tokens, 4 held-out prompts): on seed 0 PPO raises the proxy from the first
# step (held-out 0.113 -> 0.163 -> 0.233), so the gold falls and a patience of 2 fires at step 2
SMALL = dict(rollout_batch_size=4, micro_batch_size=4, minibatch_size=4, eval_prompts=4,
             sampling=dict(max_new_tokens=8, temperature=1.0, max_prompt_length=64))  # fmt: skip


def config(tmp_path, name="out", **kw):
    # the proxy: the share of lowercase letters; the gold: 1 minus it. Evaluated at every step.
    kw = {"reward_fn": REWARD, "gold_reward_fn": GOLD, "eval_every": 1, "kl_coef": 0.0, "checkpoint_every": 1,
          **SMALL, **kw}  # fmt: skip
    return tiny(ppo_preset, tmp_path, name, **kw)


def test_stop_keeps_the_best_weights_and_a_restart_keeps_the_alarm(tmp_path):
    from rlhf_engine.algos.rewards import FunctionReward
    from rlhf_engine.core.distributed import Dist
    from rlhf_engine.datasets.prompts import EVAL_PROMPTS_FILE, load_prompts
    from rlhf_engine.model.stack import ModelStack
    from rlhf_engine.stages.ppo import evaluate_rollout

    cfg = config(tmp_path, "straight", max_steps=6, on_overoptimization="stop")
    result = train_ppo(cfg)
    over, rs = result.overoptimization, rows(cfg.out)
    assert result.stopped_by == "overoptimization" and over["alarm_step"] is not None, over
    assert result.steps == over["alarm_step"] < 6 and rs[-1]["step"] == over["alarm_step"] and rs[-1]["alarm"] == 1
    gold = {r["step"]: r["eval_reward/gold"] for r in rs}
    assert all("reward/gold" in r and "reward/proxy" in r for r in rs[1:])  # logged at every step, never trained on
    assert gold[over["best_step"]] > gold[over["alarm_step"]] and over["best_watched"] == gold[over["best_step"]]
    assert "fell from" in over["reason"]
    # the saved policy is the best evaluation's: evaluated again (same prompts, same draws) it scores
    # exactly the gold logged at best_step
    stack = ModelStack.from_saved(cfg.out)
    prompts = load_prompts(os.path.join(cfg.out, EVAL_PROMPTS_FILE))
    again = evaluate_rollout(stack, prompts, [("gold", FunctionReward(GOLD), 1.0)], cfg, Dist())
    assert again["eval_reward_mean"] == pytest.approx(gold[over["best_step"]], abs=1e-9)

    # the same run cut before its alarm and resumed (larger max_steps): the streak and the best weights
    # come back from the checkpoint, so it fires at the same step and saves the same weights
    split = config(tmp_path, "split", max_steps=over["alarm_step"] - 1, on_overoptimization="stop")
    first = train_ppo(split)
    assert first.stopped_by is None and rows(split.out)[-1]["alarm_streak"] == 1  # one short of the alarm
    resumed = train_ppo(config(tmp_path, "split", max_steps=6, on_overoptimization="stop"))
    assert resumed.resumed_from == over["alarm_step"] - 1 and resumed.overoptimization == over
    assert untimed(rows(split.out)) == untimed(rs)
    a, b = saved_weights(cfg.out), saved_weights(split.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # rerun once stopped: it stays stopped and keeps the best weights
    rerun = train_ppo(cfg)
    assert rerun.steps == result.steps and rerun.stopped_by == "overoptimization"
    assert all(torch.equal(a[k], v) for k, v in saved_weights(cfg.out).items())


def test_warn_trains_on_and_off_watches_nothing(tmp_path, capsys):
    warn = train_ppo(config(tmp_path, "warn", max_steps=2, overopt_patience=1))
    assert warn.steps == 2 and warn.stopped_by is None and warn.overoptimization["alarm_step"] is not None
    assert "ppo: over-optimisation at step" in capsys.readouterr().err
    off = train_ppo(config(tmp_path, "off", max_steps=1, on_overoptimization="off"))
    assert off.overoptimization is None and "alarm" not in rows(off.out)[-1]
    assert "eval_reward/gold" in rows(off.out)[-1]  # the gold scorer is still logged


def test_two_ranks_reach_the_decision_one_rank_reaches(tmp_path):
    # torchrun, 2 gloo processes (each scores its share of the held-out prompts; the sums are
    # all-reduced) against 1 process: the alarm fires at the same step, the same best step is kept
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)

    def args(out):
        return ["-m", "rlhf_engine", "ppo", "--preset", "tiny", "--reward-fn", REWARD, "--gold-reward-fn", GOLD,
                "--out", str(out), "--no-progress", "--max-steps", "2", "--eval-every", "1", "--kl-coef", "0",
                "--on-overoptimization", "stop", "--overopt-patience", "1", "--rollout-batch-size", "4",
                "--micro-batch-size", "4", "--minibatch-size", "4", "--eval-prompts", "4"]  # fmt: skip

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = subprocess.run([sys.executable, "-P", *args(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-P", "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), *args(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    r1, r2 = (json.load(open(tmp_path / d / "result.json")) for d in ("one", "two"))
    assert r1["stopped_by"] == r2["stopped_by"] == "overoptimization"
    assert {k: r1["overoptimization"][k] for k in ("alarm_step", "best_step")} == \
        {k: r2["overoptimization"][k] for k in ("alarm_step", "best_step")}  # fmt: skip
    assert r2["overoptimization"]["best_watched"] == pytest.approx(r1["overoptimization"]["best_watched"], abs=1e-6)

"""Critic-free RL on the PPO trainer: GRPO, Dr. GRPO and RLOO advantages (hand-derived cases in
tests/test_rl.py), the loss aggregation modes against a float64 reference, no value adapter anywhere,
several weighted reward functions, zero-variance groups, learning, and the CLI."""

import json
import os

import pytest
import torch

import rlhf_kernels as kernels
from rlhf_engine.algos.losses import aggregation_weights
from rlhf_engine.stages.ppo import build_stack, train_ppo
from rlhf_engine.stages.ppo_config import ppo_preset
from util import REWARD, ROOT, assert_close, rows, tiny

FNS = os.path.join(ROOT, "tests", "_reward_fns.py")


def config(tmp_path, name="out", **kw):
    kw.setdefault("max_steps", 2)
    kw.setdefault("reward_fn", REWARD)
    kw.setdefault("advantage", "grpo")
    kw.setdefault("samples_per_prompt", 4)
    kw.setdefault("rollout_batch_size", 4)
    return tiny(ppo_preset, tmp_path, name, **kw)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_aggregated_ppo_loss_and_gradient_against_float64(mode, backend):
    # The trainer computes sum_t w_t * pg_t as n * ppo_loss(logprobs, old, w * A, mask) (the clipped
    # objective is positively homogeneous in A). Reference: pg_t = max(-A r, -A clip(r, 0.8, 1.28)) in
    # float64, weighted by the mode's w (tests/test_rl.py derives the weights by hand).
    g = torch.Generator().manual_seed(0)
    B, R = 6, 9
    mask = torch.arange(R)[None, :] < torch.tensor([9, 3, 5, 1, 7, 9])[:, None]
    old = torch.randn(B, R, generator=g) * 0.5 - 2.0
    logp = (old + torch.randn(B, R, generator=g) * 0.4).requires_grad_(True)  # ratios up to ~e^1: many clip
    adv = torch.randn(B, R, generator=g)
    w = aggregation_weights(mask, mode, n_tokens=float(mask.sum()), n_seqs=float(B), max_len=R)
    n = mask.sum().float()
    pg, _ = kernels.ppo_loss(logp, old, adv * w, mask, clip_low=0.2, clip_high=0.28, backend=backend)
    got = pg * n
    got.backward()
    x = logp.detach().double().requires_grad_(True)
    ratio = torch.exp(x - old.double())
    a = adv.double()
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    want = (w.double() * torch.where(mask, per_token, 0)).sum()
    want.backward()
    assert_close(got.detach(), want.detach(), atol=1e-6, rtol=1e-5, name=f"{mode} loss")
    assert_close(logp.grad, x.grad, atol=1e-7, rtol=1e-5, name=f"{mode} grad")


def test_no_value_adapter_head_or_forward_in_group_modes(tmp_path, monkeypatch):
    from rlhf_engine.model.stack import ModelStack

    grpo_stack, _ = build_stack(config(tmp_path, "g"))
    ppo_stack, _ = build_stack(config(tmp_path, "p", advantage="gae", samples_per_prompt=1, rollout_batch_size=8))
    assert "value" not in grpo_stack.config.adapters and "value" not in grpo_stack.heads
    assert "value" in ppo_stack.config.adapters and "value" in ppo_stack.heads
    # smaller: no value adapter or head to hold, and nothing of theirs in the optimizer
    assert grpo_stack.memory_report()["total"]["bytes"] < ppo_stack.memory_report()["total"]["bytes"]
    assert sum(p.numel() for _, p in grpo_stack.named_role_parameters("policy")) < sum(
        p.numel() for role in ("policy", "value") for _, p in ppo_stack.named_role_parameters(role))

    def forbidden(*a, **k):
        raise AssertionError("a value forward ran in a critic-free mode")

    monkeypatch.setattr(ModelStack, "values", forbidden)
    for advantage in ("grpo", "drgrpo", "rloo"):
        result = train_ppo(config(tmp_path, advantage, advantage=advantage))
        last = rows(result.out)[-1]
        assert "vf_loss" not in last and "explained_variance" not in last and 0 <= last["frac_reward_zero_std"] <= 1
        saved = json.load(open(os.path.join(result.out, "stack.json")))
        assert saved["roles"] == ["policy"]


def test_weighted_reward_functions_are_logged_one_by_one(tmp_path):
    # reward = 2 * lowercase_share + 0.5 * count_e; reward_mean is that sum, each source's own mean logged
    result = train_ppo(config(tmp_path, reward_fn=(REWARD, FNS + ":count_e"), reward_weights=(2.0, 0.5),
                              max_steps=1))  # fmt: skip
    r = rows(result.out)[-1]
    a, b = r[f"reward/{REWARD}"], r[f"reward/{FNS}:count_e"]
    assert r["reward_mean"] == pytest.approx(2 * a + 0.5 * b, rel=1e-6) and a > 0


def test_groups_without_signal(tmp_path):
    # count_e of a tiny random model is 0 for nearly every response: most groups have zero std. Dropping
    # them leaves only groups with signal in the loss; when no group has any, nothing moves.
    kept = train_ppo(config(tmp_path, "kept", reward_fn=FNS + ":count_e", max_steps=1))
    frac = rows(kept.out)[-1]["frac_reward_zero_std"]
    assert 0.5 <= frac <= 1.0
    flat = os.path.join(tmp_path, "flat.py")
    with open(flat, "w") as f:
        f.write("def score(prompts, responses):\n    return [1.0] * len(responses)\n")
    dropped = train_ppo(config(tmp_path, "dropped", reward_fn=f"{flat}:score", drop_zero_std_groups=True,
                               max_steps=1, ent_coef=0.0))  # fmt: skip
    r = rows(dropped.out)[-1]
    assert r["frac_reward_zero_std"] == 1.0 and r["pg_loss"] == 0.0 and r["grad_norm"] == 0.0


@pytest.mark.parametrize("estimator", ["k3", "exact"])
def test_trls_default_grpo_step_runs_neither_no_grad_forward(tmp_path, monkeypatch, estimator):
    # TRL's GRPO default: beta 0 with the KL in the loss, one update per rollout. Nothing reads the
    # reference and the old log-probs are the training forward's: step 4 runs no forward (the only
    # no-grad forwards left are generation's), the per-step KL metrics are None, the held-out
    # evaluation still measures the KL, and the ratio is 1 (clipfrac 0).
    from rlhf_engine.model.stack import ModelStack

    forwards = []
    real = ModelStack.hidden_states

    def counted(self, adapter, input_ids, *a, **k):
        if not torch.is_grad_enabled() and "past_key_values" not in k and input_ids.shape[1] > 1:
            forwards.append(adapter)  # a whole-sequence no-grad forward (not a decode step)
        return real(self, adapter, input_ids, *a, **k)

    monkeypatch.setattr(ModelStack, "hidden_states", counted)
    result = train_ppo(config(tmp_path, kl_in="loss", kl_coef=0.0, kl_estimator=estimator, ppo_epochs=1,
                              minibatch_size=16, micro_batch_size=8, max_steps=2, eval_every=2))  # fmt: skip
    rs = rows(result.out)
    eval_forwards = 2 * 2  # evaluations at steps 0 and 2: the policy's and the reference's forward each
    assert len(forwards) == eval_forwards, forwards
    for r in rs[1:]:
        assert r["kl"] is None and r["kl_k3"] is None and r["clipfrac"] == 0.0 and r["entropy"] > 0
        assert r["time_old_logprobs_s"] < 0.01 and r["time_ref_logprobs_s"] < 0.01
    assert rs[0]["eval_kl"] == 0.0 and rs[-1]["eval_kl"] > 0  # the fresh policy is the base, then it moves


def test_grpo_learns_the_rule_based_reward(tmp_path):
    # 8 prompts x 4 responses per step, no critic: the held-out reward rises within 20 steps
    result = train_ppo(config(tmp_path, max_steps=20, eval_every=10, rollout_batch_size=8, minibatch_size=16,
                              micro_batch_size=16, kl_coef=0.0))  # fmt: skip
    evals = [r["eval_reward_mean"] for r in rows(result.out) if "eval_reward_mean" in r]
    assert evals[-1] > evals[0] + 0.15, evals


def test_cli_group_flags(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, "-P", "-m", "rlhf_engine", "ppo", "--preset", "tiny", "--reward-fn", REWARD, "--out",
         str(tmp_path / "cli"), "--no-progress", "--max-steps", "1", "--advantage", "rloo", "--group-size", "3",
         "--loss-agg", "token_sum_norm", "--rollout-batch-size", "4", "--minibatch-size", "12"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.load(open(tmp_path / "cli" / "config.json"))["config"]
    assert (cfg["advantage"], cfg["samples_per_prompt"], cfg["loss_agg"]) == ("rloo", 3, "token_sum_norm")
    assert "frac_reward_zero_std" in rows(tmp_path / "cli")[-1]

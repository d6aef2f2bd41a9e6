"""stages.ppo: the PPO trainer on one shared base.

Alignment of every per-token quantity with the model's own logits, the step functions, kernels on vs
off, learning on a rule-based reward (and the KL penalty holding the policy back), the reference as a
frozen copy of a starting adapter, the threshold stop, resume after SIGKILL, data parallel over two
gloo processes, and the command line. Letters: B sequences, P prompt tokens, R response positions."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import rlhf_kernels as kernels
from rlhf_engine.algos.advantages import whiten_advantages
from rlhf_engine.algos.rollout import forward_stats, rollout
from rlhf_engine.core.distributed import Dist
from rlhf_engine.datasets.prompts import EVAL_PROMPTS_FILE
from rlhf_engine.errors import ConfigError
from rlhf_engine.stages.ppo import build_stack, prompt_split, step_prompts, train_ppo
from rlhf_engine.stages.ppo_config import ppo_preset
from util import REWARD, ROOT, assert_rel_norm, rows, saved_weights, tiny, untimed


def config(tmp_path, name="out", **kw):
    kw.setdefault("max_steps", 2)
    kw.setdefault("reward_fn", REWARD)
    return tiny(ppo_preset, tmp_path, name, **kw)


def weights(out) -> dict[str, torch.Tensor]:
    return saved_weights(out, ("adapter_policy.safetensors", "adapter_value.safetensors", "heads.safetensors"))


# ---- the per-token grid -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_stack(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("stack"))
    stack, source = build_stack(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy and a value adapter that differ from the base
        for name, p in stack.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cfg, stack.eval(), source


def test_rollout_stats_line_up_with_the_models_own_logits(policy_stack):
    # Every per-token quantity at response position j must come from the hidden state before token
    # P + j (an off-by-one here trains the policy on the wrong tokens without any error): check the
    # fused-kernel stats against log_softmax of the full logits of the policy and of the bare base.
    cfg, stack, _ = policy_stack
    traj = rollout(stack, ["My house is too hot.", "Hi"], [0, 1], cfg.sampling, samples_per_prompt=2, seed=3)
    forward_stats(stack, traj, cfg)
    P, (B, R) = traj.prompt_length, traj.mask.shape
    pos = (traj.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def logits(adapter):
        with stack._active(adapter), torch.no_grad():
            out = stack.model.get_base_model()(input_ids=traj.input_ids, attention_mask=traj.attention_mask,
                                               position_ids=pos)  # fmt: skip
        return out.logits[:, P - 1 : -1].double()  # (B, R, V): position j predicts token P + j

    lp, lq = torch.log_softmax(logits("policy"), -1), torch.log_softmax(logits(None), -1)
    tokens = traj.input_ids[:, P:]
    m = traj.mask
    want_logp = torch.where(m, lp.gather(-1, tokens[..., None])[..., 0], 0)
    want_ref = torch.where(m, lq.gather(-1, tokens[..., None])[..., 0], 0)
    want_kl = torch.where(m, (lp.exp() * (lp - lq)).sum(-1), 0)
    want_ent = torch.where(m, -(lp.exp() * lp).sum(-1), 0)
    for name, got, want in (("old_logprobs", traj.old_logprobs, want_logp), ("ref_logprobs", traj.ref_logprobs,
                            want_ref), ("kl_exact", traj.kl_exact, want_kl), ("entropy", traj.entropy, want_ent)):  # fmt: skip
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=name)
    # values: the value adapter's head at the same positions
    with torch.no_grad():
        hv = stack.hidden_states("value", traj.input_ids, traj.attention_mask)
        want_v = stack.heads["value"](hv)[:, P - 1 : -1]
    torch.testing.assert_close(traj.old_values, torch.where(m, want_v, 0), atol=1e-5, rtol=1e-5)
    # the labels are the response tokens, ignored past each response's end
    assert torch.equal(traj.labels, torch.where(m, tokens, -100)) and m.sum(1).tolist() == traj.mask.sum(1).tolist()
    assert B == 4 and R == int(traj.mask.sum(1).max())


def test_step_prompts_give_full_batches_across_epochs():
    n, batch = 7, 3
    seen = [step_prompts(n, batch, seed=5, step=s) for s in range(7)]
    assert all(len(b) == batch for b in seen)
    flat = [i for b in seen for i in b]
    # 21 items = 3 whole epochs, each a permutation of the 7 prompts
    for e in range(3):
        assert sorted(flat[e * n : (e + 1) * n]) == list(range(n))
    assert step_prompts(n, batch, seed=5, step=4) == seen[4]  # a pure function of the step
    assert step_prompts(n, batch, seed=6, step=4) != seen[4]


def test_prompt_split_holds_out_whole_prompts(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(20)))
    train, held = prompt_split(config(tmp_path, prompts=str(data), eval_fraction=0.25))
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert (train, held) == prompt_split(config(tmp_path, prompts=str(data), eval_fraction=0.25))
    assert prompt_split(config(tmp_path, prompts=str(data), eval_fraction=0.25, eval_prompts=2))[1] == held[:2]


def test_one_rank_whitening_is_the_kernel():
    adv = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    cfg = ppo_preset("tiny", out="x", reward_fn="a:b")
    assert torch.equal(whiten_advantages(adv, mask, cfg, Dist()), kernels.masked_whiten(adv, mask))


# ---- whole runs ---------------------------------------------------------------------------------------


def test_kernels_on_vs_off(tmp_path):
    # The same two PPO steps with the fused kernels ("auto": C++ here) and with the PyTorch references
    # ("torch", [N, V] logits): the same losses, grad norms and adapter weights. Tolerance: both are
    # fp32 computations of the same math in different orders (~1e-6 relative per op): losses and grad
    # norms agree to 1e-4. Adam divides each coordinate's step by its own gradient scale, so where a
    # gradient is near 0 the fp32 difference is amplified coordinate-wise: weights compare norm-wise
    # (measured: 1.1e-4 relative at worst per tensor).
    on = train_ppo(config(tmp_path, "on", backend="auto"))
    off = train_ppo(config(tmp_path, "off", backend="torch"))
    ron, roff = untimed(rows(on.out)), untimed(rows(off.out))
    assert [r["step"] for r in ron] == [0, 1, 2] and len(ron) == len(roff)
    for a, b in zip(ron, roff):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    wa, wb = weights(on.out), weights(off.out)
    for k in wa:
        assert_rel_norm(wa[k], wb[k], bound=1e-3, name=k)


def test_metrics_rows_carry_every_key_and_the_held_out_prompts(tmp_path):
    from rlhf_engine.stages.ppo import METRIC_KEYS

    result = train_ppo(config(tmp_path, max_steps=2, eval_every=2))
    rs = rows(result.out)
    assert rs[0]["step"] == 0 and "eval_reward_mean" in rs[0]  # the untrained baseline
    for r in rs[1:]:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, missing
        assert r["response_length"] > 0 and 0 <= r["eos_fraction"] <= 1 and r["beta"] == 0.02
    assert "eval_reward_mean" in rs[-1]
    held = [json.loads(line)["prompt"] for line in open(os.path.join(result.out, EVAL_PROMPTS_FILE))]
    assert len(held) == result.eval_prompts == 4
    saved = json.load(open(os.path.join(result.out, "stack.json")))
    assert set(saved["roles"]) == {"policy", "value"}


def _eval_and_kl(out):
    # the KL of the held-out evaluations: a run with kl_coef=0 computes no per-step KL (no reference
    # forward: algos.rollout.step_forwards), and both runs are measured the same way
    rs = rows(out)
    evals = [r["eval_reward_mean"] for r in rs if "eval_reward_mean" in r]
    kls = [r["eval_kl"] for r in rs if "eval_kl" in r]
    return evals, kls[-1]


def test_ppo_learns_a_rule_based_reward_and_the_kl_penalty_holds_it_back(tmp_path):
    # The reward: the share of lowercase letters in the response (about 0.2 for the tiny random
    # base). 20 steps, 8 prompts each, held-out evaluation at 0, 10 and 20 (same draws every time).
    free = train_ppo(config(tmp_path, "free", max_steps=20, eval_every=10, kl_coef=0.0))
    held = train_ppo(config(tmp_path, "held", max_steps=20, eval_every=10, kl_coef=0.2))
    evals_free, kl_free = _eval_and_kl(free.out)
    _, kl_held = _eval_and_kl(held.out)
    assert evals_free[-1] > evals_free[0] + 0.15, evals_free  # measured: 0.22 -> 0.66
    assert kl_held < 0.8 * kl_free, (kl_held, kl_free)  # measured: 12.5 vs 30.4 nats per held-out response


def test_reference_as_a_frozen_copy_of_the_starting_adapter(tmp_path):
    # A policy that starts from a trained adapter: with reference="init" the reference is that adapter
    # frozen, so the first rollout's KL is exactly 0; the bare base as reference would be far from it.
    first = train_ppo(config(tmp_path, "first", max_steps=3))
    copy = train_ppo(config(tmp_path, "copy", max_steps=1, init_adapter=first.out))
    base = train_ppo(config(tmp_path, "base", max_steps=1, init_adapter=first.out, reference="base"))
    assert rows(copy.out)[1]["kl"] == 0.0 and rows(copy.out)[1]["kl_k3"] == 0.0
    assert rows(base.out)[1]["kl"] > 0.1
    saved = json.load(open(os.path.join(copy.out, "stack.json")))
    assert "reference" in saved["roles"]
    start = load_file(os.path.join(first.out, "adapter_policy.safetensors"))
    ref = load_file(os.path.join(copy.out, "adapter_reference.safetensors"))
    assert all(torch.equal(v, ref[k.replace(".policy.", ".reference.")]) for k, v in start.items())


@pytest.mark.parametrize("estimator", ["exact", "k3"])
def test_kl_in_the_loss_adds_beta_times_the_mean_kl(policy_stack, estimator):
    # kl_in="loss": the rewards carry the score alone, and the loss carries beta * (token mean of KL):
    # exact through linear_token_stats with the cached reference hidden states, k3 through kl_penalty.
    # Before any update the training forward's policy is the rollout's, so the added term is
    # beta * masked_mean(the rollout's KL) exactly (up to fp32): check it against the kl_in="reward"
    # loss of the same micro-batch, where the KL is not in the loss.
    import dataclasses

    from rlhf_engine.algos.advantages import estimate_advantages
    from rlhf_engine.algos.kl import assign_rewards
    from rlhf_engine.algos.losses import minibatch_weights
    from rlhf_engine.algos.losses import ppo_micro_loss as micro_loss

    cfg, stack, _ = policy_stack
    in_loss = dataclasses.replace(cfg, kl_in="loss", kl_estimator=estimator)
    traj = rollout(stack, ["My house is too hot.", "Hi"], [0, 1], cfg.sampling, samples_per_prompt=2, seed=3)
    forward_stats(stack, traj, in_loss)
    traj.scores = torch.tensor([1.0, 0.0, -1.0, 0.5])
    assign_rewards(traj, in_loss, beta=0.7)
    assert torch.equal(traj.rewards.sum(1), traj.scores)  # no KL in the rewards
    estimate_advantages(traj, in_loss, Dist())
    idx = torch.arange(4)
    w, n = minibatch_weights(traj, idx, in_loss, Dist())  # token_mean: 1 / n at every real token
    mb = traj.rows(idx)
    with_kl, _ = micro_loss(stack, mb, traj.prompt_length, in_loss, 0.7, w, n)
    without, _ = micro_loss(stack, mb, traj.prompt_length, dataclasses.replace(in_loss, kl_in="reward"), 0.7, w, n)
    kl = traj.kl_exact if estimator == "exact" else kernels.kl_penalty(traj.old_logprobs, traj.ref_logprobs, kind="k3")
    want = 0.7 * float((kl * traj.mask).sum()) / n
    assert float((with_kl - without).detach()) == pytest.approx(want, rel=1e-4, abs=1e-6) and want > 0


# ---- the forwards a step skips ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, old, reference, values",
    [
        # one update per rollout (1 epoch, minibatch = the 8 x 1 sequences); GAE reads the value adapter
        (dict(ppo_epochs=1, minibatch_size=8, kl_coef=0.0), False, False, True),
        # a second epoch (or a second minibatch) trains on a moved policy: the sampling policy's log-probs
        (dict(ppo_epochs=2, minibatch_size=8, kl_coef=0.0), True, False, True),
        (dict(ppo_epochs=1, minibatch_size=4, micro_batch_size=4, kl_coef=0.0), True, False, True),
        # beta > 0 with the KL in the rewards: both, before the advantages
        (dict(ppo_epochs=1, minibatch_size=8, kl_coef=0.1), True, True, True),
        # the KL in the loss: the reference only; the policy's side comes from the training forward
        (dict(ppo_epochs=1, minibatch_size=8, kl_coef=0.1, kl_in="loss"), False, True, True),
        # an adaptive beta from 0 still measures the KL
        (dict(ppo_epochs=1, minibatch_size=8, kl_coef=0.0, target_kl=1.0), True, True, True),
        # a value head on the policy reads the policy's hidden states before the advantages
        (dict(ppo_epochs=1, minibatch_size=8, kl_coef=0.0, stack=dict(model="tiny-llama", value_mode="policy_head")),
         True, False, False),
        # critic-free: no values
        (dict(ppo_epochs=1, minibatch_size=16, kl_coef=0.0, advantage="grpo", samples_per_prompt=2), False, False,
         False),
    ],
)  # fmt: skip
def test_step_forwards_runs_what_the_step_reads(tmp_path, kw, old, reference, values):
    from rlhf_engine.algos.rollout import step_forwards

    need = step_forwards(config(tmp_path, **kw).validate())
    assert (need.old, need.reference, need.values) == (old, reference, values)


def test_forward_stats_runs_no_forward_it_can_skip(policy_stack, monkeypatch):
    # GRPO-like: one update per rollout, beta 0 -> no forward at all (and the trajectory says so with
    # None); beta > 0 with a sampled KL in the loss -> the reference's forward alone.
    import dataclasses

    cfg, stack, _ = policy_stack
    traj = rollout(stack, ["My house is too hot.", "Hi"], [0, 1], cfg.sampling, samples_per_prompt=2, seed=3)
    calls = []
    real = type(stack).hidden_states

    def counted(self, adapter, *a, **k):
        calls.append(adapter)
        return real(self, adapter, *a, **k)

    monkeypatch.setattr(type(stack), "hidden_states", counted)
    one = dataclasses.replace(cfg, advantage="grpo", samples_per_prompt=2, rollout_batch_size=2, minibatch_size=4,
                              ppo_epochs=1, kl_coef=0.0)  # fmt: skip
    forward_stats(stack, traj, one)
    assert calls == []
    assert traj.old_logprobs is None and traj.ref_logprobs is None and traj.kl_exact is None and traj.entropy is None
    forward_stats(stack, traj, dataclasses.replace(one, kl_coef=0.1, kl_in="loss", kl_estimator="k3"))
    assert set(calls) == {None} and traj.old_logprobs is None and traj.ref_logprobs is not None  # bare-base reference


def test_one_update_per_rollout_trains_as_if_the_old_forward_ran(tmp_path, monkeypatch):
    # The same two GRPO steps (k3 KL in the loss, beta 0.05, one update per rollout) with step 4's policy
    # forward skipped (old log-probs = the training forward's, detached) and forced: the ratio is 1 in
    # both (the same policy), so losses, grad norms, weights and the metrics read back from the training
    # forward (entropy, kl_k3) agree to fp32 (sums in other orders: 1e-4, weights norm-wise as in
    # test_kernels_on_vs_off).
    import rlhf_engine.algos.rollout as rollout_module

    kw = dict(advantage="grpo", samples_per_prompt=2, rollout_batch_size=4, minibatch_size=8, micro_batch_size=4,
              ppo_epochs=1, kl_coef=0.05, kl_in="loss", kl_estimator="k3")  # fmt: skip
    skipped = train_ppo(config(tmp_path, "skipped", **kw))
    real = rollout_module.step_forwards
    monkeypatch.setattr(rollout_module, "step_forwards", lambda c: dataclasses.replace(real(c), old=True))
    forced = train_ppo(config(tmp_path, "forced", **kw))
    rs, rf = untimed(rows(skipped.out))[1:], untimed(rows(forced.out))[1:]
    for a, b in zip(rs, rf):
        assert a["kl"] is None and b["kl"] >= 0  # no exact KL without the policy's no-grad forward
        assert a["clipfrac"] == 0.0 and a["approx_kl"] == 0.0  # ratio = 1 exactly
        for k in ("pg_loss", "grad_norm", "entropy", "kl_k3", "reward_mean", "train_entropy"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    ws, wf = saved_weights(skipped.out), saved_weights(forced.out)  # the policy adapter (no critic)
    for k in wf:
        assert_rel_norm(ws[k], wf[k], bound=1e-3, name=k)


def test_a_run_with_kl_in_the_loss(tmp_path):
    result = train_ppo(config(tmp_path, max_steps=2, kl_in="loss", kl_coef=0.5))
    assert rows(result.out)[-1]["kl"] > 0
    assert all(bool(torch.isfinite(v).all()) for v in weights(result.out).values())


def test_stops_at_the_reward_threshold_and_stays_stopped(tmp_path):
    cfg = config(tmp_path, max_steps=5, eval_every=1, reward_threshold=-1.0)  # any held-out reward reaches it
    result = train_ppo(cfg)
    assert result.stopped_at_threshold and result.steps == 1
    assert [r["step"] for r in rows(cfg.out)] == [0, 1]
    again = train_ppo(cfg)  # resumes from the stop's checkpoint and does not train on
    assert again.steps == 1 and again.resumed_from == 1 and [r["step"] for r in rows(cfg.out)] == [0, 1]


# ---- resume after SIGKILL, data parallel, the command line ---------------------------------------------


def cli(*args, env=None, check=False, **kw):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-P", "-m", "rlhf_engine", *args], env=full, capture_output=True,
                          text=True, timeout=600, **kw)  # fmt: skip


def ppo_args(out, *extra):
    return ["ppo", "--preset", "tiny", "--reward-fn", REWARD, "--out", str(out), "--no-progress", *extra]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    # the adaptive KL controller (target_kl) carries state across steps: the checkpoint must hold it
    steps = ["--max-steps", "6", "--checkpoint-every", "1", "--eval-every", "3", "--target-kl", "0.05"]
    straight = cli(*ppo_args(tmp_path / "straight", *steps))
    assert straight.returncode == 0, straight.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    child = subprocess.Popen([sys.executable, "-P", "-m", "rlhf_engine", *ppo_args(tmp_path / "killed", *steps)],
                             env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # steps 0, 1, 2 logged
        assert child.poll() is None, child.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    resumed = cli(*ppo_args(tmp_path / "killed", *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "killed" / "result.json").read_text())["resumed_from"] >= 1  # not a fresh start
    assert untimed(rows(tmp_path / "killed")) == untimed(rows(tmp_path / "straight"))
    assert len({r["beta"] for r in rows(tmp_path / "straight") if "beta" in r}) > 1  # the controller moved beta
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_make_the_update_one_rank_makes(tmp_path):
    # torchrun, 2 CPU processes on gloo, 8 prompts per step in all (4 per rank), against 1 process with
    # the same 8: the same responses (sampling keys are global), global whitening and token means,
    # summed gradients -> the same metrics and adapter weights, up to summation order (1e-4).
    steps = ["--max-steps", "2", "--eval-every", "2"]
    one = cli(*ppo_args(tmp_path / "one", *steps))
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    two = subprocess.run(
        [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
         "127.0.0.1", "--master-port", str(_free_port()), "-m", "rlhf_engine", *ppo_args(tmp_path / "two", *steps)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    r1, r2 = untimed(rows(tmp_path / "one")), untimed(rows(tmp_path / "two"))
    assert [r["step"] for r in r2] == [0, 1, 2]
    for a, b in zip(r1, r2):
        for k in a:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in wa:
        assert_rel_norm(wa[k], wb[k], bound=1e-3, name=k)  # norm-wise, as in test_kernels_on_vs_off


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--minibatch-size", "64"], "minibatch_size=64 is larger than the batch of 8 sequences"),
        (["--reward-fn", "no_such_module_xyz:score"], "cannot import 'no_such_module_xyz'"),
        (["--reward-fn", "", "--reward-model", "/no/such/rm"], "reward_model '/no/such/rm': not a saved stack"),
        (["--reward-fn", ""], "reward: give --reward-model, --reward-classifier and/or --reward-fn"),
        (["--reward-weights", "1,2"], "reward_weights: 2 weights for 1 sources"),
        (["--advantage", "grpo"], "--group-size >= 2"),
        (["--advantage", "ppo"], "advantage='ppo': expected one of gae, grpo, drgrpo, rloo"),
        (["--kl-estimator", "k4"], "kl_estimator='k4': expected one of exact, k1, k2, k3"),
        (["--temperature", "-1"], "temperature=-1.0"),
        (["--config", "/no/such/config.yaml"], "config '/no/such/config.yaml': cannot read"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path, extra, message):
    out = cli(*ppo_args(tmp_path / "out", *extra))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_config_file_then_flags(tmp_path):
    from rlhf_engine.cli import build_parser, stage_config

    cfg_file = tmp_path / "ppo.yaml"
    cfg_file.write_text("lr: 0.001\nsampling:\n  max_new_tokens: 7\n  top_p: 0.9\nstack:\n  lora_r: 4\n")
    args = build_parser().parse_args(ppo_args(tmp_path / "o", "--config", str(cfg_file), "--top-p", "0.8"))
    c = stage_config(args)
    assert (c.lr, c.sampling.max_new_tokens, c.sampling.top_p, c.stack.lora_r) == (0.001, 7, 0.8, 4)
    assert c.sampling.temperature == 1.0 and c.max_steps == 20  # the tiny preset's, untouched
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown config fields: learning_rate"):
        stage_config(build_parser().parse_args(ppo_args(tmp_path / "o", "--config", str(tmp_path / "bad.json"))))


def test_help_names_every_knob():
    out = cli("ppo", "--help")
    assert out.returncode == 0
    for f in ("--prompts", "--reward-fn", "--reward-model", "--reward-classifier", "--max-new-tokens", "--temperature",
              "--top-p", "--top-k", "--stop-strings", "--samples-per-prompt", "--rollout-batch-size",
              "--minibatch-size", "--ppo-epochs", "--clip-low", "--clip-high", "--value-clip", "--vf-coef",
              "--ent-coef", "--gamma", "--lam", "--kl-coef", "--kl-estimator", "--kl-in", "--target-kl",
              "--whiten-advantages", "--reward-clip", "--missing-eos-penalty", "--lr", "--max-grad-norm",
              "--max-steps", "--eval-every", "--checkpoint-every", "--seed", "--backend", "--config",
              "--init-adapter", "--reference"):  # fmt: skip
        assert f in out.stdout, f


def test_eval_before_and_after(tmp_path):
    result = train_ppo(config(tmp_path, max_steps=3))
    out = cli("eval", "--policy", result.out, "--reward-fn", REWARD, "--progress", "false")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(open(os.path.join(result.out, "eval.json")).read())
    assert report["prompts"] == 4 and report["before"]["kl"] == 0.0 and report["after"]["kl"] > 0
    assert set(report["before"]["scores"]) == {REWARD}
    assert "before" in out.stdout and "after" in out.stdout and "prompt:" in out.stdout
    assert len(report["samples"]) == 3 and all(s["prompt"] and "after" in s for s in report["samples"])
    missing = cli("eval", "--policy", result.out)
    assert missing.returncode == 2 and "eval needs a reward source" in missing.stderr


def test_reward_from_an_rm_directory_and_from_a_classifier(tmp_path):
    # (a) the reward adapter + head of an `engine rm` output joins the PPO stack (one base) and stays
    # frozen; (b) a separate two-label classifier directory scores through its positive class.
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_engine.model.tokenizers import byte_tokenizer
    from rlhf_engine.stages.rm import train_reward_model
    from rlhf_engine.stages.rm_config import reward_preset

    rm = train_reward_model(reward_preset("tiny", data=os.path.join(ROOT, "examples", "feedback_ranked.jsonl"),
                                          out=str(tmp_path / "rm"), max_steps=2, progress=False))  # fmt: skip
    ppo = train_ppo(config(tmp_path, "with_rm", max_steps=1, reward_fn="", reward_model=rm.out))
    for name in ("adapter_reward.safetensors",):
        before, after = load_file(os.path.join(rm.out, name)), load_file(os.path.join(ppo.out, name))
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    heads_rm, heads_ppo = load_file(os.path.join(rm.out, "heads.safetensors")), weights(ppo.out)
    assert all(torch.equal(v, heads_ppo[k]) for k, v in heads_rm.items())
    assert rows(ppo.out)[-1]["reward_std"] > 0  # the RM tells the responses apart

    tok = byte_tokenizer()
    clf = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=2, id2label={0: "hate", 1: "not hate"},
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(clf).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    ppo = train_ppo(config(tmp_path, "with_clf", max_steps=1, reward_fn="", reward_classifier=str(tmp_path / "clf"),
                           reward_positive_label="not hate"))  # fmt: skip
    assert rows(ppo.out)[-1]["reward_std"] > 0
    # an RM trained on another base is refused before anything loads
    with pytest.raises(ConfigError, match="trained on base 'tiny-llama'; this run's base is 'small-llama'"):
        config(tmp_path, "other", reward_fn="", reward_model=rm.out, stack={"model": "small-llama"}).validate()

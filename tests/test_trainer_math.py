"""Trainer math at the trainer level: the real functions of algos/, stages/ppo.py and the SFT and DPO
trainers, one step on a fixed batch, against the formula worked out by hand (the derivation in the
comments) or in float64 from the model's own logits. Each test names the bug it is there to catch: bugs
that a learning threshold notices only by luck, or not at all (a flat reward hides a dropped group, a
temperature of 1 hides a training forward that ignores it, ent_coef = 0 hides the entropy's sign).

Letters: B sequences, P prompt tokens, R response positions, V vocabulary."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.algos.advantages import GROUP_STD_EPS, estimate_advantages
from rlhf_engine.algos.kl import assign_rewards
from rlhf_engine.algos.losses import minibatch_weights, ppo_micro_loss
from rlhf_engine.algos.rewards import RunningMoments, StackReward
from rlhf_engine.algos.rollout import Trajectory, forward_stats, rollout, score
from rlhf_engine.core.distributed import Dist
from rlhf_engine.core.run import Run
from rlhf_engine.core.tensors import IGNORE_INDEX
from rlhf_engine.model.config import SamplingConfig, StackConfig
from rlhf_engine.model.logprobs import policy_reference_stats
from rlhf_engine.model.stack import ModelStack
from rlhf_engine.stages.ppo import build_stack, optimise
from rlhf_engine.stages.ppo_config import ppo_preset
from util import REWARD, rows, saved_weights, tiny

PROMPTS = ["My house is too hot.", "Hi"]


def ppo_config(tmp_path, **kw):
    kw.setdefault("reward_fn", REWARD)
    return tiny(ppo_preset, tmp_path, "ppo", **kw)


def perturb(stack, seed=0, scale=0.2):
    """LoRA weights that differ from peft's start (lora_B = 0 makes every adapter the bare base, which
    would hide any bug that only shows where the policy differs from the reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return stack


@pytest.fixture(scope="module")
def ppo_stack(tmp_path_factory):
    """The PPO stack (policy + value adapters, the tiny base), perturbed, in eval mode (lora_dropout 0)."""
    stack, _ = build_stack(ppo_config(tmp_path_factory.mktemp("ppo")))
    return perturb(stack).eval()


def sampled(stack, config, seed=3) -> Trajectory:
    """Steps 2 and 4 of PPO: 2 prompts x config.samples_per_prompt responses and their statistics."""
    traj = rollout(stack, PROMPTS, [0, 1], config.sampling, samples_per_prompt=config.samples_per_prompt, seed=seed)
    forward_stats(stack, traj, config)
    return traj


def own_logprobs(stack, traj, temperature, adapter="policy") -> torch.Tensor:
    """(B, R, V) float64 log_softmax(logits / T) of the model's own forward at the response positions."""
    P = traj.prompt_length
    pos = (traj.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with stack._active(adapter), torch.no_grad():
        logits = stack.model.get_base_model()(input_ids=traj.input_ids, attention_mask=traj.attention_mask,
                                              position_ids=pos).logits  # fmt: skip
    return torch.log_softmax(logits[:, P - 1 : -1].double() / temperature, -1)


def token_logprobs(lp, traj) -> torch.Tensor:
    """(B, R) float64: the sampled tokens' entries of lp (B, R, V), 0 past each response."""
    tokens = traj.input_ids[:, traj.prompt_length :, None]
    return torch.where(traj.mask, lp.gather(-1, tokens)[..., 0], 0)


def micro_loss(stack, traj, config, beta=0.0):
    """ppo_micro_loss over the whole trajectory as one minibatch and one micro-batch (this rank only)."""
    idx = torch.arange(traj.mask.shape[0])
    weights, n_total = minibatch_weights(traj, idx, config, Dist())
    loss, stats = ppo_micro_loss(stack, traj.rows(idx), traj.prompt_length, config, beta, weights, n_total)
    return loss, stats, weights


def hand_trajectory(mask_rows, R) -> Trajectory:
    """A Trajectory of dummy tokens whose response mask has the given row lengths (for the step functions
    that never run the model)."""
    B = len(mask_rows)
    mask = torch.arange(R)[None, :] < torch.tensor(mask_rows)[:, None]
    ids = torch.full((B, 1 + R), 5)
    return Trajectory(input_ids=ids, attention_mask=torch.cat([torch.ones(B, 1, dtype=torch.long), mask.long()], 1),
                      prompt_length=1, labels=torch.where(mask, 5, IGNORE_INDEX), mask=mask,
                      stopped=torch.ones(B, dtype=torch.bool), prompts=["p"] * B, responses=["r"] * B)  # fmt: skip


# ---- LoRA dropout: the rollout's statistics are those of a fixed policy ---------------------------------


@pytest.fixture(scope="module")
def dropout_stack():
    """policy, value and reward adapters with lora_dropout = 0.3, perturbed, in TRAIN mode (as train_ppo
    leaves the stack: the training forward keeps its dropout)."""
    stack = ModelStack.build(StackConfig(model="tiny-llama", adapters=("policy", "value", "reward"), lora_dropout=0.3))
    return perturb(stack, scale=0.3).train(True)


def test_rollout_statistics_ignore_lora_dropout(dropout_stack, tmp_path):
    # Bug: sampling, the old / reference log-probs, the values or the reward model run with dropout on (the
    # trainer sets train mode once): two passes of the same fixed policy then disagree by nats, the first
    # ratio is not 1, and the KL and the reward are noise. Each no-grad pass must run in eval mode.
    from rlhf_engine.stages.cai import ModelJudge

    stack = dropout_stack
    config = ppo_config(tmp_path, samples_per_prompt=2)
    a, b = sampled(stack, config), sampled(stack, config)
    assert a.responses == b.responses and torch.equal(a.input_ids, b.input_ids)
    for name in ("old_logprobs", "ref_logprobs", "entropy", "kl_exact", "old_values"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    P, ids, am = a.prompt_length, a.input_ids, a.attention_mask
    first, second = (policy_reference_stats(stack, ids, am, a.labels, P, 1.0, "auto") for _ in range(2))
    assert all(torch.equal(first[k], second[k]) for k in ("logp", "ref_logp", "ent", "kl"))
    rm = StackReward(stack, max_length=64)
    assert torch.equal(rm.score(a.prompts, a.responses), rm.score(a.prompts, a.responses))
    judge = ModelJudge(stack, "policy", ("A", "B"), batch_size=2, max_length=64)
    assert judge(["Which is better? ("]) == judge(["Which is better? ("])
    assert stack.model.training  # and the stack is left in train mode for the training forward


def test_first_minibatch_ratio_is_one_with_lora_dropout(dropout_stack, tmp_path):
    # Before the first update the policy is the one that sampled: in eval mode the training forward's
    # log-probs are the rollout's, so ratio = 1 at every token (approx_kl = mean(ratio - 1 - log ratio) = 0,
    # nothing clipped). With the old log-probs taken with dropout on, |log ratio| is ~1 nat (approx_kl ~ 0.1).
    # In train mode the training forward itself drops LoRA inputs (kept, as the issue asks): there the
    # ratio moves by dropout noise alone, which this test also pins down.
    stack = dropout_stack
    config = ppo_config(tmp_path, samples_per_prompt=2, advantage="grpo")
    traj = sampled(stack, config)
    traj.scores = torch.tensor([1.0, 0.0, 0.5, -1.0])
    assign_rewards(traj, config, 0.0)
    estimate_advantages(traj, config, Dist())
    with stack.evaluating():
        _, stats, _ = micro_loss(stack, traj, config)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0
    _, noisy, _ = micro_loss(stack, traj, config)
    assert noisy["approx_kl"] > 1e-4


# ---- GAE, value clip, zero-std groups, shaping, entropy, temperature -------------------------------------


def test_gae_in_the_trainer_uses_gamma_and_lambda_as_given(tmp_path):
    # Bug: gamma and lambda swapped where the trainer calls GAE. gamma = 0.9, lam = 0.5 (gamma * lam = 0.45),
    # no whitening; delta_t = r_t + gamma v_{t+1} - v_t (v = 0 after the last real token), A_t = delta_t +
    # 0.45 A_{t+1}, returns = A + v.
    # Row 0, 4 tokens, r = [0, 0, 0, 1], v = 0.5 everywhere:
    #   t=3: delta = 1 - 0.5 = 0.5                                 A = 0.5
    #   t=2: delta = 0.9 * 0.5 - 0.5 = -0.05                       A = -0.05 + 0.45 * 0.5 = 0.175
    #   t=1: delta = -0.05                                         A = -0.05 + 0.45 * 0.175 = 0.02875
    #   t=0: delta = -0.05                                         A = -0.05 + 0.45 * 0.02875 = -0.0370625
    # Row 1, 3 tokens, r = [0, 0, 2], v = [1, 0, -1] (and 7 at the masked position, which must not count):
    #   t=2: delta = 2 - (-1) = 3                                  A = 3
    #   t=1: delta = 0.9 * (-1) - 0 = -0.9                         A = -0.9 + 0.45 * 3 = 0.45
    #   t=0: delta = 0.9 * 0 - 1 = -1                              A = -1 + 0.45 * 0.45 = -0.7975
    # Swapped (gamma 0.5) row 0 would give delta_2 = 0.5 * 0.5 - 0.5 = -0.25 instead.
    config = ppo_config(tmp_path, gamma=0.9, lam=0.5, whiten_advantages=False)
    traj = hand_trajectory([4, 3], 4)
    traj.rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
    traj.old_values = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, -1.0, 7.0]])
    estimate_advantages(traj, config, Dist())
    want = torch.tensor([[-0.0370625, 0.02875, 0.175, 0.5], [-0.7975, 0.45, 3.0, 0.0]])
    torch.testing.assert_close(traj.advantages, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(traj.returns, torch.where(traj.mask, want + traj.old_values, 0), atol=1e-6, rtol=0)


def test_value_loss_in_the_trainer_uses_the_clip_range(ppo_stack, tmp_path):
    # Bug: the trainer ignores value_clip (passes no clip, or another number). Old values are set 0.5
    # above / 0.05 below the current ones: with clip 0.2 the first move is clipped to 0.2, the second is
    # inside the range. Reference, float64: 0.5 * masked_mean(max((v - R)^2, (old + clip(v - old, -0.2, 0.2)
    # - R)^2)) with v the value head's output at the same positions; the returns sit below v, so the
    # clipped branch is the larger one on the tokens that moved far (vf_clipfrac > 0).
    config = ppo_config(tmp_path, samples_per_prompt=2, value_clip=0.2)
    stack = ppo_stack
    traj = sampled(stack, config)
    m = traj.mask
    with torch.no_grad():
        v = stack.values(traj.input_ids, traj.attention_mask)[:, traj.prompt_length - 1 : -1].double()
    offset = torch.where(torch.arange(m.shape[1]) % 2 == 0, 0.5, -0.05).expand_as(v)
    traj.old_values = torch.where(m, v + offset, 0).float()
    traj.returns = torch.where(m, v - 1.0, 0).float()
    traj.advantages = torch.zeros_like(traj.old_logprobs)
    _, stats, _ = micro_loss(stack, traj, config)
    old, ret = traj.old_values.double(), traj.returns.double()
    clipped = old + (v - old).clamp(-0.2, 0.2)
    per_token = torch.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    want = 0.5 * float(per_token[m].mean())
    share = float(((clipped - ret) ** 2 > (v - ret) ** 2)[m].double().mean())
    assert stats["vf_loss"] == pytest.approx(want, rel=1e-5) and stats["vf_clipfrac"] == pytest.approx(share)
    assert share > 0.3  # the clip range matters here: without it vf_loss would be 0.5 * 1.0


def test_drop_zero_std_groups_leaves_the_flat_groups_out(ppo_stack, tmp_path):
    # Bug: --drop-zero-std-groups has no effect. A flat reward in every group hides it (every advantage is 0
    # either way): here group 0 varies (scores 1, 0) and group 1 is flat (0.5, 0.5). GRPO advantages: group 0
    # +-0.5 / (std + eps) with std = sqrt(0.5) (unbiased), group 1 zero. token_mean weights: 1 / (kept real
    # tokens) on group 0's tokens and 0 on group 1's when dropping, 1 / (all real tokens) otherwise. At ratio
    # 1 (first minibatch), pg_loss = sum_t w_t (-A_t) with ent_coef = 0.
    stack = ppo_stack
    results = {}
    for drop in (False, True):
        config = ppo_config(tmp_path, samples_per_prompt=2, advantage="grpo", drop_zero_std_groups=drop)
        traj = sampled(stack, config)
        traj.scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
        assign_rewards(traj, config, 0.0)
        estimate_advantages(traj, config, Dist())
        assert traj.zero_std.tolist() == [False, False, True, True]
        _, stats, weights = micro_loss(stack, traj, config)
        m = traj.mask
        a = 0.5 / (math.sqrt(0.5) + GROUP_STD_EPS)
        adv = torch.tensor([a, -a, 0.0, 0.0], dtype=torch.float64)[:, None] * m
        kept = m.clone()
        if drop:
            kept[2:] = False
        w = kept.double() / kept.sum()
        torch.testing.assert_close(weights.double(), w, atol=1e-7, rtol=0)
        assert stats["pg_loss"] == pytest.approx(float((w * -adv).sum()), rel=1e-4, abs=1e-6)
        results[drop] = stats["pg_loss"]
    assert results[True] != pytest.approx(results[False])  # the option changes the loss of this batch


def test_reward_shaping_is_applied_once(tmp_path):
    # Bug: the shaping (missing-EOS penalty, normalisation, clipping) runs twice. Raw scores [2, 0, 1, -1],
    # the second response never stopped (penalty -1): [2, -1, 1, -1]. Running normalisation from fresh
    # moments: mean 0.25, unbiased variance ((1.75^2 + 1.25^2 + 0.75^2 + 1.25^2) / 3 = 6.75 / 3 = 2.25, std
    # 1.5: [1.1667, -0.8333, 0.5, -0.8333]; clipped to [-1, 1]: [1, -0.8333, 0.5, -0.8333]. The moments saw 4
    # scores. Then step 5 puts each score at its response's last token and nothing else (beta = 0).
    class Fixed:
        name = "fixed"

        def score(self, prompts, responses):
            return torch.tensor([2.0, 0.0, 1.0, -1.0])

    config = ppo_config(tmp_path, missing_eos_penalty=-1.0, reward_normalization="running", reward_clip=1.0)
    traj = hand_trajectory([3, 2, 3, 1], 3)
    traj.stopped = torch.tensor([True, False, True, True])
    moments = RunningMoments()
    score(traj, [("fixed", Fixed(), 1.0)], config, moments, Dist())
    want = torch.tensor([1.0, -1.25 / 1.5, 0.5, -1.25 / 1.5])
    torch.testing.assert_close(traj.scores, want, atol=1e-6, rtol=0)
    assert moments.count == 4 and moments.mean == pytest.approx(0.25) and moments.std == pytest.approx(1.5)
    assert traj.raw_scores.tolist() == [2.0, 0.0, 1.0, -1.0]  # the log's reward_mean is of the raw scores
    traj.kl_exact = torch.zeros(4, 3)
    assign_rewards(traj, config, 0.0)
    last = torch.tensor([2, 1, 2, 0])
    torch.testing.assert_close(traj.rewards, F.one_hot(last, 3).float() * want[:, None], atol=1e-6, rtol=0)


def test_entropy_bonus_sign_and_size(ppo_stack, tmp_path):
    # Bug: the entropy bonus's sign flipped (every other test runs ent_coef = 0). loss(ent_coef = 0.1) -
    # loss(0) = -0.1 * sum_t w_t H_t, with H_t the entropy of softmax(logits / T) at T = 0.7 from the model's
    # own logits (float64) and w the token-mean weights: the bonus LOWERS the loss by 0.1 x the mean entropy.
    stack = ppo_stack
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.7, max_prompt_length=64)
    config = ppo_config(tmp_path, samples_per_prompt=2, advantage="grpo", sampling=sampling)
    traj = sampled(stack, config)
    traj.scores = torch.tensor([1.0, 0.0, 0.5, -1.0])
    assign_rewards(traj, config, 0.0)
    estimate_advantages(traj, config, Dist())
    without, _, w = micro_loss(stack, traj, config)
    with_bonus, _, _ = micro_loss(stack, traj, dataclasses.replace(config, ent_coef=0.1))
    lp = own_logprobs(stack, traj, 0.7)
    entropy = -(lp.exp() * lp).sum(-1)  # (B, R)
    want = -0.1 * float((w.double() * entropy).sum())
    assert want < -0.01 and float(with_bonus - without) == pytest.approx(want, rel=1e-4)


def test_training_forward_uses_the_sampling_temperature(ppo_stack, tmp_path):
    # Bug: a forward that ignores the temperature (every other test samples at T = 1). At T = 0.6 the old
    # log-probs are log_softmax(logits / 0.6) of the model's own logits, and the training forward before
    # any update reproduces them: ratio 1 (approx_kl 0, nothing clipped), pg_loss = sum_t w_t (-A_t).
    stack = ppo_stack
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.6, max_prompt_length=64)
    config = ppo_config(tmp_path, samples_per_prompt=2, advantage="grpo", sampling=sampling)
    traj = sampled(stack, config)
    lp = own_logprobs(stack, traj, 0.6)
    torch.testing.assert_close(traj.old_logprobs.double(), token_logprobs(lp, traj), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(traj.entropy.double(), torch.where(traj.mask, -(lp.exp() * lp).sum(-1), 0),
                               atol=2e-5, rtol=2e-5)  # fmt: skip
    traj.advantages = torch.where(traj.mask, torch.randn(traj.mask.shape, generator=torch.Generator().manual_seed(5)), 0)
    _, stats, w = micro_loss(stack, traj, config)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0
    assert stats["pg_loss"] == pytest.approx(float((w * -traj.advantages).sum()), rel=1e-4)


# ---- the policy objective, group advantages, an SFT step, a DPO step -------------------------------------


def test_ppo_objective_in_the_trainer(ppo_stack, tmp_path):
    # Bug: an advantage sign, a lost clip or weight in the trainer (test_ppo's learning run is the only
    # other witness). Old log-probs shifted by delta in [-0.4, 0.4] so ratios clip on both sides; advantages
    # of both signs; asymmetric clip (0.2, 0.28), dual clip 3, GRPO's per-sequence token mean. Reference,
    # float64: r = exp(log p - old) with log p from the model's own logits,
    # pg_t = max(-A r, -A clip(r, 0.8, 1.28)), capped at -3 A where A < 0; loss = sum_t w_t pg_t with
    # w = 1 / (len_i * n_seqs).
    stack = ppo_stack
    config = ppo_config(tmp_path, samples_per_prompt=2, advantage="grpo", clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                        loss_agg="seq_mean_token_mean")  # fmt: skip
    traj = sampled(stack, config)
    g = torch.Generator().manual_seed(7)
    m = traj.mask
    traj.old_logprobs = torch.where(m, traj.old_logprobs + (torch.rand(m.shape, generator=g) - 0.5) * 0.8, 0)
    traj.advantages = torch.where(m, torch.randn(m.shape, generator=g), 0)
    loss, stats, _ = micro_loss(stack, traj, config)
    ratio = torch.exp(token_logprobs(own_logprobs(stack, traj, 1.0), traj) - traj.old_logprobs.double())
    a = traj.advantages.double()
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
    pg = torch.where(a < 0, torch.minimum(pg, -3.0 * a), pg)
    w = m.double() / (m.sum(1, keepdim=True) * m.shape[0])
    want = float((w * torch.where(m, pg, 0)).sum())
    clipped = (ratio < 0.8) | (ratio > 1.28)
    assert float(loss) == pytest.approx(want, rel=1e-4) and bool(clipped[m].any()) and bool((~clipped)[m].any())
    assert stats["clipfrac"] > 0


def test_one_optimise_step_lowers_the_loss_of_its_batch(ppo_stack, tmp_path):
    # Bug: the gradient applied with the wrong sign (the loss right, the step away from it). One optimise
    # step (AdamW at lr 1e-4: a small step along -sign(grad)) must lower the micro-batch loss of its own
    # batch: first order, loss(theta - lr u) = loss - lr <grad, u> + O(lr^2) with <grad, sign(grad)> > 0.
    stack = perturb(build_stack(ppo_config(tmp_path / "fresh"))[0], seed=1).eval()
    config = ppo_config(tmp_path, samples_per_prompt=2, advantage="grpo", minibatch_size=4, micro_batch_size=2,
                        ppo_epochs=1, lr=1e-4, max_grad_norm=0.0)  # fmt: skip
    traj = sampled(stack, config)
    traj.scores = torch.tensor([1.0, 0.0, 0.5, -1.0])
    assign_rewards(traj, config, 0.0)
    estimate_advantages(traj, config, Dist())
    stack.set_trainable("policy")
    params = stack.role_parameters("policy")
    before, _, _ = micro_loss(stack, traj, config)
    with Run("ppo", config) as run:
        optimise(stack, traj, config, 0.0, run, torch.optim.AdamW(params, lr=config.lr), params, Dist(), 0)
    after, _, _ = micro_loss(stack, traj, config)
    assert float(after) < float(before) - 1e-4, (float(before), float(after))


@pytest.mark.parametrize("mode, a0, a1", [
    # rows 0, 1 (group 0): sequence rewards 0.7, 2.6 (mean 1.65, +-0.95); rows 2, 3: 2.0, 1.5 (mean 1.75, +-0.25)
    ("grpo", 0.95 / (0.95 * math.sqrt(2) + GROUP_STD_EPS), 0.25 / (0.25 * math.sqrt(2) + GROUP_STD_EPS)),
    ("drgrpo", 0.95, 0.25),
    ("rloo", 1.9, 0.5),  # k / (k - 1) = 2 times the centred reward: r_i - (the other one)
])  # fmt: skip
def test_group_advantages_in_the_trainer(tmp_path, mode, a0, a1):
    # Bug: the trainer groups the wrong rows, uses the score without the KL, or flips the sign (test_grpo's
    # learning run is the only other witness). k = 2, rows i * 2 + j; scores [1, 3, 2, 2]; exact KL per token
    # with beta = 1 in the reward: row sums 0.3, 0.4, 0, 0.5 -> sequence rewards [0.7, 2.6, 2.0, 1.5].
    # GRPO: (r - mean) / (std + eps) with the unbiased std = |r_0 - r_1| / sqrt(2); Dr. GRPO: r - mean;
    # RLOO: r - the other response's reward. The advantage sits on every real token of its response.
    config = ppo_config(tmp_path, samples_per_prompt=2, advantage=mode, kl_coef=1.0)
    traj = hand_trajectory([3, 2, 3, 1], 3)
    traj.scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    traj.kl_exact = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]])
    assign_rewards(traj, config, beta=1.0)
    estimate_advantages(traj, config, Dist())
    want = torch.tensor([-a0, a0, a1, -a1])[:, None] * traj.mask
    torch.testing.assert_close(traj.advantages, want.float(), atol=1e-6, rtol=1e-6)
    assert traj.zero_std.tolist() == [False] * 4


def _records(path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def _adamw_step(theta, grad, lr, wd, max_norm):
    """AdamW's first step from a gradient, clipped to max_norm as a whole: m_hat = g, v_hat = g^2, so
    theta <- theta (1 - lr wd) - lr g / (|g| + eps) (Loshchilov and Hutter 2019; torch's eps = 1e-8)."""
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grad.values()))
    c = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0
    return {n: theta[n].double() * (1 - lr * wd) - lr * (c * grad[n]) / ((c * grad[n]).abs() + 1e-8) for n in theta}, c


def _assert_step(got, want, grad, c, lr):
    """The saved weights after one step against _adamw_step: elementwise where |c g| > 1e-5 (below that,
    g / (|g| + eps) amplifies fp32 rounding of g), within one step elsewhere."""
    for n in want:
        big = (c * grad[n]).abs() > 1e-5
        torch.testing.assert_close(got[n].double()[big], want[n][big], atol=lr * 1e-3, rtol=1e-6, msg=n)
        assert float((got[n].double() - want[n]).abs().max()) <= 2 * lr, n


def test_one_sft_step_is_the_formula(tmp_path):
    # Bug: the SFT step's loss sign, its normaliser or its labels (test_sft's learning threshold is the only
    # other witness). 4 records, one batch of 4 in two micro-batches, nothing held out, no warm-up. Step 1's
    # logged loss is the token mean of -log softmax(hidden @ W.T) over the completion tokens of the 4 records
    # (float64, the starting policy rebuilt from the same seed), and the saved weights are AdamW's first
    # step along that loss's gradient.
    from rlhf_engine.datasets.batching import collate
    from rlhf_engine.datasets.samples import SFTExample, encode_example
    from rlhf_engine.model.stack import build_policy_stack
    from rlhf_engine.stages.sft import train_sft
    from rlhf_engine.stages.sft_config import sft_preset

    records = [{"prompt": "My house is too hot.", "completion": "Open a window."}, {"prompt": "Hi", "completion": "Hello."},
               {"prompt": "Two plus three?", "completion": "Five."}, {"prompt": "Name a colour.", "completion": "Blue"}]  # fmt: skip
    config = tiny(sft_preset, tmp_path, data=_records(tmp_path / "sft.jsonl", records), eval_fraction=0.0, batch_size=4,
                  micro_batch_size=2, max_steps=1, warmup_steps=0, lr=1e-3, weight_decay=0.1)  # fmt: skip
    result = train_sft(config)
    stack = build_policy_stack(config.stack, "")
    tok = stack.tokenizer
    batch = collate([encode_example(tok, SFTExample(r["prompt"], r["completion"]), 256) for r in records],
                    tok.pad_token_id)  # fmt: skip
    named = dict(stack.named_role_parameters("policy"))
    hidden = stack.policy(batch.input_ids, batch.attention_mask)[:, :-1]
    lp = torch.log_softmax(hidden.double() @ stack.lm_head_weight.double().T, -1)
    keep = batch.labels != IGNORE_INDEX
    loss = -lp.gather(-1, torch.where(keep, batch.labels, 0)[..., None])[..., 0][keep].mean()
    loss.backward()
    assert rows(result.out)[1]["loss"] == pytest.approx(float(loss), rel=1e-5)
    grad = {n: p.grad.double() for n, p in named.items()}
    want, c = _adamw_step({n: p.detach() for n, p in named.items()}, grad, 1e-3, 0.1, config.max_grad_norm)
    _assert_step(saved_weights(result.out), want, grad, c, 1e-3)


@pytest.mark.parametrize("precompute", [False, True])
def test_one_dpo_step_is_the_formula(tmp_path, precompute):
    # Bug: chosen and rejected (or their reference log-probs) swapped somewhere in the DPO step (test_dpo's
    # learning run is the only other witness). A starting policy that differs from the reference (the bare
    # base); 4 pairs, one batch in two micro-batches, the reference log-probs per step or precomputed.
    # Step 1's logged loss is mean_i -log sigmoid(beta m_i), m = (log pi_c - log ref_c) - (log pi_r - log ref_r)
    # from each side's summed completion log-probs of the model's own logits (float64); the logged
    # log-probs and accuracy follow; the saved weights are AdamW's first step along that loss's gradient.
    from rlhf_engine.datasets.batching import collate_pairs
    from rlhf_engine.datasets.feedback import PreferencePair
    from rlhf_engine.datasets.samples import encode_pairs
    from rlhf_engine.model.stack import build_policy_stack
    from rlhf_engine.stages.dpo import train_dpo
    from rlhf_engine.stages.dpo_config import dpo_preset

    start = tmp_path / "start"
    perturb(build_policy_stack(StackConfig(model="tiny-llama", adapters=("policy",)), ""), scale=0.3).save(
        str(start), roles=("policy",))
    pairs = [PreferencePair("q1", "abc", "xyz"), PreferencePair("q2", "yes", "no no"),
             PreferencePair("q3", "hello there", "go"), PreferencePair("q4", "a", "b")]  # fmt: skip
    data = _records(tmp_path / "prefs.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                               for p in pairs])  # fmt: skip
    config = tiny(dpo_preset, tmp_path, data=data, eval_fraction=0.0, batch_size=4, micro_batch_size=2, max_steps=1,
                  warmup_steps=0, lr=1e-3, init_adapter=str(start), reference="base", precompute_ref_logps=precompute)  # fmt: skip
    result = train_dpo(config)
    stack = build_policy_stack(config.stack, str(start), "base")
    batch = collate_pairs(encode_pairs(stack.tokenizer, pairs, 256), stack.tokenizer.pad_token_id)
    keep = batch.labels != IGNORE_INDEX
    tokens = torch.where(keep, batch.labels, 0)[..., None]

    def sums(adapter):  # (8,) summed completion log-probs: chosen rows 0-3, rejected rows 4-7
        hidden = stack.hidden_states(adapter, batch.input_ids, batch.attention_mask)[:, :-1]
        lp = torch.log_softmax(hidden.double() @ stack.lm_head_weight.double().T, -1)
        return torch.where(keep, lp.gather(-1, tokens)[..., 0], 0).sum(1)

    pi = sums("policy")
    with torch.no_grad():
        ref = sums(None)
    margin = (pi[:4] - ref[:4]) - (pi[4:] - ref[4:])
    loss = -F.logsigmoid(config.beta * margin).mean()
    loss.backward()
    row = rows(result.out)[1]
    assert row["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert row["logps_chosen"] == pytest.approx(float(pi[:4].mean()), rel=1e-5)
    assert row["logps_rejected"] == pytest.approx(float(pi[4:].mean()), rel=1e-5)
    assert row["accuracy"] == float((margin > 0).double().mean()) and 0 < row["accuracy"] < 1
    named = dict(stack.named_role_parameters("policy"))
    grad = {n: p.grad.double() for n, p in named.items()}
    want, c = _adamw_step({n: p.detach() for n, p in named.items()}, grad, 1e-3, config.weight_decay,
                          config.max_grad_norm)  # fmt: skip
    _assert_step(saved_weights(result.out), want, grad, c, 1e-3)

"""Our RL math against the peers' own definitions, on identical inputs (masks with padding and holes,
ties, zero-std groups, ignore_index, temperature != 1): GAE (verl, OpenRLHF), GRPO / Dr. GRPO / RLOO
advantages (verl, OpenRLHF), the clipped policy loss with asymmetric and dual clip and the clipped value
loss (verl), the k1 / k2 / k3 KL estimators (verl, OpenRLHF), the adaptive KL controller (verl, OpenRLHF;
Ziegler et al. 2019), masked whitening (verl, OpenRLHF), the DPO family (TRL), log-probs and entropy at a
temperature (OpenRLHF, verl).

Each peer formula is written here from its published definition, with the repository, file and function
it follows; none is imported or copied. Where the conventions agree, ours (rlhf_kernels on "torch" and
"cpp", and the engine's algos functions) must equal the peer's; where they differ on purpose, the test
pins the difference down and README "Conventions against the peers" gives the reason. Versions read:
verl at b178a3c (2026-01), OpenRLHF at 3c3be62 (2026-08), TRL 1.16.0 (and 0.28 for the DPO label
smoothing that TRL dropped in 0.29).

Letters: B sequences, T (or R) positions, V vocabulary."""

import math

import pytest
import torch
import torch.nn.functional as F

import rlhf_kernels as kernels
from rlhf_engine.algos.advantages import GROUP_STD_EPS, estimate_advantages
from rlhf_engine.algos.kl import KL_LOG_RATIO_CLAMP, KLController
from rlhf_engine.algos.losses import dpo_losses
from rlhf_engine.algos.rollout import Trajectory
from rlhf_engine.core.distributed import Dist
from rlhf_engine.stages.ppo_config import ppo_preset
from util import REWARD, assert_close, device_for, on, tiny

BACKENDS = ["torch", "cpp"]
F64 = torch.float64


# ---- the peers' definitions (float64) ---------------------------------------------------------------


def verl_masked_whiten(values, mask, shift_mean=True):
    """verl, verl/utils/torch_functional.py, masked_whiten: mean = sum(m x) / (sum m + 1e-8), the variance
    about it with Bessel's correction n / (n - 1) (masked_var, unbiased=True), (x - mean) * rsqrt(var + 1e-8),
    the mean added back when not shift_mean. Every position is transformed, masked ones included."""
    m = mask.to(F64)
    mean = (values * m).sum() / (m.sum() + 1e-8)
    n = m.sum()
    var = (((values - mean) ** 2) * m).sum() / (n + 1e-8) * n / (n - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def openrlhf_normalize(advantages, mask):
    """OpenRLHF, openrlhf/trainer/ppo_utils/experience_maker.py (the advantage normalisation after
    get_advantages_and_returns): mean over the action tokens, the BIASED variance (divided by the token
    count), (A - mean) * rsqrt(max(var, 1e-8))."""
    m = mask.to(F64)
    n = m.sum()
    mean = (advantages * m).sum() / n
    var = (((advantages - mean) ** 2) * m).sum() / n
    return (advantages - mean) * var.clamp(min=1e-8).rsqrt()


def verl_gae(rewards, values, mask, gamma, lam):
    """verl, verl/trainer/ppo/core_algos.py, compute_gae_advantage_return: the reverse TD(lambda) loop in
    which a masked position (an observation token, padding) takes no TD error and breaks nothing: the next
    value and the running advantage carry over it. Returns (verl_masked_whiten(advantages), returns) with
    returns = advantages + values taken before the whitening."""
    B, T = rewards.shape
    m = mask.to(F64)
    next_v, running = torch.zeros(B, dtype=F64), torch.zeros(B, dtype=F64)
    adv = torch.zeros(B, T, dtype=F64)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        new = delta + gamma * lam * running
        next_v = values[:, t] * m[:, t] + (1 - m[:, t]) * next_v
        running = new * m[:, t] + (1 - m[:, t]) * running
        adv[:, t] = running
    return verl_masked_whiten(adv, mask), adv + values


def openrlhf_gae(rewards, values, mask, gamma, lam):
    """OpenRLHF, openrlhf/trainer/ppo_utils/experience_maker.py, get_advantages_and_returns: values and
    rewards zeroed outside the action mask, then the plain reverse loop over every position (v after the
    last position is 0). Returns (advantages, returns = advantages + masked values)."""
    values, rewards = values * mask, rewards * mask
    B, T = rewards.shape
    running = torch.zeros(B, dtype=F64)
    adv = torch.zeros(B, T, dtype=F64)
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t < T - 1 else 0.0
        running = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * running
        adv[:, t] = running
    return adv, adv + values


def verl_group_outcome(token_rewards, mask, index, *, epsilon=1e-6, norm_by_std=True):
    """verl, verl/trainer/ppo/core_algos.py, compute_grpo_outcome_advantage: each response's summed token
    reward against its group's (same index): (s - mean) / (std + epsilon) with torch.std (unbiased), or
    s - mean when not norm_adv_by_std_in_grpo (Dr. GRPO); a group of one has mean 0 and std 1. The
    advantage is broadcast over the response mask."""
    s = token_rewards.sum(-1)
    out = torch.empty_like(s)
    for g in set(index):
        rows = [i for i, x in enumerate(index) if x == g]
        group = s[rows]
        mean, std = (group.mean(), group.std()) if len(rows) > 1 else (torch.zeros((), dtype=F64), torch.ones((), dtype=F64))
        out[rows] = (group - mean) / (std + epsilon) if norm_by_std else group - mean
    return out[:, None] * mask


def verl_rloo(token_rewards, mask, index):
    """verl, verl/trainer/ppo/core_algos.py, compute_rloo_outcome_advantage: s * n / (n - 1) - mean * n /
    (n - 1) for a group of n > 1 (= s minus the mean of the other n - 1), broadcast over the mask."""
    s = token_rewards.sum(-1)
    out = s.clone()
    for g in set(index):
        rows = [i for i, x in enumerate(index) if x == g]
        n = len(rows)
        if n > 1:
            out[rows] = s[rows] * n / (n - 1) - s[rows].mean() * n / (n - 1)
    return out[:, None] * mask


def openrlhf_rloo(scores, k):
    """OpenRLHF, openrlhf/trainer/ppo_utils/experience_maker.py (estimator "rloo"): rewards reshaped to
    (prompts, k), baseline = (group sum - r) / (k - 1), r - baseline."""
    r = scores.view(-1, k)
    return (r - (r.sum(-1, keepdim=True) - r) / (k - 1)).reshape(-1)


def verl_policy_loss(old_log_prob, log_prob, advantages, mask, clip_low, clip_high, clip_c):
    """verl, verl/trainer/ppo/core_algos.py, compute_policy_loss_vanilla (token-mean aggregation, agg_loss):
    log-ratio clamped to [-20, 20], ratio = exp; pg_losses = max(-A r, -A clip(r, 1 - low, 1 + high));
    where A < 0, min(that, -A c) (dual clip, Ye et al. 2020); pg_clipfrac = mean(clipped branch > plain);
    ppo_kl = mean(-log ratio) (k1 of old vs new). Returns (pg_loss, pg_clipfrac, ppo_kl)."""
    m = mask.to(F64)
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    pg = torch.where(advantages < 0, torch.minimum(-advantages * clip_c, clip1), clip1)
    mean = lambda x: (x * m).sum() / m.sum()  # noqa: E731 (verl's masked_sum / batch token count)
    return mean(pg), mean((pg2 > pg1).to(F64)), mean(-log_ratio)


def verl_value_loss(vpreds, returns, values, mask, cliprange_value):
    """verl, verl/trainer/ppo/core_algos.py, compute_value_loss: vpredclipped = clip_by_value(vpreds,
    values - c, values + c); 0.5 * token-mean of max((vpreds - R)^2, (vpredclipped - R)^2); vf_clipfrac =
    mean(clipped loss > plain loss)."""
    m = mask.to(F64)
    clipped = torch.maximum(torch.minimum(vpreds, values + cliprange_value), values - cliprange_value)
    l1, l2 = (vpreds - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * (torch.maximum(l1, l2) * m).sum() / m.sum(), ((l2 > l1).to(F64) * m).sum() / m.sum()


def verl_kl_penalty(logprob, ref_logprob, kind):
    """verl, verl/trainer/ppo/core_algos.py, kl_penalty_forward (Schulman 2020): "kl"/"k1" logp - ref;
    "abs" |logp - ref|; "mse"/"k2" 0.5 (logp - ref)^2; "low_var_kl"/"k3": x = ref - logp clamped to
    [-20, 20], exp(x) - x - 1, the result clamped to [-10, 10]."""
    if kind in ("kl", "k1"):
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob) ** 2
    x = (ref_logprob - logprob).clamp(-20, 20)
    return (torch.exp(x) - x - 1).clamp(-10, 10)


def openrlhf_approx_kl(log_probs, log_probs_base, kind):
    """OpenRLHF, openrlhf/models/utils.py, compute_approx_kl: x = log_probs - log_probs_base; k1 x, k2 x^2 / 2,
    k3 exp(-x) - 1 + x; the result clamped to [-10, 10]."""
    x = log_probs - log_probs_base
    out = {"k1": x, "k2": x**2 / 2, "k3": torch.exp(-x) - 1 + x}[kind]
    return out.clamp(-10, 10)


class VerlAdaptiveKL:
    """verl, verl/trainer/ppo/core_algos.py, AdaptiveKLController (and OpenRLHF's, openrlhf/trainer/ppo_utils/
    kl_controller.py, the same rule; Ziegler et al. 2019): e = clip(kl / target - 1, -0.2, 0.2), value *=
    1 + e * n_steps / horizon."""

    def __init__(self, init_kl_coef, target_kl, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target_kl, horizon

    def update(self, current_kl, n_steps):
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def trl_dpo_loss_1_16(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                      chosen_tokens=None, rejected_tokens=None):  # fmt: skip
    """TRL 1.16.0, trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss (reverse-KL scores; there is no
    dpo_loss method in 1.x): delta = (c - ref_c) - (r - ref_r) of summed completion log-probs;
    "sigmoid" -log sigmoid(beta delta) (label_smoothing is not read there); "ipo" each side's log-ratio
    divided by its completion token count, then (delta_avg - 1 / (2 beta))^2."""
    chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen - rejected))
    delta = chosen / chosen_tokens.clamp(min=1.0) - rejected / rejected_tokens.clamp(min=1.0)
    return (delta - 1 / (2 * beta)) ** 2


def trl_dpo_loss_0_28(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, label_smoothing):
    """TRL 0.28, trl/trainer/dpo_trainer.py, DPOTrainer.dpo_loss, loss_type "sigmoid" with label_smoothing
    (conservative DPO, Mitchell 2023; removed in 0.29 by the DPO refactor, TRL #3906):
    -log sigmoid(beta x) (1 - eps) - log sigmoid(-beta x) eps, x = (c - r) - (ref_c - ref_r)."""
    x = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * x) * (1 - label_smoothing) - F.logsigmoid(-beta * x) * label_smoothing


def openrlhf_log_probs(logits, labels, temperature):
    """OpenRLHF, openrlhf/models/utils.py, log_probs_from_logits: logits divided by the temperature,
    log_softmax, the label's entry."""
    return torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]


def verl_entropy(logits):
    """verl, verl/utils/torch_functional.py, entropy_from_logits: logsumexp(x) - sum(softmax(x) x)."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


# ---- inputs ---------------------------------------------------------------------------------------


def masks(B=6, T=11):
    """(B, T) bool: right padding of several lengths, one left-padded row, one row with holes (tool
    tokens inside the response), one row of a single token."""
    lengths = [11, 7, 3, 1, 9, 11]
    m = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    m[4] = torch.arange(T) >= 2  # left padding
    m[5, [2, 3, 7]] = False  # holes
    return m[:B]


def data(seed, *shape, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def hand_trajectory(mask) -> Trajectory:
    B, R = mask.shape
    ids = torch.full((B, 1 + R), 5)
    return Trajectory(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_length=1,
                      labels=torch.where(mask, 5, -100), mask=mask, stopped=torch.ones(B, dtype=torch.bool),
                      prompts=["p"] * B, responses=["r"] * B)  # fmt: skip


def config(tmp_path, **kw):
    return tiny(ppo_preset, tmp_path, "ppo", reward_fn=REWARD, **kw)


# ---- GAE and whitening ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_matches_verl_and_openrlhf(backend):
    # verl: on every valid position, holes and left padding included (both skip a masked position), its
    # whitened advantages and returns equal rlhf_kernels.gae then masked_whiten. OpenRLHF: the same
    # wherever a row has no hole (right or left padding); across a hole it keeps discounting (gamma * lam
    # per masked position, with v = 0 and r = 0 there), ours skips it: the row with holes differs.
    device = device_for(backend)
    mask = masks()
    rewards, values = data(0, 6, 11) * mask, data(1, 6, 11)
    gamma, lam = 0.99, 0.95
    adv, ret = kernels.gae(*on(device, rewards.float(), values.float(), mask), gamma=gamma, lam=lam, backend=backend)
    white = kernels.masked_whiten(adv, on(device, mask), backend=backend)
    want_white, want_ret = verl_gae(rewards, values, mask, gamma, lam)
    z = torch.zeros((), dtype=F64)
    # fp32 kernels against float64: |adv| ~ 5 over 11 steps, rounding ~1e-6 relative
    assert_close(white, torch.where(mask, want_white, z), atol=2e-5, rtol=2e-5, name="verl whitened advantages")
    assert_close(ret, torch.where(mask, want_ret, z), atol=2e-5, rtol=2e-5, name="verl returns")
    o_adv, o_ret = openrlhf_gae(rewards, values, mask.to(F64), gamma, lam)
    plain = [0, 1, 2, 3, 4]  # rows without holes
    assert_close(adv[plain], torch.where(mask, o_adv, z)[plain], atol=2e-5, rtol=2e-5, name="openrlhf advantages")
    assert_close(ret[plain], torch.where(mask, o_ret, z)[plain], atol=2e-5, rtol=2e-5, name="openrlhf returns")
    assert float((adv[5].double() - o_adv[5])[mask[5]].abs().max()) > 1e-2  # the convention differs at holes


def test_the_engines_gae_step_matches_verl(tmp_path):
    # algos.advantages through the registry (--advantage gae, whitening on), on the same hand-built batch
    mask = masks()
    traj = hand_trajectory(mask)
    traj.rewards, traj.old_values = (data(0, 6, 11) * mask).float(), data(1, 6, 11).float()
    estimate_advantages(traj, config(tmp_path, gamma=0.99, lam=0.95, whiten_advantages=True), Dist())
    want_white, want_ret = verl_gae(traj.rewards.double(), traj.old_values.double(), mask, 0.99, 0.95)
    z = torch.zeros((), dtype=F64)
    assert_close(traj.advantages, torch.where(mask, want_white, z), atol=2e-5, rtol=2e-5, name="advantages")
    assert_close(traj.returns, torch.where(mask, want_ret, z), atol=2e-5, rtol=2e-5, name="returns")


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_whiten_matches_verl_and_differs_from_openrlhf_by_bessel(backend, shift_mean):
    # verl and we divide by the unbiased variance; OpenRLHF by the biased one, so its advantages are ours
    # times sqrt(n / (n - 1)) (n valid tokens; the epsilons, 1e-8 on variances of order 10, aside).
    device = device_for(backend)
    mask = masks()
    x = data(3, 6, 11, scale=3.0) + 1.5
    got = kernels.masked_whiten(*on(device, x.float(), mask), shift_mean=shift_mean, backend=backend)
    want = torch.where(mask, verl_masked_whiten(x, mask, shift_mean), torch.zeros((), dtype=F64))
    assert_close(got, want, atol=1e-6, rtol=1e-6, name="verl masked_whiten")
    if shift_mean:
        n = float(mask.sum())
        theirs = torch.where(mask, openrlhf_normalize(x, mask), torch.zeros((), dtype=F64))
        assert_close(got.double() * math.sqrt(n / (n - 1)), theirs, atol=1e-6, rtol=1e-6, name="openrlhf")


# ---- group advantages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
def test_group_advantages_match_verl(tmp_path, mode):
    # 3 groups of k = 4 (rows i * 4 + j), token-level rewards (a score at the last token, KL terms on the
    # others) under right padding: group 0 varies, group 1 has a tie (two equal rewards) and group 2 is
    # flat (zero std: every advantage 0 in all three). GRPO agrees with verl's epsilon set to ours (1e-4,
    # TRL's); at verl's default 1e-6 a group whose std is ~1e-5 gets advantages ~10x ours (below).
    k = 4
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3, 1, 4, 2, 5, 5, 3, 4, 4, 1, 2])[:, None]
    rewards = data(4, 12, 5) * 0.1 * mask
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.5, 1.5, 0.0, 0.3, 0.3, 0.3, 0.3], dtype=F64)
    rewards[torch.arange(12), mask.sum(1) - 1] += scores
    rewards[8:] = 0.0  # group 2: every response's total reward is 0.3, on its last token
    rewards[torch.arange(8, 12), mask[8:].sum(1) - 1] = 0.3
    traj = hand_trajectory(mask)
    traj.rewards = rewards.float()
    estimate_advantages(traj, config(tmp_path, advantage=mode, samples_per_prompt=k), Dist())
    index = [i // k for i in range(12)]
    r = traj.rewards.double()  # the fp32 rewards the engine saw
    if mode == "rloo":
        want = verl_rloo(r, mask, index)
        assert_close(want.sum(1) / mask.sum(1), openrlhf_rloo(r.sum(1), k), atol=1e-12, name="openrlhf rloo")
    else:
        want = verl_group_outcome(r, mask, index, epsilon=GROUP_STD_EPS, norm_by_std=mode == "grpo")
    assert_close(traj.advantages, want, atol=1e-6, rtol=1e-6, name=mode)
    assert traj.zero_std.tolist() == [False] * 8 + [True] * 4 and not traj.advantages[8:].any()


def test_grpo_std_epsilon_is_ours_not_verls():
    # A near-flat group, rewards 1 +- 1e-5: std (unbiased) = 1.15e-5. Ours: centred / (std + 1e-4), about
    # +-0.09; verl's default epsilon 1e-6 gives about +-0.8, an almost full-size advantage from a difference
    # the reward model cannot mean.
    from rlhf_engine.algos.advantages import group_advantages

    r = torch.tensor([1 + 1e-5, 1 - 1e-5, 1.0, 1.0], dtype=F64)
    ours, _ = group_advantages(r, 4, "grpo")
    mask = torch.ones(4, 1, dtype=torch.bool)
    assert_close(ours, verl_group_outcome(r[:, None], mask, [0] * 4, epsilon=GROUP_STD_EPS)[:, 0], atol=1e-12)
    verl_default = verl_group_outcome(r[:, None], mask, [0] * 4)[:, 0]
    assert float(ours.abs().max()) < 0.1 and float(verl_default.abs().max()) > 0.7


# ---- policy and value losses -----------------------------------------------------------------------


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_matches_verl(backend, dual_clip):
    # Asymmetric clip (0.2, 0.28) and, optionally, dual clip c = 3 (verl always applies its clip_ratio_c;
    # "no dual clip" is c = 1e9 there). Log-ratios within +-1.5, where verl's clamp at +-20 does nothing.
    # The loss, its gradient w.r.t. the log-probs and clipfrac agree. The KL statistics differ by
    # definition: our approx_kl is k3, mean(r - 1 - log r) (>= 0, unbiased for KL(old || new)); verl's
    # ppo_kl is k1, mean(-log r) (either sign); each is checked against its own formula.
    device = device_for(backend)
    mask = masks()
    old = data(5, 6, 11) * 0.5 - 2.0
    logp = old + (torch.rand(6, 11, generator=torch.Generator().manual_seed(6), dtype=F64) - 0.5) * 3.0
    adv = data(7, 6, 11)
    x = logp.float().to(device).requires_grad_(True)
    loss, stats = kernels.ppo_loss(x, *on(device, old.float(), adv.float(), mask), clip_low=0.2, clip_high=0.28,
                                   dual_clip=dual_clip, backend=backend)  # fmt: skip
    upstream = 0.7
    (loss * upstream).backward()
    ref = logp.float().double().requires_grad_(True)  # the same fp32-rounded inputs, in float64
    want, clipfrac, ppo_kl = verl_policy_loss(old.float().double(), ref, adv.float().double(), mask, 0.2, 0.28,
                                              dual_clip or 1e9)  # fmt: skip
    (want * upstream).backward()
    assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5, name="pg_loss")
    assert_close(x.grad, ref.grad, atol=1e-7, rtol=1e-5, name="d pg_loss / d logprobs")
    assert_close(stats.clipfrac, clipfrac, atol=1e-6, name="clipfrac")
    log_ratio = (ref.detach() - old.float().double())[mask]
    assert_close(stats.approx_kl, (log_ratio.exp() - 1 - log_ratio).mean(), atol=1e-5, rtol=1e-5, name="approx_kl")
    assert abs(float(stats.approx_kl) - float(ppo_kl)) > 1e-2  # k3 vs verl's k1: not the same number


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_matches_verl(backend):
    device = device_for(backend)
    mask = masks()
    old, ret = data(8, 6, 11), data(9, 6, 11)
    v = old + data(10, 6, 11) * 0.3  # about a third move past the clip range 0.2
    x = v.float().to(device).requires_grad_(True)
    loss, stats = kernels.value_loss(x, *on(device, old.float(), ret.float(), mask), clip=0.2, backend=backend)
    loss.backward()
    ref = v.float().double().requires_grad_(True)
    want, clipfrac = verl_value_loss(ref, ret.float().double(), old.float().double(), mask, 0.2)
    want.backward()
    assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5, name="vf_loss")
    assert_close(x.grad, ref.grad, atol=1e-7, rtol=1e-5, name="d vf_loss / d values")
    assert_close(stats.vf_clipfrac, clipfrac, atol=1e-6, name="vf_clipfrac")
    assert 0.1 < float(clipfrac) < 0.9


# ---- KL: estimators and the adaptive coefficient ---------------------------------------------------------


@pytest.mark.parametrize("kind, verl_name", [("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_estimators_match_verl_and_openrlhf(backend, kind, verl_name):
    # Log-ratios within +-2.3, where verl's and OpenRLHF's clamps do nothing (k3 <= e^2.3 - 3.3 = 6.7 < 10):
    # every estimator agrees. verl's "abs" (|log-ratio|) has no counterpart here (neither unbiased nor
    # the gradient of a divergence).
    device = device_for(backend)
    logp = data(11, 7, 13) * 0.5 - 3.0
    ref = logp + (torch.rand(7, 13, generator=torch.Generator().manual_seed(12), dtype=F64) - 0.5) * 4.6
    got = kernels.kl_penalty(*on(device, logp.float(), ref.float()), kind=kind, clamp=KL_LOG_RATIO_CLAMP,
                             backend=backend)  # fmt: skip
    lp, rp = logp.float().double(), ref.float().double()
    # k3 near 0 cancels in fp32 unless computed with care (the kernels' Taylor branch): 1e-6 absolute
    assert_close(got, verl_kl_penalty(lp, rp, verl_name), atol=1e-6, rtol=1e-5, name=f"verl {verl_name}")
    assert_close(got, openrlhf_approx_kl(lp, rp, kind), atol=1e-6, rtol=1e-5, name=f"openrlhf {kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_clamps_the_log_ratio_not_the_estimate(backend):
    # Past the agreement region: verl clamps the log-ratio at +-20 AND k3 itself at 10; OpenRLHF clamps k3 at
    # 10; the trainer clamps the log-ratio at KL_LOG_RATIO_CLAMP = 20 only (README "Conventions against the
    # peers"): a token with log pi - log ref = -5 costs e^5 - 6 = 142.4 nats here, 10 there.
    device = device_for(backend)
    log_ratio = torch.tensor([-50.0, -25.0, -5.0, 5.0, 25.0, 50.0], dtype=F64)
    got = kernels.kl_penalty(*on(device, log_ratio.float(), torch.zeros(6)), kind="k3", clamp=KL_LOG_RATIO_CLAMP,
                             backend=backend)  # fmt: skip
    x = log_ratio.clamp(-20, 20)
    assert_close(got, torch.exp(-x) - 1 + x, atol=0, rtol=1e-6, name="k3 of the clamped log-ratio")
    assert verl_kl_penalty(log_ratio, torch.zeros(6, dtype=F64), "k3").max() == 10.0


def test_adaptive_kl_controller_matches_verl():
    # The same rule (Ziegler et al. 2019, section 2.2): errors beyond +-0.2 saturate; n = sequences per batch
    ours, theirs = KLController(0.05, target=6.0, horizon=10000), VerlAdaptiveKL(0.05, 6.0, 10000)
    for kl, n in [(12.0, 64), (6.3, 64), (1.0, 128), (5.9, 8), (0.0, 64), (100.0, 512)]:
        ours.update(kl, n)
        theirs.update(kl, n)
        assert ours.beta == pytest.approx(theirs.value, rel=1e-15)


# ---- DPO family ------------------------------------------------------------------------------------


def test_dpo_losses_match_trl():
    # Sequence log-probs of 5 pairs (a tie: margin 0, loss log 2 for DPO). DPO = TRL 1.16's "sigmoid".
    # IPO: TRL 1.16 divides each side's log-ratio by its completion token count; ours takes the summed
    # log-probs as given (Azar et al. 2023 state IPO on sequence log-likelihoods), so ours on per-token
    # means is TRL's, and on sums it is not. cDPO: TRL 1.16 dropped label smoothing from "sigmoid"; ours is
    # TRL 0.28's sigmoid loss with label_smoothing.
    pc, pr = torch.tensor([-12.0, -30.5, -7.0, -20.0, -9.0], dtype=F64), torch.tensor([-15.0, -28.0, -7.0, -26.0, -4.0], dtype=F64)
    rc, rr = torch.tensor([-13.0, -30.0, -7.5, -21.0, -8.0], dtype=F64), torch.tensor([-14.0, -29.0, -7.5, -24.0, -5.0], dtype=F64)
    nc, nr = torch.tensor([4.0, 9.0, 3.0, 6.0, 2.0], dtype=F64), torch.tensor([5.0, 8.0, 3.0, 7.0, 1.0], dtype=F64)
    beta = 0.1
    dpo, _, _ = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="dpo")
    assert_close(dpo, trl_dpo_loss_1_16(pc, pr, rc, rr, beta, "sigmoid"), atol=1e-12, name="dpo")
    assert dpo[2] == pytest.approx(math.log(2))  # the tie
    ipo_means, _, _ = dpo_losses(pc / nc, pr / nr, rc / nc, rr / nr, beta=beta, loss_type="ipo")
    trl_ipo = trl_dpo_loss_1_16(pc, pr, rc, rr, beta, "ipo", nc, nr)
    assert_close(ipo_means, trl_ipo, atol=1e-12, name="ipo on per-token means")
    ipo_sums, _, _ = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert float((ipo_sums - trl_ipo).abs().max()) > 1.0  # the length convention differs
    cdpo, _, _ = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type="cdpo", label_smoothing=0.2)
    assert_close(cdpo, trl_dpo_loss_0_28(pc, pr, rc, rr, beta, 0.2), atol=1e-12, name="cdpo")


# ---- log-probs and entropy at a temperature, ignore_index ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_and_entropy_match_the_peers_at_a_temperature(backend):
    # 37 tokens over a 1009-word vocabulary (prime sizes), T = 0.7, labels with ignore_index: ours gives 0
    # there, the peers gather a label they never use. Entropy of softmax(logits / T), as verl computes it
    # from the temperature-scaled logits.
    device = device_for(backend)
    logits = data(13, 37, 1009, scale=4.0)
    labels = torch.randint(0, 1009, (37,), generator=torch.Generator().manual_seed(14))
    labels[[0, 5, 36]] = -100
    logp, ent = kernels.logprobs(*on(device, logits.float(), labels), temperature=0.7, ignore_index=-100,
                                 entropy=True, backend=backend)  # fmt: skip
    x = logits.float().double()
    keep = labels != -100
    want = torch.where(keep, openrlhf_log_probs(x, labels.clamp(min=0), 0.7), torch.zeros((), dtype=F64))
    assert_close(logp, want, atol=2e-5, rtol=1e-5, name="log-probs")
    assert_close(ent, torch.where(keep, verl_entropy(x / 0.7), torch.zeros((), dtype=F64)), atol=2e-5, rtol=1e-5,
                 name="entropy")  # fmt: skip


# ---- an extreme log-ratio in the trainer ------------------------------------------------------------------


def test_an_extreme_log_ratio_stays_finite_in_the_trainer(tmp_path):
    # The decision (README "Conventions against the peers"): the policy's log-ratio is not clamped; at +-50
    # its ratio e^50 = 5e21 is finite in fp32, and so are the loss, its gradient and every statistic. The
    # sampled KL's log-ratio is clamped at 20: a reference log-prob 100 nats above the policy's would make
    # k3 = e^100 = inf in the reward and the loss; clamped, k3 = e^20 - 21.
    from rlhf_engine.algos.kl import assign_rewards
    from rlhf_engine.algos.losses import minibatch_weights, ppo_micro_loss
    from rlhf_engine.algos.rollout import forward_stats, rollout
    from rlhf_engine.stages.ppo import build_stack, rollout_metrics

    cfg = config(tmp_path, samples_per_prompt=2, kl_estimator="k3", kl_in="loss")
    stack, _ = build_stack(cfg)
    stack.eval()
    traj = rollout(stack, ["My house is too hot.", "Hi"], [0, 1], cfg.sampling, samples_per_prompt=2, seed=3)
    forward_stats(stack, traj, cfg)
    m = traj.mask
    sign = torch.where(torch.arange(m.shape[1]) % 2 == 0, 1.0, -1.0)
    traj.old_logprobs = torch.where(m, traj.old_logprobs + 50.0 * sign, 0)  # policy log-ratios -50 and +50
    traj.ref_logprobs = torch.where(m, traj.old_logprobs + 100.0 * sign, 0)  # KL log-ratios -100 and +100
    traj.raw_scores, traj.scores, traj.proxy_scores, traj.source_scores = torch.ones(4), torch.ones(4), torch.ones(4), {}
    for kl_in in ("loss", "reward"):
        c = config(tmp_path, samples_per_prompt=2, kl_estimator="k3", kl_in=kl_in)
        assign_rewards(traj, c, beta=0.05)
        estimate_advantages(traj, c, Dist())
        assert torch.isfinite(traj.rewards).all() and torch.isfinite(traj.advantages).all(), kl_in
        idx = torch.arange(4)
        w, n = minibatch_weights(traj, idx, c, Dist())
        stack.set_trainable("policy", "value")
        loss, stats = ppo_micro_loss(stack, traj.rows(idx), traj.prompt_length, c, 0.05, w, n)
        loss.backward()
        assert math.isfinite(float(loss)) and all(math.isfinite(v) for v in stats.values()), (kl_in, stats)
        grads = [p.grad for p in stack.role_parameters("policy") if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        stack.model.zero_grad(set_to_none=True)
    row = rollout_metrics(traj, c, Dist())
    assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    # kl_k3: per response, the clamped k3 of its tokens: e^20 - 21 at the even positions, 20 + e^-20 - 1 at the odd
    per_token = torch.where(sign > 0, math.exp(20) - 21, 19 + math.exp(-20)).double()
    want = float((per_token * m).sum()) / 4
    assert row["kl_k3"] == pytest.approx(want, rel=1e-5)

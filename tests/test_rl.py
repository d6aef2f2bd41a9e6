"""algos (kl, advantages, losses, rewards): the trainers' pure RL functions, against hand-derived cases."""

import math

import pytest
import torch

from rlhf_engine.algos.advantages import explained_variance
from rlhf_engine.algos.kl import KLController, token_rewards
from rlhf_engine.algos.rewards import RunningMoments
from rlhf_engine.core.tensors import last_token_index


def test_token_rewards_hand_case():
    # Two responses on an R = 4 grid, beta = 0.5:
    #   row 0: 3 tokens, KL (0.2, 0.4, 0.0), score 1.0 -> -0.1, -0.2, 0 + 1.0, and 0 on the padding
    #   row 1: 4 tokens, KL (1, 1, 1, 1), score -2.0  -> -0.5, -0.5, -0.5, -0.5 - 2.0
    # The score lands on the LAST real token only; padding (KL 9 there) contributes nothing.
    kl = torch.tensor([[0.2, 0.4, 0.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, beta=0.5)
    want = torch.tensor([[-0.1, -0.2, 1.0, 0.0], [-0.5, -0.5, -0.5, -2.5]])
    assert torch.allclose(got, want, atol=1e-7), got


def test_token_rewards_left_aligned_holes_and_empty_rows():
    # the last real token is found by position, not by count: a hole before it does not move it
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = token_rewards(torch.tensor([3.0, 5.0]), torch.zeros(2, 4), mask, beta=1.0)
    assert got.tolist() == [[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # an empty row gets no score
    assert last_token_index(mask).tolist() == [2, 0]


def test_adaptive_kl_controller_update():
    # target 6, horizon 10000, batch of 256 sequences:
    #   KL 9: error = clip(9/6 - 1, -0.2, 0.2) = 0.2 -> beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.100512
    #   KL 5.7: error = 5.7/6 - 1 = -0.05 -> beta = 0.100512 * (1 - 0.05 * 0.0256) = 0.10038334...
    c = KLController(beta=0.1, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.100512, rel=1e-12)
    assert c.update(5.7, 256) == pytest.approx(0.100512 * (1 - 0.05 * 0.0256), rel=1e-12)
    # fixed beta ignores the KL; a non-finite KL never moves beta
    fixed = KLController(beta=0.05)
    assert fixed.update(100.0, 256) == 0.05
    assert c.update(float("nan"), 256) == c.beta
    # state round-trip
    d = KLController(beta=1.0)
    d.load_state_dict(c.state_dict())
    assert d == c


def test_running_moments_match_the_whole_data():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 2
    m = RunningMoments()
    for chunk in x.split([1, 7, 300, 692]):
        m.update(chunk)
    assert m.count == 1000
    assert m.mean == pytest.approx(float(x.mean()), rel=1e-12)
    assert m.std == pytest.approx(float(x.std()), rel=1e-12)
    m2 = RunningMoments()
    m2.load_state_dict(m.state_dict())
    assert m2 == m


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # a perfect critic explains everything; the constant mean explains nothing; the padding is ignored
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask) == pytest.approx(0.0)
    # values off by (1, -1, 0): Var[residual] = 2/3, Var[returns] = 2/3 -> 0
    assert explained_variance(torch.tensor([[0.0, 3.0, 3.0, 0.0]]), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones(1, 4), mask))


# ---- critic-free advantages and loss aggregation ---------------------------------------------------

from rlhf_engine.algos.advantages import GROUP_STD_EPS, group_advantages
from rlhf_engine.algos.losses import aggregation_weights  # noqa: E402


def test_group_advantages_hand_cases():
    # k = 2, one group (1, 3): mean 2, unbiased std sqrt(2)
    #   grpo: (-1, 1) / (sqrt 2 + eps); drgrpo: (-1, 1); rloo: r_i - the other = (-2, 2) = 2/1 * (-1, 1)
    r = torch.tensor([1.0, 3.0])
    adv, zero = group_advantages(r, 2, "grpo")
    s = 2**0.5 + GROUP_STD_EPS
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s]) and not zero.any()
    assert group_advantages(r, 2, "drgrpo")[0].tolist() == [-1.0, 1.0]
    assert group_advantages(r, 2, "rloo")[0].tolist() == [-2.0, 2.0]
    # k = 3, groups (0, 1, 5) and a tie (2, 2, 2):
    #   group 1: mean 2, deviations (-2, -1, 3), unbiased var (4 + 1 + 9) / 2 = 7
    #   rloo: r_i - mean of the other two: 0 - 3 = -3, 1 - 2.5 = -1.5, 5 - 0.5 = 4.5 = 3/2 * (-2, -1, 3)
    #   group 2: equal rewards -> advantages 0 in every mode, flagged as zero-std
    r = torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 2.0])
    adv, zero = group_advantages(r, 3, "grpo")
    s = 7**0.5 + GROUP_STD_EPS
    assert adv.tolist() == pytest.approx([-2 / s, -1 / s, 3 / s, 0, 0, 0])
    assert zero.tolist() == [False] * 3 + [True] * 3
    assert group_advantages(r, 3, "rloo")[0].tolist() == pytest.approx([-3.0, -1.5, 4.5, 0, 0, 0])
    assert group_advantages(r, 3, "drgrpo")[0].tolist() == pytest.approx([-2.0, -1.0, 3.0, 0, 0, 0])
    # a partial tie (1, 1, 3): mean 5/3, deviations (-2/3, -2/3, 4/3), unbiased var (4 + 4 + 16) / 9 / 2 = 4/3;
    #   rloo: 1 - 2 = -1, 1 - 2 = -1, 3 - 1 = 2; the tied pair shares one advantage, the group is not zero-std
    r = torch.tensor([1.0, 1.0, 3.0])
    adv, zero = group_advantages(r, 3, "grpo")
    s = (4 / 3) ** 0.5 + GROUP_STD_EPS
    assert adv.tolist() == pytest.approx([-2 / 3 / s, -2 / 3 / s, 4 / 3 / s]) and not zero.any()
    assert group_advantages(r, 3, "drgrpo")[0].tolist() == pytest.approx([-2 / 3, -2 / 3, 4 / 3])
    assert group_advantages(r, 3, "rloo")[0].tolist() == pytest.approx([-1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(5), 2, "grpo")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "token_sum_norm"])
def test_aggregation_weights_against_float64_definitions(mode):
    # two sequences of 3 and 1 tokens on an R = 4 grid, per-token losses l; max_len 4:
    #   token_mean:          (l00 + l01 + l02 + l10) / 4
    #   seq_mean_token_mean: ((l00 + l01 + l02) / 3 + l10 / 1) / 2
    #   token_sum_norm:      (l00 + l01 + l02 + l10) / (2 * 4)
    loss = torch.tensor([[1.0, 2.0, 4.0, 99.0], [8.0, 99.0, 99.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    want = {"token_mean": 15 / 4, "seq_mean_token_mean": (7 / 3 + 8) / 2, "token_sum_norm": 15 / 8}[mode]
    w = aggregation_weights(mask, mode, n_tokens=4, n_seqs=2, max_len=4)
    assert float((w.double() * loss).sum()) == pytest.approx(want, rel=1e-7)

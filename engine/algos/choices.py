"""The names of every choice the algorithms implement: the configs validate against these, and each
implementing module checks that its registry holds exactly these names (tests/test_layout.py too).

Pure Python: the configs import this without torch.
"""

ADVANTAGES = ("gae", "grpo", "drgrpo", "rloo")  # advantages.ESTIMATORS: GAE with a critic, or group-relative
GROUP_ADVANTAGES = ("grpo", "drgrpo", "rloo")  # the critic-free ones (no value adapter or head)
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "token_sum_norm")  # losses.aggregation_weights
KL_ESTIMATORS = ("exact", "k1", "k2", "k3")  # kl.penalty_kl: the full-vocabulary KL, or a sampled estimate
KL_PLACEMENTS = ("reward", "loss")  # -beta KL_t in every token's reward, or + beta KL in the loss
REWARD_NORMALIZATIONS = ("none", "batch", "running")  # rewards.shape_scores
REWARD_ENSEMBLES = ("mean", "mean_minus_std", "min")  # rewards.ENSEMBLE_REWARDS: k reward heads -> one PPO reward
OVEROPTIMIZATION_POLICIES = ("off", "warn", "stop")  # what PPO does when overoptimization.OverOptimizationMonitor fires
DPO_LOSSES = ("dpo", "ipo", "cdpo")  # losses.dpo_losses

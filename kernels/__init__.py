"""Fused RLHF ops: a PyTorch reference, Triton kernels and C++/CUDA kernels behind one dispatch.

Every public op takes backend="auto" | "torch" | "triton" | "cpp" | "cuda"; `backends()` tells what
this machine can run, and RLHF_KERNELS_BACKEND overrides "auto" for a whole run.
"""

from kernels._dispatch import BACKENDS, backends
from kernels.gae import gae, gae_ref
from kernels.kl_penalty import kl_penalty, kl_penalty_ref
from kernels.logprobs import logprobs, logprobs_ref
from kernels.ppo_loss import PPOStats, ppo_loss, ppo_loss_ref
from kernels.value_loss import ValueStats, value_loss, value_loss_ref
from kernels.whiten import masked_whiten, masked_whiten_ref
from kernels.full_kl import full_kl, full_kl_ref
from kernels.token_stats import token_stats, token_stats_ref
from kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref
from kernels.linear_token_stats import linear_token_stats, linear_token_stats_ref

__all__ = ["BACKENDS", "backends", "logprobs", "logprobs_ref", "full_kl", "full_kl_ref", "token_stats", "token_stats_ref",
           "gae", "gae_ref", "ppo_loss", "ppo_loss_ref", "PPOStats", "value_loss", "value_loss_ref", "ValueStats",
           "masked_whiten", "masked_whiten_ref", "kl_penalty", "kl_penalty_ref",
           "linear_logprobs", "linear_logprobs_ref", "linear_token_stats", "linear_token_stats_ref"]

"""Fused RLHF ops: a PyTorch reference, Triton kernels and C++/CUDA kernels behind one dispatch.

Every public op takes backend="auto" | "torch" | "triton" | "cpp" | "cuda"; `backends()` tells what
this machine can run, and RLHF_KERNELS_BACKEND overrides "auto" for a whole run.
"""

from kernels._dispatch import BACKENDS, backends
from kernels.logprobs import logprobs, logprobs_ref

__all__ = ["BACKENDS", "backends", "logprobs", "logprobs_ref"]

"""The RLHF trainer over the fused ops in `kernels`."""

"""kernels.linear_token_stats: python -m bench linear_token_stats [--quick] [--json PATH]

Cases, providers and rooflines: bench/bench_linear_logprobs.py (BENCH_TOKEN_STATS); "unfused" is
kernels.token_stats on logits materialised by F.linear.
"""

from bench.bench_linear_logprobs import BENCH_TOKEN_STATS as BENCH  # noqa: F401

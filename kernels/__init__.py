"""Fused RLHF ops: a PyTorch reference, Triton kernels and C++/CUDA kernels behind one dispatch.

Installed as `rlhf_kernels` (this folder is its source): `import rlhf_kernels as kernels`. Every public
op takes backend="auto" | "torch" | "triton" | "cpp" (| "cuda" where the op has one); `backends()`
tells what this machine can run, and RLHF_KERNELS_BACKEND overrides "auto" for a whole run.
"""

if __name__ != "rlhf_kernels":
    # This folder was imported by its own name: a checkout's root is on sys.path (python -m / -c run
    # there). "kernels" belongs to the Hugging Face hub package, which transformers and bitsandbytes
    # import. Where it is installed, hand the name over to it. Otherwise stay an empty module with no
    # file: importers that probe for the hub package read that as "not installed" (transformers takes
    # a module without __file__ and __version__ for a namespace package), where raising here would
    # break their own import instead.
    import os as _os
    import sys as _sys
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _PathFinder.find_spec(__name__, _path)
    if _spec is None:
        __file__ = None
        __path__ = []
    else:
        _hub = _module_from_spec(_spec)
        _sys.modules[__name__] = _hub  # the import statement returns what sys.modules holds after this runs
        try:
            _spec.loader.exec_module(_hub)
        except BaseException:
            del _sys.modules[__name__]
            raise
    del _os, _sys, _PathFinder, _module_from_spec, _root, _path, _spec
else:
    from rlhf_kernels._dispatch import BACKENDS, backends
    from rlhf_kernels.full_kl import full_kl, full_kl_ref
    from rlhf_kernels.gae import gae, gae_ref
    from rlhf_kernels.gumbel_argmax import gumbel_argmax, gumbel_argmax_ref, gumbel_noise, gumbel_streams
    from rlhf_kernels.kl_penalty import kl_penalty, kl_penalty_ref
    from rlhf_kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref
    from rlhf_kernels.linear_token_stats import linear_token_stats, linear_token_stats_ref
    from rlhf_kernels.logprobs import logprobs, logprobs_ref
    from rlhf_kernels.nf4_linear import nf4_linear, nf4_linear_ref
    from rlhf_kernels.ppo_loss import PPOStats, ppo_loss, ppo_loss_ref
    from rlhf_kernels.rms_norm import rms_norm, rms_norm_ref
    from rlhf_kernels.swiglu import swiglu, swiglu_ref
    from rlhf_kernels.token_stats import token_stats, token_stats_ref
    from rlhf_kernels.value_loss import ValueStats, value_loss, value_loss_ref
    from rlhf_kernels.whiten import masked_whiten, masked_whiten_ref

    __all__ = ["BACKENDS", "backends", "logprobs", "logprobs_ref", "full_kl", "full_kl_ref", "token_stats",
               "token_stats_ref", "gae", "gae_ref", "ppo_loss", "ppo_loss_ref", "PPOStats", "value_loss",
               "value_loss_ref", "ValueStats", "masked_whiten", "masked_whiten_ref", "kl_penalty", "kl_penalty_ref",
               "linear_logprobs", "linear_logprobs_ref", "linear_token_stats", "linear_token_stats_ref", "nf4_linear",
               "nf4_linear_ref", "gumbel_argmax", "gumbel_argmax_ref", "gumbel_noise", "gumbel_streams",
               "rms_norm", "rms_norm_ref", "swiglu", "swiglu_ref"]

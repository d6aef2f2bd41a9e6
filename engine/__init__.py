"""The RLHF trainer over the fused ops in `kernels`.

    engine.config    StackConfig, RewardConfig, MODEL_PRESETS, REWARD_PRESETS, reward_preset
    engine.stack     ModelStack: one (4-bit) base, roles policy / reference / values / reward
    engine.feedback  feedback JSONL formats, consensus ranking, pairs, labeler agreement
    engine.reward    reward_loss, train_reward_model (python -m engine rm)

Names resolve lazily, so `import engine` (and `python -m engine --help`) does not import torch.
"""

import importlib

_EXPORTS = {
    "StackConfig": "engine.config",
    "RewardConfig": "engine.config",
    "MODEL_PRESETS": "engine.config",
    "REWARD_PRESETS": "engine.config",
    "reward_preset": "engine.config",
    "EngineError": "engine.config",
    "ConfigError": "engine.config",
    "ModelStack": "engine.stack",
    "FeedbackError": "engine.feedback",
    "PreferencePair": "engine.feedback",
    "RankedFeedback": "engine.feedback",
    "load_feedback": "engine.feedback",
    "build_pairs": "engine.feedback",
    "consensus_ranking": "engine.feedback",
    "labeler_agreement": "engine.feedback",
    "reward_loss": "engine.reward",
    "train_reward_model": "engine.reward",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

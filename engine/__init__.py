"""The RLHF trainer over the fused ops in `rlhf_kernels`.

Installed as `rlhf_engine` (this folder is its source); the command line is `python -m rlhf_engine`
(or `rlhf-engine`), and from a checkout's root `python -m engine` runs the same thing: imported by its
folder name this package only forwards names to `rlhf_engine`, and every module imports `rlhf_engine.*`.

    rlhf_engine.config    RunConfig, StackConfig, RewardConfig, MODEL_PRESETS, REWARD_PRESETS, reward_preset
    rlhf_engine.run       Run: the run machinery every stage shares (lock, checkpoint/resume, metrics,
                          progress, seeded data order, non-finite guard)
    rlhf_engine.stack     ModelStack: one (4-bit) base, roles policy / reference / values / reward
    rlhf_engine.feedback  feedback JSONL formats, consensus ranking, pairs, labeler agreement
    rlhf_engine.reward    reward_loss, train_reward_model (python -m rlhf_engine rm)
    rlhf_engine.ppo       train_ppo (python -m rlhf_engine ppo); rlhf_engine.evaluate: evaluate (... eval)
    rlhf_engine.generation  sample: KV-cached sampling from a stack role
    rlhf_engine.cai       cai_revise, cai_label: Constitutional AI data (python -m rlhf_engine cai revise | label);
                          rlhf_engine.constitution: the constitution, templates, judge_preference
    rlhf_engine.sft       train_sft (python -m rlhf_engine sft): the policy adapter on prompt -> completion
    rlhf_engine.dpo       dpo_losses, train_dpo (python -m rlhf_engine dpo): DPO / IPO / conservative DPO
    rlhf_engine.pipeline  run_pipeline (python -m rlhf_engine pipeline): every stage end to end on the
                          embedded world (rlhf_engine.world); rlhf_engine.report: report.json / .md / curves.png

Names resolve lazily, so `import rlhf_engine` (and `--help`) does not import torch.
"""

import importlib

_EXPORTS = {
    "RunConfig": "rlhf_engine.config",
    "StackConfig": "rlhf_engine.config",
    "RewardConfig": "rlhf_engine.config",
    "MODEL_PRESETS": "rlhf_engine.config",
    "REWARD_PRESETS": "rlhf_engine.config",
    "reward_preset": "rlhf_engine.config",
    "EngineError": "rlhf_engine.config",
    "ConfigError": "rlhf_engine.config",
    "Run": "rlhf_engine.run",
    "DataOrder": "rlhf_engine.run",
    "RunLockedError": "rlhf_engine.run",
    "CheckpointError": "rlhf_engine.run",
    "NonFiniteError": "rlhf_engine.run",
    "ModelStack": "rlhf_engine.stack",
    "FeedbackError": "rlhf_engine.feedback",
    "PreferencePair": "rlhf_engine.feedback",
    "RankedFeedback": "rlhf_engine.feedback",
    "load_feedback": "rlhf_engine.feedback",
    "build_pairs": "rlhf_engine.feedback",
    "consensus_ranking": "rlhf_engine.feedback",
    "labeler_agreement": "rlhf_engine.feedback",
    "reward_loss": "rlhf_engine.reward",
    "train_reward_model": "rlhf_engine.reward",
    "PPOConfig": "rlhf_engine.config",
    "PPO_PRESETS": "rlhf_engine.config",
    "ppo_preset": "rlhf_engine.config",
    "SamplingConfig": "rlhf_engine.config",
    "EvalConfig": "rlhf_engine.config",
    "train_ppo": "rlhf_engine.ppo",
    "evaluate": "rlhf_engine.evaluate",
    "sample": "rlhf_engine.generation",
    "CAIReviseConfig": "rlhf_engine.config",
    "CAILabelConfig": "rlhf_engine.config",
    "CAI_PRESETS": "rlhf_engine.config",
    "cai_revise": "rlhf_engine.cai",
    "cai_label": "rlhf_engine.cai",
    "Principle": "rlhf_engine.constitution",
    "load_constitution": "rlhf_engine.constitution",
    "load_template": "rlhf_engine.constitution",
    "judge_preference": "rlhf_engine.constitution",
    "SFTConfig": "rlhf_engine.config",
    "SFT_PRESETS": "rlhf_engine.config",
    "sft_preset": "rlhf_engine.config",
    "DPOConfig": "rlhf_engine.config",
    "DPO_PRESETS": "rlhf_engine.config",
    "dpo_preset": "rlhf_engine.config",
    "train_sft": "rlhf_engine.sft",
    "sft_loss": "rlhf_engine.sft",
    "train_dpo": "rlhf_engine.dpo",
    "dpo_losses": "rlhf_engine.dpo",
    "PipelineConfig": "rlhf_engine.config",
    "PIPELINE_PRESETS": "rlhf_engine.config",
    "run_pipeline": "rlhf_engine.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The RLHF trainer over the fused ops in `rlhf_kernels`.

Installed as `rlhf_engine` (this folder is its source); the command line is `python -m rlhf_engine`
(or `rlhf-engine`), and from a checkout's root `python -m engine` runs the same thing. Layers, each
importing only the ones before it (tests/test_layout.py checks it):

    errors.py   the exceptions a user can act on (one `error:` line on the command line)
    core/       run machinery: configs' base and shared checks, files, the lock, seeded orders, devices,
                the CPU allocator and OpenMP wait policy,
                padding, the Run (checkpoint, resume, metrics, progress), data parallel
    model/      the one base with its LoRA roles (ModelStack), tokenizers, generation, hidden states ->
                log-probs through rlhf_kernels            datasets/   readers, the text layout, batching
    algos/      losses, advantage estimators by name, KL control, reward sources, the rollout container
    stages/     <stage>_config.py + <stage>.py: rm, sft, dpo, ppo (grpo, rloo), eval, cai
    pipeline/   the main job: every stage wired in order on the embedded world, and its report
    cli.py      one parser built from every stage's config

The names below resolve lazily, so `import rlhf_engine` (and `--help`) does not import torch.
"""

import importlib
import sys

if __name__ != "rlhf_engine":
    # This folder was imported by its own name (a checkout's root is on sys.path): answer with the installed
    # package, so that one copy of every module and class exists.
    sys.modules[__name__] = importlib.import_module("rlhf_engine")
else:
    from .core.threads import prefer_passive_openmp

    prefer_passive_openmp()  # before anything imports torch (core/threads.py: 2 threads under load)
    _EXPORTS = {
        "EngineError": "errors", "ConfigError": "errors", "DataError": "errors", "FeedbackError": "errors",
        "RunLockedError": "errors", "CheckpointError": "errors", "NonFiniteError": "errors",
        "RunConfig": "core.config", "Run": "core.run", "DataOrder": "core.order",
        "StackConfig": "model.config", "SamplingConfig": "model.config", "MODEL_PRESETS": "model.config",
        "ModelStack": "model.stack", "sample": "model.generation",
        "PreferencePair": "datasets.feedback", "RankedFeedback": "datasets.feedback", "load_feedback": "datasets.feedback",
        "build_pairs": "datasets.feedback", "consensus_ranking": "datasets.feedback",
        "labeler_agreement": "datasets.feedback",
        "Principle": "datasets.constitution", "load_constitution": "datasets.constitution",
        "load_template": "datasets.constitution", "judge_preference": "datasets.constitution",
        "reward_loss": "algos.losses", "sft_loss": "algos.losses", "dpo_losses": "algos.losses",
        "RewardConfig": "stages.rm_config", "REWARD_PRESETS": "stages.rm_config", "reward_preset": "stages.rm_config",
        "train_reward_model": "stages.rm",
        "SFTConfig": "stages.sft_config", "SFT_PRESETS": "stages.sft_config", "sft_preset": "stages.sft_config",
        "train_sft": "stages.sft",
        "DPOConfig": "stages.dpo_config", "DPO_PRESETS": "stages.dpo_config", "dpo_preset": "stages.dpo_config",
        "train_dpo": "stages.dpo",
        "PPOConfig": "stages.ppo_config", "PPO_PRESETS": "stages.ppo_config", "ppo_preset": "stages.ppo_config",
        "train_ppo": "stages.ppo",
        "EvalConfig": "stages.eval_config", "evaluate": "stages.eval",
        "CAIReviseConfig": "stages.cai_config", "CAILabelConfig": "stages.cai_config", "CAI_PRESETS": "stages.cai_config",
        "cai_revise": "stages.cai", "cai_label": "stages.cai",
        "PipelineConfig": "pipeline.pipeline_config", "PIPELINE_PRESETS": "pipeline.pipeline_config",
        "run_pipeline": "pipeline.pipeline",
    }  # fmt: skip
    __all__ = sorted(_EXPORTS)

    def __getattr__(name):
        if name in _EXPORTS:
            return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

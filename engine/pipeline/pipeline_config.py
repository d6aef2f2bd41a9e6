"""The pipeline's config (`python -m engine pipeline`, `make run`; pipeline/pipeline.py runs it), its
presets, and the stages' configs as pure functions of it: one base for every stage.

Pure Python: no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.config import Command, check_fields, check_out_dir, check_seed, from_data
from ..datasets.samples import load_sft_data
from ..errors import ConfigError, DataError
from ..model.config import StackConfig
from . import world


@dataclass
class PipelineConfig:
    """The whole RLHF story end to end on one base: SFT -> sample -> simulated labelers -> reward model ->
    PPO -> before/after evaluation (`python -m engine pipeline`). Every stage is the engine's own stage,
    writing to OUT/<stage>; the hyperparameters below are the world-llama preset's (a user's --model
    usually wants smaller learning rates: set them with --config or the flags)."""

    out: str = "runs/pipeline"  # output directory: a subdirectory per stage; report.json, report.md, curves.png
    model: str = "world-llama"  # the one base of every role: a MODEL_PRESETS name or a local save_pretrained directory
    data: str = ""  # JSONL of {"prompt", "completion"} replacing the embedded world corpus ("" = pipeline.world)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    seed: int = 0  # seeds the prompt split, the labelers' noise and every stage
    quantization: str | None = "nf4"  # the base's weights: "nf4" (4-bit) or None (unquantized)
    heldout_prompts: int = 16  # prompts no stage trains on: the before/after evaluation's
    lora_r: int = 16  # LoRA rank of every adapter (policy, value, reward)
    sft_steps: int = 400  # SFT optimizer steps
    sft_lr: float = 3e-3  # SFT learning rate
    samples_per_prompt: int = 8  # completions of the SFT policy per training prompt that the labelers rank (n)
    labeler_noise: float = 0.3  # std of the Gaussian noise each labeler adds to the hidden score
    rm_epochs: int = 3  # reward-model passes over the labelers' pairs
    rm_lr: float = 3e-3  # reward-model learning rate
    ppo_steps: int = 60  # PPO step cap (rollout + optimisation rounds)
    ppo_lr: float = 1e-4  # PPO learning rate of the policy and value adapters
    rollout_batch_size: int = 16  # prompts per PPO step
    kl_coef: float = 0.1  # beta of the KL penalty against the SFT policy (per token, in the reward; RM scores normalised)
    max_new_tokens: int = 40  # tokens per sampled completion (every stage)
    temperature: float = 1.0  # sampling temperature (every stage)
    eval_samples: int = 4  # completions per held-out prompt and policy in the before/after evaluation
    resume: bool = True  # rerun on OUT: every stage resumes or, when done, is reused; False starts every stage over
    progress: bool = True  # progress bars; False also silences transformers' loading bars

    def validate(self) -> PipelineConfig:
        check_seed(self.seed)
        check_fields(self)
        check_out_dir(self.out)
        stack_config(self, ("policy",)).validate()
        if self.data and not os.path.isfile(self.data):
            raise ConfigError(f"data {self.data!r}: no such file")
        if self.samples_per_prompt < 3:
            raise ConfigError(f"samples_per_prompt={self.samples_per_prompt}: the labelers rank n >= 3 completions")
        counts = ("heldout_prompts", "sft_steps", "rm_epochs", "ppo_steps", "rollout_batch_size", "max_new_tokens",
                  "eval_samples")  # fmt: skip
        for name in counts:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if min(self.sft_lr, self.rm_lr, self.ppo_lr) <= 0 or self.kl_coef < 0 or self.labeler_noise < 0:
            raise ConfigError("sft_lr, rm_lr, ppo_lr must be > 0; kl_coef and labeler_noise >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature}: must be > 0 (the completions are sampled)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        return from_data(cls, d)

    def check_inputs(self) -> None:
        """The corpus (the --data file, read strictly), before a model loads: at least 3 distinct prompts."""
        distinct_prompts(corpus_records(self))


PIPELINE_PRESETS: dict[str, PipelineConfig] = {
    # at most 5 minutes on a 2-core CPU (set-up excluded); the same command on a GPU
    "default": PipelineConfig(),
    # the test size, under 90 s on a 2-core CPU (`--quick`)
    "quick": PipelineConfig(sft_steps=250, rm_epochs=2, ppo_steps=20, eval_samples=2),
}


def corpus_records(config: PipelineConfig) -> list[dict]:
    """{"prompt", "completion"} records: the user's --data file, or the embedded world's."""
    if not config.data:
        return world.sft_examples(world.prompts())
    records = []
    for ex in load_sft_data(config.data):
        if ex.messages is not None:
            raise DataError(f"{config.data}:{ex.line}: the pipeline takes {{\"prompt\", \"completion\"}} records "
                            "(its labelers score a reply to a prompt), not chat 'messages'")  # fmt: skip
        records.append({"prompt": ex.prompt, "completion": ex.completion})
    return records


def distinct_prompts(records: list[dict]) -> list[str]:
    """The corpus's distinct prompts in order of appearance; at least 3 (train, held out, and one more)."""
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    if len(prompts) < 3:
        raise DataError(f"the corpus has {len(prompts)} distinct prompts; the pipeline needs at least 3")
    return prompts


def stack_config(config: PipelineConfig, adapters: tuple[str, ...]) -> StackConfig:
    """One base for every stage: same model, quantization, seed (a preset's weights) and LoRA rank (the
    LoRA scale alpha / r = 2)."""
    return StackConfig(model=config.model, quantization=config.quantization, device=config.device,
                       lora_r=config.lora_r, lora_alpha=2 * config.lora_r, adapters=adapters, seed=config.seed)  # fmt: skip


def _quick_flag(parser) -> None:
    parser.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="the quick preset: the test size (under 90 s on a 2-core CPU)")


COMMAND = Command(
    name="pipeline", presets=PIPELINE_PRESETS, run="pipeline.pipeline:run_pipeline", flags=_quick_flag,
    preset_help="default: at most 5 minutes on a 2-core CPU; quick: the test size, under 90 s",
    help="the whole RLHF story end to end: SFT -> feedback -> reward model -> PPO -> before/after",
    description=(
        "RLHF end to end on ONE (4-bit) base, each stage the engine's own: (1) SFT of the policy adapter on a "
        "corpus of prompts with helpful, dismissive and rude replies (the embedded world, or --data: JSONL of "
        "{\"prompt\", \"completion\"}); (2) n completions per training prompt from the SFT policy, ranked by "
        "simulated labelers who follow a hidden score plus noise (one misunderstood the instructions) -> "
        "OUT/feedback.jsonl; (3) the reward adapter on the consensus pairs, the odd labeler flagged and left "
        "out; (4) PPO of the policy against the RM with the exact KL penalty against a frozen copy of the SFT "
        "adapter; (5) held-out prompts, SFT vs PPO, scored by the hidden score, the toxicity rule and the RM. "
        "Writes OUT/report.json, OUT/report.md, OUT/curves.png and each stage's directory (OUT/sft, OUT/rm, "
        "OUT/ppo: metrics.jsonl, adapters, checkpoint); rerunning on the same OUT resumes every stage."
    ),
    epilog="example: python -m engine pipeline --quick --out runs/pipeline-quick",
)  # fmt: skip

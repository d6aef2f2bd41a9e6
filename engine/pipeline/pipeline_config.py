"""The pipeline's config (`python -m engine pipeline`, `make run`; pipeline/pipeline.py runs it), its
presets, and the stages' configs as pure functions of it: one base for every stage.

Pure Python: no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from ..algos.choices import ADVANTAGES, OVEROPTIMIZATION_POLICIES
from ..core.config import Command, check_at_least, check_choice, check_fields, check_out_dir, check_seed, from_data
from ..datasets.samples import load_sft_data
from ..errors import ConfigError, DataError
from ..model.config import VALUE_MODES, StackConfig
from . import world


@dataclass
class PipelineConfig:
    """The whole RLHF story end to end on one base: SFT -> sample -> simulated labelers -> reward model ->
    PPO -> before/after evaluation (`python -m engine pipeline`). Every stage is the engine's own stage,
    writing to OUT/<stage>. The defaults are the world-llama preset's (a random toy, SFT first); the
    "real" preset is SmolLM2-135M-Instruct's (an instruct model: no SFT, its own answers are ranked), which
    `--model smollm2-135m-instruct` starts from; another --model usually wants smaller learning rates."""

    out: str = "runs/pipeline"  # output directory: a subdirectory per stage; report.json, report.md, curves.png
    model: str = "world-llama"  # the one base of every role: a MODEL_PRESETS name or a local save_pretrained directory
    data: str = ""  # JSONL of {"prompt", "completion"} replacing the embedded world corpus ("" = pipeline.world)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    seed: int = 0  # seeds the prompt split, the labelers' noise and every stage
    quantization: str | None = "nf4"  # the base's weights: "nf4" (4-bit) or None (unquantized)
    heldout_prompts: int = 16  # prompts no stage trains on: the before/after evaluation's
    lora_r: int = 16  # LoRA rank of every adapter (policy, value, reward)
    sft_steps: int = 400  # SFT optimizer steps; 0: no SFT (an instruct model: the base is the starting policy)
    sft_lr: float = 3e-3  # SFT learning rate
    samples_per_prompt: int = 8  # completions of the starting policy per training prompt that the labelers rank (n)
    feedback_prompts: int = 0  # training prompts whose completions the labelers rank (0: all)
    labeler_noise: float = 0.3  # std of the Gaussian noise each labeler adds to the hidden score
    rm_epochs: int = 3  # reward-model passes over the labelers' pairs
    rm_lr: float = 3e-3  # reward-model learning rate
    rm_heads: int = 1  # reward heads on the one reward adapter: k > 1 is an ensemble (each head its own bootstrap of the pairs)
    max_length: int = 256  # tokens of prompt + completion the SFT and reward-model stages read (the last ones)
    ppo_steps: int = 60  # PPO step cap (rollout + optimisation rounds)
    ppo_lr: float = 1e-4  # PPO learning rate of the policy and value adapters
    rollout_batch_size: int = 16  # prompts per PPO step
    advantage: str = "gae"  # PPO's advantages: "gae" (a critic) or critic-free "grpo", "drgrpo", "rloo" (groups of group_size)
    group_size: int = 4  # responses per prompt in a PPO step with a critic-free advantage
    value_mode: str = "adapter"  # the critic: "adapter" (its own LoRA) or "policy_head" (a head on the policy: no extra forward)
    ppo_epochs: int = 2  # PPO passes over each rollout
    ppo_eval_prompts: int = 64  # held-out training prompts of PPO's own evaluation (its reward threshold), at most
    kl_coef: float = 0.1  # beta of the KL penalty against the SFT policy (per token, in the reward; RM scores normalised)
    on_overoptimization: str = "warn"  # PPO's over-optimisation alarm, the hidden score as gold: "off", "warn", "stop"
    kl_sweep: bool = False  # then PPO again per KL setting (beta 0, kl_coef, adaptive) -> OUT/sweep/, report rows, hacking.png
    sweep_lr: float = 3e-4  # the sweep's PPO learning rate (high enough for beta = 0 to over-optimise the RM)
    sweep_steps: int = 60  # the sweep's PPO steps per setting (no reward threshold)
    sweep_target_kl: float = 4.0  # the adaptive setting's target KL to the SFT policy (nats per response)
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
        check_at_least(1, heldout_prompts=self.heldout_prompts, rm_epochs=self.rm_epochs, ppo_steps=self.ppo_steps,
                       rollout_batch_size=self.rollout_batch_size, max_new_tokens=self.max_new_tokens,
                       eval_samples=self.eval_samples, ppo_epochs=self.ppo_epochs,
                       ppo_eval_prompts=self.ppo_eval_prompts)  # fmt: skip
        check_at_least(0, sft_steps=self.sft_steps, feedback_prompts=self.feedback_prompts)
        check_at_least(2, max_length=self.max_length, group_size=self.group_size)
        check_choice("advantage", self.advantage, ADVANTAGES)
        check_choice("value_mode", self.value_mode, VALUE_MODES)
        check_choice("on_overoptimization", self.on_overoptimization, OVEROPTIMIZATION_POLICIES)
        check_at_least(1, rm_heads=self.rm_heads, sweep_steps=self.sweep_steps)
        if min(self.sft_lr, self.rm_lr, self.ppo_lr, self.sweep_lr) <= 0 or self.kl_coef < 0 or self.labeler_noise < 0:
            raise ConfigError("sft_lr, rm_lr, ppo_lr, sweep_lr must be > 0; kl_coef and labeler_noise >= 0")
        if not self.sweep_target_kl > 0:
            raise ConfigError(f"sweep_target_kl={self.sweep_target_kl}: must be > 0")
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
    # SmolLM2-135M-Instruct (`make run-real`): no SFT; its own answers to the world's situations, ranked by the
    # rubric; RLOO groups with the exact KL to the base; sized for at most 20 minutes on a 2-core CPU
    "real": PipelineConfig(
        model="smollm2-135m-instruct", sft_steps=0, samples_per_prompt=4, feedback_prompts=0, rm_epochs=1,
        rm_lr=3e-4, max_length=160, ppo_steps=12, ppo_lr=1e-4, rollout_batch_size=4, advantage="rloo", group_size=4,
        ppo_epochs=1, ppo_eval_prompts=8, kl_coef=0.05, max_new_tokens=48, temperature=0.7, eval_samples=2,
        heldout_prompts=12, sweep_lr=2e-4, sweep_steps=24,  # the sweep (--kl-sweep) is sized, not yet run here
    ),
}
# a named base's own preset: `--model NAME` without --preset starts from it (the defaults are the toy's)
MODEL_PRESET = {"smollm2-135m-instruct": "real"}


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
    LoRA scale alpha / r = 2); the reward role has rm_heads heads."""
    return StackConfig(model=config.model, quantization=config.quantization, device=config.device,
                       lora_r=config.lora_r, lora_alpha=2 * config.lora_r, adapters=adapters, seed=config.seed,
                       reward_heads=config.rm_heads if "reward" in adapters else 1)  # fmt: skip


def _preset_of_the_model(args, data: dict) -> dict:
    """`--model NAME` of a named base without --preset: that base's preset, then the flags."""
    name = MODEL_PRESET.get(getattr(args, "model", ""))
    if name is not None and not hasattr(args, "preset"):
        data = dataclasses.asdict(PIPELINE_PRESETS[name])
    return data


def _quick_flag(parser) -> None:
    parser.add_argument("--quick", dest="preset", action="store_const", const="quick", default=argparse.SUPPRESS,
                        help="the quick preset: the test size (under 90 s on a 2-core CPU)")


COMMAND = Command(
    name="pipeline", presets=PIPELINE_PRESETS, run="pipeline.pipeline:run_pipeline", flags=_quick_flag,
    defaults=_preset_of_the_model,
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

"""The PPO stage's config (`python -m engine ppo`; stages/ppo.py runs it: PPO with a critic, or the
critic-free GRPO / Dr. GRPO / RLOO) and its presets.

Pure Python: no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..algos.choices import (
    ADVANTAGES, KL_ESTIMATORS, KL_PLACEMENTS, LOSS_AGGREGATIONS, OVEROPTIMIZATION_POLICIES, REWARD_ENSEMBLES,
    REWARD_NORMALIZATIONS,
)  # fmt: skip
from ..core.config import (
    BACKENDS, Command, RunConfig, check_at_least, check_choice, check_fraction, check_reference, from_data, preset,
    resolve_reference,
)  # fmt: skip
from ..datasets.prompts import load_prompts
from ..errors import ConfigError
from ..model.config import (
    SamplingConfig, StackConfig, adapter_inputs, check_init_adapter, check_model_dir, check_same_base,
    directory_inputs, saved_stack_files,
)  # fmt: skip


def reward_fn_sources(specs: tuple[str, ...]) -> dict[str, str]:
    """input_paths() entries for the PATH.py:FUNCTION reward functions: "reward_fn[i]" -> the file (an
    edited scoring rule changes the run; a MODULE:FUNCTION is an installed package's)."""
    out = {}
    for i, spec in enumerate(specs):
        module = spec.rpartition(":")[0]
        if module.endswith(".py") and os.path.isfile(module):
            out[f"reward_fn[{i}]"] = module
    return out


@dataclass
class PPOConfig(RunConfig):
    """PPO on one (4-bit) base (`python -m engine ppo`): the policy and value adapters train; the
    reference (the bare base or a frozen copy of the starting adapter) and the reward adapter are the
    same base. Exactly one reward source: reward_model, reward_fn or reward_classifier.

    Inherits out, seed, log_every, checkpoint_every, resume and progress from RunConfig."""

    prompts: str = ""  # JSONL of {"prompt": ...}; "" = the embedded prompts of datasets.corpus
    eval_fraction: float = 0.1  # share of prompts held out: evaluation and the reward threshold
    advantage: str = "gae"  # "gae": PPO with a value adapter; "grpo", "drgrpo", "rloo": group-relative, no critic
    stack: StackConfig = field(default_factory=lambda: StackConfig(adapters=("policy", "value")))
    init_adapter: str = ""  # start the policy from a saved adapter (an `engine sft` or `engine ppo` output)
    reference: str = "auto"  # "base": adapters off; "init": frozen copy of the starting adapter; auto: init iff init_adapter
    # ---- reward (one source or several, weighted) ----
    reward_model: str = ""  # an `engine rm` output directory: its reward adapter + head join this stack
    reward_fn: tuple[str, ...] = ()  # MODULE:FUNCTION or PATH.py:FUNCTION each: score(prompts, responses) -> list[float]
    reward_classifier: str = ""  # a ...ForSequenceClassification directory (a separate model)
    reward_positive_label: str = ""  # the classifier's positive class (name or index) when it has 2+ labels
    reward_weights: tuple[float, ...] = ()  # one per source (model or classifier first, then each reward_fn); () = all 1
    reward_max_length: int = 512  # tokens of prompt + response the reward model reads (the last ones)
    missing_eos_penalty: float | None = None  # added to the score of a response that never stopped (e.g. -1.0)
    reward_clip: float | None = None  # scores clipped to [-c, c] after normalisation
    reward_normalization: str = "none"  # "none", "batch" (this batch's mean/std) or "running" (all batches so far)
    reward_ensemble: str = "mean"  # a reward model with k heads: their "mean", or conservative "mean_minus_std" or "min"
    ensemble_lambda: float = 1.0  # mean_minus_std's lambda: the reward is the heads' mean - lambda * their std
    # ---- rollout ----
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))
    samples_per_prompt: int = 1  # responses per prompt (the group size of grpo / drgrpo / rloo: --group-size)
    rollout_batch_size: int = 16  # prompts per step; the step's sequences are this x samples_per_prompt
    forward_batch_size: int = 16  # sequences per no-grad forward (old / reference log-probs, values)
    # ---- optimisation ----
    ppo_epochs: int = 1  # passes over each rollout
    minibatch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate up to the minibatch
    lr: float = 1e-5  # AdamW learning rate of the policy and value parameters (constant)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping of the policy and value parameters together; 0 disables it
    # ---- losses ----
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2  # ratio clipped above at 1 + clip_high (DAPO's clip-higher: > clip_low)
    dual_clip: float | None = None  # c > 1: tokens with negative advantages are capped at -A * c
    value_clip: float = 0.2  # values may move this far from the rollout's before the clipped branch takes over
    vf_coef: float = 0.1  # weight of the value loss
    ent_coef: float = 0.0  # weight of the entropy bonus (subtracted from the loss)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise GAE's advantages over the batch (mean 0, std 1); groups normalise themselves
    loss_agg: str = "token_mean"  # "token_mean", "seq_mean_token_mean" (GRPO's) or "token_sum_norm" (Dr. GRPO's)
    drop_zero_std_groups: bool = False  # leave groups whose rewards are all equal (no signal) out of the loss
    # ---- KL to the reference ----
    kl_coef: float | None = None  # beta, the KL weight (its start with target_kl); None: 0.05 for gae, 0 for the group modes
    kl_estimator: str = "exact"  # "exact": full-vocabulary KL; "k1", "k2", "k3": sampled estimates from log-probs
    kl_in: str = "reward"  # "reward": -beta KL_t in every token's reward; "loss": + beta mean KL in the loss
    target_kl: float | None = None  # adaptive beta (Ziegler et al. 2019) towards this KL per sequence; None: fixed
    kl_horizon: int = 10000  # sequences over which the adaptive beta moves by about e^0.2
    # ---- run ----
    max_steps: int = 100  # rollout + optimisation rounds
    eval_every: int = 10  # held-out evaluation every this many steps (and at 0 and the end); 0: start and end
    reward_threshold: float | None = None  # stop once the held-out mean score reaches this
    eval_prompts: int = 64  # held-out prompts used per evaluation (at most)
    backend: str = "auto"  # rlhf_kernels backend for every op ("torch": the unfused references)
    # ---- over-optimisation (algos.overoptimization): watched at each held-out evaluation ----
    gold_reward_fn: str = ""  # MODULE:FUNCTION or PATH.py:FUNCTION: the true reward, logged, never trained on
    on_overoptimization: str = "warn"  # "off"; "warn": a line + the alarm metrics; "stop": end, keep the best weights
    overopt_patience: int = 2  # evaluations in a row with the watched score below its best, the proxy above
    overopt_tolerance: float = 0.0  # "below its best" means by more than this (the watched score's units)
    kl_budget: float | None = None  # alarm once the held-out KL to the reference passes this (nats per response)

    RESUMABLE_CHANGES = RunConfig.RESUMABLE_CHANGES + ("max_steps", "eval_every", "reward_threshold")

    @property
    def INPUT_FILES(self) -> tuple[str, ...]:  # noqa: N802 (the RunConfig attribute)
        return ("prompts",) if self.prompts else ()

    def input_paths(self) -> dict[str, str]:
        """Everything the run reads: the prompts, the starting adapter's files, the reward model's adapter,
        heads and stack.json, a reward classifier directory's files and the source of each PATH.py reward
        function; a resume refuses any of them changed."""
        paths = {**super().input_paths(), **adapter_inputs("init_adapter", self.init_adapter, ("policy",)),
                 **adapter_inputs("reward_model", self.reward_model, ("reward",)),
                 **directory_inputs("reward_classifier", self.reward_classifier)}  # fmt: skip
        return {**paths, **reward_fn_sources(self.reward_fn)}

    def check_inputs(self) -> None:
        """The prompt file, read strictly before a model loads."""
        if self.prompts:
            load_prompts(self.prompts)

    @property
    def reward_sources(self) -> list[tuple[str, str]]:
        """The configured reward sources in weight order: (field, value), model or classifier first."""
        out = [(k, getattr(self, k)) for k in ("reward_model", "reward_classifier") if getattr(self, k)]
        return out + [("reward_fn", spec) for spec in self.reward_fn]

    @property
    def beta(self) -> float:
        """The KL coefficient to start from."""
        if self.kl_coef is not None:
            return self.kl_coef
        return 0.05 if self.advantage == "gae" else 0.0

    @property
    def critic(self) -> bool:
        """Whether a value adapter (or head) is trained: GAE needs one, the group advantages do not."""
        return self.advantage == "gae"

    @property
    def reference_mode(self) -> str:
        """"base" or "init" ("auto" resolved)."""
        return resolve_reference(self.reference, self.init_adapter)

    def validate(self) -> PPOConfig:
        if isinstance(self.reward_fn, str):  # one spec given as a string (Python callers)
            self.reward_fn = (self.reward_fn,) if self.reward_fn else ()
        super().validate()
        self.stack.validate()
        self.sampling.validate()
        sources = self.reward_sources
        if not sources:
            raise ConfigError("reward: give --reward-model, --reward-classifier and/or --reward-fn")
        if self.reward_model and self.reward_classifier:
            raise ConfigError("reward: --reward-model and --reward-classifier are two reward models; give one")
        if self.reward_weights and len(self.reward_weights) != len(sources):
            raise ConfigError(f"reward_weights: {len(self.reward_weights)} weights for {len(sources)} sources "
                              f"({', '.join(v for _, v in sources)})")  # fmt: skip
        check_choice("advantage", self.advantage, ADVANTAGES)
        if not self.critic and self.samples_per_prompt < 2:
            raise ConfigError(f"advantage={self.advantage!r} compares the responses of a group: --group-size >= 2 "
                              f"(got samples_per_prompt={self.samples_per_prompt})")  # fmt: skip
        check_choice("loss_agg", self.loss_agg, LOSS_AGGREGATIONS)
        if self.reward_classifier:  # a causal LM here would score through a randomly initialised head
            check_model_dir(self.reward_classifier, "reward_classifier", "classifier")
        check_init_adapter(self.init_adapter, self.stack.model)
        if self.reward_model:
            check_same_base(self.reward_model, "reward_model", self.stack.model)
            saved_stack_files(self.reward_model, ("reward",))  # each safetensors file whole
        check_reference(self.reference, self.init_adapter)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("kl_in", self.kl_in, KL_PLACEMENTS)
        check_choice("reward_normalization", self.reward_normalization, REWARD_NORMALIZATIONS)
        check_choice("reward_ensemble", self.reward_ensemble, REWARD_ENSEMBLES)
        check_choice("on_overoptimization", self.on_overoptimization, OVEROPTIMIZATION_POLICIES)
        check_at_least(1, overopt_patience=self.overopt_patience)
        if self.ensemble_lambda < 0 or self.overopt_tolerance < 0 or not (self.kl_budget is None or self.kl_budget > 0):
            raise ConfigError(f"ensemble_lambda={self.ensemble_lambda}, overopt_tolerance={self.overopt_tolerance} "
                              f"must be >= 0 and kl_budget={self.kl_budget} > 0")  # fmt: skip
        check_choice("backend", self.backend, BACKENDS)
        check_at_least(1, samples_per_prompt=self.samples_per_prompt, rollout_batch_size=self.rollout_batch_size,
                       forward_batch_size=self.forward_batch_size, ppo_epochs=self.ppo_epochs,
                       minibatch_size=self.minibatch_size, micro_batch_size=self.micro_batch_size,
                       max_steps=self.max_steps, eval_prompts=self.eval_prompts,
                       reward_max_length=self.reward_max_length, kl_horizon=self.kl_horizon)  # fmt: skip
        sequences = self.rollout_batch_size * self.samples_per_prompt
        if self.minibatch_size > sequences:
            raise ConfigError(f"minibatch_size={self.minibatch_size} is larger than the batch of {sequences} "
                              f"sequences (rollout_batch_size x samples_per_prompt)")  # fmt: skip
        if self.micro_batch_size > self.minibatch_size:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} > minibatch_size={self.minibatch_size}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError(f"lr={self.lr} must be > 0; weight_decay, max_grad_norm >= 0")
        if not (0 <= self.clip_low < 1) or self.clip_high < 0 or self.value_clip < 0:
            raise ConfigError(f"clip_low={self.clip_low} in [0, 1), clip_high={self.clip_high} and "
                              f"value_clip={self.value_clip} >= 0")  # fmt: skip
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(f"dual_clip={self.dual_clip}: must be > 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma={self.gamma}, lam={self.lam}: both in [0, 1]")
        if self.beta < 0 or (self.target_kl is not None and not self.target_kl > 0):
            raise ConfigError(f"kl_coef={self.kl_coef} must be >= 0 and target_kl={self.target_kl} > 0")
        if self.vf_coef < 0 or self.ent_coef < 0:
            raise ConfigError(f"vf_coef={self.vf_coef}, ent_coef={self.ent_coef}: must be >= 0")
        check_fraction("eval_fraction", self.eval_fraction)
        check_at_least(0, eval_every=self.eval_every)
        if self.reward_normalization != "none" and self.reward_clip is not None and not self.reward_clip > 0:
            raise ConfigError(f"reward_clip={self.reward_clip}: must be > 0")

        return self

    @classmethod
    def from_dict(cls, d: dict) -> PPOConfig:
        """As RunConfig.from_dict; one reward_fn may be a string."""
        d = dict(d)
        if isinstance(d.get("reward_fn"), str):
            d["reward_fn"] = (d["reward_fn"],) if d["reward_fn"] else ()
        return from_data(cls, d)


PPO_PRESETS: dict[str, PPOConfig] = {
    # A real run on a GPU: NF4 base, LoRA policy and value, 64 prompts x 128 new tokens per step.
    "default": PPOConfig(
        sampling=SamplingConfig(max_new_tokens=128, temperature=1.0), rollout_batch_size=64, forward_batch_size=32,
        minibatch_size=16, micro_batch_size=8, ppo_epochs=2, lr=1e-5, max_steps=200, eval_every=20,
    ),
    # CPU smoke run on the tiny preset base: short responses, a few prompts, a high rate.
    "tiny": PPOConfig(
        stack=StackConfig(model="tiny-llama", adapters=("policy", "value")),
        sampling=SamplingConfig(max_new_tokens=12, temperature=1.0, max_prompt_length=64),
        rollout_batch_size=8, forward_batch_size=16, minibatch_size=8, micro_batch_size=4, ppo_epochs=2,
        lr=3e-3, vf_coef=0.5, kl_coef=0.02, max_steps=20, eval_every=5, eval_prompts=16, checkpoint_every=5,
        reward_max_length=128,
    ),
}  # fmt: skip


def ppo_preset(name: str, **overrides) -> PPOConfig:
    """A copy of PPO_PRESETS[name] with fields replaced; `stack` and `sampling` overrides are dicts."""
    if isinstance(overrides.get("reward_fn"), str):  # one spec
        overrides["reward_fn"] = (overrides["reward_fn"],) if overrides["reward_fn"] else ()
    return preset(PPO_PRESETS, name, **overrides)


def _group_size_flag(parser) -> None:
    parser.add_argument("--group-size", type=int, metavar="K",
                        help="responses per prompt: the group of grpo / drgrpo / rloo (= --samples-per-prompt)")


def _group_size(args, data: dict) -> None:
    """--group-size is --samples-per-prompt under the name the group estimators use."""
    if getattr(args, "group_size", None) is not None:
        given = getattr(args, "samples_per_prompt", None)
        if given not in (None, args.group_size):
            raise ConfigError(f"--group-size {args.group_size} and --samples-per-prompt {given} "
                              "name the same thing; give one")  # fmt: skip
        data["samples_per_prompt"] = args.group_size


COMMAND = Command(
    name="ppo", presets=PPO_PRESETS, run="stages.ppo:train_ppo", flags=_group_size_flag, adjust=_group_size,
    help="RLHF with PPO: the policy and value adapters against a reward, with a KL penalty",
    description=(
        "PPO on one (4-bit) base: the LoRA policy and value adapters train; the reference is the bare base "
        "or a frozen copy of --init-adapter; the reward is an `engine rm` output (--reward-model), a "
        "classifier directory (--reward-classifier) or a Python function (--reward-fn MODULE:FUNCTION or "
        "PATH.py:FUNCTION, score(prompts, responses) -> list[float]). Log-probs, the exact full-vocabulary "
        "KL, GAE, whitening and the losses run on rlhf_kernels. Writes OUT/metrics.jsonl (one row per step), "
        "the adapters, OUT/eval_prompts.jsonl and OUT/checkpoint.pt; rerunning with the same OUT resumes. "
        "Settings come from the preset, then --config FILE (JSON/YAML of these fields, stack and sampling "
        "nested), then the flags. Batch sizes are global (all data-parallel ranks together)."
    ),
    epilog=(
        "example: python -m engine ppo --preset tiny --reward-fn tests/_reward_fns.py:lowercase_share "
        "--out runs/ppo --max-steps 20"
    ),
)  # fmt: skip

"""The evaluation stage's config (`python -m engine eval`; stages/eval.py runs it): before and after on
held-out prompts.

Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..core.config import DEVICES, Command, check_fields, check_out_dir, check_seed, from_data
from ..core.files import CONFIG_FILE
from ..datasets.prompts import load_prompts
from ..errors import ConfigError
from ..model.config import STACK_FILE, SamplingConfig, check_model_dir, saved_stack_files


@dataclass
class EvalConfig:
    """Before/after evaluation on held-out prompts (`python -m engine eval`): the reference and the
    trained policy of a saved stack answer the same prompts with the same randomness; every reward
    source scores both; KL to the reference and response length come along."""

    policy: str = ""  # a saved stack directory with a policy adapter (an `engine ppo` output)
    prompts: str = ""  # JSONL of {"prompt": ...}; "" = the embedded prompts
    out: str = ""  # where eval.json goes ("" = POLICY/eval.json)
    reward_model: str = ""  # an `engine rm` directory; "" = the policy directory's own reward adapter, if saved
    reward_fn: tuple[str, ...] = ()  # user scorers, each MODULE:FUNCTION or PATH.py:FUNCTION (one column each)
    reward_classifier: str = ""  # a ...ForSequenceClassification directory
    reward_positive_label: str = ""  # its positive class when it has 2+ labels
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.0))
    max_prompts: int = 64  # prompts evaluated (the first ones of the file)
    samples: int = 1  # completions per prompt and policy (the means are over all of them)
    show: int = 3  # prompts whose two completions are printed side by side
    batch_size: int = 16  # prompts per generation / scoring batch
    seed: int = 0  # sampling seed (both policies draw the same randomness)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    backend: str = "auto"  # rlhf_kernels backend for the KL
    progress: bool = True  # transformers' loading bars (False silences them)

    @classmethod
    def from_dict(cls, d: dict) -> EvalConfig:
        return from_data(cls, d)

    def check_inputs(self) -> None:
        """The prompt file, read strictly before a model loads."""
        if self.prompts:
            load_prompts(self.prompts)

    def validate(self) -> EvalConfig:
        check_seed(self.seed)
        check_fields(self)
        self.sampling.validate()
        if not self.policy or not os.path.isfile(os.path.join(self.policy, STACK_FILE)):
            raise ConfigError(f"policy {self.policy!r}: not a saved stack directory (no stack.json)")
        if not os.path.isfile(os.path.join(self.policy, "adapter_policy.safetensors")):
            raise ConfigError(f"policy {self.policy!r}: has no policy adapter (adapter_policy.safetensors)")
        saved_stack_files(self.policy, ("policy", "reference", "value", "reward"))  # each whole
        if self.prompts and not os.path.isfile(self.prompts):
            raise ConfigError(f"prompts {self.prompts!r}: no such file")
        if self.reward_model and not os.path.isfile(os.path.join(self.reward_model, STACK_FILE)):
            raise ConfigError(f"reward_model {self.reward_model!r}: not an `engine rm` output directory (no stack.json)")
        if self.reward_model:
            saved_stack_files(self.reward_model, ("reward",))
        if self.reward_classifier:  # a causal LM here would score through a randomly initialised head
            check_model_dir(self.reward_classifier, "reward_classifier", "classifier")
        if min(self.max_prompts, self.batch_size, self.samples) < 1 or self.show < 0:
            raise ConfigError(f"max_prompts={self.max_prompts}, batch_size={self.batch_size}, samples={self.samples}: "
                              f"each must be >= 1; show={self.show} >= 0")  # fmt: skip
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r}: expected auto, cpu or cuda")
        if self.out:
            check_out_dir(os.path.dirname(os.path.abspath(self.out)) or ".")
        return self

    @property
    def out_file(self) -> str:
        """Where the report goes: --out, else POLICY/eval.json."""
        return self.out or os.path.join(self.policy, "eval.json")


def trained_sampling(policy: str) -> SamplingConfig | None:
    """The sampling settings of the run that trained `policy` (its config.json), if it has them."""
    path = os.path.join(policy, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            sampling = json.load(f)["config"]["sampling"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    return SamplingConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sampling.items() if k in known})


def _trained_sampling(args, data: dict) -> dict:
    """The CLI samples as the training run did (POLICY/config.json) unless the sampling flags say otherwise."""
    trained = trained_sampling(args.policy) if getattr(args, "policy", None) else None
    if trained is not None:
        data["sampling"] = dataclasses.asdict(trained)
    return data


COMMAND = Command(
    name="eval", presets={"default": EvalConfig()}, run="stages.eval:evaluate", defaults=_trained_sampling,
    help="before/after: the reference vs the trained policy on held-out prompts",
    description=(
        "The reference and the trained policy of a saved stack (an `engine ppo` output) answer the same "
        "held-out prompts (--prompts, else the run's OUT/eval_prompts.jsonl) with the same randomness; each "
        "reward source scores both (the policy directory's reward adapter when no source is given), sampling as "
        "the training run did (POLICY/config.json) unless the sampling flags say otherwise. Prints "
        "the table (mean scores, exact KL to the reference, response length) and a few completions side "
        "by side, and writes it to --out (default POLICY/eval.json)."
    ),
    epilog="example: python -m engine eval --policy runs/ppo --reward-fn tests/_reward_fns.py:lowercase_share",
)  # fmt: skip

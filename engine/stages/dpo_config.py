"""The DPO stage's config (`python -m engine dpo`; stages/dpo.py runs it: DPO, IPO, conservative DPO)
and its presets.

Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..algos.choices import DPO_LOSSES
from ..core.config import (
    Command, check_agreement_threshold, check_choice, check_reference, preset, resolve_reference,
)  # fmt: skip
from ..datasets.feedback import check_completions, load_feedback
from ..errors import ConfigError
from ..model.config import StackConfig
from .supervised_config import SupervisedConfig


@dataclass
class DPOConfig(SupervisedConfig):
    """Direct preference optimisation of the policy adapter (`python -m engine dpo`): DPO (Rafailov et
    al. 2023), IPO (Azar et al. 2023) or conservative DPO (label smoothing, Mitchell 2023) against a
    reference that is the bare base or a frozen copy of the starting adapter.

    Inherits every field of SupervisedConfig."""

    data: str = ""  # feedback JSONL: pairwise and/or ranked records (README: "Feedback data"); required

    loss_type: str = "dpo"  # "dpo": -log sigmoid(beta m); "ipo": (m - 1/(2 beta))^2; "cdpo": label-smoothed DPO
    beta: float = 0.1  # scale of the implicit reward beta * (log pi - log ref); IPO's regulariser
    label_smoothing: float = 0.0  # cdpo: the assumed share of flipped labels, 0 < eps < 0.5
    reference: str = "auto"  # "base": adapters off; "init": frozen copy of the starting adapter; auto: init iff init
    precompute_ref_logps: bool = False  # the reference sequence log-probs once, at the start: a forward less per step
    agreement_threshold: float = 0.3  # ranked data: flag labelers whose Kendall tau with the consensus is below this
    exclude_flagged: bool = False  # ranked data: drop flagged labelers' rankings before building the consensus

    def check_inputs(self) -> None:
        """The feedback file, read strictly before a model loads, every completion with visible text."""
        check_completions(load_feedback(self.data), self.data)

    @property
    def reference_mode(self) -> str:
        """"base" or "init" ("auto" resolved), as PPOConfig.reference_mode."""
        return resolve_reference(self.reference, self.init_adapter)

    def validate(self) -> DPOConfig:
        if not self.data:
            raise ConfigError("data: a feedback file is required (--data FILE)")
        super().validate()
        check_choice("loss_type", self.loss_type, DPO_LOSSES)
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta}: must be > 0")
        if self.loss_type == "cdpo" and not 0.0 < self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing}: cdpo needs 0 < label_smoothing < 0.5")
        if self.loss_type != "cdpo" and self.label_smoothing != 0.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing}: only loss_type='cdpo' smooths labels")
        check_reference(self.reference, self.init_adapter)
        check_agreement_threshold(self.agreement_threshold)
        return self


DPO_PRESETS: dict[str, DPOConfig] = {
    # A real run on a GPU: NF4 base, LoRA policy, beta 0.1 (Rafailov et al. 2023), one epoch.
    "default": DPOConfig(batch_size=16, micro_batch_size=8, lr=5e-5, warmup_steps=10, max_length=1024, eval_every=100),
    # CPU smoke run on the tiny preset base: a high rate so a few dozen steps learn a preference.
    "tiny": DPOConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)), batch_size=8, micro_batch_size=8,
                      lr=3e-3, max_length=256, epochs=3, eval_every=10, checkpoint_every=10),
}  # fmt: skip


def dpo_preset(name: str, **overrides) -> DPOConfig:
    """A copy of DPO_PRESETS[name] with fields replaced; `stack` overrides go in `stack=dict(...)`."""
    return preset(DPO_PRESETS, name, **overrides)


COMMAND = Command(
    name="dpo", presets=DPO_PRESETS, run="stages.dpo:train_dpo",
    help="DPO / IPO / conservative DPO of the policy adapter from preference data",
    description=(
        "Direct preference optimisation of the LoRA policy adapter on one (4-bit) base: --loss-type dpo "
        "(-log sigmoid(beta m)), ipo ((m - 1/(2 beta))^2) or cdpo (label smoothing), m = (log pi_c - log ref_c) "
        "- (log pi_r - log ref_r). The reference is the bare base, or a frozen copy of --init-adapter "
        "(--reference). Data: the feedback JSONL of `engine rm` (pairwise, ranked or thumbs; see README). "
        "Sequence log-probs from hidden states through rlhf_kernels.linear_logprobs, chosen and rejected in "
        "one forward. Writes OUT/adapter_policy.safetensors (+ adapter_reference) + OUT/stack.json, "
        "OUT/metrics.jsonl, OUT/labelers.json, OUT/result.json and OUT/checkpoint.pt; rerunning with the "
        "same OUT resumes. Settings: the preset, then --config FILE, then the flags."
    ),
    epilog=(
        "example: python -m engine dpo --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/dpo "
        "--preset tiny"
    ),
)  # fmt: skip

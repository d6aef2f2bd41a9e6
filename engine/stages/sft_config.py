"""The SFT stage's config (`python -m engine sft`; stages/sft.py runs it) and its presets.

Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Command, preset
from ..datasets.samples import load_sft_data
from ..model.config import StackConfig
from .supervised_config import SupervisedConfig


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning of the policy adapter on prompt -> completion data (`python -m engine
    sft`): token-mean negative log-likelihood of the completion tokens.

    Inherits every field of SupervisedConfig; `data` may be omitted."""

    data: str = ""  # JSONL of {"prompt", "completion"} or {"messages": [...]}; "" = the embedded corpus (datasets.corpus)

    def check_inputs(self) -> None:
        """The SFT records, read strictly before a model loads: a bad line is one error naming it."""
        load_sft_data(self.data)


SFT_PRESETS: dict[str, SFTConfig] = {
    # A real run on a GPU: NF4 base, LoRA policy, a LoRA-SFT learning rate with a short warm-up.
    "default": SFTConfig(batch_size=16, micro_batch_size=8, lr=2e-4, warmup_steps=20, epochs=2, max_length=1024,
                         eval_every=100),
    # CPU smoke run on the tiny preset base (the embedded corpus when --data is omitted): a high rate.
    "tiny": SFTConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)), batch_size=8, micro_batch_size=8,
                      lr=3e-3, max_length=256, max_steps=40, eval_fraction=0.2, eval_every=10, checkpoint_every=10),
}  # fmt: skip


def sft_preset(name: str, **overrides) -> SFTConfig:
    """A copy of SFT_PRESETS[name] with fields replaced; `stack` overrides go in `stack=dict(...)`."""
    return preset(SFT_PRESETS, name, **overrides)


COMMAND = Command(
    name="sft", presets=SFT_PRESETS, run="stages.sft:train_sft",
    help="supervised fine-tuning of the policy adapter on prompt -> completion data",
    description=(
        "SFT of the LoRA policy adapter on one (4-bit) base: the token mean of -log p over completion tokens "
        "only, from hidden states through rlhf_kernels.linear_logprobs (no [N, V] logits), length-bucketed "
        "batches. Data: JSONL {\"prompt\", \"completion\"} or {\"messages\": [{\"role\", \"content\"}, ...]} "
        "(the tokenizer's chat template; the last message, the assistant's, trains); without --data the "
        "embedded corpus. Whole prompts are held out for the held-out loss. Writes OUT/adapter_policy.safetensors "
        "+ OUT/stack.json (the --init-adapter of ppo and dpo), OUT/metrics.jsonl, OUT/result.json and "
        "OUT/checkpoint.pt; rerunning with the same OUT resumes. Settings: the preset, then --config FILE, "
        "then the flags."
    ),
    epilog="example: python -m engine sft --model tiny-llama --out runs/sft --preset tiny",
)  # fmt: skip

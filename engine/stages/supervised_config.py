"""What the SFT and DPO configs share (stages/sft_config.py, stages/dpo_config.py): the data, the policy
adapter on one (4-bit) base, batching and the optimizer.

Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import BACKENDS, RunConfig, check_at_least, check_choice, check_fields, check_fraction
from ..errors import ConfigError
from ..model.config import StackConfig, adapter_inputs, check_init_adapter


@dataclass
class SupervisedConfig(RunConfig):
    """What SFT and DPO share: the data, the policy adapter on one (4-bit) base, batching and the
    optimizer. Inherits out, seed, log_every, checkpoint_every, resume and progress from RunConfig."""

    data: str = ""  # JSONL training data (README: "Engine: SFT and DPO")
    stack: StackConfig = field(default_factory=lambda: StackConfig(adapters=("policy",)))
    init_adapter: str = ""  # start the policy from a saved adapter (an `engine sft`, `dpo` or `ppo` output)
    eval_fraction: float = 0.1  # share of prompts (not examples) held out for the held-out metrics
    epochs: int = 1  # passes over the training data (ignored when max_steps is set)
    max_steps: int | None = None  # stop after this many optimizer steps; a later run with more steps resumes
    batch_size: int = 8  # examples (SFT) or preference pairs (DPO) per optimizer step
    micro_batch_size: int = 8  # examples / pairs per forward-backward; gradients accumulate up to batch_size
    bucket_window: int = 8  # length buckets: a batch comes from a seeded window of this many batches, by length (1: off)
    lr: float = 1e-4  # AdamW learning rate of the policy adapter
    warmup_steps: int = 0  # the learning rate rises linearly over this many steps, then stays constant
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    max_length: int = 512  # tokens per prompt+completion; longer ones keep their last max_length tokens
    eval_every: int = 0  # held-out evaluation every this many steps (and at 0 and the end); 0: start and end
    backend: str = "auto"  # rlhf_kernels backend of the log-probs: auto (fused kernels), torch (unfused reference)

    RESUMABLE_CHANGES = RunConfig.RESUMABLE_CHANGES + ("epochs", "max_steps", "eval_every")

    @property
    def INPUT_FILES(self) -> tuple[str, ...]:  # noqa: N802 (the RunConfig attribute)
        return ("data",) if self.data else ()

    def input_paths(self) -> dict[str, str]:
        """The data and the starting adapter's files (its weights and stack.json): a resume refuses either
        changed (a pipeline rerun with a longer SFT gives PPO and DPO a new starting policy)."""
        return {**super().input_paths(), **adapter_inputs("init_adapter", self.init_adapter, ("policy",))}

    def validate(self) -> SupervisedConfig:
        check_fields(self)  # types first: the checks below read the values
        self.stack.validate()
        check_init_adapter(self.init_adapter, self.stack.model)
        super().validate()
        check_at_least(1, epochs=self.epochs, batch_size=self.batch_size, micro_batch_size=self.micro_batch_size,
                       bucket_window=self.bucket_window, max_steps=1 if self.max_steps is None else self.max_steps)
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} > batch_size={self.batch_size}")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length}: must be >= 2 (a prompt token and a completion token)")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0:
            raise ConfigError(f"lr={self.lr} must be > 0; weight_decay={self.weight_decay}, max_grad_norm="
                              f"{self.max_grad_norm}, warmup_steps={self.warmup_steps} >= 0")  # fmt: skip
        check_fraction("eval_fraction", self.eval_fraction)
        check_at_least(0, eval_every=self.eval_every)
        check_choice("backend", self.backend, BACKENDS)
        if set(self.stack.adapters) != {"policy"}:
            raise ConfigError(f"stack.adapters={self.stack.adapters}: {type(self).__name__} trains the policy "
                              "adapter alone (the DPO reference copy is added by `reference`)")  # fmt: skip
        return self

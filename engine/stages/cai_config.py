"""The Constitutional AI stages' configs (`python -m engine cai revise | label`; stages/cai.py runs them)
and their presets.

Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import Command, RunConfig
from ..datasets.constitution import DEFAULT_CONSTITUTION, DEFAULT_TEMPLATES, label_inputs, revise_inputs
from ..errors import ConfigError
from ..model.config import SamplingConfig, StackConfig, adapter_inputs, check_init_adapter, check_model



# The section headers of the shipped templates (engine/data/cai): a model that starts the next section
# has finished this one. The text from the stop string on is cut (datasets.constitution.clean).
CAI_STOP_STRINGS = ("\n\nHuman:", "\n\nCritique request:", "\n\nRevision request:")


@dataclass
class CAIConfig(RunConfig):
    """What both Constitutional AI stages share (`python -m engine cai revise | label`): the prompts, the
    constitution, the model that answers and how it samples. One run step is one batch of prompts; the
    checkpoint holds every record done so far, so a rerun resumes after the last checkpointed batch.

    Inherits out, seed, log_every, checkpoint_every, resume and progress from RunConfig."""

    prompts: str = ""  # JSONL of {"prompt": ...} (red-team prompts); "" = the embedded ones (datasets.corpus)
    max_prompts: int = 0  # use the first N prompts only (0: all)
    constitution: str = ""  # JSONL of principles {critique_request, revision_request, choice_question}; "" = shipped
    stack: StackConfig = field(default_factory=lambda: StackConfig(adapters=("policy",)))
    init_adapter: str = ""  # the answering policy's saved adapter (`engine sft` / `engine ppo` output); "" = the base
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(
            max_new_tokens=128, max_prompt_length=1024, stop_strings=CAI_STOP_STRINGS
        )
    )
    batch_size: int = 16  # prompts per step (one batched generation per phase)
    checkpoint_every: int = 10  # write checkpoint.pt every this many steps (and at the last one)

    TEMPLATE_FIELDS = ()  # the stage's template-path fields (input files, like prompts and constitution)

    @property
    def INPUT_FILES(self) -> tuple[str, ...]:  # noqa: N802 (the RunConfig attribute)
        return tuple(name for name in ("prompts", "constitution", *self.TEMPLATE_FIELDS) if getattr(self, name))

    def input_paths(self) -> dict[str, str]:
        """The prompts, the constitution and the templates (the shipped ones when not given: an upgrade
        that edits them changes the data) and the answering policy's adapter files."""
        shipped = {"constitution": DEFAULT_CONSTITUTION,
                   **{f: DEFAULT_TEMPLATES[f.removesuffix("_template")] for f in self.TEMPLATE_FIELDS}}  # fmt: skip
        paths = {name: getattr(self, name) or default for name, default in shipped.items()}
        return {**super().input_paths(), **paths, **adapter_inputs("init_adapter", self.init_adapter, ("policy",))}

    def validate(self) -> CAIConfig:
        super().validate()
        self.stack.validate()
        self.sampling.validate()
        if self.max_prompts < 0 or self.batch_size < 1:
            raise ConfigError(f"max_prompts={self.max_prompts} must be >= 0 and batch_size={self.batch_size} >= 1")
        check_init_adapter(self.init_adapter, self.stack.model)
        return self


@dataclass
class CAIReviseConfig(CAIConfig):
    """Critique -> revision -> SFT data (`python -m engine cai revise`): for each prompt the model
    answers, critiques its answer against a principle drawn for the prompt and round, and revises it;
    OUT/sft.jsonl pairs each prompt with its final revision."""

    rounds: int = 1  # critique-revision rounds; each round critiques the previous revision under a new draw
    critique_template: str = ""  # text file with {prompt} {response} {critique_request}; "" = shipped
    revision_template: str = ""  # text file with {prompt} {response} {critique} {revision_request}; "" = shipped

    TEMPLATE_FIELDS = ("critique_template", "revision_template")

    def check_inputs(self) -> None:
        """Prompts, constitution and templates, each checked before a model loads."""
        revise_inputs(self)

    def validate(self) -> CAIReviseConfig:
        super().validate()
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds}: must be >= 1")
        return self


@dataclass
class CAILabelConfig(CAIConfig):
    """AI preference labels (RLAIF) (`python -m engine cai label`): the model samples several completions
    per prompt; a judge answers, for every pair and in both orders, a multiple-choice question drawn from
    the constitution; its choice-token log-probs give the preference. OUT/preferences.jsonl holds pairwise
    feedback records that `engine rm` and `engine dpo` read as they are."""

    judge: str = ""  # judge model, a preset or a save_pretrained directory; "" = the answering policy itself
    judge_template: str = ""  # text file with {prompt} {question} {response_a} {response_b}; "" = shipped
    samples_per_prompt: int = 2  # completions per prompt; every pair of distinct ones is judged
    choices: tuple[str, ...] = ("A", "B")  # the two option labels; each must be one token of the judge's tokenizer
    margin_scale: float = 1.0  # margin of a record = margin_scale * |the judge's log-odds| (0: plain pairs)
    judge_batch_size: int = 16  # questions per judge forward
    judge_max_length: int = 1024  # tokens of a question the judge reads (the last ones)

    TEMPLATE_FIELDS = ("judge_template",)

    def check_inputs(self) -> None:
        """Prompts, constitution (with choice questions) and the judge template, checked before a model loads."""
        label_inputs(self)

    def validate(self) -> CAILabelConfig:
        super().validate()
        if self.judge:
            check_model(self.judge, "judge")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt={self.samples_per_prompt}: the judge compares at least 2")
        if len(self.choices) != 2 or len(set(self.choices)) != 2 or not all(self.choices):
            raise ConfigError(f"choices={self.choices!r}: expected two distinct non-empty labels, e.g. A,B")
        if self.margin_scale < 0:
            raise ConfigError(f"margin_scale={self.margin_scale}: must be >= 0")
        if self.judge_batch_size < 1 or self.judge_max_length < 1:
            raise ConfigError(f"judge_batch_size={self.judge_batch_size}, judge_max_length={self.judge_max_length}: "
                              "both must be >= 1")  # fmt: skip
        return self


_CAI_TINY_SAMPLING = SamplingConfig(max_new_tokens=16, max_prompt_length=384, stop_strings=CAI_STOP_STRINGS)
CAI_PRESETS: dict[str, dict[str, CAIConfig]] = {
    "revise": {
        # A real run on a GPU: 128-token answers, critiques and revisions, 16 prompts per batch.
        "default": CAIReviseConfig(),
        # CPU smoke run on the tiny preset base (512 positions): short texts, small batches.
        "tiny": CAIReviseConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)),
                                sampling=_CAI_TINY_SAMPLING, batch_size=4, checkpoint_every=2),
    },
    "label": {
        "default": CAILabelConfig(),
        "tiny": CAILabelConfig(stack=StackConfig(model="tiny-llama", adapters=("policy",)),
                               sampling=_CAI_TINY_SAMPLING, batch_size=4, checkpoint_every=2, judge_max_length=384),
    },
}  # fmt: skip


COMMANDS = (
    Command(
        name="revise", presets=CAI_PRESETS["revise"], run="stages.cai:cai_revise",
        help="answer, critique against a principle, revise -> OUT/sft.jsonl, OUT/transcript.jsonl",
        description=(
            "For each prompt (--prompts JSONL of {prompt}; default: the embedded red-team prompts) the model (the "
            "base, or --init-adapter's policy on it) answers; then, for --rounds rounds, it critiques the current "
            "response against a principle drawn per prompt and round (seeded) from --constitution (JSONL of "
            "{critique_request, revision_request, choice_question}; default: the shipped one) and revises it, "
            "through the critique and revision templates (text files with {field} placeholders; defaults ship). "
            "Writes OUT/sft.jsonl ({prompt, completion}: the prompt and its final revision), OUT/transcript.jsonl "
            "(answer, then principle, critique and revision per round), OUT/metrics.jsonl, OUT/result.json, "
            "OUT/config.json and OUT/checkpoint.pt; rerunning with the same OUT resumes after the last "
            "checkpointed batch. The datasets are written once, atomically, when every prompt is done. Settings "
            "come from the preset, then --config FILE (JSON/YAML, stack and sampling nested), then the flags."
        ),
        epilog=("example: python -m engine cai revise --preset tiny --model tiny-llama --out runs/cai-sft "
                "--max-prompts 8"),
    ),
    Command(
        name="label", presets=CAI_PRESETS["label"], run="stages.cai:cai_label",
        help="AI preference labels from a judge's choice-token log-probs -> OUT/preferences.jsonl",
        description=(
            "For each prompt the model samples --samples-per-prompt completions; for every pair of distinct ones a "
            "judge (--judge: a preset or a save_pretrained directory; default: the answering policy itself) answers "
            "the prompt's drawn choice question of the constitution as a multiple-choice question (the judge "
            "template), once with each completion as option A. Its log-probs of the two choice tokens (--choices) "
            "at the question's last position give the preference; the two orders' log-odds are averaged, which "
            "cancels a position bias. Writes OUT/preferences.jsonl ({prompt, chosen, rejected, margin}, margin = "
            "--margin-scale x |log-odds|: what `engine rm --data` and `engine dpo` read), OUT/judgements.jsonl "
            "(log-probs and probabilities per pair), metrics, result and checkpoint as `cai revise` does."
        ),
        epilog=(
            "example: python -m engine cai label --preset tiny --model tiny-llama --out runs/cai-prefs; then "
            "python -m engine rm --data runs/cai-prefs/preferences.jsonl --model tiny-llama --out runs/rm"
        ),
    ),
)  # fmt: skip
CAI_HELP = "Constitutional AI: critique -> revision -> SFT data; AI preference labels -> RM / DPO data"
CAI_DESCRIPTION = (
    "Constitutional AI (Bai et al. 2022) on one (4-bit) base. `cai revise`: the model answers each prompt, "
    "critiques its answer against a principle of the constitution and revises it -> OUT/sft.jsonl "
    "({prompt, completion}, for `engine sft`) and OUT/transcript.jsonl. `cai label`: the model samples "
    "several completions per prompt and a judge model says which better follows a principle, read from "
    "its choice-token log-probs in both orders -> OUT/preferences.jsonl (pairwise feedback for `engine rm` "
    "and `engine dpo`) and OUT/judgements.jsonl."
)
CAI_EPILOG = "example: python -m engine cai revise --preset tiny --out runs/cai-sft (see `cai revise --help`)"

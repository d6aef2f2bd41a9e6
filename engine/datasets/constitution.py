"""Constitutional AI data (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"): the
constitution, the prompt templates a user can edit, the text clean-up, and the judge's preference read
from its choice-token log-probs. `stages/cai.py` runs the two stages on a model.

    python -m engine cai revise --model tiny-llama --out runs/cai-sft     (stages/cai.py)

Constitution: JSONL, one principle per line, strict (core.jsonl: file:line errors, no unknown field):

    {"critique_request": "Identify specific ways in which the assistant's last response is harmful, ...",
     "revision_request": "Please rewrite the assistant response to remove any and all harmful ... content.",
     "choice_question": "Which of these assistant responses is less harmful? ..."}

`critique_request` and `revision_request` are required (they define a principle); `choice_question`, the
multiple-choice question the judge of `cai label` answers, is required by that stage only.

Templates: text files with `{field}` placeholders (str.format syntax: `{{` and `}}` are literal braces).
One trailing newline of the file is not part of the template, so a template can end exactly where the
model continues ("Critique:", "The answer is: ("). Each kind has fields it must use and fields it may use
(TEMPLATE_FIELDS); a missing required field or an unknown one is an error naming the field and the file.

Pure Python: no torch, so the command line checks all of this before the heavy imports.
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass

from ..core.files import read_text
from ..core.jsonl import check_fields, read_jsonl, require_str
from ..errors import ConfigError, ConstitutionError
from .corpus import red_team_prompts
from .prompts import load_prompts

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "cai")
DEFAULT_CONSTITUTION = os.path.join(DATA_DIR, "constitution.jsonl")
DEFAULT_TEMPLATES = {kind: os.path.join(DATA_DIR, f"{kind}.txt") for kind in ("critique", "revision", "judge")}
PRINCIPLE_FIELDS = ("critique_request", "revision_request", "choice_question")
# kind -> (fields the template must use, fields it may use)
TEMPLATE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "critique": (("prompt", "response", "critique_request"), ()),
    "revision": (("prompt", "response", "critique", "revision_request"), ("critique_request",)),
    "judge": (("prompt", "question", "response_a", "response_b"), ("choice_a", "choice_b")),
}


# ---- the constitution ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Principle:
    """One principle: how to critique a response against it, how to revise it, and (for the judge) the
    multiple-choice question that compares two responses under it."""

    critique_request: str
    revision_request: str
    choice_question: str | None = None
    line: int = 0  # line of the constitution file (0: built in code)


def load_constitution(path: str = "", *, need_choice: bool = False) -> list[Principle]:
    """The principles of a constitution JSONL file ("" = the shipped one); `need_choice`: every principle
    must have a choice_question (the judge of `cai label` asks it)."""
    path = path or DEFAULT_CONSTITUTION

    def parse(obj, line):
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object (a principle), got {type(obj).__name__}")
        check_fields(obj, "principle", PRINCIPLE_FIELDS)
        for key in ("critique_request", "revision_request"):
            if key not in obj:
                raise ValueError(f"principle without a {key.replace('_', ' ')} (field {key!r})")
            require_str(obj, key)
        if "choice_question" in obj:
            require_str(obj, "choice_question")
        elif need_choice:
            raise ValueError("principle without a choice question (field 'choice_question'), which cai label "
                             "asks the judge")  # fmt: skip
        return Principle(obj["critique_request"], obj["revision_request"], obj.get("choice_question"), line)

    try:
        with open(path, "rb") as f:
            empty = not f.read().strip()
    except OSError as e:
        raise ConstitutionError(f"constitution {path}: cannot open ({e.strerror})") from e
    if empty:
        raise ConstitutionError(f"constitution {path}: empty (no principles)")
    return read_jsonl(path, parse, ConstitutionError)


# ---- templates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A prompt template of one kind ("critique", "revision" or "judge"), read from `path`."""

    kind: str
    text: str
    path: str
    fields: frozenset[str]  # the placeholders the text uses

    def fill(self, **values: str) -> str:
        """The text with every placeholder replaced; `values` must hold every field the kind allows
        (placeholders in the values themselves are not expanded)."""
        allowed = set().union(*TEMPLATE_FIELDS[self.kind])
        if set(values) != allowed:
            raise TypeError(f"{self.kind} template: fill() takes exactly {sorted(allowed)}, got {sorted(values)}")
        return string.Formatter().vformat(self.text, (), values)


def load_template(kind: str, path: str = "") -> Template:
    """The template of `kind` from `path` ("" = the shipped one); ConfigError (one line, naming the file
    and the field) when it misses a required field, uses an unknown one or is not a valid format string."""
    path = path or DEFAULT_TEMPLATES[kind]
    required, optional = TEMPLATE_FIELDS[kind]
    text = read_text(path, f"{kind} template {path}")
    if text.endswith("\n"):  # a text file's last newline; the model continues right after the text
        text = text[:-1]
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise ConfigError(f"{kind} template {path}: {e} (write {{{{ and }}}} for literal braces)") from e
    known = (*required, *optional)
    unknown = sorted(used - set(known))
    if unknown:
        raise ConfigError(f"{kind} template {path}: unknown field {{{unknown[0]}}}; {kind} templates have: "
                          f"{', '.join('{' + k + '}' for k in known)}")  # fmt: skip
    missing = [k for k in required if k not in used]
    if missing:
        raise ConfigError(f"{kind} template {path}: missing field {{{missing[0]}}} (a {kind} template must use "
                          f"{', '.join('{' + k + '}' for k in required)})")  # fmt: skip
    return Template(kind, text, path, frozenset(used))


# ---- a stage's inputs ----------------------------------------------------------------------------


def stage_prompts(config) -> list[str]:
    """The prompt file's prompts (or the embedded red-team prompts), the first max_prompts of them."""
    prompts = load_prompts(config.prompts) if config.prompts else red_team_prompts()
    return prompts[: config.max_prompts] if config.max_prompts else prompts


def revise_inputs(config) -> tuple[list[str], list[Principle], Template, Template]:
    """(prompts, principles, critique template, revision template) of `cai revise`, each checked."""
    critique = load_template("critique", config.critique_template)
    revision = load_template("revision", config.revision_template)
    return stage_prompts(config), load_constitution(config.constitution), critique, revision


def label_inputs(config) -> tuple[list[str], list[Principle], Template]:
    """(prompts, principles, judge template) of `cai label`, each checked."""
    principles = load_constitution(config.constitution, need_choice=True)
    return stage_prompts(config), principles, load_template("judge", config.judge_template)


def clean(text: str, stop_strings: tuple[str, ...] = ()) -> str:
    """A generated text as data: cut at the first stop string (it marks the start of the next turn, not
    part of this one) and stripped of surrounding whitespace."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut].strip()


# ---- the judge's preference -----------------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """The judge's preference between two completions x and y, from both orders of the question."""

    log_odds: float  # log P(x preferred) - log P(y preferred), the position bias cancelled
    probability: float  # P(x preferred) = sigmoid(log_odds)
    consistent: bool  # both orders prefer the same completion (a judge with no position effect)


def judge_preference(x_as_a: tuple[float, float], x_as_b: tuple[float, float]) -> Judgement:
    """Preference of completion x over y from the judge's log-probs (log p(A), log p(B)) of the two
    choice tokens: `x_as_a` for the question that lists x as option A and y as B, `x_as_b` for the one
    that lists y as A and x as B.

    Each order gives the log-odds of x restricted to the two choices (the softmax normaliser over the
    vocabulary cancels): l1 = log p(A) - log p(B) in the first order, l2 = log p(B) - log p(A) in the
    second. A judge that adds a bias b to option A's logit gives l1 = d + b and l2 = d - b, so the mean

        log_odds = (l1 + l2) / 2 = d,    P(x preferred) = sigmoid(log_odds)

    cancels any such position bias exactly. Averaging the two probabilities instead would not: at d = 1,
    b = 2 it gives (sigmoid(3) + sigmoid(-1)) / 2 = 0.61 where the unbiased preference is sigmoid(1) = 0.73."""
    l1 = x_as_a[0] - x_as_a[1]
    l2 = x_as_b[1] - x_as_b[0]
    log_odds = 0.5 * (l1 + l2)
    return Judgement(log_odds, _sigmoid(log_odds), (l1 > 0) == (l2 > 0) and l1 != 0 and l2 != 0)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # no overflow for very negative x
    return e / (1.0 + e)

"""Where a sequence's reward comes from, and how it is shaped before RL (step 3 of the PPO loop).

Sources (each scores (prompt, response) text pairs -> one float per pair):
    StackReward       the `reward` adapter + head on the SAME stack as the policy, loaded from a
                      `python -m engine rm` output directory (no second model)
    ClassifierReward  a separate ...ForSequenceClassification directory: num_labels = 1 gives its score,
                      2 or more the logit of a configured positive class (e.g. "not hate" of an
                      off-the-shelf toxicity classifier)
    FunctionReward    a Python callable `score(prompts, responses) -> list[float]` named as
                      "module:function" or "path/to/file.py:function" (rules, classifiers, harnesses)

Ensembles: an `engine rm` output may hold k reward heads on its one reward adapter (stack.reward gives
(B, k)); ENSEMBLE_REWARDS turns them into the PPO reward (the mean, or a conservative choice), and
ensemble_std is their disagreement, the over-optimisation signal of Coste et al. 2023.

Shaping (shape_scores): a penalty for responses that never stopped, clipping, normalisation.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.config import short_repr
from ..core.order import epoch_seed
from ..core.tensors import pad
from ..datasets.layout import format_sample, sample_ids
from ..errors import ConfigError, RewardError
from .choices import REWARD_ENSEMBLES, REWARD_NORMALIZATIONS


def check_scores(name: str, values, n: int, what: str = "reward") -> torch.Tensor:
    """A source's output -> (n,) fp32: a list (tuple, array, tensor) of n finite numbers; anything else
    is one RewardError saying what `what name` returned, so a NaN never reaches an update and a string
    "1.0" is not read as a number."""
    shown = f"{what} {name}"
    if isinstance(values, torch.Tensor) or hasattr(values, "tolist"):  # a tensor or a numpy array
        values = values.tolist() if getattr(values, "ndim", 1) else values
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{shown} returned {_describe(values)}; expected a list of {n} numbers, one per response")
    if len(values) != n:
        raise RewardError(f"{shown} returned {len(values)} scores for {n} responses")
    floats = [_number(v) for v in values]
    for i, (v, x) in enumerate(zip(values, floats)):
        if x is None:
            raise RewardError(f"{shown} returned {_describe(v)} for response {i}; expected a number")
    scores = torch.tensor(floats, dtype=torch.float32)
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise RewardError(f"{shown} returned a non-finite score {float(scores[i])} for response {i} "
                          f"({bad.numel()} of {n}); a reward must be a finite number")  # fmt: skip
    return scores


def _number(v) -> float | None:
    """A score as a float: a Python or numpy number, a 0-d tensor, an (n, 1) output's one-item row; None
    for anything else (a string "1.0", None, a list)."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        v = v.item()
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    return float(v) if isinstance(v, numbers.Real) else None


def _describe(value) -> str:
    """What a reward source returned, for its error line: the type and a short repr."""
    return f"{type(value).__name__} {short_repr(value)}" if value is not None else "None"


class FunctionReward:
    """`module:function` or `path/to/file.py:function`, called as function(prompts, responses)."""

    def __init__(self, spec: str):
        self.name = spec
        self.fn = load_function(spec)

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        try:
            values = self.fn(list(prompts), list(responses))
        except Exception as e:  # the user's code: its traceback stays chained (__cause__) for Python callers
            raise RewardError(f"reward function {self.name} raised {type(e).__name__}: {e}{_where(e)}") from e
        return check_scores(self.name, values, len(responses), what="reward function")


def _where(e: BaseException) -> str:
    """ " (at FILE:LINE)" of the innermost frame of an exception's traceback, for the one-line error."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


def load_function(spec: str) -> Callable:
    """Resolve "module:function" (importable) or "file.py:function" to a callable; ConfigError otherwise."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function {spec!r}: expected MODULE:FUNCTION or PATH.py:FUNCTION")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise ConfigError(f"reward function {spec!r}: no file {module_name!r}")
            mod_spec = importlib.util.spec_from_file_location(f"_reward_{abs(hash(module_name))}", module_name)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(f"reward function {spec!r}: cannot import {module_name!r} ({e})") from e
    except Exception as e:  # the user's module raised while loading
        raise ConfigError(f"reward function {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {attr!r} is not callable")
    return fn


class StackReward:
    """The stack's own `reward` adapter + head(s) (trained by `engine rm`), read at the last token of the
    sample the RM was trained on (datasets.layout.sample_ids of the prompt and the response). With k > 1
    heads (an ensemble) `score` is their `ensemble` combination (ENSEMBLE_REWARDS) and `score_heads`
    gives each head's score."""

    def __init__(self, stack, *, max_length: int, batch_size: int = 16, ensemble: str = "mean",
                 ensemble_lambda: float = 1.0):  # fmt: skip
        if "reward" not in stack.config.adapters:
            raise ConfigError("the stack has no reward adapter (load an `engine rm` output directory)")
        if ensemble not in ENSEMBLE_REWARDS:
            raise ConfigError(f"reward ensemble {ensemble!r}: expected one of {', '.join(ENSEMBLE_REWARDS)}")
        self.name = "rm"
        self.stack, self.max_length, self.batch_size = stack, max_length, batch_size
        self.ensemble, self.ensemble_lambda = ensemble, ensemble_lambda
        self.heads = stack.config.reward_heads

    @torch.no_grad()
    def score_heads(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(B, k) fp32: every head's score of each (prompt, response); k = 1 for a single head."""
        tok = self.stack.tokenizer
        out = []
        for i in range(0, len(responses), self.batch_size):
            seqs = [sample_ids(tok, p, r, self.max_length)[0]
                    for p, r in zip(prompts[i : i + self.batch_size], responses[i : i + self.batch_size])]
            ids, mask = pad(seqs, tok.pad_token_id)
            with self.stack.evaluating():  # the frozen RM is a fixed function: no LoRA dropout in a training stack
                scores = self.stack.reward(ids.to(self.stack.device), mask.to(self.stack.device)).float().cpu()
            out.append(scores.reshape(len(seqs), self.heads))
        heads = torch.cat(out) if out else torch.zeros(0, self.heads)
        for h in range(self.heads):  # each head's output is checked as a source's would be
            check_scores(self.name if self.heads == 1 else f"{self.name} head {h}", heads[:, h], len(responses))
        return heads

    def combine(self, heads: torch.Tensor) -> torch.Tensor:
        """(B, k) head scores -> (B,) the reward PPO trains on."""
        return ENSEMBLE_REWARDS[self.ensemble](heads, self.ensemble_lambda)

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self.combine(self.score_heads(prompts, responses))


# ---- reward-model ensembles ----------------------------------------------------------------------
# Letters: B sequences, k heads. Coste et al. 2023, "Reward model ensembles help mitigate
# overoptimization": k reward models' mean is a better proxy than any one of them, and a conservative
# objective (their UWO, mean - lambda * variance; WCO, the worst member) keeps the policy where the
# members agree. We penalise the std rather than the variance: it is in the reward's units, so lambda
# is a plain number of standard deviations whatever the RM's scale.


def ensemble_std(heads: torch.Tensor) -> torch.Tensor:
    """(B, k) -> (B,) the heads' disagreement: the population std over the k heads,
    sqrt(mean_i (r_i - mean r)^2); 0 for one head or equal heads."""
    return heads.float().std(dim=1, unbiased=False) if heads.shape[1] > 1 else torch.zeros_like(heads[:, 0]).float()


def _mean(heads: torch.Tensor, lam: float) -> torch.Tensor:
    return heads.float().mean(dim=1)


def _mean_minus_std(heads: torch.Tensor, lam: float) -> torch.Tensor:
    """Uncertainty-weighted (Coste et al.'s UWO with the std): mean_i r_i - lam * std_i r_i."""
    return heads.float().mean(dim=1) - lam * ensemble_std(heads)


def _min(heads: torch.Tensor, lam: float) -> torch.Tensor:
    """Worst-case (Coste et al.'s WCO): min_i r_i."""
    return heads.float().min(dim=1).values


# (B, k) head scores, lambda -> (B,) the PPO reward
ENSEMBLE_REWARDS = {"mean": _mean, "mean_minus_std": _mean_minus_std, "min": _min}
assert tuple(ENSEMBLE_REWARDS) == REWARD_ENSEMBLES, "algos.choices.REWARD_ENSEMBLES and the registry disagree"


def conservative_choice(ensemble: str) -> str:
    """The conservative reward the over-optimisation monitor watches when there is no gold scorer: the
    configured one, or mean - lambda * std when PPO trains on the plain mean."""
    return "mean_minus_std" if ensemble == "mean" else ensemble


def bootstrap_counts(n: int, k: int, seed: int) -> torch.Tensor:
    """(k, n) int64: how often each of n training pairs appears in head h's bootstrap resample (n draws
    with replacement; Efron 1979), a pure function of (n, k, seed, h). Head h's loss weighs pair j by
    counts[h, j], so each head fits its own resample of the data while every head shares the one
    forward pass over the batch. Every column sums to about k on average; each row sums to n."""
    rows = []
    for h in range(k):
        g = torch.Generator().manual_seed(epoch_seed(seed, h, "rm-bootstrap"))
        rows.append(torch.bincount(torch.randint(0, n, (n,), generator=g), minlength=n))
    return torch.stack(rows)


def load_classifier(path: str, device, what: str):
    """(model, tokenizer) of a local ...ForSequenceClassification directory on `device`, with a pad token
    (the classifier finds each row's last token through it); ConfigError naming `what` otherwise."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path!r}: cannot load as a sequence classifier ({str(e).splitlines()[0]})") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class ClassifierReward:
    """A local ...ForSequenceClassification directory, frozen: one label -> its logit; several -> the
    logit of `positive_label` (a name from the model's id2label, or an index)."""

    def __init__(self, path: str, device: torch.device, *, positive_label: str | int | None = None,
                 max_length: int = 512, batch_size: int = 16):  # fmt: skip
        self.model, self.tokenizer = load_classifier(path, device, "reward model")
        self.model.eval().requires_grad_(False)
        self.name, self.device, self.max_length, self.batch_size = os.path.basename(path.rstrip("/")), device, \
            max_length, batch_size  # fmt: skip
        self.index = positive_index(self.model.config, positive_label, path)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(responses), self.batch_size):
            texts = [format_sample(p, r) for p, r in zip(prompts[i : i + self.batch_size],
                                                         responses[i : i + self.batch_size])]  # fmt: skip
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length).to(self.device)  # fmt: skip
            out.append(self.model(**enc).logits[:, self.index].float().cpu())
        return check_scores(self.name, torch.cat(out), len(responses))


def positive_index(model_config, label: str | int | None, path: str) -> int:
    """Which logit scores a response: the only one, or the configured positive class."""
    n = model_config.num_labels
    if n == 1:
        return 0
    names = {str(v).lower(): int(k) for k, v in (model_config.id2label or {}).items()}
    if label is None:
        raise ConfigError(f"reward model {path!r} has {n} labels ({', '.join(names)}): name the positive one "
                          "(--reward-positive-label)")  # fmt: skip
    if isinstance(label, int) or str(label).isdigit():
        idx = int(label)
        if not 0 <= idx < n:
            raise ConfigError(f"reward model {path!r}: label index {idx} outside 0..{n - 1}")
        return idx
    if str(label).lower() not in names:
        raise ConfigError(f"reward model {path!r}: no label {label!r} (labels: {', '.join(names)})")
    return names[str(label).lower()]


@dataclass
class RunningMoments:
    """Running mean and variance of scores over all batches seen (Chan et al.'s parallel update), to
    normalise rewards across batches; a checkpoint keeps its state."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def shape_scores(
    scores: torch.Tensor,
    stopped: torch.Tensor,
    *,
    missing_eos_penalty: float | None,
    clip: float | None,
    normalize: str,
    moments: RunningMoments,
) -> torch.Tensor:
    """The score the policy is trained on, from the raw source scores (B,) and whether each response
    stopped (B,): + missing_eos_penalty where it did not (TRL's convention: a negative number), then
    normalised ("batch": this batch's mean/std; "running": the moments of every batch so far, updated
    here), then clipped to [-clip, clip]."""
    s = scores.float().clone()
    if missing_eos_penalty is not None:
        s = torch.where(stopped.to(s.device), s, s + missing_eos_penalty)
    if normalize == "batch" and s.numel() > 1:
        s = (s - s.mean()) / (s.std() + 1e-8)
    elif normalize == "running":
        moments.update(s)
        s = (s - moments.mean) / (moments.std + 1e-8)
    elif normalize not in REWARD_NORMALIZATIONS:
        raise ConfigError(f"reward normalisation {normalize!r}: expected one of {', '.join(REWARD_NORMALIZATIONS)}")
    if clip is not None:
        if not (clip > 0 and math.isfinite(clip)):
            raise ConfigError(f"reward clip {clip}: expected a finite number > 0")
        s = s.clamp(-clip, clip)
    return s

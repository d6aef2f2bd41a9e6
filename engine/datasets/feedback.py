"""Human feedback: JSONL formats, ranked -> pairwise expansion, consensus, labeler agreement.

Two record kinds may be mixed in one JSONL file (README: "Feedback data"):

    pairwise  {"prompt": str, "chosen": str, "rejected": str, "margin"?: float}
    ranked    {"prompt": str, "completions": [str, ...n],
               "rankings"?: [[rank of completion 0, ..., rank of completion n-1] per labeler],
               "labelers"?: [name per ranking], "thumbs"?: [1 | -1 | null per completion]}

A ranking gives each completion its rank, 1 = best, each of 1..n exactly once. A ranked record needs
rankings or thumbs; with rankings, the pairs come from the consensus of the labelers; with thumbs
only, every thumbs-up completion is preferred to every thumbs-down one. The consensus may tie (two
labelers ranking [1, 2] and [2, 1]): a tie is no preference, so it gives no pair and counts neither
for nor against any labeler.

Strict: any other field (a misspelled "labeller" would otherwise silently drop the labeler names) is an
error listing the known ones; a key given as null is an error, not "absent" (leave the key out); a key
given twice, NaN / Infinity, non-UTF-8 bytes and numbers beyond float32 are errors naming file:line.

Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core.config import FLOAT32_MAX, short_repr
from ..core.jsonl import check_fields, read_jsonl, require_str
from ..errors import FeedbackError

LABELERS_FILE = "labelers.json"  # each labeler's agreement report, beside a stage's outputs (rm, dpo)
PAIRWISE_FIELDS = ("prompt", "chosen", "rejected", "margin")
RANKED_FIELDS = ("prompt", "completions", "rankings", "labelers", "thumbs")


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: `chosen` is preferred to `rejected` for `prompt`."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0  # extra margin this pair asks of the reward gap (0: plain Bradley-Terry)
    line: int = 0  # line of the source record in its file (0: built in code)


@dataclass(frozen=True)
class RankedFeedback:
    """n completions of one prompt, ranked by several labelers and/or given thumbs."""

    prompt: str
    completions: tuple[str, ...]
    rankings: tuple[tuple[int, ...], ...] = ()  # [labeler][completion] -> rank, 1 = best
    labelers: tuple[str, ...] = ()  # one name per ranking; positional names "0", "1", ... by default
    thumbs: tuple[int | None, ...] | None = None  # +1 up, -1 down, None unrated, per completion
    line: int = 0


Record = PreferencePair | RankedFeedback


# ---- loading and validation ------------------------------------------------------------------


def load_feedback(path: str) -> list[Record]:
    """Parse a feedback JSONL file; any bad record raises FeedbackError naming `path:line`."""
    return read_jsonl(path, parse_record, FeedbackError)


def parse_record(obj, line: int = 0) -> Record:
    """One JSON object -> PreferencePair or RankedFeedback; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    require_str(obj, "prompt")
    if "chosen" in obj or "rejected" in obj:
        _check_fields(obj, "pairwise", PAIRWISE_FIELDS)
        require_str(obj, "chosen")
        require_str(obj, "rejected")
        if obj["chosen"] == obj["rejected"]:
            raise ValueError("'chosen' and 'rejected' are the same text")
        margin = _number(obj.get("margin", 0.0), "margin")
        return PreferencePair(obj["prompt"], obj["chosen"], obj["rejected"], margin, line)
    if "completions" not in obj:
        raise ValueError("missing key: expected 'chosen' and 'rejected' (pairwise) or 'completions' (ranked)")
    _check_fields(obj, "ranked", RANKED_FIELDS)
    completions = obj["completions"]
    if not isinstance(completions, list) or len(completions) < 2 or not all(isinstance(c, str) for c in completions):
        raise ValueError("'completions' must be a list of at least 2 strings")
    if len(set(completions)) != len(completions):
        raise ValueError("'completions' has the same text twice")
    n = len(completions)
    if "rankings" not in obj and "thumbs" not in obj:
        raise ValueError("missing key 'rankings' (or 'thumbs'): a ranked record needs one of them")
    rankings = obj.get("rankings", [])
    if not isinstance(rankings, list) or ("rankings" in obj and not rankings):
        raise ValueError("'rankings' must be a non-empty list with one ranking per labeler")
    for j, ranking in enumerate(rankings):
        check_ranking(ranking, n, j)
    labelers = obj.get("labelers", [str(j) for j in range(len(rankings))])
    if (
        not isinstance(labelers, list)
        or len(labelers) != len(rankings)
        or not all(isinstance(x, str) for x in labelers)
        or len(set(labelers)) != len(labelers)
    ):
        raise ValueError(f"'labelers' must be {len(rankings)} distinct names, one per ranking")
    thumbs = None
    if "thumbs" in obj:
        if not isinstance(obj["thumbs"], list) or len(obj["thumbs"]) != n:
            got = short_repr(obj["thumbs"])
            raise ValueError(f"'thumbs' must be a list of {n} entries (1, -1 or null per completion), got {got}")
        thumbs = tuple(_thumb(t) for t in obj["thumbs"])
    return RankedFeedback(
        obj["prompt"], tuple(completions), tuple(tuple(r) for r in rankings), tuple(labelers), thumbs, line
    )


def _check_fields(obj: dict, kind: str, known: tuple[str, ...]) -> None:
    check_fields(obj, kind, known, PAIRWISE_FIELDS + RANKED_FIELDS)


def _number(value, key: str) -> float:
    """A JSON number within float32 (the loss is fp32); bools are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key!r} must be a finite number, got {short_repr(value)}")
    try:
        x = float(value)
    except OverflowError:  # an integer of hundreds of digits
        x = math.inf
    if not abs(x) <= FLOAT32_MAX:
        raise ValueError(f"{key!r} must be a finite number within float32 range, got {short_repr(value)}")
    return x


def check_ranking(ranking, n: int, labeler: int = 0) -> None:
    """A ranking is a list of n integer ranks, each of 1..n exactly once (1 = best)."""
    if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        raise ValueError(f"ranking {labeler} must be a list of integer ranks, got {short_repr(ranking)}")
    if len(ranking) != n:
        raise ValueError(f"ranking {labeler} has {len(ranking)} ranks for {n} completions")
    for i, r in enumerate(ranking):
        if not 1 <= r <= n:
            raise ValueError(f"ranking {labeler} gives completion {i} rank {short_repr(r)}, outside 1..{n}")
    for r in range(1, n + 1):
        holders = [i for i, x in enumerate(ranking) if x == r]
        if len(holders) > 1:
            raise ValueError(
                f"ranking {labeler} gives rank {r} twice (completions {holders[0]} and {holders[1]}); "
                f"each rank 1..{n} is used once"
            )


def _thumb(t) -> int | None:
    """A thumb: 1 / true (up), -1 / false (down), null (unrated)."""
    if t is None:
        return None
    if isinstance(t, bool):
        return 1 if t else -1
    if isinstance(t, int) and t in (1, -1):
        return t
    raise ValueError(f"thumb {short_repr(t)}: expected 1 (up), -1 (down), true, false or null")


# ---- consensus, pairs, agreement ---------------------------------------------------------------


def consensus_ranking(rankings: Sequence[Sequence[int]]) -> list[int]:
    """Rank per completion (1 = best) by mean rank across labelers: 1 + the number of completions with a
    lower mean rank (competition ranking).

    Completions with equal mean ranks share a rank ([1, 1, 3]): the consensus is then a partial order,
    and a tie prefers neither completion (breaking it by list position would invent a preference that
    nobody stated, and count it against whichever labeler disagreed with that arbitrary order). Without
    ties this is a strict ranking of 1..n."""
    n = len(rankings[0])
    totals = [sum(r[i] for r in rankings) for i in range(n)]  # integer sums: equal means compare exactly
    return [1 + sum(t < totals[i] for t in totals) for i in range(n)]


def pairs_from_ranking(
    prompt: str, completions: Sequence[str], ranks: Sequence[int], line: int = 0
) -> list[PreferencePair]:
    """Every pair of completions with different ranks, the better completion first: the C(n, 2) pairs of
    a strict ranking; two completions that share a rank (a tie in the consensus) give no pair.

    Pairs come best-first: (1st, 2nd), (1st, 3rd), ..., (2nd, 3rd), ... (tied completions in list order)."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    return [
        PreferencePair(prompt, completions[order[a]], completions[order[b]], 0.0, line)
        for a in range(len(order))
        for b in range(a + 1, len(order))
        if ranks[order[a]] < ranks[order[b]]
    ]


def pairs_from_thumbs(
    prompt: str, completions: Sequence[str], thumbs: Sequence[int | None], line: int = 0
) -> list[PreferencePair]:
    """Every thumbs-up completion preferred to every thumbs-down one (in completion order)."""
    up = [c for c, t in zip(completions, thumbs) if t == 1]
    down = [c for c, t in zip(completions, thumbs) if t == -1]
    return [PreferencePair(prompt, u, d, 0.0, line) for u in up for d in down]


def concordance(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> tuple[int, int]:
    """(concordant, discordant) pair counts of two rankings of the same items; a pair tied in either
    ranking is neither."""
    concordant = discordant = 0
    n = len(ranks_a)
    for i in range(n):
        for k in range(i + 1, n):
            s = (ranks_a[i] - ranks_a[k]) * (ranks_b[i] - ranks_b[k])
            concordant += s > 0
            discordant += s < 0
    return concordant, discordant


def kendall_tau(ranks_a: Sequence[int], ranks_b: Sequence[int]) -> float:
    """Kendall tau-a = (concordant - discordant) / C(n, 2), in [-1, 1] (Kendall 1938); tied pairs count in
    C(n, 2) but in neither count."""
    c, d = concordance(ranks_a, ranks_b)
    n = len(ranks_a)
    return (c - d) / (n * (n - 1) // 2)


@dataclass
class LabelerReport:
    """How one labeler agrees with the consensus, pooled over every prompt they ranked."""

    labeler: str
    prompts: int = 0  # records this labeler ranked
    concordant: int = 0  # completion pairs ordered as the consensus orders them
    discordant: int = 0  # completion pairs ordered the other way (pairs the consensus ties count as neither)
    flagged: bool = False  # tau below the threshold
    lines: list[int] = field(default_factory=list)  # source lines of the records they ranked

    @property
    def tau(self) -> float:
        """Pooled Kendall tau: (concordant - discordant) / pairs."""
        total = self.concordant + self.discordant
        return (self.concordant - self.discordant) / total if total else 1.0

    @property
    def agreement(self) -> float:
        """Share of completion pairs ordered as the consensus orders them: (tau + 1) / 2."""
        total = self.concordant + self.discordant
        return self.concordant / total if total else 1.0

    def to_dict(self) -> dict:
        return dict(
            labeler=self.labeler, prompts=self.prompts, concordant=self.concordant, discordant=self.discordant,
            tau=self.tau, agreement=self.agreement, flagged=self.flagged, lines=self.lines,
        )


def labeler_agreement(records: Sequence[Record], threshold: float = 0.3) -> dict[str, LabelerReport]:
    """Per labeler: agreement with each record's consensus (all labelers included), flagged when
    the pooled Kendall tau is below `threshold`. Records with one ranking carry no signal; completion
    pairs the consensus ties count for and against nobody (a labeler with no untied pair has tau 1)."""
    reports: dict[str, LabelerReport] = {}
    for rec in records:
        if not isinstance(rec, RankedFeedback) or len(rec.rankings) < 2:
            continue
        consensus = consensus_ranking(rec.rankings)
        for name, ranking in zip(rec.labelers, rec.rankings):
            rep = reports.setdefault(name, LabelerReport(name))
            c, d = concordance(ranking, consensus)
            rep.prompts += 1
            rep.concordant += c
            rep.discordant += d
            rep.lines.append(rec.line)
    for rep in reports.values():
        rep.flagged = rep.tau < threshold
    return reports


def build_pairs(
    records: Sequence[Record], threshold: float = 0.3, exclude_flagged: bool = False
) -> tuple[list[PreferencePair], dict[str, LabelerReport]]:
    """Records -> (preference pairs, labeler reports).

    Pairwise records pass through; ranked records give the pairs their consensus orders (mean rank
    over labelers, flagged labelers left out when `exclude_flagged` and someone is left; a tie gives no
    pair); thumbs-only records give up-vs-down pairs."""
    reports = labeler_agreement(records, threshold)
    excluded = {name for name, rep in reports.items() if rep.flagged} if exclude_flagged else set()
    pairs: list[PreferencePair] = []
    for rec in records:
        if isinstance(rec, PreferencePair):
            pairs.append(rec)
        elif rec.rankings:
            kept = [r for name, r in zip(rec.labelers, rec.rankings) if name not in excluded] or list(rec.rankings)
            pairs += pairs_from_ranking(rec.prompt, rec.completions, consensus_ranking(kept), rec.line)
        else:
            pairs += pairs_from_thumbs(rec.prompt, rec.completions, rec.thumbs, rec.line)
    return pairs, reports


def check_completions(records, path: str) -> None:
    """Every completion has visible text: an empty or whitespace-only one is a FeedbackError naming
    `path:line` (a pairwise record's empty strings are already refused by parse_record)."""
    for rec in records:
        if isinstance(rec, PreferencePair):
            texts = {"'chosen'": rec.chosen, "'rejected'": rec.rejected}
        elif isinstance(rec, RankedFeedback):
            texts = {f"completion {i}": c for i, c in enumerate(rec.completions)}
        else:  # pragma: no cover (load_feedback returns the two kinds only)
            continue
        for name, text in texts.items():
            if not text.strip():
                raise FeedbackError(f"{path}:{rec.line}: {name} is empty; DPO needs a completion to score")


def labeler_reports(reports: dict[str, LabelerReport]) -> tuple[dict, list[str]]:
    """(what LABELERS_FILE holds: name -> report, the flagged labelers' names, sorted)."""
    return {name: rep.to_dict() for name, rep in reports.items()}, sorted(n for n, r in reports.items() if r.flagged)

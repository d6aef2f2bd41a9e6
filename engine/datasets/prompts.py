"""Prompt files and held-out splits: `{"prompt": ...}` JSONL (read strictly, written atomically), whole
prompts held out so that held-out metrics are on prompts no step trained on.

Pure Python at import (the seeded split imports torch when called).
"""

from __future__ import annotations

import math
import random

from ..core.files import write_jsonl
from ..core.jsonl import check_fields, read_jsonl, require_str

EVAL_PROMPTS_FILE = "eval_prompts.jsonl"  # the held-out prompts, beside a stage's adapters (`engine eval` reads them)


def load_prompts(path: str) -> list[str]:
    """A prompt file: one {"prompt": "..."} per line."""

    def parse(obj, line):
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        check_fields(obj, "prompt", ("prompt",))
        return require_str(obj, "prompt")

    return read_jsonl(path, parse)


def write_prompts(path: str, prompts: list[str]) -> str:
    """{"prompt": ...} lines, each distinct prompt once in order, written atomically; returns the path."""
    return write_jsonl(path, [{"prompt": p} for p in dict.fromkeys(prompts)])


def split_by_prompt(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out) of items with a `.prompt`: whole prompts are held out (a seeded shuffle of the
    distinct prompts, at least one left for training), so held-out metrics are on unseen prompts."""
    prompts = sorted({x.prompt for x in items})
    random.Random(seed).shuffle(prompts)
    n_eval = math.ceil(eval_fraction * len(prompts)) if eval_fraction > 0 else 0
    n_eval = min(n_eval, len(prompts) - 1)  # keep at least one training prompt
    held = set(prompts[:n_eval])
    return [x for x in items if x.prompt not in held], [x for x in items if x.prompt in held]


def heldout_split(prompts: list[str], eval_fraction: float, seed: int, limit: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): eval_fraction of the prompts held out by a seeded
    permutation (at least one stays for training), the held-out ones cut to `limit`, both in file order."""
    from ..core.order import seeded_permutation

    order = seeded_permutation(len(prompts), seed, 0, name="eval-split")
    n_eval = min(math.ceil(eval_fraction * len(prompts)), len(prompts) - 1) if eval_fraction else 0
    held = sorted(order[:n_eval])
    train = [prompts[i] for i in sorted(order[n_eval:])]
    return train, [prompts[i] for i in held][:limit]

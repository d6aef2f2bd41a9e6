"""Strict JSONL input for every stage (feedback, prompts, SFT data, the constitution): one JSON object
per line, and any bad line is one error naming `file:line` (the CLI prints it as one line, exit 2).

Strict: non-UTF-8 bytes (a BOM may open the file), NaN / Infinity, a key given twice, nesting too deep
for the parser, numbers past Python's digit limit, and fields a record kind does not have are errors.

Pure Python: no torch.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from typing import TypeVar

from ..errors import DataError
from .config import short_repr

T = TypeVar("T")


def read_jsonl(path: str, parse: Callable[[object, int], T], error: type[DataError] = DataError) -> list[T]:
    """parse(object, line) for every non-blank line of `path`; a ValueError from parse (or from the
    JSON itself) becomes `error` with the message "path:line: what is wrong"."""
    try:
        f = open(path, "rb")  # bytes: a bad UTF-8 sequence is then reported on its own line
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror})") from e
    records = []
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                raise error(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from e
            if not text.strip():
                continue
            try:
                records.append(parse(parse_json(text), lineno))
            except ValueError as e:
                raise error(f"{path}:{lineno}: {e}") from e
    if not records:
        raise error(f"{path}: no records")
    return records


def parse_json(text: str):
    """One line of JSON, strictly: no NaN / Infinity, no key twice; ValueError says what is wrong."""
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from e
    except ValueError as e:  # from the hooks, or an integer past Python's 4300-digit conversion limit
        detail = "a number with too many digits" if "digits" in str(e) else str(e)
        raise ValueError(f"not valid JSON ({detail})") from e


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {short_repr(key)} given twice")
        obj[key] = value
    return obj


def check_fields(obj: dict, kind: str, known: tuple[str, ...], vocabulary: tuple[str, ...] = ()) -> None:
    """Reject fields the record kind does not have (a typo would be ignored and change the result);
    `vocabulary` (default: `known`) is where a "did you mean" hint is looked for."""
    unknown = [k for k in obj if k not in known]
    if unknown:
        others = [f for f in (vocabulary or known) if f != unknown[0]]
        close = difflib.get_close_matches(unknown[0], others, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown field {short_repr(unknown[0])}{hint}; {kind} records have: {', '.join(known)}")


def require_str(obj: dict, key: str) -> str:
    """obj[key], which must be a non-empty string."""
    if key not in obj:
        raise ValueError(f"missing key {key!r}")
    if not isinstance(obj[key], str) or not obj[key]:
        raise ValueError(f"{key!r} must be a non-empty string")
    return obj[key]

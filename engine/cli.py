"""Command-line flags generated from a stage's config dataclass, so `--help` is complete and can never
drift from the config: one flag per field, its help the field's comment, its default the preset's.

Precedence: the preset, then a config file (--config FILE: JSON or YAML, the config's fields, with
`stack` and `sampling` as nested objects), then the flags given. Pure Python until a stage runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re

from rlhf_engine.config import ConfigError

_COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.*)$")


def field_comments(cls) -> dict[str, str]:
    """Field name -> its trailing comment in the class source (the house style: one per field)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            m = _COMMENT.match(line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_type(annotation: str):
    """(converter, is_bool, is_tuple) for the annotations configs use."""
    a = annotation.replace(" ", "")
    optional = "|None" in a or "None|" in a
    a = a.replace("|None", "").replace("None|", "")
    if a == "bool":
        return None, True, False, optional
    if a.startswith("tuple["):
        inner = a[len("tuple[") : -1].split(",")[0]
        return {"str": str, "int": int, "float": float}[inner], False, True, optional
    return {"str": str, "int": int, "float": float}[a], False, False, optional


def add_config_flags(parser, cls, defaults, *, skip=(), names: dict[str, str] | None = None, group=None) -> list[str]:
    """One flag per field of dataclass `cls` (values shown from `defaults`), except `skip`; `names`
    renames a field's flag. Returns the destinations added. Tuples take comma-separated values;
    optional numbers take "none"; booleans take true/false (and --no-X for a True default)."""
    comments = field_comments(cls)
    target = group or parser
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(getattr(defaults, f.name)):
            continue
        conv, is_bool, is_tuple, optional = _parse_type(str(f.type))
        default = getattr(defaults, f.name)
        dest = f.name
        help_text = f"{comments.get(f.name, '')} (default: {_show(default)})"
        opt = flag((names or {}).get(f.name, f.name))
        if is_bool:
            target.add_argument(opt, dest=dest, type=_bool, default=None, metavar="true|false", help=help_text)
        elif is_tuple:
            target.add_argument(opt, dest=dest, type=_tuple_of(conv), default=None, metavar="A,B", help=help_text)
        else:
            kind = _optional(conv) if optional else conv
            target.add_argument(opt, dest=dest, type=kind, default=None, help=help_text,
                                metavar={int: "N", float: "X", str: "S"}[conv])  # fmt: skip
        added.append(dest)
    return added


def _show(value) -> str:
    if isinstance(value, tuple):  # strings with whitespace or commas shown quoted (they need --config)
        return ",".join(json.dumps(v) if isinstance(v, str) and (not v.isprintable() or "," in v) else str(v)
                        for v in value) or "none"  # fmt: skip
    if value == "":
        return "none"
    return str(value)


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(conv):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else conv(text)

    parse.__name__ = conv.__name__
    return parse


def _tuple_of(conv):
    def parse(text: str):
        return tuple(conv(x) for x in text.split(",") if x.strip()) if text.strip() else ()

    parse.__name__ = f"list of {conv.__name__}"
    return parse


def read_config_file(path: str) -> dict:
    """A config file as plain data: JSON, or YAML (.yaml / .yml)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"config {path!r}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path!r}: not UTF-8 ({e.reason})") from e
    try:
        if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # JSON and YAML parsers raise their own error types
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"config {path!r}: not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'} "
                          f"({first})") from e  # fmt: skip
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r}: expected an object of config fields, got {type(data).__name__}")
    return data


def given(args, dests: list[str]) -> dict:
    """The flags the user gave (argparse leaves the others None)."""
    return {d: getattr(args, d) for d in dests if getattr(args, d, None) is not None}

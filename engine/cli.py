"""Command-line flags generated from a stage's config dataclass, so `--help` is complete and can never
drift from the config: one flag per field, its help the field's comment, its default the preset's.

Precedence: the preset, then a config file (--config FILE: JSON or YAML, the config's fields, with
`stack` and `sampling` as nested objects), then the flags given. Pure Python until a stage runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import re

from rlhf_engine.config import ConfigError

_COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.*)$")


@functools.lru_cache(maxsize=None)
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


def add_stage(sub, name: str, presets: dict, run, *, help: str, description: str, epilog: str, adjust=None,
              preset_help: str = "tiny: a CPU smoke run; default: a GPU run"):
    """A subcommand over a config dataclass: --preset, --config FILE, one flag per config field (stack
    and sampling fields, where the config has them, in their own groups), --no-resume, --no-progress.
    `adjust(args, data)` may edit the merged data before it becomes a config (a flag that is not a
    field). Returns the parser."""
    from rlhf_engine.config import SamplingConfig, StackConfig

    d = presets["default"]
    nested = tuple(name for name in ("stack", "sampling") if hasattr(d, name))
    p = sub.add_parser(name, help=help, description=description, epilog=epilog)
    p.add_argument("--preset", default="default", choices=sorted(presets),
                   help=f"settings the config file and flags override ({preset_help})")
    nested_help = f" ({' and '.join(nested)} as nested objects)" if nested else ""
    p.add_argument("--config", help=f"JSON or YAML file of config fields{nested_help}")
    flags = {"top": add_config_flags(p, type(d), d, skip=("resume", "progress")) + ["resume", "progress"]}
    if "stack" in nested:
        skip = ("adapters", "seed", "target_modules") + (() if "value" in d.stack.adapters else ("value_mode",))
        flags["stack"] = add_config_flags(p.add_argument_group("model stack"), StackConfig, d.stack, skip=skip)
    if "sampling" in nested:
        flags["sampling"] = add_config_flags(p.add_argument_group("sampling"), SamplingConfig, d.sampling)
    p.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="start over: delete OUT/checkpoint.pt instead of resuming from it")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (transformers' and huggingface_hub's loading bars included)")
    p.set_defaults(func=run, flags=flags, presets=presets, adjust=adjust)
    return p


def stage_config(args):
    """The validated config of an add_stage subcommand: the preset, then --config FILE, then the flags
    given; one --seed for the run and the preset base's init."""
    preset = args.presets[args.preset]
    data = dataclasses.asdict(preset)
    if args.config:
        data = merge(data, read_config_file(args.config))
    data = merge(data, given(args, args.flags["top"]))
    data = merge(data, {group: given(args, dests) for group, dests in args.flags.items() if group != "top"})
    if args.adjust is not None:
        args.adjust(args, data)
    if isinstance(data.get("stack"), dict):
        data["stack"]["seed"] = data["seed"]
    return type(preset).from_dict(data).validate()


def merge(base: dict, override: dict) -> dict:
    """base with override's keys replaced; nested dicts (stack, sampling) merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

"""The config base every stage's config builds on: the run fields (RunConfig), plain data -> config
(from_data, with nested configs), named presets, the merge of a preset, a config file and flags, and
the checks every config shares, written once.

Pure Python: no torch, so `python -m engine <stage> --help` and a bad flag stay fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1; the stack seeds its init with seed + 1
INT_MAX = 2**63 - 1  # every int field must fit an int64 (torch sizes, counters)
FLOAT32_MAX = 3.4028234663852886e38  # losses are fp32: a larger margin is inf there
BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")  # rlhf_kernels' backends (tests check they agree)
DEVICES = ("auto", "cpu", "cuda")
REFERENCES = ("auto", "base", "init")  # the reference policy: resolve_reference


def short_repr(value) -> str:
    """repr of a value cut to one readable piece (a 400-digit number would flood the one-line error)."""
    r = repr(value)
    return r if len(r) <= 40 else f"{r[:24]}...{r[-8:]} ({len(r)} characters)"


# ---- the shared checks ------------------------------------------------------------------------------


def check_fields(config, prefix: str = "") -> None:
    """Every field of a config dataclass (nested ones too) of its annotated type, every float finite and
    every int within int64; the one place a value's type is checked, so `{"max_steps": 2.5}` or
    `{"lr": "fast"}` in a config file is one error line, not a TypeError deep in a stage. An int where a
    float is annotated becomes that float; a list where a tuple is annotated becomes a tuple."""
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, name + ".")
            continue
        if nested_type(f) is not None:  # {"stack": "tiny-llama"}: a nested config given as a plain value
            raise ConfigError(f"{name}={short_repr(value)}: expected an object of {name} fields")
        value = _typed(value, str(f.type), name)
        setattr(config, f.name, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value}: not a finite number")  # a NaN rate trains a NaN model silently
        if isinstance(value, int) and not isinstance(value, bool) and not -INT_MAX - 1 <= value <= INT_MAX:
            raise ConfigError(f"{name}={short_repr(value)}: outside the int64 range")


_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
_PLURAL = {"bool": "true/false values", "int": "integers", "float": "numbers", "str": "strings"}


def _typed(value, annotation: str, name: str):
    """`value` as the annotation's type ("int", "float | None", "tuple[str, ...]", "str | tuple[str, ...]");
    ConfigError when it is not one."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return None
    for a in (a for a in options if a != "None"):
        if a.startswith("tuple[") and isinstance(value, (list, tuple)):
            inner = a[len("tuple[") : -1].split(",")[0].strip()
            return tuple(_typed(v, inner, f"{name}[{i}]") for i, v in enumerate(value))
        if a == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) if isinstance(value, int) and abs(value) < 2**1023 else value
        if a == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if a in ("bool", "str") and type(value).__name__ == a:
            return value
        if a not in _KINDS and not a.startswith("tuple["):
            return value  # an annotation this check does not know (kept as it is)
    kinds = [_KINDS.get(a, f"a list of {_PLURAL.get(a[6:-1].split(',')[0].strip(), 'values')}") for a in options]
    raise ConfigError(f"{name}={short_repr(value)}: expected {' or '.join(kinds).replace('None', 'none')}")


def check_seed(seed: int, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{name}={short_repr(seed)}: expected an integer with 0 <= {name} < 2**63")


def check_out_dir(out: str) -> None:
    """OUT is a directory or can become one: the nearest existing ancestor must be a directory.
    (Whether it can really be created, e.g. under /proc, is found when the run creates it.)"""
    if not out:
        raise ConfigError("out: an output directory is required")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out {out!r}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"out {out!r}: {parent!r} is a file, not a directory")


def check_choice(name: str, value, choices) -> None:
    """`value` is one of `choices` (a config field's enumeration, imported from where the choices live)."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")


def check_at_least(minimum, **values) -> None:
    """Each value (a count) >= minimum."""
    for name, value in values.items():
        if value < minimum:
            raise ConfigError(f"{name}={value}: must be >= {minimum}")


def check_fraction(name: str, value: float) -> None:
    """A share of the data held out: 0 <= f < 1."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}={value}: expected 0 <= f < 1")


def check_agreement_threshold(value: float) -> None:
    if not -1.0 <= value <= 1.0:
        raise ConfigError(f"agreement_threshold={value}: Kendall tau lies in [-1, 1]")


def resolve_reference(reference: str, init_adapter: str) -> str:
    """"base" or "init" for a config's `reference` ("auto": init iff there is a starting adapter)."""
    if reference == "auto":
        return "init" if init_adapter else "base"
    return reference


def check_reference(reference: str, init_adapter: str) -> None:
    check_choice("reference", reference, REFERENCES)
    if reference == "init" and not init_adapter:
        raise ConfigError("reference='init' needs --init-adapter (the adapter the reference copies)")


# ---- configs from plain data --------------------------------------------------------------------------


def from_data(cls, d: dict, what: str = "config"):
    """A `cls` config dataclass from plain data: unknown fields are an error naming the known ones,
    nested configs (stack, sampling) come from nested objects, lists become tuples."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: expected an object of fields, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {what} fields: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    values = {}
    for name, value in d.items():
        nested = nested_type(fields[name])
        if nested is not None and isinstance(value, dict):
            value = from_data(nested, value, name)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def nested_type(f: dataclasses.Field):
    """The config dataclass a field holds (from its default), or None."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
        return type(default) if dataclasses.is_dataclass(default) else None
    return type(f.default) if dataclasses.is_dataclass(f.default) else None


def merge(base: dict, override: dict) -> dict:
    """base with override's keys replaced; nested dicts (stack, sampling) merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset(presets: dict, name: str, **overrides):
    """A copy of presets[name] with fields replaced; nested configs (stack, sampling) take dicts whose
    keys replace theirs. Unknown names are an error."""
    if name not in presets:
        raise ConfigError(f"preset {name!r}: expected one of {', '.join(presets)}")
    config = from_data(type(presets[name]), merge(dataclasses.asdict(presets[name]), overrides))
    check_fields(config)  # a Python caller's max_steps=2.5 is the CLI's one error line, not a later TypeError
    return config


def read_config_file(path: str) -> dict:
    """A config file as plain data: JSON, or YAML (.yaml / .yml)."""
    from .files import read_text

    text = read_text(path, f"config {path!r}")
    yaml_file = os.path.splitext(path)[1].lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # JSON and YAML parsers raise their own error types
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"config {path!r}: not valid {'YAML' if yaml_file else 'JSON'} ({first})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path!r}: expected an object of config fields, got {type(data).__name__}")
    return data


# ---- the run fields every training stage carries ----------------------------------------------------------


@dataclass
class RunConfig:
    """What every training stage's config carries: where the run lives and how it is seeded, logged,
    checkpointed and resumed (`core.run.Run` reads these fields). A stage's config subclasses it, adds
    its own fields, names its input files in INPUT_FILES (and input_paths) and extends RESUMABLE_CHANGES."""

    out: str = ""  # output directory: checkpoint.pt, metrics.jsonl, result.json, the stage's files; locked in use
    seed: int = 0  # seeds python/numpy/torch when the run opens, the data order and the init; 0 <= seed < 2**63
    log_every: int = 1  # write a metrics row every this many steps (and at the last one)
    checkpoint_every: int = 50  # write checkpoint.pt every this many steps (and at the last one)
    resume: bool = True  # continue from OUT/checkpoint.pt when it exists; False starts over and deletes it
    progress: bool = True  # tqdm bar; False also silences transformers' and huggingface_hub's loading bars

    # Fields a resumed run may change; any other difference from the checkpoint's config is refused.
    RESUMABLE_CHANGES = ("out", "log_every", "checkpoint_every", "resume", "progress")
    # Fields naming required input files (each must exist); with everything else the run reads they make
    # input_paths(), whose sha256 goes into the checkpoint (the path itself may change: a moved file with
    # the same bytes resumes).
    INPUT_FILES = ()

    def input_paths(self) -> dict[str, str]:
        """Every file the run reads, label -> path: the INPUT_FILES fields, and what a stage adds (the files
        of an adapter directory, a reward function's source, the shipped constitution). core.run hashes
        them into the checkpoint, and a resume refuses any whose content changed."""
        return {name: getattr(self, name) for name in self.INPUT_FILES}

    def validate(self) -> RunConfig:
        check_seed(self.seed)
        check_fields(self)
        check_out_dir(self.out)
        if min(self.log_every, self.checkpoint_every) < 1:
            raise ConfigError(
                f"log_every={self.log_every}, checkpoint_every={self.checkpoint_every}: both must be >= 1"
            )
        for name in self.INPUT_FILES:
            path = getattr(self, name)
            if not path:
                raise ConfigError(f"{name}: an input file is required")
            if not os.path.isfile(path):
                raise ConfigError(f"{name} {path!r}: no such file")
        return self

    def check_inputs(self) -> None:
        """Read the stage's input files strictly (pure Python): the CLI calls this before torch and a
        model load, so a bad data line fails at once. Stages override it."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """A config from plain data (a JSON/YAML config file, a checkpoint, the CLI): see from_data."""
        return from_data(cls, d)


# ---- a stage's command line -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A stage's command line (`python -m engine <name>`), declared beside its config: the CLI (cli.py)
    builds --preset, --config FILE and one flag per config field from it, checks the config and its
    inputs (`config.check_inputs()`), and only then imports and calls `run`."""

    name: str  # the subcommand
    presets: dict  # preset name -> config ("default" is the base of the flags)
    run: str  # "module:function" inside the package, e.g. "stages.rm:train_reward_model"; run(config) -> result
    help: str  # its line in `python -m engine --help`
    description: str  # what `--help` says of it
    epilog: str  # an example command
    preset_help: str = "tiny: a CPU smoke run; default: a GPU run"  # what the presets are for
    flags: Callable | None = None  # flags(parser): flags that are not config fields (ppo's --group-size)
    defaults: Callable | None = None  # defaults(args, data): edit the preset's data before the file and flags
    adjust: Callable | None = None  # adjust(args, data): edit the merged data before it becomes a config

"""The command line: one subcommand per stage, each built from the stage's config and its `Command`
(declared beside the config), so `--help` is complete and can never drift from the config: one flag
per field, its help the field's comment, its default the preset's.

    python -m engine pipeline --quick
    python -m engine sft --model tiny-llama --out runs/sft
    python -m engine rm --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/rm
    python -m engine dpo --data examples/feedback_ranked.jsonl --model tiny-llama --out runs/dpo
    python -m engine ppo --preset tiny --reward-fn MODULE:FUNCTION --out runs/ppo
    python -m engine eval --policy runs/ppo --reward-fn MODULE:FUNCTION
    python -m engine cai revise --model tiny-llama --out runs/cai-sft
    python -m engine cai label --model tiny-llama --out runs/cai-prefs

Settings: the preset, then a config file (--config FILE: JSON or YAML of the config's fields, `stack`
and `sampling` as nested objects), then the flags given (an explicit `none` included). The config and
its input files are checked before torch and a model load (pure Python until a stage runs).

Every error a user can act on prints one `error: ...` line, never a traceback. Exit status: 0 done;
2 a bad option, path, config, data line or checkpoint, an OUT that cannot be written, or OUT in use
by another run; 3 the run stopped on a non-finite loss, gradient norm or weight (the last good
checkpoint is kept); 4 the run stopped because its file system refused a write (disk full: every
file written before is intact, and the same command resumes); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import sys

from .core.config import Command, merge, read_config_file
from .errors import EngineError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's status for SIGINT
# the modules whose COMMAND (or COMMANDS, under "cai") make the subcommands, in --help order
COMMAND_MODULES = ("pipeline.pipeline_config", "stages.sft_config", "stages.rm_config", "stages.ppo_config",
                   "stages.eval_config", "stages.dpo_config")  # fmt: skip
NESTED = ("stack", "sampling")  # nested configs, each a flag group of its own
_COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.*)$")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of the CLI."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# ---- flags from a config dataclass ------------------------------------------------------------------


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
    """(converter, is_bool, is_tuple, optional) for the annotations configs use."""
    a = annotation.replace(" ", "")
    optional = "|None" in a or "None|" in a
    a = a.replace("|None", "").replace("None|", "")
    if a == "bool":
        return None, True, False, optional
    if a.startswith("tuple["):
        inner = a[len("tuple[") : -1].split(",")[0]
        return {"str": str, "int": int, "float": float}[inner], False, True, optional
    return {"str": str, "int": int, "float": float}[a], False, False, optional


def add_config_flags(parser, cls, defaults, *, skip=()) -> list[str]:
    """One flag per field of dataclass `cls` (values shown from `defaults`), except `skip`. Returns the
    destinations added; a flag not given is absent from the parsed namespace. Tuples take comma-separated
    values; optional fields take "none"; booleans take true/false (the flag alone: true)."""
    comments = field_comments(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(getattr(defaults, f.name)):
            continue
        conv, is_bool, is_tuple, optional = _parse_type(str(f.type))
        help_text = f"{comments.get(f.name, '')} (default: {_show(getattr(defaults, f.name))})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if is_bool:
            parser.add_argument(flag(f.name), type=_bool, metavar="true|false", nargs="?", const=True, **kwargs)  # alone: true
        elif is_tuple:
            parser.add_argument(flag(f.name), type=_tuple_of(conv), metavar="A,B", **kwargs)
        else:
            parser.add_argument(flag(f.name), type=_optional(conv) if optional else conv,
                                metavar={int: "N", float: "X", str: "S"}[conv], **kwargs)  # fmt: skip
        added.append(f.name)
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


def given(args, dests: list[str]) -> dict:
    """The flags the user gave, with their values (None for an explicit `none`)."""
    return {d: getattr(args, d) for d in dests if hasattr(args, d)}


# ---- subcommands ------------------------------------------------------------------------------------


def add_command(sub, command: Command) -> argparse.ArgumentParser:
    """A subcommand over a stage's config: --preset (where there are several), --config FILE, one flag per
    config field (the stack's and the sampling's, where the config has them, in their own groups),
    --no-resume / --no-progress (= --resume false / --progress false) where the config has those fields,
    and the command's own flags."""
    from .model.config import SamplingConfig, StackConfig

    d = command.presets["default"]
    nested = [name for name in NESTED if hasattr(d, name)]
    p = sub.add_parser(command.name, help=command.help, description=command.description, epilog=command.epilog)
    if len(command.presets) > 1:
        p.add_argument("--preset", choices=sorted(command.presets), default=argparse.SUPPRESS,
                       help=f"settings the config file and flags override ({command.preset_help})")  # fmt: skip
    nested_help = f" ({' and '.join(nested)} as nested objects)" if nested else ""
    p.add_argument("--config", help=f"JSON or YAML file of config fields{nested_help}")
    switches = [name for name in ("resume", "progress") if hasattr(d, name)]
    flags = {"top": add_config_flags(p, type(d), d)}
    if "stack" in nested:
        skip = ("adapters", "seed", "target_modules") + (() if "value" in d.stack.adapters else ("value_mode",)) \
            + (() if "reward" in d.stack.adapters else ("reward_heads",))  # PPO reads an RM's heads from its directory
        flags["stack"] = add_config_flags(p.add_argument_group("model stack"), StackConfig, d.stack, skip=skip)
    if "sampling" in nested:
        flags["sampling"] = add_config_flags(p.add_argument_group("sampling"), SamplingConfig, d.sampling)
    if "resume" in switches:
        p.add_argument("--no-resume", dest="resume", action="store_false", default=argparse.SUPPRESS,
                       help="start over: delete OUT/checkpoint.pt instead of resuming from it")  # fmt: skip
    if "progress" in switches:
        p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                       help="no progress bars (transformers' and huggingface_hub's loading bars included)")  # fmt: skip
    if command.flags is not None:
        command.flags(p)
    p.set_defaults(stage=command, flags=flags)
    return p


def stage_config(args):
    """The validated config of a subcommand: the preset, then --config FILE, then the flags given; one
    --seed for the run and the preset base's init."""
    command: Command = args.stage
    preset = command.presets[getattr(args, "preset", "default")]
    data = dataclasses.asdict(preset)
    if command.defaults is not None:
        data = command.defaults(args, data)
    if args.config:
        data = merge(data, read_config_file(args.config))
    data = merge(data, given(args, args.flags["top"]))
    # only the groups with a flag given: an empty {} would replace a config file's (bad) non-object "stack"
    groups = {group: given(args, dests) for group, dests in args.flags.items() if group != "top"}
    data = merge(data, {group: flags for group, flags in groups.items() if flags})
    if command.adjust is not None:
        command.adjust(args, data)
    if isinstance(data.get("stack"), dict) and "seed" in data:
        data["stack"]["seed"] = data["seed"]
    return type(preset).from_dict(data).validate()


def _package_object(path: str):
    """ "module:name" inside this package -> the object (imported now: the heavy imports happen here)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)


def run_command(args) -> int:
    config = stage_config(args)
    config.check_inputs()  # data files read strictly before torch and a model load: a bad line fails at once
    result = _package_object(args.stage.run)(config)
    if os.environ.get("RANK", "0") == "0":  # one summary per job (torchrun starts one process per rank)
        print(SUMMARIES[args.stage.name](result, config))
    return 0


# ---- what each command prints when it is done --------------------------------------------------------


def _n(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _eval_summary(report, config) -> str:
    from .stages.eval import format_report

    return format_report(report)


def _pipeline_summary(report, config) -> str:
    from .pipeline.report import format_table

    return (f"\n{format_table(report)}\n\npipeline: {report['total_seconds']:.0f} s; report in "
            f"{os.path.join(config.out, 'report.md')}")  # fmt: skip


SUMMARIES = {
    "pipeline": _pipeline_summary,
    "eval": _eval_summary,
    "sft": lambda r, c: (f"sft: {r.steps} steps ({r.train_examples} train examples), held-out loss "
                         f"{_n(r.eval_loss_start)} -> {_n(r.eval_loss)} on {r.eval_examples} examples; saved to {r.out}"),
    "rm": lambda r, c: (f"rm: {r.steps} steps ({r.train_pairs} train pairs), held-out accuracy {_n(r.eval_accuracy)} "
                        f"on {r.eval_pairs} pairs; flagged labelers: {', '.join(r.flagged_labelers) or 'none'}; "
                        f"saved to {r.out}"),
    "ppo": lambda r, c: (f"ppo: {r.steps} steps{' (reward threshold reached)' if r.stopped_at_threshold else ''}, "
                         f"held-out reward {'n/a' if r.eval_reward_mean is None else f'{r.eval_reward_mean:.4f}'} "
                         f"on {r.eval_prompts} prompts; saved to {r.out}"),
    "dpo": lambda r, c: (f"dpo ({c.loss_type}, reference {r.reference}): {r.steps} steps ({r.train_pairs} train "
                         f"pairs), held-out accuracy {_n(r.eval_accuracy)} on {r.eval_pairs} pairs; flagged "
                         f"labelers: {', '.join(r.flagged_labelers) or 'none'}; saved to {r.out}"),
    "revise": lambda r, c: (f"cai revise: {r.prompts} prompts -> {r.sft_records} SFT records ({r.empty_revisions} "
                            f"empty revisions left out); wrote {', '.join(r.files)}"),
    "label": lambda r, c: (f"cai label: {r.prompts} prompts, {r.comparisons} comparisons (both orders agree on "
                           f"{_n(r.consistent_fraction)}) -> {r.preference_records} preference records; wrote "
                           f"{', '.join(r.files)}"),
}  # fmt: skip


# ---- the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m engine",
        description="Kernel-backed RLHF engine: one 4-bit base serves the policy, reference, value and reward roles.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        add_command(sub, _package_object(f"{module}:COMMAND"))
    from .stages import cai_config  # two stages under one command: cai revise | label

    p = sub.add_parser("cai", help=cai_config.CAI_HELP, description=cai_config.CAI_DESCRIPTION,
                       epilog=cai_config.CAI_EPILOG)  # fmt: skip
    stages = p.add_subparsers(dest="cai_stage", required=True, metavar="STAGE")
    for command in cai_config.COMMANDS:
        add_command(stages, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except EngineError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever the message
        return getattr(e, "exit_status", EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted; the same command resumes from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED

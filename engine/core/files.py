"""Files a run writes and reads: atomic writes, strict JSON (RFC 8259: no NaN / Infinity), JSON lines,
metrics rows, content hashes.

Pure Python: values with a `tolist` (tensors, numpy scalars) are turned into plain JSON values without
importing torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping

from ..errors import CheckpointError, ConfigError
from .jsonl import parse_json

# The files of a run's OUT (core.run.Run writes them)
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"  # the run's stage and full config, for people and later stages (engine eval)
TENSORBOARD_DIR = "tensorboard"  # event files, when the tensorboard package is installed

# mkstemp creates 0600 files; written files get the usual 0666 & ~umask (read once, at import)
_UMASK = os.umask(0o022)
os.umask(_UMASK)
# atomic_write's temp files: .<target>.<pid>.<random>.tmp, so two writers never share one
_TEMP_NAME = re.compile(r"^\..+\.\d+\.[^.]+\.tmp$")


def fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable (the rename itself lives in the directory's inode)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable) -> None:
    """Write `path` through write(binary file): a temp file in the same directory, named for this
    writer alone (pid + random suffix, created O_EXCL), fsync-ed, then os.replace-d over `path` and
    the directory fsync-ed. A reader (or a crash) sees the old content or the new, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def is_temp_file(name: str) -> bool:
    """A temp file of atomic_write (a writer that died leaves one; the run holding OUT removes it)."""
    return bool(_TEMP_NAME.match(name))


def plain(obj):
    """obj with tensors, numpy scalars and dataclasses turned into JSON values and every non-finite
    float into None: JSON has no NaN or Infinity (json.dumps would write the invalid tokens)."""
    if hasattr(obj, "detach"):  # a torch tensor
        obj = obj.detach().cpu().tolist()
    elif hasattr(obj, "dtype") and callable(getattr(obj, "item", None)):  # a numpy scalar or 0-d array
        obj = obj.tolist()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON (RFC 8259): non-finite numbers become null, never NaN / Infinity."""
    return json.dumps(plain(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj) -> str:
    """Strict JSON written atomically; returns the path."""
    text = dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def write_jsonl(path: str, rows) -> str:
    """Strict JSON lines written atomically (the parent directory created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = "".join(dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file's content; ConfigError `<what>: cannot read (...)` or `<what>: not UTF-8 (...)`."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: not UTF-8 ({e.reason})") from e


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics JSONL file. A last line without its newline is what a crash mid-write
    leaves: it is dropped. Any other unreadable line is a CheckpointError naming file:line."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for lineno, line in enumerate(lines[:-1], start=1):  # lines[-1]: "" or the partial last line
        if not line.strip():
            continue
        try:
            row = parse_json(line.decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError too
            raise CheckpointError(f"{path}:{lineno}: not a metrics row ({e}); fix or delete the file") from e
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise CheckpointError(f"{path}:{lineno}: not a metrics row (no integer 'step'); fix or delete the file")
        rows.append(row)
    return rows


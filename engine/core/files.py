"""Files a run writes and reads: atomic writes, strict JSON (RFC 8259: no NaN / Infinity), JSON lines,
metrics rows, content hashes.

Pure Python: values with a `tolist` (tensors, numpy scalars) are turned into plain JSON values without
importing torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping

from ..errors import CheckpointError, ConfigError, WriteError
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


def _write_temp(path: str, write: Callable) -> str:
    """write(binary file) into a temp file beside `path`, named for this writer alone (pid + random suffix,
    created O_EXCL), with the usual mode and fsync-ed; returns its path (removed again on any error)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: str, write: Callable) -> None:
    """Write `path` through write(binary file): a temp file in the same directory, fsync-ed, then
    os.replace-d over `path` and the directory fsync-ed. A reader (or a crash) sees the old content or the
    new, never a mix."""
    atomic_write_files([(path, write)])


def atomic_write_files(files: list[tuple[str, Callable]]) -> None:
    """atomic_write for a set of files that belong together (an adapter, its heads and stack.json): every
    temp file is written and fsync-ed first, and only then are they renamed over their targets, in order.
    A failure while writing (a full disk) leaves every old file as it was; only a kill between two
    renames, which cannot fail for want of space, mixes old and new files."""
    temps = []
    try:
        for path, write in files:
            temps.append((_write_temp(path, write), path))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for directory in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p, _ in files):
        fsync_dir(directory)


def atomic_write_dir(path: str, write: Callable[[str], None]) -> None:
    """Write the directory `path` through write(temp directory) (a save_pretrained), atomically: the temp
    directory beside it gets every file with the usual mode, each fsync-ed, and then replaces `path`
    (the old one renamed aside first, then removed). A failure while writing leaves the old directory as
    it was; a kill between the two renames leaves it under its temp name, which the next run removes."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
    try:
        write(tmp)
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fchmod(f.fileno(), 0o666 & ~_UMASK)
                    os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        remove_temp(tmp)
        raise
    fsync_dir(parent)
    if old is not None:
        remove_temp(old)


def remove_temp(path: str) -> None:
    """Remove a temp file or directory of the atomic writers, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _Sink:
    """A binary file that remembers the OSError its write raised: torch.save turns it into a RuntimeError
    ("unexpected pos ...") that no longer says the disk was full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_through(f, save: Callable) -> None:
    """save(file) into the binary file f (torch.save's writer); an OSError of a write (ENOSPC) comes out
    as itself, whatever the saver wraps it in."""
    sink = _Sink(f)
    try:
        save(sink)
    except Exception as e:
        if sink.error is not None and e is not sink.error:
            raise sink.error from e
        raise


def probe_writable(directory: str, what: str = "out") -> None:
    """Create `directory` if needed and create and remove a file in it, so an OUT that cannot be written
    (under /proc, a read-only mount, no permission) is one ConfigError before any work starts, not an
    OSError after it."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f".probe.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {directory!r}: cannot write there ({e.strerror})") from e


# errno values with which a file system refuses a write (rather than a path being wrong)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})


def write_error(e: BaseException, out: str, then: str) -> WriteError | None:
    """The WriteError for an OSError with which the file system refused a write under `out` (disk full,
    quota, read-only), with `then` saying what is kept and how to go on; None for any other exception."""
    if not isinstance(e, OSError) or e.errno not in WRITE_ERRNOS:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return WriteError(f"cannot write to {out}{where}: {e.strerror or e}; {then}")


@contextlib.contextmanager
def writing(out: str, then: str) -> Iterator[None]:
    """Turn a file system's refusal to write (write_error) inside the block into one WriteError line."""
    try:
        yield
    except OSError as e:
        err = write_error(e, out, then)
        if err is None:
            raise
        raise err from e


def is_temp_file(name: str) -> bool:
    """A temp file or directory of the atomic writers (a writer that died leaves one; the run holding OUT
    removes it with remove_temp)."""
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


def check_safetensors(path: str) -> None:
    """A safetensors file is whole: its header parses and the tensors it describes end exactly where the
    file does (a copy cut short or a file overwritten mid-write fails here, with one ConfigError naming
    it, not inside the loader as "SafetensorError: incomplete metadata"). Reads the header only; pure
    Python, so the CLI checks adapters and model directories before torch loads."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"{size} bytes: no complete header")
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            raise ValueError(f"{size} bytes, its header describes {8 + n + max(ends, default=0)}")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ConfigError(f"{path}: truncated or corrupt safetensors file ({e})") from e


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


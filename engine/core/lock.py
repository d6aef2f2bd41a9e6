"""The lock on OUT: one run at a time per output directory.

Pure Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from ..errors import ConfigError, RunLockedError

LOCK_FILE = "run.lock"


class OutputLock:
    """An exclusive flock on OUT/run.lock, which holds the holder's pid.

    flock, not a pid file: the kernel drops the lock when the holder's last descriptor closes, so a
    SIGKILL-ed run never blocks the next one and no stale-pid guessing is needed. The lock belongs to
    an open file description, so a second Run on the same OUT is refused inside one process too."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_FILE)
        self._file = None

    def acquire(self) -> None:
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise ConfigError(f"out {self.out!r}: cannot create {LOCK_FILE} ({e.strerror})") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._holder(f)
            f.close()
            raise RunLockedError(f"{self.out} is in use by pid {pid}") from None
        except OSError as e:
            f.close()
            raise ConfigError(f"out {self.out!r}: cannot lock {LOCK_FILE} ({e.strerror})") from e
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    @staticmethod
    def _holder(f) -> str:
        """The holder's pid; it writes it right after locking, so wait a moment for it."""
        for _ in range(20):
            f.seek(0)
            text = f.read().strip()
            if text.isdigit():
                return text
            time.sleep(0.025)
        return "unknown"

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.truncate(0)  # no stale pid after a clean exit (still holding the lock here)
            self._file.close()  # closing the last descriptor drops the flock
            self._file = None

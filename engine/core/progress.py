"""Progress: tqdm bars for long work, and switching transformers' and huggingface_hub's own bars off
when a run's progress is off.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "batch", initial: int = 0):
    """A tqdm bar on stderr (disabled: a no-op bar with the same methods)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=sys.stderr)


def note(line: str) -> None:
    """One line on stderr that leaves a running progress bar intact (tqdm.write)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


@contextlib.contextmanager
def hub_progress(enabled: bool) -> Iterator[None]:
    """With progress off, transformers' and huggingface_hub's own bars ("Loading weights", downloads)
    are off too for the run, and restored afterwards."""
    if enabled:
        yield
        return
    restore = []
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    if importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    try:
        yield
    finally:
        for fn in reversed(restore):
            fn()

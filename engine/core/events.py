"""TensorBoard events of a run (OUT/tensorboard), written when the tensorboard package is installed: the
metrics rows as scalars, always the same steps as OUT/metrics.jsonl.

A run that starts over deletes the old event files, and a resumed one rewrites them from the metrics rows
it keeps (those up to its checkpoint): TensorBoard would otherwise draw the old run's curves, or the
steps past the checkpoint twice, in the same plots.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Mapping


class Events:
    """The scalars of one run's metrics rows in `directory`, tagged "<stage>/<key>"."""

    def __init__(self, directory: str, stage: str):
        self.directory, self.stage = directory, stage
        self._writer = None  # a SummaryWriter once made; False when tensorboard is not installed

    def restart(self, rows: list[Mapping]) -> None:
        """Delete every event file, then write `rows` again (a resumed run's kept rows; none when fresh)."""
        shutil.rmtree(self.directory, ignore_errors=True)
        for row in rows:
            self.add(row)

    def add(self, row: Mapping) -> None:
        """One metrics row ({"step": ..., key: number, ...}); keys that are not numbers are skipped."""
        writer = self._get()
        if writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                writer.add_scalar(f"{self.stage}/{k}", v, row["step"])
        writer.flush()

    def _get(self):
        if self._writer is None:
            self._writer = False
            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(self.directory)
        return self._writer or None

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        self._writer = None

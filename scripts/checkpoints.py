"""Checkpoints that survive a kill: atomic writes, and finding the one to resume from."""

from __future__ import annotations

import glob
import os
import re

from monai.handlers import CheckpointSaver

_ITERATION = re.compile(r"iteration=(\d+)\.pt$")


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` writing every file atomically (temporary file, then rename),
    so a kill at any moment leaves the previous checkpoint intact instead of half a file. (The files are then
    readable by their owner only, as with any ``tempfile``.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The checkpoint with the highest iteration in ``checkpoint_dir`` (interval or final), or None if none."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir, "*.pt")):
        match = _ITERATION.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), os.path.getmtime(path), path))
    return max(found)[2] if found else None

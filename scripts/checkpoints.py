"""Checkpoints that survive a kill: atomic writes, and finding the one to resume from."""

from __future__ import annotations

import glob
import json
import os
import re
import zipfile

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointSaver

from scripts.errors import KeyMorphInputError
from scripts.transform_io import write_atomically

_ITERATION = re.compile(r"iteration=(\d+)\.pt$")


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` writing every file atomically (temporary file, then rename),
    so a kill at any moment leaves the previous checkpoint intact instead of half a file. (The files are then
    readable by their owner only, as with any ``tempfile``.)

    An iteration-level interval checkpoint due on the last iteration of an epoch is written when the epoch has
    completed, after the epoch-end handlers attached before this one (LR schedule step, validation): written at
    the iteration's end it would hold the state before them, and a run resumed from it would skip them (its LR
    schedule one epoch behind).

    The best model (``key_metric_filename``, e.g. ``model_best.pt``) is the best of the whole run, across resumes:
    its score goes into a record beside it (``model_best.json``), and a resumed run replaces it only with a better
    one (MONAI's saver alone forgets the best score when the process ends, so the first validation after a resume
    would overwrite the model of a better one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True
        best_model = getattr(getattr(self._key_metric_checkpoint, "save_handler", None), "filename", None)
        self._best_record = None
        if best_model is not None:
            self._best_record = os.path.join(self.save_dir, os.path.splitext(best_model)[0] + ".json")
            if os.path.isfile(self._best_record) and os.path.isfile(os.path.join(self.save_dir, best_model)):
                with open(self._best_record) as record:
                    score = json.load(record)["score"]
                self._key_metric_checkpoint._saved = [Checkpoint.Item(score, best_model)]

    def metrics_completed(self, engine: Engine) -> None:
        """Save the best model when the key metric beats the run's best so far, and record its score."""
        before = list(self._key_metric_checkpoint._saved)
        super().metrics_completed(engine)
        saved = self._key_metric_checkpoint._saved
        if self._best_record is not None and saved and saved != before:
            write_atomically(self._best_record, lambda path: _write_json(path, {"score": float(saved[-1].priority)}))

    def attach(self, engine: Engine) -> None:
        if self._interval_checkpoint is None or self.epoch_level:
            super().attach(engine)
            return
        interval, self._interval_checkpoint = self._interval_checkpoint, None
        try:
            super().attach(engine)  # final and key-metric checkpoints as MONAI attaches them
        finally:
            self._interval_checkpoint = interval

        def due(engine: Engine) -> bool:
            return engine.state.iteration % self.save_interval == 0

        def epoch_end(engine: Engine) -> bool:
            return bool(engine.state.epoch_length) and engine.state.iteration % engine.state.epoch_length == 0

        engine.add_event_handler(
            Events.ITERATION_COMPLETED(event_filter=lambda e, _: due(e) and not epoch_end(e)), self.interval_completed
        )
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=lambda e, _: due(e)), self.interval_completed)


def _write_json(path: str, content: dict) -> None:
    with open(path, "w") as file:
        json.dump(content, file)


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` cannot be a checkpoint ``torch.load`` reads, or None when it looks sound.

    ``torch.save`` writes a zip archive whose directory is at the end of the file, so reading that directory (not
    the tensors) cheaply finds truncated, empty or foreign files.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        return f"unreadable checkpoint ({error})"
    if not any(name.endswith("data.pkl") for name in names):
        return "not a PyTorch checkpoint (no data.pkl in the archive)"
    return None


def latest_checkpoint(checkpoint_dir: str) -> str | None:
    """The checkpoint with the highest iteration in ``checkpoint_dir`` (interval or final), or None if none.

    Raises :class:`KeyMorphInputError` (one line naming the file) when that checkpoint is unreadable, e.g. truncated
    by a full disk or an interrupted copy: resuming from an older one or from scratch instead would go unnoticed.
    """
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir, "*.pt")):
        match = _ITERATION.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), os.path.getmtime(path), path))
    if not found:
        return None
    path = max(found)[2]
    problem = checkpoint_problem(path)
    if problem:
        raise KeyMorphInputError(
            f"{path}: {problem}; delete or move it to resume from the checkpoint before it, or use another output_dir"
        )
    return path


def shared_latest_checkpoint(checkpoint_dir: str) -> str | None:
    """:func:`latest_checkpoint` as rank 0 finds it, on every rank of an initialized process group (multi-process
    training: all ranks resume from the same file whatever they would see themselves); else latest_checkpoint."""
    if not (dist.is_available() and dist.is_initialized()):
        return latest_checkpoint(checkpoint_dir)
    choice = [latest_checkpoint(checkpoint_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def is_iteration_checkpoint(file_name: str) -> bool:
    """Whether ``file_name`` is an interval or final checkpoint of a training run (``...iteration=N.pt``)."""
    return _ITERATION.search(file_name) is not None


def load_state_dict(ckpt_path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The network's state dict from ``ckpt_path``: a plain state dict (``models/model.pt``, ``model_best.pt``) or
    a training checkpoint that holds it under ``"model"`` (``CheckpointSaver``'s format). Raises ``ValueError`` when
    the file holds something else."""
    checkpoint = torch.load(ckpt_path, map_location=device, weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{ckpt_path}: not a state dict (got {type(checkpoint).__name__})")
    return checkpoint


def load_network_weights(network, path: str) -> None:
    """Load a network's weights from ``path`` (:func:`load_state_dict`)."""
    network.load_state_dict(load_state_dict(path))

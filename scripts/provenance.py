"""What produced a case's results, recorded next to them so that a rerun never keeps outputs made otherwise.

Each finished case folder holds ``provenance.json``: the sha256 of the fixed image, of the moving image and of its
mask and accompanying images (``apply_to``) when it has them, the settings that change results (skull stripping,
aligner, turn search, refinement, network and grid sizes) and the sha256 of the weights. A rerun into the same
OUT_DIR compares the record of each finished case with what it would use now: a case recorded otherwise (a new
fixed image, other settings or weights, an edited input) or without a record is REDONE, and its summary row says
what changed; ``--overwrite true`` redoes every case. Paths are recorded for the reader but not compared, so a
moved input folder does not redo anything.

The record also holds the case's ``summary.csv`` row (:data:`SUMMARY_ROW_KEY`; not compared), written with the
folder: a rerun that skips the case takes its row from there, so a run killed after putting the folder in place but
before adding the row to ``summary.csv`` loses nothing. The rerun reads the record once
(:class:`scripts.inference.RegistrationDataset`, which compares it) and hands the row on with the skipped case to
the writer (:mod:`scripts.case_outputs`).
"""

from __future__ import annotations

import json
import os

from scripts.hashes import file_hash

PROVENANCE_FILE = "provenance.json"
#: The key of the case's summary row (status, message, QC scores, seconds) in the record.
SUMMARY_ROW_KEY = "summary_row"
# The fields compared between a record and a rerun, and how a difference reads in the summary.
COMPARED = {
    "fixed_sha256": "the fixed image",
    "moving_sha256": "the moving image",
    "mask_sha256": "the brain mask",
    "extra_sha256": "the accompanying images",
    "weights_sha256": "the weights",
}


class RunProvenance:
    """The record of a run's cases (see the module docstring).

    Args:
        ckpt_path: the weights file.
        settings: the settings that change results, as plain JSON values (``configs/inference.yaml`` lists them).
    """

    def __init__(self, ckpt_path: str, settings: dict):
        self.settings = json.loads(json.dumps(dict(settings), default=str))
        self.weights_sha256 = self.file_sha256(ckpt_path)

    @staticmethod
    def file_sha256(path: str) -> str | None:
        """sha256 of a file (:func:`scripts.hashes.file_hash`: once per file version); None when it cannot be read
        (the case fails later, naming the file)."""
        try:
            return file_hash(path)
        except OSError:
            return None

    def for_case(self, item: dict) -> dict:
        """The record of a dataset item (``image``, ``fixed``, optional ``mask_path`` and ``extra``)."""
        record = {
            "fixed_image": os.path.abspath(item["fixed"]),
            "fixed_sha256": self.file_sha256(item["fixed"]),
            "moving_image": os.path.abspath(item["image"]),
            "moving_sha256": self.file_sha256(item["image"]),
            "settings": self.settings,
            "weights_sha256": self.weights_sha256,
        }
        if item.get("mask_path"):
            record["mask_sha256"] = self.file_sha256(item["mask_path"])
        if item.get("extra"):
            record["extra_sha256"] = {os.path.basename(p): self.file_sha256(p) for p in item["extra"]}
        return record


def read_provenance(folder: str) -> dict | None:
    """The record in a case folder, or None when there is none or it cannot be read."""
    try:
        with open(os.path.join(folder, PROVENANCE_FILE), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_provenance(path: str, record: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)


def what_changed(recorded: dict | None, expected: dict) -> str | None:
    """What differs between a case's record and the run now, as words for the summary (None: nothing)."""
    if recorded is None:
        return f"the earlier {PROVENANCE_FILE} cannot be read"
    changes = [words for key, words in COMPARED.items() if recorded.get(key) != expected.get(key)]
    settings = recorded.get("settings") if isinstance(recorded.get("settings"), dict) else {}
    changed = sorted(k for k in {*settings, *expected["settings"]} if settings.get(k) != expected["settings"].get(k))
    if changed:
        changes.append(f"the settings ({', '.join(changed)})")
    return f"{', '.join(changes)} changed since the earlier result" if changes else None

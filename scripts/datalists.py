"""Lists of real images for training and evaluation: an IXI-layout folder or a CSV datalist, and which one a path is.

A datalist is a list of dicts, one per image:

* ``image``: path of the NIfTI image;
* ``modality``: its contrast, e.g. ``"T1"``, ``"T2"``, ``"PD"``;
* ``subject``: who was scanned; images of one subject show one anatomy;
* optional ``label`` (path of its FreeSurfer-style label map) and ``mask`` (path of its brain mask);
* optional ``split`` (``"train"``, ``"validation"`` or ``"test"``; CSV datalists only);
* optional ``world_transform``: ``(4, 4)`` float64 tensor, the RAS matrix from the subject's common world to this
  image's world (what :mod:`scripts.make_test_set` writes to ``transforms.csv``; a CSV datalist's
  ``world_transform`` column: its 16 entries row by row, separated by spaces), so that two images ``a`` and ``b``
  of one subject are related by the fixed-to-moving matrix ``T_b @ inv(T_a)``.

Which subjects are held out (:func:`subject_split`): the names the workflows' ``validation_subjects`` and
``test_subjects`` settings give, a CSV's ``split`` column, or, for an IXI folder or a CSV without that column whose
subjects match none of those names, a seeded random choice written to ``split.json`` in the run's output folder.

Every problem with the files (a malformed name or row, a missing file) raises
:class:`scripts.errors.KeyMorphInputError` with one line naming the file.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re

import numpy as np
import torch

from scripts.errors import KeyMorphInputError
from scripts.image_io import is_nifti
from scripts.transform_io import write_atomically

logger = logging.getLogger(__name__)

IXI_MODALITIES = ("T1", "T2", "PD")
#: ``IXI<id>-<site>-<n>-<MOD>.nii[.gz]``, e.g. ``IXI002-Guys-0828-T1.nii.gz``.
IXI_NAME = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-([A-Za-z0-9]+)\.nii(\.gz)?$")
TRANSFORMS_CSV = "transforms.csv"
#: Columns of ``transforms.csv``: the image's path relative to the CSV, then its 4x4 matrix row by row.
TRANSFORM_COLUMNS = ["image"] + [f"m{row}{column}" for row in range(4) for column in range(4)]
SPLITS = ("train", "validation", "test")
CSV_REQUIRED = ("image", "modality", "subject")
CSV_OPTIONAL = ("label", "mask")
SPLIT_FILE = "split.json"


def _world_matrix(values: list[str], where: str) -> torch.Tensor:
    """``(4, 4)`` float64 matrix of 16 row-major entries; :class:`KeyMorphInputError` naming ``where`` unless they
    are 16 numbers forming an invertible finite matrix."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 16:
        raise KeyMorphInputError(f"{where}: the world transform needs 16 numbers (a 4x4 matrix row by row)")
    matrix = torch.tensor(numbers, dtype=torch.float64).reshape(4, 4)
    if not torch.isfinite(matrix).all() or abs(float(torch.linalg.det(matrix))) < 1e-9:
        raise KeyMorphInputError(f"{where}: not an invertible finite matrix")
    return matrix


def read_transforms_csv(path: str) -> dict[str, torch.Tensor]:
    """``{image path relative to the CSV's folder: (4, 4) float64 matrix}`` from a ``transforms.csv`` with columns
    ``image, m00, m01, ..., m33`` (row-major)."""
    columns = TRANSFORM_COLUMNS[1:]
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in TRANSFORM_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise KeyMorphInputError(f"{path}: missing columns {', '.join(missing)}")
        matrices = {}
        for line, row in enumerate(reader, start=2):
            matrix = _world_matrix([row[c] for c in columns], f"{path}: line {line}")
            matrices[os.path.normpath(row["image"])] = matrix
    return matrices


def ixi_datalist(dataset_dir: str) -> list[dict]:
    """The images of an IXI-layout folder, sorted by subject then modality.

    Images are ``dataset_dir/IXI-<MOD>/IXI<id>-<site>-<n>-<MOD>.nii.gz`` for ``MOD`` in T1, T2, PD (the folders
    present; others such as IXI-MRA are ignored). A file of the same name in ``IXI-<MOD>-labels/`` or
    ``IXI-<MOD>-masks/`` becomes the image's ``label`` or ``mask``; a row of ``dataset_dir/transforms.csv``
    naming the image (``IXI-<MOD>/<file name>``) its ``world_transform``. ``subject`` is the ``IXI<id>`` part.

    Raises:
        KeyMorphInputError: a NIfTI file whose name does not follow the pattern or names another modality than
            its folder, a malformed ``transforms.csv``, or no image at all.
    """
    transforms_path = os.path.join(dataset_dir, TRANSFORMS_CSV)
    transforms = read_transforms_csv(transforms_path) if os.path.isfile(transforms_path) else {}
    items = []
    for modality in IXI_MODALITIES:
        folder = os.path.join(dataset_dir, f"IXI-{modality}")
        if not os.path.isdir(folder):
            continue
        for name in sorted(n for n in os.listdir(folder) if is_nifti(n) and not n.startswith(".")):
            match = IXI_NAME.match(name)
            if match is None or match.group(4) != modality:
                raise KeyMorphInputError(
                    f"{os.path.join(folder, name)}: not an IXI file name IXI<id>-<site>-<n>-{modality}.nii.gz"
                )
            item = {"image": os.path.join(folder, name), "modality": modality, "subject": match.group(1)}
            for key, suffix in (("label", "labels"), ("mask", "masks")):
                path = os.path.join(dataset_dir, f"IXI-{modality}-{suffix}", name)
                if os.path.isfile(path):
                    item[key] = path
            relative = os.path.normpath(os.path.join(f"IXI-{modality}", name))
            if relative in transforms:
                item["world_transform"] = transforms[relative].clone()
            items.append(item)
    if not items:
        raise KeyMorphInputError(f"{dataset_dir}: no IXI images (IXI-T1/, IXI-T2/, IXI-PD/ hold no .nii.gz files)")
    return sorted(items, key=lambda item: (item["subject"], IXI_MODALITIES.index(item["modality"]), item["image"]))


def csv_datalist(csv_path: str) -> list[dict]:
    """The images of a CSV datalist, in file order.

    Columns ``image``, ``modality``, ``subject`` (required, non-empty) and optionally ``label``, ``mask`` (paths;
    an empty cell means none), ``world_transform`` (16 numbers separated by spaces: the image's RAS matrix from its
    subject's common world, row by row; empty: the identity) and ``split`` (``train``, ``validation`` or ``test``;
    when the column exists every row needs one). Relative paths are relative to the CSV's folder; every named file
    must exist.

    Raises:
        KeyMorphInputError: missing file or column, an empty required cell, an unknown split, a malformed world
            transform or a missing image, label or mask file (naming the CSV line), or no row.
    """
    if not os.path.isfile(csv_path):
        raise KeyMorphInputError(f"{csv_path}: datalist CSV not found")
    root = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in CSV_REQUIRED if c not in columns]
        if missing:
            raise KeyMorphInputError(
                f"{csv_path}: missing columns {', '.join(missing)} (needs image, modality, subject; optional label,"
                " mask, world_transform, split)"
            )
        has_split = "split" in columns
        items = []
        for line, raw in enumerate(reader, start=2):
            row = {key.strip(): (value or "").strip() for key, value in raw.items() if key is not None}
            empty = [c for c in CSV_REQUIRED if not row.get(c)]
            if empty:
                raise KeyMorphInputError(f"{csv_path}: line {line}: empty {', '.join(empty)}")
            item = {key: row[key] for key in CSV_REQUIRED}
            for key in ("image", *CSV_OPTIONAL):
                if row.get(key):
                    item[key] = os.path.join(root, row[key])
                    if not os.path.isfile(item[key]):
                        raise KeyMorphInputError(f"{csv_path}: line {line}: {key} file {item[key]} not found")
            if row.get("world_transform"):
                item["world_transform"] = _world_matrix(row["world_transform"].split(), f"{csv_path}: line {line}")
            if has_split:
                if row.get("split") not in SPLITS:
                    raise KeyMorphInputError(
                        f"{csv_path}: line {line}: split {row.get('split')!r} is not one of {', '.join(SPLITS)}"
                    )
                item["split"] = row["split"]
            items.append(item)
    if not items:
        raise KeyMorphInputError(f"{csv_path}: the datalist has no rows")
    return items


def detect_source(dataset_dir: str) -> str:
    """What ``dataset_dir`` holds: ``"csv"`` (it is a .csv file), ``"ixi"`` (a folder with IXI-T1/, IXI-T2/ or
    IXI-PD/), or ``"label_maps"`` (a folder of .nii/.nii.gz label maps).

    Raises:
        KeyMorphInputError: the path does not exist or holds none of these.
    """
    if not os.path.exists(dataset_dir):
        raise KeyMorphInputError(f"{dataset_dir}: not found")
    if os.path.isfile(dataset_dir) and dataset_dir.lower().endswith(".csv"):
        return "csv"
    if os.path.isdir(dataset_dir):
        if any(os.path.isdir(os.path.join(dataset_dir, f"IXI-{m}")) for m in IXI_MODALITIES):
            return "ixi"
        if glob.glob(os.path.join(dataset_dir, "*.nii")) + glob.glob(os.path.join(dataset_dir, "*.nii.gz")):
            return "label_maps"
    raise KeyMorphInputError(
        f"{dataset_dir}: holds nothing usable: expected a CSV datalist (.csv), an IXI folder (IXI-T1/, IXI-T2/,"
        " IXI-PD/) or a folder of .nii/.nii.gz label maps"
    )


def select_subjects(
    datalist: list[dict],
    split: str,
    exclude: list[str] | tuple[str, ...] = (),
    include: list[str] | tuple[str, ...] = (),
    source: str = "datalist",
) -> list[dict]:
    """The images of one split.

    With a ``split`` entry on the images (a CSV ``split`` column) the images of that split; otherwise, as for label
    maps, the images whose subject contains no entry of ``exclude`` and, with ``include``, one of ``include``
    (the held-out validation subjects). Raises :class:`KeyMorphInputError` naming ``source`` when none is left.
    """
    if any("split" in item for item in datalist):
        chosen = [item for item in datalist if item.get("split") == split]
        if not chosen:
            raise KeyMorphInputError(f"{source}: no image has split {split!r}")
        return chosen
    unmatched = [e for e in exclude if e and not any(e in item["subject"] for item in datalist)]
    if unmatched:
        # held-out names of another dataset (e.g. label-map names on IXI) would silently exclude nothing
        logger.warning(f"{source}: no subject matches the held-out names {unmatched}; nothing is left out for them")
    chosen = [item for item in datalist if not any(e and e in item["subject"] for e in exclude)]
    if include:
        chosen = [item for item in chosen if any(name in item["subject"] for name in include)]
    if not chosen:
        raise KeyMorphInputError(
            f"{source}: no images of the {split} subjects (include {list(include)}, exclude {list(exclude)})"
        )
    return chosen


def subject_split(
    dataset_dir: str,
    validation_subjects: list[str] | tuple[str, ...],
    test_subjects: list[str] | tuple[str, ...],
    output_dir: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> dict[str, list[str]]:
    """The held-out subjects of a dataset: ``{"validation": [...], "test": [...]}`` (names matched as parts of
    subject ids or label-map file names, as :func:`select_subjects` does).

    * a folder of label maps, or any source whose subjects match one of the configured names: those names;
    * a CSV datalist with a ``split`` column: the subjects of its validation and test rows (the column wins);
    * an IXI folder or a CSV datalist matching none of them (the defaults name the shipped label maps): a seeded
      random choice of ``test_fraction`` and ``validation_fraction`` of its subjects (at least two test subjects,
      for pairs of different subjects, and one validation subject, test first, while two subjects are left to
      train on; with too few subjects, one warning line and no
      validation, or neither), the same in every workflow for the same data and seed.

    With ``output_dir``, the split is written to ``output_dir/split.json`` and, when that file is already there
    (a resumed or repeated run), read from it instead. A source that cannot be read gives the configured names
    (the workflows' settings check then reports the problem in one line).
    """
    configured = {"validation": list(validation_subjects or ()), "test": list(test_subjects or ())}
    record = os.path.join(output_dir, SPLIT_FILE) if output_dir else None
    if record and os.path.isfile(record):
        with open(record) as handle:
            saved = json.load(handle)
        return {"validation": list(saved["validation"]), "test": list(saved["test"])}
    try:
        kind = detect_source(dataset_dir)
        datalist = (
            None if kind == "label_maps" else csv_datalist(dataset_dir) if kind == "csv" else ixi_datalist(dataset_dir)
        )
    except KeyMorphInputError:
        return configured
    if datalist is None:
        split = configured
    elif any("split" in item for item in datalist):
        split = {
            name: sorted({i["subject"] for i in datalist if i.get("split") == name}) for name in ("validation", "test")
        }
    elif any(n and n in item["subject"] for n in configured["validation"] + configured["test"] for item in datalist):
        split = configured
    else:
        split = _random_split(
            sorted({item["subject"] for item in datalist}), seed, validation_fraction, test_fraction, dataset_dir
        )
    if record:
        try:
            os.makedirs(output_dir, exist_ok=True)
            write_atomically(record, lambda path: _write_split(path, split, dataset_dir, seed))
        except OSError:
            pass  # an unwritable output folder: the settings check names it
    return split


def _random_split(subjects: list[str], seed: int, validation_fraction: float, test_fraction: float, source: str):
    """Seeded choice of test then validation subjects among sorted ``subjects`` (see :func:`subject_split`)."""
    order = [subjects[i] for i in np.random.RandomState(seed).permutation(len(subjects))]
    spare = max(len(subjects) - 2, 0)  # two subjects stay for training: pairs of different subjects
    test = min(spare, max(2, round(test_fraction * len(subjects))))  # two: pairs of different test subjects
    validation = min(spare - test, max(1, round(validation_fraction * len(subjects))))
    if validation == 0:
        logger.warning(
            f"{source}: {len(subjects)} subjects are too few to hold out validation"
            f"{'' if test else ' or test'} subjects; training without validation"
        )
    return {"test": order[:test], "validation": order[test : test + validation]}


def _write_split(path: str, split: dict, dataset_dir: str, seed: int) -> None:
    with open(path, "w") as handle:
        json.dump({"dataset_dir": str(dataset_dir), "seed": seed, **split}, handle, indent=1)

"""Lists of real images for training and evaluation: an IXI-layout folder or a CSV datalist, and which one a path is.

A datalist is a list of dicts, one per image:

* ``image``: path of the NIfTI image;
* ``modality``: its contrast, e.g. ``"T1"``, ``"T2"``, ``"PD"``;
* ``subject``: who was scanned; images of one subject show one anatomy;
* optional ``label`` (path of its FreeSurfer-style label map) and ``mask`` (path of its brain mask);
* optional ``split`` (``"train"``, ``"validation"`` or ``"test"``; CSV datalists only);
* optional ``world_transform``: ``(4, 4)`` float64 tensor, the RAS matrix from the subject's common world to this
  image's world (what :mod:`scripts.make_test_set` writes to ``transforms.csv``), so that two images ``a`` and
  ``b`` of one subject are related by the fixed-to-moving matrix ``T_b @ inv(T_a)``.

Every problem with the files (a malformed name or row, a missing file) raises
:class:`scripts.errors.KeyMorphInputError` with one line naming the file.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import re

import torch

from scripts.errors import KeyMorphInputError
from scripts.image_io import is_nifti

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
            try:
                values = [float(row[c]) for c in columns]
            except (TypeError, ValueError):
                raise KeyMorphInputError(f"{path}: line {line}: the 16 matrix entries must be numbers") from None
            matrix = torch.tensor(values, dtype=torch.float64).reshape(4, 4)
            if not torch.isfinite(matrix).all() or abs(float(torch.linalg.det(matrix))) < 1e-9:
                raise KeyMorphInputError(f"{path}: line {line}: not an invertible finite matrix")
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
    an empty cell means none) and ``split`` (``train``, ``validation`` or ``test``; when the column exists every
    row needs one). Relative paths are relative to the CSV's folder; every named file must exist.

    Raises:
        KeyMorphInputError: missing file or column, an empty required cell, an unknown split or a missing image,
            label or mask file (naming the CSV line), or no row.
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
                " mask, split)"
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

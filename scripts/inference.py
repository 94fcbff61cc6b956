"""Registering a folder of NIfTI files: the dataset, the evaluator and the writer of ``configs/inference.yaml``.

For ``IN_DIR/NAME.nii.gz`` the writer fills ``OUT_DIR/NAME/`` with ``registered.nii.gz`` (the ORIGINAL moving image
resampled onto the fixed image's native grid, with the fixed header), the transform files of
:func:`scripts.transform_io.write_transform_files` (``transform.tfm``: ITK, fixed -> moving physical points, LPS;
its inverse; ``affine_ras.txt``: moving RAS mm -> fixed RAS mm; FSL FLIRT and FreeSurfer LTA files),
``moving_mask.nii.gz`` (the moving brain mask on the moving grid), ``keypoints_moving.csv`` and
``keypoints_fixed.csv`` (RAS mm), ``qc.png`` (the fixed image's edges over the registered image, fixed grid),
``qc_keypoints.png`` (the network grids with the keypoints), optionally ``registered_header_only.nii.gz`` (the moving
voxels with the header moved into the fixed space) and, for each accompanying image ``EXTRA`` (``apply_to``),
``registered_EXTRA``; ``OUT_DIR/summary.csv`` gets one row per input and ``OUT_DIR/index.html`` shows them all,
worst first (:mod:`scripts.qc_report`).

Failures and reruns:

* A bad input never stops the folder: it gets status ``error`` and a one-line message naming the file, and the
  next input is registered. Registered cases get ``ok``, or ``suspect`` with the reasons when :mod:`scripts.qc`
  flags them.
* Case names name folders of OUT_DIR, so they are checked (:mod:`scripts.output_folder`): one path component, not
  hidden, not a file of the run such as ``summary.csv``; an invalid name is an ``error`` row naming the input, and
  every path the writer creates goes through one guard that keeps it inside OUT_DIR. One run at a time writes to a
  folder (``OUT_DIR/.keymorph.lock``); a second one is refused with one line naming the PID of the first.
* Outputs are atomic per case: the files are written into a hidden staging folder ``OUT_DIR/.keymorph-tmp-*``,
  which then replaces ``OUT_DIR/NAME`` as a whole (rename), so ``OUT_DIR/NAME`` is either absent, the complete old
  result or the complete new one, never a mix, even after a crash or kill (leftover hidden folders are removed by
  the next run). Overwriting replaces the whole case folder, files added to it by hand included.
* A case is done when ``OUT_DIR/NAME`` holds every output file (including ``registered_EXTRA``) and its
  ``provenance.json`` (:mod:`scripts.provenance`) matches what the run would record now (fixed, moving, mask and
  accompanying files, weights, result-changing settings). Done cases are skipped without being preprocessed, and
  keep their earlier summary row, unless ``overwrite`` is set; cases recorded otherwise are redone, their row
  saying what changed. Failed cases have no folder, so a rerun retries them.
* Hidden NIfTI files, MGH/MGZ and Analyze/NIfTI-pair files of the input folder are not read; each gets a
  ``skipped`` row saying why (:func:`not_read_reason`).
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import logging
import os
import shutil
import time

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import apply_transform

from scripts.cli import as_bool, optional
from scripts.coordinates import affine_of, resample_onto
from scripts.errors import KeyMorphInputError, fail, first_line, workflow_step
from scripts.image_io import header_moved, is_label_map, is_nifti, load_volume, save_volume
from scripts.output_folder import (
    INDEX_FILE,
    STAGING_PREFIX,
    SUMMARY_FILE,
    RunLock,
    check_case_name,
    inside,
    printable,
    staging_name,
)
from scripts.provenance import PROVENANCE_FILE, read_provenance, what_changed, write_provenance
from scripts.qc import QC_THRESHOLDS, qc_figure, qc_flags, qc_scores
from scripts.qc_report import edges_figure, write_index
from scripts.transform_io import write_atomically, write_keypoints_csv, write_transform_files

logger = logging.getLogger(__name__)

MASK_FILE = "moving_mask.nii.gz"
OUTPUT_FILES = (
    "registered.nii.gz",
    "transform.tfm",
    "transform_inverse.tfm",
    "affine_ras.txt",
    "transform_flirt.mat",
    "transform.lta",
    MASK_FILE,
    "keypoints_moving.csv",
    "keypoints_fixed.csv",
    "qc.png",
    "qc_keypoints.png",
    PROVENANCE_FILE,
)
# with header_only: the moving image, voxels untouched, its header moved into the fixed space
HEADER_ONLY_FILE = "registered_header_only.nii.gz"
SUMMARY_COLUMNS = [
    "name",
    "status",
    "message",
    "seconds",
    "keypoint_residual_mm",
    "similarity",
    "brain_fill",
    "smoothness",
]
STATUSES = ("ok", "suspect", "error", "skipped")


def case_name(path: str) -> str:
    """``IN_DIR/NAME.nii.gz`` -> ``NAME``."""
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def extra_output_names(paths) -> list[str]:
    """File names of a case's accompanying images once registered, in order: ``registered_`` + the image's file
    name or, for images sharing a file name (``labels/a_seg.nii.gz``, ``lesions/a_seg.nii.gz``), + as many of its
    parent folders as tell them apart (``registered_labels_a_seg.nii.gz``); raises :class:`KeyMorphInputError` when
    two names still clash (one would overwrite the other)."""
    split = [os.path.normpath(p).split(os.sep) for p in paths]
    names = []
    for parts in split:
        depth = 1
        while depth < len(parts) and any(o != parts and o[-depth:] == parts[-depth:] for o in split):
            depth += 1
        names.append("registered_" + "_".join(parts[-depth:]))
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise KeyMorphInputError(f"accompanying images would overwrite each other as {', '.join(clashes)}")
    return names


def case_done(output_dir: str, name: str, extra=()) -> bool:
    """Whether ``output_dir/name`` holds every output of a case with these accompanying images."""
    folder = os.path.join(output_dir, name)
    expected = [*OUTPUT_FILES, *extra_output_names(extra)]
    return all(os.path.isfile(os.path.join(folder, f)) for f in expected)


def _source(item: dict) -> str:
    """The moving image's path of a dataset item, before or after preprocessing (then a MetaTensor)."""
    image = item.get("original", item["image"])
    if isinstance(image, str):
        return image
    return str(getattr(image, "meta", {}).get("filename_or_obj", item.get("name", "<image>")))


def _unwrap(error: BaseException) -> BaseException:
    """The KeyMorphInputError (else the innermost error) behind MONAI's ``RuntimeError("applying transform ...")``
    wrappers."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return next((e for e in chain if isinstance(e, KeyMorphInputError)), chain[-1])


def _naming(error: BaseException, path: str) -> str:
    """A one-line message for an exception while handling ``path``: starts with the file (a line break in its name
    written as ``\\n``, so the reason after it is kept)."""
    error = _unwrap(error)
    shown = printable(path)
    reason = first_line(str(error).replace(path, shown) if path else error)
    if isinstance(error, KeyMorphInputError):
        return reason if shown in reason else f"{shown}: {reason}"
    return f"{shown}: {type(error).__name__}" + (f": {reason}" if reason else "")


def not_read_reason(file_name: str) -> str | None:
    """Why an image file of the input folder is listed with a ``skipped`` row instead of being registered, or None
    for the files registered (and for other files, which are not images)."""
    lower = file_name.lower()
    if is_nifti(lower) and file_name.startswith("."):
        return "hidden file (its name starts with '.'), not registered; rename it to register it"
    if lower.endswith((".mgz", ".mgh")):
        return "FreeSurfer MGH/MGZ is not read (ITK tools cannot read it); convert it, e.g. `mri_convert IN.mgz OUT.nii.gz`"
    if lower.endswith((".hdr", ".hdr.gz")):
        return (
            "Analyze / NIfTI-pair (.hdr/.img) is not read (Analyze headers carry no orientation); convert it to one"
            " .nii.gz, e.g. `fslchfiletype NIFTI_GZ IN.hdr`"
        )
    return None


class RegistrationDataset(Dataset):
    """The cases to register, one dict per moving image: ``{"name", "image", "fixed", "extra"}``.

    Folder mode: every ``.nii``/``.nii.gz`` directly in ``dataset_dir`` is a moving image registered to
    ``fixed_image``; ``apply_to`` (a glob relative to ``dataset_dir`` with ``{name}`` standing for the case name, e.g.
    ``"labels/{name}_seg.nii.gz"``) names accompanying images the transform is also applied to; files it matches are
    not moving images themselves. Pairs mode: ``pairs_csv`` with columns ``moving``, ``fixed`` and optionally
    ``name`` and ``extra`` (paths separated by ``;``); relative paths are relative to the CSV.

    Case names must be unique (they name the output folders): a second input with the same name (``a.nii`` next to
    ``a.nii.gz``, or the same moving image in two rows of a pairs CSV without a ``name`` column) becomes an error
    item saying so.

    ``mask_dir`` (for ``--skull_strip mask``): the brain mask of ``NAME.nii.gz`` is ``mask_dir/NAME.nii.gz`` (or
    ``.nii``), given to the preprocessing as ``mask_path``.

    With ``output_dir`` given and ``overwrite`` false, cases already done there (:func:`case_done`) come back as
    ``{..., "skipped": True}`` without being read, unless ``provenance`` (a
    :class:`scripts.provenance.RunProvenance`) shows that they were made from other files, settings or weights:
    those are redone, with a note saying what changed. Items carry the record the writer stores
    (``"provenance"``). Items whose preprocessing fails come back as ``{..., "error": message}`` so one bad file
    never stops the folder.
    """

    def __init__(
        self,
        dataset_dir: str,
        fixed_image: str,
        transform=None,
        pairs_csv: str | None = None,
        apply_to: str | None = None,
        mask_dir: str | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
        provenance=None,
    ):
        pairs_csv, apply_to, mask_dir = optional(pairs_csv), optional(apply_to), optional(mask_dir)
        self.provenance = provenance
        items = self._pairs(pairs_csv) if pairs_csv else self._folder(dataset_dir, fixed_image, apply_to)
        seen: dict[str, str] = {}
        for item in items:
            if "not_read" in item:
                continue
            try:
                check_case_name(item["name"], item["image"])
            except KeyMorphInputError as error:
                item["error"], item["name"] = str(error), printable(str(item["name"]))
                continue
            if mask_dir:
                item["mask_path"] = self._mask_path(mask_dir, item["name"])
            item["extra"] = list(dict.fromkeys(os.path.normpath(p) for p in item["extra"]))
            try:
                extra_output_names(item["extra"])
            except KeyMorphInputError as error:
                item["error"] = f"{item['image']}: {error}"
            if item["name"] in seen:
                item["error"] = (
                    f"{item['image']}: case name {item['name']!r} is already used by {seen[item['name']]};"
                    " rename one of them (or give a 'name' column in the pairs CSV)"
                )
            else:
                seen[item["name"]] = item["image"]
        self.output_dir, self.overwrite = output_dir, as_bool(overwrite, "overwrite")
        super().__init__(data=items, transform=transform)

    @staticmethod
    def _mask_path(mask_dir: str, name: str) -> str:
        for suffix in (".nii.gz", ".nii"):
            if os.path.exists(os.path.join(mask_dir, name + suffix)):
                return os.path.join(mask_dir, name + suffix)
        return os.path.join(mask_dir, name + ".nii.gz")  # missing: the mask backend names it in its error

    @staticmethod
    def _folder(dataset_dir: str, fixed_image: str, apply_to: str | None) -> list[dict]:
        if not os.path.isdir(dataset_dir):
            raise KeyMorphInputError(f"{dataset_dir}: input folder not found")
        files = sorted(os.listdir(dataset_dir))
        names = [n for n in files if is_nifti(n) and not_read_reason(n) is None]
        not_read = [
            {"name": n, "image": os.path.join(dataset_dir, n), "fixed": fixed_image, "extra": [], "not_read": reason}
            for n in files
            for reason in [not_read_reason(n)]
            if reason
        ]
        if apply_to:
            pattern = apply_to.replace("{name}", "*")
            names = [n for n in names if not fnmatch.fnmatch(n, pattern)]
        items = []
        for name in names:
            stem = case_name(name)
            item = {"name": stem, "image": os.path.join(dataset_dir, name), "fixed": fixed_image, "extra": []}
            if apply_to:
                item["extra"] = sorted(glob.glob(os.path.join(dataset_dir, apply_to.replace("{name}", stem))))
                if not item["extra"]:
                    item["notes"] = [f"--apply_to {apply_to!r} matched no file for this case"]
            items.append(item)
        if not items:
            other = f" ({not_read[0]['name']}: {not_read[0]['not_read']})" if not_read else ""
            raise KeyMorphInputError(f"{dataset_dir}: no .nii or .nii.gz files to register{other}")
        return items + not_read

    @staticmethod
    def _pairs(pairs_csv: str) -> list[dict]:
        if not os.path.isfile(pairs_csv):
            raise KeyMorphInputError(f"{pairs_csv}: pairs CSV not found")
        root = os.path.dirname(os.path.abspath(pairs_csv))
        try:
            with open(pairs_csv, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise KeyMorphInputError(f"{pairs_csv}: cannot read the pairs CSV ({first_line(error)})") from None
        if not rows or not {"moving", "fixed"} <= set(rows[0]):
            raise KeyMorphInputError(f"{pairs_csv}: needs a header with the columns 'moving' and 'fixed'")
        items = []
        for number, row in enumerate(rows, start=2):
            if not (row.get("moving") or "").strip() or not (row.get("fixed") or "").strip():
                raise KeyMorphInputError(f"{pairs_csv}: line {number} has no 'moving' or no 'fixed' path")
            moving = os.path.join(root, row["moving"].strip())
            extra = [os.path.join(root, p.strip()) for p in (row.get("extra") or "").split(";") if p.strip()]
            items.append(
                {
                    "name": (row.get("name") or "").strip() or case_name(moving),
                    "image": moving,
                    "fixed": os.path.join(root, row["fixed"].strip()),
                    "extra": extra,
                }
            )
        return items

    def _transform(self, index: int):
        item = dict(self.data[index])
        if "error" in item:
            return {**item, "seconds": 0.0}
        if "not_read" in item:
            return {**item, "skipped": True, "seconds": 0.0}
        start = time.perf_counter()
        if self.provenance is not None:
            item["provenance"] = self.provenance.for_case(item)
        if self.output_dir and not self.overwrite and case_done(self.output_dir, item["name"], item["extra"]):
            change = None
            if self.provenance is not None:
                change = what_changed(read_provenance(os.path.join(self.output_dir, item["name"])), item["provenance"])
            if change is None:
                return {**item, "skipped": True, "seconds": 0.0}
            item["notes"] = [*item.get("notes", []), f"redone: {change}"]
        try:
            result = apply_transform(self.transform, item) if self.transform is not None else item
        except Exception as error:  # KeyMorphInputError, or a library failing on a file we did not foresee
            result = {**item, "error": _naming(error, item["image"])}
        return {**result, "seconds": time.perf_counter() - start}


class RegistrationEvaluator(SupervisedEvaluator):
    """Registers each moving image of the dataset to its fixed image; one iteration per case.

    The fixed images are preprocessed once with ``fixed_preprocessing`` and kept (a fixed image that fails is an
    error for each of its cases). Which cases are skipped is the dataset's decision (items marked ``skipped``). The
    iteration output is a dict with ``name``, ``status`` ("ok", "error" or "skipped"; the writer turns "ok" into
    "suspect" when QC flags it), ``message``, ``seconds`` and, for registered cases, the
    :class:`scripts.registration.Registration` and the network-grid images for the writer.
    """

    def __init__(
        self,
        device,
        val_data_loader,
        network,
        inferer,
        fixed_preprocessing,
        output_dir: str,
        val_handlers=None,
        **kwargs,
    ):
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            val_handlers=val_handlers,
            **kwargs,
        )
        self.fixed_preprocessing = fixed_preprocessing
        self.output_dir = output_dir
        self._fixed_cache: dict[str, dict | str] = {}

    def fixed(self, path: str) -> dict:
        """The preprocessed fixed image; raises :class:`KeyMorphInputError` (every time) when it cannot be."""
        if path not in self._fixed_cache:
            try:
                self._fixed_cache[path] = self.fixed_preprocessing({"image": path})
            except Exception as error:
                self._fixed_cache[path] = f"fixed image {_naming(error, path)}"
        cached = self._fixed_cache[path]
        if isinstance(cached, str):
            raise KeyMorphInputError(cached)
        return cached

    def _iteration(self, engine: Engine, batchdata):
        item = batchdata[0]
        start = time.perf_counter() - item.get("seconds", 0.0)  # include the reading and preprocessing
        base = {"name": item["name"], "seconds": 0.0, "message": ""}
        if item.get("skipped"):
            message = item.get("not_read", "outputs exist (set --overwrite true to redo)")
            return {**base, "status": "skipped", "message": message}
        if "error" in item:
            return {**base, "status": "error", "message": item["error"], "seconds": time.perf_counter() - start}
        try:
            fixed = self.fixed(item["fixed"])
            self.network.eval()
            with torch.no_grad():
                registration = self.inferer(
                    fixed["image"][None].to(engine.state.device),
                    item["image"][None].to(engine.state.device),
                    self.network,
                    fixed_mask=fixed["mask"][None].to(engine.state.device),
                )
        except Exception as error:
            logger.debug("registration of %s failed", _source(item), exc_info=True)
            message = _naming(error, _source(item))
            return {**base, "status": "error", "message": message, "seconds": time.perf_counter() - start}
        return {**base, "status": "ok", "registration": registration, "fixed": fixed, "moving": item, "start": start}


def _remove_leftovers(output_dir: str) -> None:
    """Remove what a killed run left in ``output_dir``: staging folders ``.keymorph-{tmp,old}-PID-HASH`` and
    temporary files ``.tmp-PID-NAME`` of :func:`scripts.transform_io.write_atomically` (those of live processes are
    kept)."""
    for name in os.listdir(output_dir):
        if name.startswith(STAGING_PREFIX):
            field = 2
        elif name.startswith(".tmp-"):
            field = 1
        else:
            continue
        try:
            pid = int(name.split("-")[field])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def replace_folder(staging: str, final: str) -> None:
    """Put the complete folder ``staging`` in place of ``final`` (absent or a complete earlier result) by renames.

    ``final`` is never a mix of both: it is renamed away first, then ``staging`` renamed to it, then the old copy
    removed. A kill between the two renames leaves ``final`` absent (the case is redone on the next run).
    """
    parent, name = os.path.split(final)
    if os.path.lexists(final):
        old = inside(parent, staging_name("old", name))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)


def read_summary_rows(path: str) -> dict[str, dict]:
    """The rows of an earlier ``summary.csv`` by case name, also after a spreadsheet saved it: UTF-8 with or
    without a byte-order mark, else Windows-1252 (with a warning; the file is rewritten as UTF-8), comma,
    semicolon or tab separated. Raises :class:`KeyMorphInputError` when it cannot be read at all (rather than
    overwriting it)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise KeyMorphInputError(f"{path}: cannot read the earlier summary ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
        logger.warning(f"{path}: not UTF-8 (saved by a spreadsheet?); read as Windows-1252, rewritten as UTF-8")
    try:
        dialect = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.DictReader(text.splitlines(), delimiter=dialect.delimiter))
    if rows and "name" not in rows[0]:
        logger.warning(f"{path}: no 'name' column; its rows are not kept")
    return {row["name"]: row for row in rows if row.get("name")}


def _seconds(value) -> str:
    """A duration for the summary, two decimals; also from a spreadsheet's ``1,5`` (empty when unreadable)."""
    try:
        return f"{float(str(value or 0).replace(',', '.')):.2f}"
    except ValueError:
        return ""


class RegistrationWriter:
    """Ignite handler writing each case's files and ``summary.csv`` (see the module docstring).

    Args:
        output_dir: OUT_DIR.
        similarity_threshold: cases whose aligned-image similarity (see :mod:`scripts.qc`) falls below it are
            marked "suspect".
        residual_threshold: likewise for the keypoint fit residual in mm (above it: "suspect").
        max_brain_fill: likewise for the fraction of the moving image inside its brain mask (above it: "suspect").
        min_smoothness: likewise for the correlation of neighbouring moving brain voxels (below it: "suspect").
        header_only: also write ``registered_header_only.nii.gz`` (:func:`scripts.image_io.header_moved`).
    """

    def __init__(
        self,
        output_dir: str,
        similarity_threshold: float = QC_THRESHOLDS["min_similarity"],
        residual_threshold: float = QC_THRESHOLDS["max_residual_mm"],
        max_brain_fill: float = QC_THRESHOLDS["max_brain_fill"],
        min_smoothness: float = QC_THRESHOLDS["min_smoothness"],
        header_only: bool = False,
    ):
        self.output_dir = output_dir
        self.header_only = as_bool(header_only, "header_only")
        self.thresholds = {
            "min_similarity": float(similarity_threshold),
            "max_residual_mm": float(residual_threshold),
            "max_brain_fill": float(max_brain_fill),
            "min_smoothness": float(min_smoothness),
        }
        self.rows: dict[str, dict] = {}
        self.counts: dict[str, int] = {}
        self.lock = RunLock(output_dir)
        self.summary_problem: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._load_summary)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._report)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._release_and_raise)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.output_dir, SUMMARY_FILE)

    def _release_and_raise(self, engine: Engine, error: BaseException) -> None:
        self.lock.release()
        raise error

    @property
    def index_path(self) -> str:
        return os.path.join(self.output_dir, INDEX_FILE)

    def _load_summary(self, engine: Engine) -> None:
        """Take the output folder (:class:`scripts.output_folder.RunLock`), clean what a killed run left and read
        the earlier summary rows."""
        os.makedirs(self.output_dir, exist_ok=True)
        self.lock.acquire()
        _remove_leftovers(self.output_dir)
        self.counts = {}
        if os.path.exists(self.summary_path):
            self.rows = read_summary_rows(self.summary_path)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        row = {key: output.get(key, "") for key in SUMMARY_COLUMNS}
        if output["status"] == "skipped":
            row = self.rows.get(output["name"], row)
        elif output["status"] == "ok":
            moving_path = _source(output["moving"])
            try:
                row.update(self._write_case(output))
            except Exception as error:  # one case must never stop the folder
                logger.debug("writing the outputs of %s failed", moving_path, exc_info=True)
                row.update(status="error", message=_naming(error, moving_path))
            row["seconds"] = time.perf_counter() - output["start"]
        row["seconds"] = _seconds(row.get("seconds"))
        self.rows[output["name"]] = row
        status = "skipped" if output["status"] == "skipped" else row["status"]
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "error":
            logger.error(row["message"])
        elif status in ("suspect", "ok") and row["message"]:  # QC flags, or notes such as an unmatched apply_to
            logger.warning(f"{output['name']}: {row['message']}")
        self._try_write_summary()

    def _try_write_summary(self) -> None:
        """Write the summary; when the folder stops taking files (read-only, full), keep the rows in memory, warn
        once, and let the other cases go on: :meth:`_report` tries once more and ends the run with one line."""
        try:
            self._write_summary()
            self.summary_problem = None
        except OSError as error:
            if self.summary_problem is None:
                logger.warning(f"{self.summary_path}: cannot write ({error.strerror or error}); trying on")
            self.summary_problem = error.strerror or str(error)

    def _write_case(self, output: dict) -> dict:
        """Write one case through a staging folder; returns the summary fields (status, message, scores)."""
        name = output["name"]
        final = inside(self.output_dir, name)
        staging = inside(self.output_dir, staging_name("tmp", name))
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            fields = self._write_files(output, staging)
            replace_folder(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return fields

    def _write_files(self, output: dict, folder: str) -> dict:
        registration, fixed, moving = output["registration"].to("cpu"), output["fixed"], output["moving"]
        moving_volume = moving["original"]
        source = moving_volume.meta.get("filename_or_obj", output["name"])
        matrix = registration.fixed_to_moving[0].detach().cpu().to(torch.float64)
        if not bool(torch.isfinite(matrix).all()) or abs(float(torch.linalg.det(matrix[:3, :3]))) < 1e-6:
            raise KeyMorphInputError(f"{source}: registration failed (the fitted transform is degenerate)")
        fixed_file = nib.load(fixed["image"].meta["filename_or_obj"])
        fixed_affine = torch.from_numpy(np.asarray(fixed_file.affine, dtype=np.float64))
        registered = resample_onto(
            moving_volume.as_tensor(), affine_of(moving_volume), fixed_affine, fixed_file.shape[:3], matrix
        )[0]
        save_volume(os.path.join(folder, "registered.nii.gz"), registered.numpy(), fixed_file, np.float32)
        for extra, extra_name in zip(moving.get("extra", []), extra_output_names(moving.get("extra", []))):
            self._write_extra(extra, inside(folder, extra_name), fixed_file, fixed_affine, matrix)
        moving_file = nib.load(source)
        write_transform_files(folder, matrix, fixed_file, moving_file)
        self._write_moving_mask(moving["native_mask"], moving_file, folder)
        if self.header_only:
            moved = header_moved(moving_file, torch.linalg.inv(matrix).numpy(), fixed_file)
            write_atomically(os.path.join(folder, HEADER_ONLY_FILE), lambda p: nib.save(moved, p))
        record = moving.get("provenance") or {}
        write_atomically(os.path.join(folder, PROVENANCE_FILE), lambda p: write_provenance(p, record))
        for role, points in (("moving", registration.moving_points), ("fixed", registration.fixed_points)):
            path = os.path.join(folder, f"keypoints_{role}.csv")
            write_atomically(path, lambda p, pts=points: write_keypoints_csv(p, pts[0].detach().cpu()))
        scores = qc_scores(registration, fixed, moving)
        title = f"{output['name']}: fixed image edges over the registered image"
        write_atomically(os.path.join(folder, "qc.png"), lambda p: edges_figure(p, registered, fixed_file, title))
        write_atomically(os.path.join(folder, "qc_keypoints.png"), lambda p: qc_figure(p, registration, fixed, moving))
        reasons = qc_flags(scores, self.thresholds)
        notes = [f"QC flagged: {'; '.join(reasons)}; check qc.png"] if reasons else []
        notes += moving.get("notes", [])
        nonfinite = float(moving_volume.meta.get("nonfinite_fraction", 0.0))
        if nonfinite > 0:
            notes.append(f"{100 * nonfinite:.2g}% of the voxels were NaN or infinite (set to 0)")
        return {
            "status": "suspect" if reasons else "ok",
            "message": "; ".join(notes),
            "keypoint_residual_mm": f"{scores['residual']:.3f}",
            "similarity": f"{scores['similarity']:.4f}",
            "brain_fill": f"{scores['brain_fill']:.4f}",
            "smoothness": f"{scores['smoothness']:.4f}",
        }

    @staticmethod
    def _write_moving_mask(mask, moving_file, folder: str) -> None:
        """Write the moving brain mask (found on the RAS-reoriented grid) on the moving file's own grid, voxel for
        voxel (a reorientation: nearest neighbour lands on voxel centres), as uint8 0/1."""
        native = resample_onto(
            mask.as_tensor().cpu(),
            affine_of(mask),
            torch.from_numpy(np.asarray(moving_file.affine, dtype=np.float64)),
            moving_file.shape[:3],
            torch.eye(4, dtype=torch.float64),
            mode="nearest",
        )[0]
        save_volume(os.path.join(folder, MASK_FILE), (native > 0.5).numpy(), moving_file, np.uint8)

    @staticmethod
    def _write_extra(path: str, target: str, fixed_file, fixed_affine: torch.Tensor, matrix: torch.Tensor) -> None:
        """Apply the transform to an accompanying image and write it to ``target``: integer images are label maps
        (nearest neighbour, values and dtype kept exactly), others are resampled trilinearly to float32."""
        volume = load_volume(path, require_contrast=False)
        moving_affine = affine_of(volume)
        if not is_label_map(path):
            warped = resample_onto(volume.as_tensor(), moving_affine, fixed_affine, fixed_file.shape[:3], matrix)[0]
            save_volume(target, warped.numpy(), fixed_file, np.float32)
            return
        # Label values need not fit float32 (2**24 + 1 does not), which the resampling computes in: it moves the
        # 1-based rank of each voxel's value among the image's values instead (0: outside the moving image).
        labels = np.asanyarray(nib.load(path).dataobj).reshape(volume.shape[1:])
        values, ranks = np.unique(labels, return_inverse=True)
        if len(values) >= 2**24:
            raise KeyMorphInputError(f"{path}: more than 2**24 distinct label values")
        ranks = torch.from_numpy((ranks.reshape(labels.shape) + 1).astype(np.float32))[None]
        del volume
        warped = resample_onto(ranks, moving_affine, fixed_affine, fixed_file.shape[:3], matrix, mode="nearest")[0]
        warped = warped.numpy().astype(np.int64)
        dtype = nib.load(path).get_data_dtype()
        out = np.where(warped > 0, values[np.maximum(warped - 1, 0)], 0).astype(dtype)
        save_volume(target, out, fixed_file, dtype)

    def _write_summary(self) -> None:
        def write(path: str) -> None:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.rows.values())

        write_atomically(self.summary_path, write)
        write_atomically(self.index_path, lambda p: write_index(p, self.output_dir, self.rows.values()))

    def _report(self, engine: Engine) -> None:
        """Log this run's counts and leave them in ``engine.state.registration_counts`` (the exit code uses them);
        let go of the output folder. Raises :class:`KeyMorphInputError` when the summary could not be written (the
        output folder stopped taking files during the run)."""
        if self.summary_problem is not None:
            self._try_write_summary()
        self.lock.release()
        engine.state.registration_counts = dict(self.counts)
        total = sum(self.counts.values())
        parts = ", ".join(f"{self.counts[s]} {s}" for s in STATUSES if self.counts.get(s))
        if self.summary_problem is not None:
            raise KeyMorphInputError(
                f"{self.summary_path}: cannot write the summary ({self.summary_problem}): the output folder stopped"
                f" taking files during the run; {total} input(s) this run: {parts or 'none'}"
            )
        logger.info(f"{total} input(s): {parts or 'none'}; summary: {self.summary_path}; QC page: {self.index_path}")


@workflow_step
def run_registration(evaluator) -> None:
    """Run the inference evaluator; exit 1 when any input failed (saying how many), 2 on a bad setting."""
    try:
        evaluator.run()
    except KeyMorphInputError as error:
        fail(str(error))
    counts = getattr(evaluator.state, "registration_counts", {})
    failed = counts.get("error", 0)
    if failed:
        summary = os.path.join(getattr(evaluator, "output_dir", "."), "summary.csv")
        fail(f"{failed} of {sum(counts.values())} input(s) failed; see {summary} for each message", code=1)

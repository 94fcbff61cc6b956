"""What a registered case leaves in ``OUT_DIR/NAME/``, and the handler of ``configs/inference.yaml`` writing it.

For ``IN_DIR/NAME.nii.gz``, :class:`RegistrationWriter` fills ``OUT_DIR/NAME/`` with ``registered.nii.gz`` (the
ORIGINAL moving image resampled onto the fixed image's native grid, with the fixed header: :func:`write_registered`,
which the benchmark calls too), the transform files of :func:`scripts.transform_io.write_transform_files`
(``transform.tfm``: ITK, fixed -> moving physical points, LPS; its inverse; ``affine_ras.txt``: moving RAS mm ->
fixed RAS mm; FSL FLIRT and FreeSurfer LTA files), ``moving_mask.nii.gz`` (the moving brain mask on the moving
grid), ``keypoints_moving.csv`` and ``keypoints_fixed.csv`` (RAS mm), ``qc.png`` (the fixed image's edges over the
registered image, fixed grid), ``qc_keypoints.png`` (the network grids with the keypoints), ``provenance.json``
(what produced the case, and the case's ``summary.csv`` row: :data:`scripts.provenance.SUMMARY_ROW_KEY`),
optionally ``registered_header_only.nii.gz`` (the moving voxels with the header moved into the fixed space) and,
for each accompanying image ``EXTRA`` (``apply_to``), ``registered_EXTRA``; ``OUT_DIR/summary.csv`` gets one row per
input and ``OUT_DIR/index.html`` shows them all, worst first (:mod:`scripts.qc_report`).

Outputs are atomic per case: the files are written into a hidden staging folder ``OUT_DIR/.keymorph-tmp-*``, which
then replaces ``OUT_DIR/NAME`` as a whole (:func:`scripts.output_folder.replace_folder`), so ``OUT_DIR/NAME`` is
either absent, the complete old result or the complete new one, never a mix, even after a crash or kill (leftover
hidden folders are removed by the next run). Overwriting replaces the whole case folder, files added to it by hand
included. A case is done when ``OUT_DIR/NAME`` holds every output file (:func:`case_done`). Registered cases get
``ok``, or ``suspect`` with the reasons when :mod:`scripts.qc` flags them; a case whose files cannot be written
gets ``error`` and the next case is written.

The folder's files cost the same per case however many cases came before: each case's row is appended to
``summary.csv`` as the case ends (a later row of a name replaces its earlier ones, as a redone case's does), and
``summary.csv`` as a whole (one row per case) and ``index.html`` are rebuilt when a run starts on an earlier
summary, with its first case, then at most every :data:`REBUILD_SECONDS` (less often when a rebuild takes long:
:data:`REBUILD_SHARE`) and at its end.

No finished case loses its row, whenever a run is killed: a case's folder records the case's row (in
``provenance.json``, written into the staging folder, so the row is there as soon as the folder is), and a rerun
that skips a finished case takes its row from the folder (the dataset reads it with the record it compares and
hands it on with the skipped case), also when the killed run put the folder in place but did not get to append the
row (or appended it only to a rank's row file). The rows of a killed run's other
finished cases are in ``summary.csv`` (and the row files) already. A folder written before folders recorded their
row keeps the row ``summary.csv`` has for it.

Under ``torchrun`` (``configs/multi_gpu_inference.yaml``) every rank runs a writer for its own share of the cases
and writes their folders (atomic as above); the writers follow the default process group. Rank 0 alone holds the
folder's lock (``OUT_DIR/.keymorph.lock``: the job is one run), cleans what a killed run left and reads the earlier
rows, then tells the others (the same one-line refusal on every rank when the folder is taken). During the run
rank 0 keeps ``summary.csv`` and ``index.html`` current with its own cases, each other rank appends its rows to
``OUT_DIR/.keymorph-rows-RANK.csv``; when every rank is done, rank 0 merges all rows into ``summary.csv`` and
``index.html`` and removes the row files, and every rank learns the counts of the whole job (one exit code). A
killed job loses no finished case: its folders are complete and record their rows, and the next run merges the
row files it finds.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import shutil
import time
from collections import Counter

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from scripts.cli import as_bool
from scripts.coordinates import affine_of, resample_onto
from scripts.errors import KeyMorphInputError, message_naming, worker_died
from scripts.image_io import header_moved, is_label_map, load_volume, save_volume
from scripts.output_folder import (
    INDEX_FILE,
    SUMMARY_FILE,
    RunLock,
    inside,
    rank_rows_files,
    rank_rows_path,
    read_summary_rows,
    remove_leftovers,
    replace_folder,
    staging_name,
)
from scripts.provenance import PROVENANCE_FILE, SUMMARY_ROW_KEY, write_provenance
from scripts.qc import QC_THRESHOLDS, qc_figure, qc_flags, qc_scores
from scripts.qc_report import EdgesFigure, write_index
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
    "brain_overlap",
]
STATUSES = ("ok", "suspect", "error", "skipped")
#: During a run, index.html (and summary.csv as a whole) is rebuilt at most every REBUILD_SECONDS, and at most
#: REBUILD_SHARE of the time goes to it (a large folder's rebuild takes longer, so it comes less often): each case
#: costs the same however many came before. summary.csv gets each row appended as its case ends.
REBUILD_SECONDS = 10.0
REBUILD_SHARE = 0.05
#: What a run keeps of each fixed image (preprocessed, and for qc.png), for the last few fixed images only: a folder
#: has one, a pairs CSV may name one per row, and memory must not grow with the number of pairs.
FIXED_IMAGES_KEPT = 4


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


def source_path(item: dict) -> str:
    """The moving image's path of a dataset item, before or after preprocessing (then a MetaTensor)."""
    image = item.get("original", item["image"])
    if isinstance(image, str):
        return image
    return str(getattr(image, "meta", {}).get("filename_or_obj", item.get("name", "<image>")))


def write_registered(path: str, moving, fixed_file: nib.Nifti1Image, fixed_to_moving: torch.Tensor) -> torch.Tensor:
    """Resample the ORIGINAL moving image (a ``(1, D, H, W)`` MetaTensor on its own grid) onto the fixed file's
    native grid through the ``(4, 4)`` fixed-to-moving world matrix and write it to ``path`` with the fixed header
    (float32); returns the resampled ``(D, H, W)`` volume."""
    registered = resample_onto(
        moving.as_tensor(), affine_of(moving), affine_of(fixed_file), fixed_file.shape[:3], fixed_to_moving
    )[0]
    save_volume(path, registered.numpy(), fixed_file, np.float32)
    return registered


def write_native_mask(path: str, mask, moving_file: nib.Nifti1Image) -> None:
    """Write a brain mask found on the RAS-reoriented grid (``mask``: ``(1, D, H, W)`` MetaTensor, brain > 0.5) on
    the moving file's own grid, voxel for voxel (a reorientation: nearest neighbour lands on voxel centres), as uint8
    0/1 with the file's header (:func:`scripts.image_io.save_volume`: atomically). Read back through the RAS
    reorientation (:func:`scripts.image_io.load_onto_grid`), it gives the same mask on the same grid."""
    native = resample_onto(
        mask.as_tensor().cpu(),
        affine_of(mask),
        torch.from_numpy(np.asarray(moving_file.affine, dtype=np.float64)),
        moving_file.shape[:3],
        torch.eye(4, dtype=torch.float64),
        mode="nearest",
    )[0]
    save_volume(path, (native > 0.5).numpy(), moving_file, np.uint8)


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the default ``torch.distributed`` process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def format_seconds(value) -> str:
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
        min_brain_overlap: likewise for the Dice of the registered moving brain mask and the fixed brain mask
            (below it: "suspect").
        header_only: also write ``registered_header_only.nii.gz`` (:func:`scripts.image_io.header_moved`).
    """

    #: the columns of ``summary.csv`` (a subclass may add its own, filled from the iteration output)
    summary_columns = SUMMARY_COLUMNS

    def __init__(
        self,
        output_dir: str,
        similarity_threshold: float = QC_THRESHOLDS["min_similarity"],
        residual_threshold: float = QC_THRESHOLDS["max_residual_mm"],
        max_brain_fill: float = QC_THRESHOLDS["max_brain_fill"],
        min_smoothness: float = QC_THRESHOLDS["min_smoothness"],
        min_brain_overlap: float = QC_THRESHOLDS["min_brain_overlap"],
        header_only: bool = False,
    ):
        self.output_dir = output_dir
        self.header_only = as_bool(header_only, "header_only")
        self.thresholds = {
            "min_similarity": float(similarity_threshold),
            "max_residual_mm": float(residual_threshold),
            "max_brain_fill": float(max_brain_fill),
            "min_smoothness": float(min_smoothness),
            "min_brain_overlap": float(min_brain_overlap),
        }
        self.rows: dict[str, dict] = {}
        # the rows this run started from (rank 0 merges the ranks' rows into them, as one process would)
        self.earlier_rows: dict[str, dict] = {}
        # the rows of the cases this process registered in this run (what a rank hands rank 0)
        self.run_rows: dict[str, dict] = {}
        self.counts: dict[str, int] = {}
        self.rank, self.world_size = 0, 1
        self.lock = RunLock(output_dir)
        self.summary_problem: str | None = None
        # the rows file as written (the last row of each name), and when it was last written as a whole, how fast
        self.rows_in_file: dict[str, dict] = {}
        self.last_rebuild, self.rebuild_seconds = -math.inf, 0.0
        # qc.png's fixed-image part, once per fixed image (the last few kept)
        self.edges_figure = functools.lru_cache(maxsize=FIXED_IMAGES_KEPT)(lambda path: EdgesFigure(nib.load(path)))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._load_summary)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._report)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._release_and_raise)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.output_dir, SUMMARY_FILE)

    @property
    def rows_path(self) -> str:
        """The file this process keeps its rows in during the run: ``summary.csv`` on rank 0, else its row file."""
        return self.summary_path if self.rank == 0 else rank_rows_path(self.output_dir, self.rank)

    def _release_and_raise(self, engine: Engine, error: BaseException) -> None:
        self.lock.release()
        raise error

    @property
    def index_path(self) -> str:
        return os.path.join(self.output_dir, INDEX_FILE)

    def _load_summary(self, engine: Engine) -> None:
        """On rank 0 (or alone): take the output folder (:class:`scripts.output_folder.RunLock`), clean what a
        killed run left and read the earlier rows; the other ranks receive the rows, or the refusal, from rank 0."""
        self.rank, self.world_size = process_group()
        self.counts, self.run_rows, self.rows_in_file = {}, {}, {}
        problem, rows = None, self.rows
        if self.rank == 0:
            try:
                rows = self._take_folder()
            except KeyMorphInputError as error:
                problem = str(error)
        if self.world_size > 1:
            shared = [problem, rows]
            dist.broadcast_object_list(shared, src=0)
            problem, rows = shared
        if problem is not None:
            raise KeyMorphInputError(problem)
        self.earlier_rows, self.rows = rows, dict(rows)

    def _take_folder(self) -> dict[str, dict]:
        """Lock the output folder, remove what a killed run left and return the earlier rows: ``summary.csv``'s,
        updated by the row files of a killed multi-process job. An earlier summary is written again at once (the
        row files merged into it and removed; a spreadsheet's encoding and separators made the run's own; a case's
        replaced rows dropped), so that this run can append its rows to it."""
        os.makedirs(self.output_dir, exist_ok=True)
        self.lock.acquire()
        remove_leftovers(self.output_dir)
        rows = read_summary_rows(self.summary_path) if os.path.exists(self.summary_path) else dict(self.rows)
        unmerged = rank_rows_files(self.output_dir)
        for path in unmerged:
            rows.update(read_summary_rows(path))
        if unmerged or os.path.exists(self.summary_path):
            self.rows = rows
            self._write_merged_summary()
        return rows

    def _write_merged_summary(self) -> None:
        """Write the summary with the ranks' rows merged into it; once it is written, remove their row files."""
        self._try_write_summary()
        if self.summary_problem is None:
            for path in rank_rows_files(self.output_dir):
                os.remove(path)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        row = self._output_row(output)
        if output["status"] == "skipped":
            row = self._recorded_row(output) or dict(self.rows.get(output["name"], row))
        elif output["status"] == "ok":
            moving_path = source_path(output["moving"])
            try:
                row = self._write_case(output)
            except Exception as error:  # one case must never stop the folder
                if worker_died(error):
                    raise
                logger.debug("writing the outputs of %s failed", moving_path, exc_info=True)
                row.update(status="error", message=message_naming(error, moving_path))
                row["seconds"] = time.perf_counter() - output["start"]
        row["seconds"] = format_seconds(row.get("seconds"))
        name = output["name"]
        unchanged = self.rows_in_file.get(name) == row  # a skipped case's earlier row, already in the file
        self.rows[name] = self.run_rows[name] = row
        status = "skipped" if output["status"] == "skipped" else row["status"]
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "error":
            logger.error(row["message"])
        elif status in ("suspect", "ok") and row["message"]:  # QC flags, or notes such as an unmatched apply_to
            logger.warning(f"{name}: {row['message']}")
        if not unchanged:
            self._try_write_summary(appended=row)

    def _rebuild_due(self) -> bool:
        """Whether rank 0 (or a single process) rebuilds ``index.html`` and ``summary.csv`` as a whole now (see
        :data:`REBUILD_SECONDS`)."""
        waited = time.monotonic() - self.last_rebuild
        return self.rank == 0 and waited >= max(REBUILD_SECONDS, self.rebuild_seconds / REBUILD_SHARE)

    def _try_write_summary(self, appended: dict | None = None) -> None:
        """Append the row ``appended`` to the rows file (``summary.csv``, or a rank's row file), or write it as a
        whole when no row is given, when it is due (:meth:`_rebuild_due`, also ``index.html``) or when an earlier
        write failed. When the folder stops taking files (read-only, full), keep the rows in memory, warn once, and
        let the other cases go on: :meth:`_report` tries once more and ends the run with one line."""
        try:
            if appended is None or self.summary_problem is not None or self._rebuild_due():
                self._write_summary()
            else:
                self._append_row(appended)
            self.summary_problem = None
        except OSError as error:
            if self.summary_problem is None:
                logger.warning(f"{self.rows_path}: cannot write ({error.strerror or error}); trying on")
            self.summary_problem = error.strerror or str(error)

    def _append_row(self, row: dict) -> None:
        """Add ``row`` at the end of the rows file (with the header when the file is new). A later row of a name
        replaces its earlier ones for every reader (:func:`scripts.output_folder.read_summary_rows`); the file is
        compacted by the next whole write. One short line, flushed at once: a killed run leaves whole rows."""
        new_file = not os.path.isfile(self.rows_path) or os.path.getsize(self.rows_path) == 0
        with open(self.rows_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.summary_columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        self.rows_in_file[row["name"]] = row

    def _output_row(self, output: dict) -> dict:
        """The summary row of an iteration output, as the evaluator gives it (its ``summary_columns``)."""
        return {key: output.get(key, "") for key in self.summary_columns}

    def _recorded_row(self, output: dict) -> dict | None:
        """The summary row the folder of a skipped finished case records (:meth:`_write_case`), as the dataset
        read it with the rest of the record and the evaluator passed it on (``output[SUMMARY_ROW_KEY]``), or None
        when it records none (a folder of an older version of the bundle)."""
        recorded = output.get(SUMMARY_ROW_KEY)
        if not isinstance(recorded, dict):
            return None
        return {**{key: str(recorded.get(key, "")) for key in self.summary_columns}, "name": output["name"]}

    def _write_case(self, output: dict) -> dict:
        """Write one case through a staging folder; returns its summary row (status, message, scores, seconds),
        which ``provenance.json`` records with what produced the case before the folder is put in place: the row
        is never lost once the folder exists (:meth:`_recorded_row`)."""
        name = output["name"]
        final = inside(self.output_dir, name)
        staging = inside(self.output_dir, staging_name("tmp", name))
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            row = {**self._output_row(output), **self._write_files(output, staging)}
            row["seconds"] = format_seconds(time.perf_counter() - output["start"])
            record = {**(output["moving"].get("provenance") or {}), SUMMARY_ROW_KEY: row}
            write_atomically(os.path.join(staging, PROVENANCE_FILE), lambda p: write_provenance(p, record))
            replace_folder(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return row

    def _write_files(self, output: dict, folder: str) -> dict:
        """Write the case's files but ``provenance.json`` into ``folder``; returns the summary fields (status,
        message, QC scores)."""
        registration, fixed, moving = output["registration"].to("cpu"), output["fixed"], output["moving"]
        moving_volume = moving["original"]
        source = moving_volume.meta.get("filename_or_obj", output["name"])
        matrix = registration.fixed_to_moving[0].detach().cpu().to(torch.float64)
        if not bool(torch.isfinite(matrix).all()) or abs(float(torch.linalg.det(matrix[:3, :3]))) < 1e-6:
            raise KeyMorphInputError(f"{source}: registration failed (the fitted transform is degenerate)")
        fixed_file = nib.load(fixed["image"].meta["filename_or_obj"])
        fixed_affine = affine_of(fixed_file)
        registered = write_registered(os.path.join(folder, "registered.nii.gz"), moving_volume, fixed_file, matrix)
        for extra, extra_name in zip(moving.get("extra", []), extra_output_names(moving.get("extra", []))):
            self._write_extra(extra, inside(folder, extra_name), fixed_file, fixed_affine, matrix)
        moving_file = nib.load(source)
        write_transform_files(folder, matrix, fixed_file, moving_file)
        write_native_mask(os.path.join(folder, MASK_FILE), moving["native_mask"], moving_file)
        if self.header_only:
            moved = header_moved(moving_file, torch.linalg.inv(matrix).numpy(), fixed_file)
            write_atomically(os.path.join(folder, HEADER_ONLY_FILE), lambda p: nib.save(moved, p))
        for role, points in (("moving", registration.moving_points), ("fixed", registration.fixed_points)):
            path = os.path.join(folder, f"keypoints_{role}.csv")
            write_atomically(path, lambda p, pts=points: write_keypoints_csv(p, pts[0].detach().cpu()))
        scores = qc_scores(registration, fixed, moving)
        title = f"{output['name']}: fixed image edges over the registered image"
        edges_figure = self.edges_figure(fixed["image"].meta["filename_or_obj"])
        write_atomically(os.path.join(folder, "qc.png"), lambda p: edges_figure(p, registered, title))
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
            "brain_overlap": f"{scores['brain_overlap']:.4f}",
        }

    @staticmethod
    def _write_extra(path: str, target: str, fixed_file, fixed_affine: torch.Tensor, matrix: torch.Tensor) -> None:
        """Apply the transform to an accompanying image and write it to ``target``: integer images are label maps
        (nearest neighbour, values and dtype kept exactly), others are resampled trilinearly to float32."""
        volume = load_volume(path, to_register=False)
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
        """Rank 0 (or alone): ``summary.csv`` and ``index.html`` with every row; another rank: its row file with
        its own rows."""

        def write(path: str, rows) -> None:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.summary_columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        start = time.monotonic()
        rows = self.run_rows if self.rank > 0 else self.rows
        write_atomically(self.rows_path, lambda p: write(p, rows.values()))
        self.rows_in_file = dict(rows)
        if self.rank == 0:
            write_atomically(self.index_path, lambda p: write_index(p, self.output_dir, self.rows.values()))
        self.last_rebuild = time.monotonic()
        self.rebuild_seconds = self.last_rebuild - start

    def _gather_ranks(self) -> None:
        """When every rank is done: rank 0 merges the ranks' rows into the earlier ones in the order of the cases
        (rank r registered cases r, r + N, ...), as one process would have; every rank learns the job's counts."""
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, (self.run_rows, self.counts))
        if self.rank == 0:
            shares = [list(rows.items()) for rows, _ in everyone]
            self.rows = dict(self.earlier_rows)
            for turn in range(max(len(share) for share in shares)):
                self.rows.update(share[turn] for share in shares if turn < len(share))
        self.counts = dict(sum((Counter(counts) for _, counts in everyone), Counter()))

    def _report(self, engine: Engine) -> None:
        """Log this run's counts and leave them in ``engine.state.registration_counts`` (the exit code uses them);
        let go of the output folder. Raises :class:`KeyMorphInputError` when the summary could not be written (the
        output folder stopped taking files during the run). Under ``torchrun``: the rows and counts of every rank
        (rank 0 writes the merged summary); the error is rank 0's alone (the other ranks' rows reached it)."""
        if self.world_size > 1:
            self._gather_ranks()
            if self.rank > 0:
                self.summary_problem = None
            else:
                self._write_merged_summary()
        else:
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

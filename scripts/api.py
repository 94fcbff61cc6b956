"""Register from Python: :func:`register` one moving image to a fixed image, through the bundle's own workflow.

``register`` runs exactly what ``python -m monai.bundle run --config_file configs/inference.yaml`` runs (the
``configs/inference.yaml`` workflow: its checks, preprocessing, network, fit, refinement and writer) on a one-row
pairs CSV, then reads the case's files back: there is no second pipeline. Settings are the config's, as keyword
arguments (``skull_strip="none"``, ``aligner="rigid"``, ``refine_iterations=0``, ``device="cpu"``, ...)::

    from scripts.api import register

    result = register("t2.nii.gz", "t1.nii.gz", skull_strip="deepbet")
    result.moving_to_fixed        # (4, 4) RAS mm, moving -> fixed (affine_ras.txt)
    result.registered             # nibabel image on the fixed grid (registered.nii.gz)

:func:`inference_workflow` builds the workflow itself (``scripts.register``, the command line, runs it too).
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow

from scripts.cli import unknown_key
from scripts.coordinates import ras_to_lps
from scripts.errors import KeyMorphInputError, KeyMorphWorkflowError
from scripts.image_io import default_atlas_path, nifti_stem
from scripts.transform_io import read_itk_transform, read_keypoints_csv

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
INFERENCE_CONFIG = BUNDLE_ROOT / "configs" / "inference.yaml"
METADATA = BUNDLE_ROOT / "configs" / "metadata.json"
# summary.csv columns that are QC scores (numbers)
QC_COLUMNS = ("keypoint_residual_mm", "similarity", "brain_fill", "smoothness", "brain_overlap")


@dataclass
class RegistrationResult:
    """One registration, as the bundle wrote it (world matrices are RAS mm unless named ``_itk``: LPS, as ITK files).

    Attributes:
        fixed_to_moving: ``(4, 4)`` fixed -> moving world matrix (the resampling direction; ``transform.tfm``).
        moving_to_fixed: its inverse (``affine_ras.txt``).
        fixed_to_moving_itk, moving_to_fixed_itk: the same in ITK's LPS world (``transform.tfm``,
            ``transform_inverse.tfm``).
        registered: the moving image resampled onto the fixed image's grid (``registered.nii.gz``), in memory.
        moving_keypoints, fixed_keypoints: ``(K, 3)`` keypoints in world mm; row k of one matches row k of the other.
        qc: the QC scores of ``summary.csv`` (``keypoint_residual_mm``, ``similarity``, ``brain_fill``,
            ``smoothness``, ``brain_overlap``; see :mod:`scripts.qc`).
        status: "ok", or "suspect" when a QC score crosses its threshold (``message`` says which).
        message: the summary message ("" when there is nothing to say).
        case_dir: the folder holding every output file when ``output_dir`` was given, else None (the files were
            written to a temporary folder, now removed).
    """

    fixed_to_moving: np.ndarray
    moving_to_fixed: np.ndarray
    fixed_to_moving_itk: np.ndarray
    moving_to_fixed_itk: np.ndarray
    registered: nib.Nifti1Image
    moving_keypoints: np.ndarray
    fixed_keypoints: np.ndarray
    qc: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    message: str = ""
    case_dir: str | None = None


def inference_workflow(logging: bool = True, **settings) -> ConfigWorkflow:
    """The ``configs/inference.yaml`` workflow of this bundle with ``settings`` (config ids -> values) applied,
    not yet initialized. ``bundle_root`` defaults to this bundle's folder, so the weights are found from any working
    directory. With ``logging`` false the bundle's ``logging.conf`` is not applied (the caller's logging stays).

    Raises:
        KeyMorphWorkflowError: a setting the config does not have (exit code 2).
    """
    problem = unknown_key([str(INFERENCE_CONFIG)], settings)
    if problem:
        raise KeyMorphWorkflowError(problem, 2)
    return ConfigWorkflow(
        config_file=str(INFERENCE_CONFIG),
        meta_file=str(METADATA),
        logging_file=None if logging else False,
        workflow_type="infer",
        **{"bundle_root": str(BUNDLE_ROOT), **settings},
    )


def workflow_error(error: BaseException) -> KeyMorphWorkflowError | None:
    """The :class:`KeyMorphWorkflowError` behind an error of a workflow (MONAI wraps errors of config expressions in
    ``RuntimeError("Failed to evaluate ...")``), or None."""
    while error is not None:
        if isinstance(error, KeyMorphWorkflowError):
            return error
        error = error.__cause__
    return None


def run_workflow(workflow: ConfigWorkflow) -> None:
    """``initialize``, ``run`` and ``finalize`` the workflow; a stop of the workflow (a wrong setting, failed inputs)
    is raised as its :class:`KeyMorphWorkflowError`, not MONAI's wrapper."""
    try:
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    except Exception as error:
        stop = workflow_error(error)
        if stop is None:
            raise
        raise stop from None


def _as_file(image: str | os.PathLike | nib.Nifti1Image, folder: str, name: str) -> str:
    """A path for a path, or the file an in-memory nibabel image is saved to in ``folder``."""
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(os.fspath(image))
    if isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        path = os.path.join(folder, f"{name}.nii.gz")
        nib.save(image, path)
        return path
    raise KeyMorphInputError(f"{name} image: expected a NIfTI path or a nibabel image, got {type(image).__name__}")


def _in_memory(path: str) -> nib.Nifti1Image:
    """A NIfTI file's image with its voxels read (the file may be removed afterwards)."""
    image = nib.load(path)
    return type(image)(np.asarray(image.dataobj), image.affine, image.header)


def register(
    moving: str | os.PathLike | nib.Nifti1Image,
    fixed: str | os.PathLike | nib.Nifti1Image | None = None,
    output_dir: str | os.PathLike | None = None,
    **settings,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with the bundle's inference workflow and return the result.

    Args:
        moving: the moving image, a NIfTI path or a nibabel image (3-D, any orientation, spacing and data type).
        fixed: the fixed image likewise; None: the MNI152 2009 T1 template at 1 mm, brain-extracted (the bundle's
            default ``fixed_image``).
        output_dir: keep every output file in ``output_dir/NAME`` (NAME: the moving file's name without
            ``.nii[.gz]``, or "moving" for an in-memory image), with ``summary.csv`` and ``index.html``; None: a
            temporary folder, removed before returning.
        settings: settings of ``configs/inference.yaml`` (e.g. ``skull_strip``, ``fixed_skull_strip``,
            ``aligner``, ``refine_iterations``, ``header_only``, ``device``, ``ckpt_path``). ``overwrite`` is
            true: a call always registers. ``num_workers`` is 0 unless given: one pair has no next case to prepare
            meanwhile, and this process takes every core (the run sets its torch threads, see
            :func:`scripts.inference.main_process_threads`).

    Raises:
        KeyMorphWorkflowError: a wrong setting, fixed image, output folder or weights (``exit_code`` 2), one line.
        KeyMorphInputError: the moving image cannot be registered; one line naming the file.
    """
    with tempfile.TemporaryDirectory(prefix="keymorph-") as scratch:
        moving_path = _as_file(moving, scratch, "moving")
        fixed_path = _as_file(fixed, scratch, "fixed") if fixed is not None else default_atlas_path()
        name = nifti_stem(moving_path)
        pairs_csv = os.path.join(scratch, "pairs.csv")
        with open(pairs_csv, "w", newline="") as handle:
            csv.writer(handle).writerows([("moving", "fixed", "name"), (moving_path, fixed_path, name)])
        out = os.path.abspath(os.fspath(output_dir)) if output_dir is not None else os.path.join(scratch, "output")
        workflow = inference_workflow(
            logging=False,
            **{"num_workers": 0, **settings, "pairs_csv": pairs_csv, "output_dir": out, "overwrite": True},
        )
        try:
            run_workflow(workflow)
        except KeyMorphWorkflowError as error:
            if error.exit_code != 1:
                raise
            row = _summary_row(out, name)
            message = row.get("message") or str(error)
            if not isinstance(moving, (str, os.PathLike)):  # the file is ours, not the caller's
                message = message.replace(moving_path, "moving image (in memory)")
            raise KeyMorphInputError(message) from None
        return _read_case(os.path.join(out, name), _summary_row(out, name), keep=output_dir is not None)


def _summary_row(output_dir: str, name: str) -> dict[str, str]:
    with open(os.path.join(output_dir, "summary.csv"), newline="") as handle:
        return next((row for row in csv.DictReader(handle) if row["name"] == name), {})


def _read_case(case_dir: str, row: dict[str, str], keep: bool) -> RegistrationResult:
    """The result of one case from its files (before a temporary folder goes)."""
    fixed_to_moving = read_itk_transform(os.path.join(case_dir, "transform.tfm"))
    moving_to_fixed = np.linalg.inv(fixed_to_moving)
    moving_points, _ = read_keypoints_csv(os.path.join(case_dir, "keypoints_moving.csv"))
    fixed_points, _ = read_keypoints_csv(os.path.join(case_dir, "keypoints_fixed.csv"))
    return RegistrationResult(
        fixed_to_moving=fixed_to_moving,
        moving_to_fixed=moving_to_fixed,
        fixed_to_moving_itk=ras_to_lps(torch.from_numpy(fixed_to_moving)).numpy(),
        moving_to_fixed_itk=ras_to_lps(torch.from_numpy(moving_to_fixed)).numpy(),
        registered=_in_memory(os.path.join(case_dir, "registered.nii.gz")),
        moving_keypoints=moving_points,
        fixed_keypoints=fixed_points,
        qc={column: float(row[column]) for column in QC_COLUMNS if row.get(column)},
        status=row.get("status", ""),
        message=row.get("message", ""),
        case_dir=case_dir if keep else None,
    )

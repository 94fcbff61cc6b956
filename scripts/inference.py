"""Registering a folder of NIfTI files: the dataset, the evaluator and the writer of ``configs/inference.yaml``.

For ``IN_DIR/NAME.nii.gz`` the writer fills ``OUT_DIR/NAME/`` with ``registered.nii.gz`` (the ORIGINAL moving image
resampled onto the fixed image's native grid, with the fixed header), ``transform.tfm`` (ITK, fixed -> moving
physical points, LPS), ``affine_ras.txt`` (moving RAS mm -> fixed RAS mm), ``keypoints_moving.csv`` and
``keypoints_fixed.csv`` (RAS mm) and ``qc.png``; ``OUT_DIR/summary.csv`` gets one row per input. Every file is
written atomically; finished cases are skipped on a rerun unless ``overwrite`` is set.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import logging
import os
import time

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.engines import SupervisedEvaluator

from scripts.coordinates import resample_onto
from scripts.errors import KeyMorphInputError
from scripts.image_io import is_nifti, load_volume, save_volume
from scripts.qc import qc_figure, qc_scores
from scripts.transform_io import write_atomically, write_itk_transform, write_keypoints_csv, write_ras_matrix

logger = logging.getLogger(__name__)

OUTPUT_FILES = (
    "registered.nii.gz",
    "transform.tfm",
    "affine_ras.txt",
    "keypoints_moving.csv",
    "keypoints_fixed.csv",
    "qc.png",
)
SUMMARY_COLUMNS = ["name", "status", "message", "seconds", "keypoint_residual_mm", "similarity"]


def case_name(path: str) -> str:
    """``IN_DIR/NAME.nii.gz`` -> ``NAME``."""
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class RegistrationDataset(Dataset):
    """The cases to register, one dict per moving image: ``{"name", "image", "fixed", "extra"}``.

    Folder mode: every ``.nii``/``.nii.gz`` directly in ``dataset_dir`` is a moving image registered to
    ``fixed_image``; ``apply_to`` (a glob relative to ``dataset_dir`` with ``{name}`` standing for the case name, e.g.
    ``"labels/{name}_seg.nii.gz"``) names accompanying images the transform is also applied to; files it matches are
    not moving images themselves. Pairs mode: ``pairs_csv`` with columns ``moving``, ``fixed`` and optionally
    ``name`` and ``extra`` (paths separated by ``;``); relative paths are relative to the CSV.

    ``mask_dir`` (for ``--skull_strip mask``): the brain mask of ``NAME.nii.gz`` is ``mask_dir/NAME.nii.gz`` (or
    ``.nii``), given to the preprocessing as ``mask_path``.

    Items whose preprocessing fails come back as ``{"name", "image", "error"}`` so one bad file never stops the
    folder.
    """

    def __init__(
        self,
        dataset_dir: str,
        fixed_image: str,
        transform=None,
        pairs_csv: str | None = None,
        apply_to: str | None = None,
        mask_dir: str | None = None,
    ):
        items = self._pairs(pairs_csv) if pairs_csv else self._folder(dataset_dir, fixed_image, apply_to)
        for item in items:
            if mask_dir:
                item["mask_path"] = self._mask_path(mask_dir, item["name"])
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
        names = sorted(n for n in os.listdir(dataset_dir) if is_nifti(n) and not n.startswith("."))
        if apply_to:
            pattern = apply_to.replace("{name}", "*")
            names = [n for n in names if not fnmatch.fnmatch(n, pattern)]
        items = []
        for name in names:
            stem = case_name(name)
            extra = sorted(glob.glob(os.path.join(dataset_dir, apply_to.replace("{name}", stem)))) if apply_to else []
            items.append({"name": stem, "image": os.path.join(dataset_dir, name), "fixed": fixed_image, "extra": extra})
        if not items:
            raise KeyMorphInputError(f"{dataset_dir}: no .nii or .nii.gz files to register")
        return items

    @staticmethod
    def _pairs(pairs_csv: str) -> list[dict]:
        if not os.path.isfile(pairs_csv):
            raise KeyMorphInputError(f"{pairs_csv}: pairs CSV not found")
        root = os.path.dirname(os.path.abspath(pairs_csv))
        with open(pairs_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"moving", "fixed"} <= set(rows[0]):
            raise KeyMorphInputError(f"{pairs_csv}: needs a header with the columns 'moving' and 'fixed'")
        items = []
        for row in rows:
            moving = os.path.join(root, row["moving"])
            extra = [os.path.join(root, p) for p in (row.get("extra") or "").split(";") if p.strip()]
            items.append(
                {
                    "name": row.get("name") or case_name(moving),
                    "image": moving,
                    "fixed": os.path.join(root, row["fixed"]),
                    "extra": extra,
                }
            )
        return items

    def _transform(self, index: int):
        item = self.data[index]
        start = time.perf_counter()
        try:
            result = super()._transform(index)
        except KeyMorphInputError as error:
            result = {**item, "error": str(error)}
        except Exception as error:  # a library failing on a file we did not foresee: still one line, still go on
            reason = str(error).splitlines()[0] if str(error) else ""
            result = {**item, "error": f"{item['image']}: {type(error).__name__}: {reason}"}
        return {**result, "seconds": time.perf_counter() - start}


class RegistrationEvaluator(SupervisedEvaluator):
    """Registers each moving image of the dataset to its fixed image; one iteration per case.

    The fixed images are preprocessed once with ``fixed_preprocessing`` and kept. The iteration output is a dict
    with ``name``, ``status`` ("ok", "suspect", "error" or "skipped"), ``message``, ``seconds`` and, for registered
    cases, the :class:`scripts.registration.Registration` and the network-grid images for the writer.
    """

    def __init__(
        self,
        device,
        val_data_loader,
        network,
        inferer,
        fixed_preprocessing,
        output_dir: str,
        overwrite: bool = False,
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
        self.overwrite = overwrite
        self._fixed_cache: dict[str, dict] = {}

    def fixed(self, path: str) -> dict:
        if path not in self._fixed_cache:
            self._fixed_cache[path] = self.fixed_preprocessing({"image": path})
        return self._fixed_cache[path]

    def is_done(self, name: str) -> bool:
        folder = os.path.join(self.output_dir, name)
        return all(os.path.exists(os.path.join(folder, f)) for f in OUTPUT_FILES)

    def _iteration(self, engine: Engine, batchdata):
        item = batchdata[0]
        start = time.perf_counter() - item.get("seconds", 0.0)  # include the reading and preprocessing
        base = {"name": item["name"], "seconds": 0.0, "message": ""}
        if not self.overwrite and self.is_done(item["name"]):
            return {**base, "status": "skipped", "message": "outputs exist (set --overwrite true to redo)"}
        if "error" in item:
            return {**base, "status": "error", "message": item["error"], "seconds": time.perf_counter() - start}
        fixed = self.fixed(item["fixed"])
        self.network.eval()
        with torch.no_grad():
            registration = self.inferer(
                fixed["image"][None].to(engine.state.device), item["image"][None].to(engine.state.device), self.network
            )
        return {**base, "status": "ok", "registration": registration, "fixed": fixed, "moving": item, "start": start}


class RegistrationWriter:
    """Ignite handler writing each case's files and ``summary.csv`` (see the module docstring).

    Args:
        output_dir: OUT_DIR.
        similarity_threshold: cases whose aligned-image similarity (see :func:`scripts.qc.qc_scores`) falls below
            it are marked "suspect".
        residual_threshold: likewise for the keypoint fit residual in mm (above it: "suspect").
    """

    def __init__(self, output_dir: str, similarity_threshold: float = 0.0, residual_threshold: float = float("inf")):
        self.output_dir = output_dir
        self.similarity_threshold = similarity_threshold
        self.residual_threshold = residual_threshold
        self.rows: dict[str, dict] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._load_summary)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._report)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.output_dir, "summary.csv")

    def _load_summary(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        if os.path.exists(self.summary_path):
            with open(self.summary_path, newline="") as handle:
                self.rows = {row["name"]: row for row in csv.DictReader(handle)}

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        row = {key: output.get(key, "") for key in SUMMARY_COLUMNS}
        if output["status"] == "skipped":
            row = self.rows.get(output["name"], row)
        elif output["status"] == "ok":
            try:
                row.update(self._write_case(output))
            except KeyMorphInputError as error:
                row.update(status="error", message=str(error))
            row["seconds"] = time.perf_counter() - output["start"]
        row["seconds"] = f"{float(row['seconds'] or 0):.2f}"
        self.rows[output["name"]] = row
        if row["status"] == "error":
            logger.error(row["message"])
        self._write_summary()

    def _write_case(self, output: dict) -> dict:
        registration, fixed, moving = output["registration"], output["fixed"], output["moving"]
        folder = os.path.join(self.output_dir, output["name"])
        os.makedirs(folder, exist_ok=True)
        matrix = registration.fixed_to_moving[0].cpu()
        fixed_file = nib.load(fixed["image"].meta["filename_or_obj"])
        fixed_affine = torch.from_numpy(np.asarray(fixed_file.affine, dtype=np.float64))
        moving_volume = moving["original"]
        registered = resample_onto(
            moving_volume.as_tensor(),
            torch.as_tensor(moving_volume.affine, dtype=torch.float64),
            fixed_affine,
            fixed_file.shape[:3],
            matrix,
        )[0]
        save_volume(os.path.join(folder, "registered.nii.gz"), registered.numpy(), fixed_file, np.float32)
        for extra in moving.get("extra", []):
            self._write_extra(extra, folder, fixed_file, fixed_affine, matrix)
        write_atomically(os.path.join(folder, "transform.tfm"), lambda p: write_itk_transform(p, matrix))
        write_atomically(
            os.path.join(folder, "affine_ras.txt"), lambda p: write_ras_matrix(p, torch.linalg.inv(matrix))
        )
        for role, points in (("moving", registration.moving_points), ("fixed", registration.fixed_points)):
            path = os.path.join(folder, f"keypoints_{role}.csv")
            write_atomically(path, lambda p, pts=points: write_keypoints_csv(p, pts[0].cpu()))
        scores = qc_scores(registration, fixed, moving)
        write_atomically(os.path.join(folder, "qc.png"), lambda p: qc_figure(p, registration, fixed, moving))
        suspect = scores["similarity"] < self.similarity_threshold or scores["residual"] > self.residual_threshold
        message = "QC flagged: low similarity or large keypoint residual; check qc.png" if suspect else ""
        return {
            "status": "suspect" if suspect else "ok",
            "message": message,
            "keypoint_residual_mm": f"{scores['residual']:.3f}",
            "similarity": f"{scores['similarity']:.4f}",
        }

    @staticmethod
    def _write_extra(path: str, folder: str, fixed_file, fixed_affine: torch.Tensor, matrix: torch.Tensor) -> None:
        """Apply the transform to an accompanying image; integer images are label maps (nearest neighbour)."""
        volume = load_volume(path)
        is_label = np.issubdtype(nib.load(path).get_data_dtype(), np.integer)
        data = volume.as_tensor()
        warped = resample_onto(
            data,
            torch.as_tensor(volume.affine, dtype=torch.float64),
            fixed_affine,
            fixed_file.shape[:3],
            matrix,
            mode="nearest" if is_label else "bilinear",
        )[0]
        dtype = nib.load(path).get_data_dtype() if is_label else np.float32
        save_volume(os.path.join(folder, f"registered_{os.path.basename(path)}"), warped.numpy(), fixed_file, dtype)

    def _write_summary(self) -> None:
        def write(path: str) -> None:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.rows.values())

        write_atomically(self.summary_path, write)

    def _report(self, engine: Engine) -> None:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        engine.state.registration_counts = counts
        logger.info(f"registered {len(self.rows)} case(s): {counts}; summary: {self.summary_path}")

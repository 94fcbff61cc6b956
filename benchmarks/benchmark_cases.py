"""The benchmark's cases: the robustness sweep's datasets (:mod:`scripts.robustness_cases`) written as NIfTI files
that every method reads, the MNI152 template cases, the warm-up phantom, and the scored row of a case; see
``benchmarks/compare_methods.py`` (Cases).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from benchmark_summary import to_float

from scripts.transform_io import write_atomically

logger = logging.getLogger("compare_methods")


#: Air (mm) kept around the moving brain when its resampled grid is cropped.
MOVING_MARGIN_MM = 10.0


def _unframed(item: dict) -> dict:
    """The sweep datasets' ``frame``: the benchmark's methods read files, so no network grid is built here."""
    return item


def _tissue_labels(image, mask, iterations: int = 20):
    """A three-class tissue map of a T1 brain: k-means of the brain intensities into CSF (24), grey matter (3)
    and white matter (2), FreeSurfer labels whose tissue classes set the synthesis presets."""
    import torch

    values = image[mask]
    centers = torch.quantile(values[:: max(1, len(values) // 100000)], torch.tensor([0.15, 0.5, 0.85]))
    for _ in range(iterations):
        assignment = (values[:, None] - centers[None]).abs().argmin(1)
        centers = torch.stack(
            [values[assignment == c].mean() if (assignment == c).any() else centers[c] for c in range(3)]
        )
    labels = torch.zeros(image.shape, dtype=torch.int32)
    labels[mask] = torch.tensor([24, 3, 2], dtype=torch.int32)[assignment]
    return labels


def make_atlas_dataset(atlas_path: str, frame, spacing: float, synthesis: dict | None, **kwargs):
    """The MNI152 cases (module docstring): :class:`scripts.robustness_cases.RobustnessDataset` with the template as the
    fixed image, one same-image pair per modality pair and rotation. The modality pairs must have T1 fixed."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation, Spacing

    from scripts.image_io import load_volume
    from scripts.robustness_cases import RobustnessDataset, parse_modality_pair
    from scripts.synthesis import SynthesizeImaged

    class AtlasRobustnessDataset(RobustnessDataset):
        def __init__(self):
            super().__init__(frame, pairs_per_cell=1, same_subject_fraction=1.0, **kwargs)
            for pair in self.modality_pairs:
                if parse_modality_pair(pair)[0] != "T1":
                    raise ValueError(f"MNI152 cases need a T1 fixed image, not {pair}")
            self.synthesis = {"deform_std": 0.0, "skull_probability": 0.0, **dict(synthesis or {})}
            self.synthesis.pop("contrast", None)
            self._atlas: dict | None = None

        def atlas(self) -> dict:
            if self._atlas is None:
                image = Orientation(axcodes="RAS", labels=None)(load_volume(atlas_path))
                if not np.allclose(torch.as_tensor(image.affine)[:3, :3].norm(dim=0).numpy(), spacing, atol=1e-3):
                    image = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros")(image)
                image = CropForeground(select_fn=lambda x: x > 1e-3, margin=4)(image)
                data = image.as_tensor().clamp(0, 1)
                brain = data[0] > 1e-3
                data = data * brain
                labels = MetaTensor(_tissue_labels(data[0], brain)[None], affine=image.affine)
                self._atlas = {
                    "image": MetaTensor(data, affine=image.affine),
                    "mask": MetaTensor(brain[None].to(torch.float32), affine=image.affine),
                    "tissues": labels,
                }
            return self._atlas

        def base_pair(self, modality_pair: str, k: int, rng: np.random.RandomState) -> tuple[dict, dict]:
            _, moving_modality = parse_modality_pair(modality_pair)
            seed = int(rng.randint(0, 2**31 - 1))
            atlas = self.atlas()
            fixed = {"image": atlas["image"], "mask": atlas["mask"], "subject": "MNI152", "modality": "T1"}
            if moving_modality == "T1":
                image = atlas["image"].clone()
            else:
                transform = SynthesizeImaged(contrast=moving_modality, **self.synthesis)
                transform.set_random_state(seed=seed)
                image = transform({"label": atlas["tissues"].clone()})["image"]
            moving = {"image": image, "mask": atlas["mask"].clone(), "subject": "MNI152", "modality": moving_modality}
            return fixed, moving

    return AtlasRobustnessDataset()


def case_ids(dataset_name: str, modality_pair: str, k: int, angle: float) -> tuple[str, str]:
    """``(base id, case id)``: e.g. ``("label_maps_T1-T2_p0", "label_maps_T1-T2_p0_r90")``."""
    base = f"{dataset_name}_{modality_pair}_p{k}"
    return base, f"{base}_r{angle:g}"


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write(text)

    write_atomically(path, write)


def _write_nifti(path: str, data, affine, dtype) -> None:
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda temporary: nib.save(image, temporary))


def crop_to_mask(image, mask, margin_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, mask, affine)`` of a ``(1, D, H, W)`` image and mask cropped to the mask's bounding box plus
    ``margin_mm`` (numpy ``(D, H, W)`` arrays; the affine moved to the new first voxel)."""
    data, brain = np.asarray(image[0]), np.asarray(mask[0]) > 0.5
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    found = np.argwhere(brain)
    if not len(found):
        return data, brain, affine
    margin = np.ceil(margin_mm / spacing).astype(int)
    low = np.maximum(found.min(0) - margin, 0)
    high = np.minimum(found.max(0) + margin + 1, brain.shape)
    region = tuple(slice(a, b) for a, b in zip(low, high))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    return data[region], brain[region], shifted


def write_case(case: dict, base_dir: str, case_dir: str, write_fixed: bool) -> dict:
    """Write a case's files (module docstring); returns the paths of the fixed and the moving image."""
    fixed, moving = case["fixed"], case["moving"]
    paths = {"fixed": os.path.join(base_dir, "fixed.nii.gz"), "moving": os.path.join(case_dir, "moving.nii.gz")}
    if write_fixed or not os.path.isfile(paths["fixed"]):
        affine = np.asarray(fixed["image"].affine, dtype=np.float64)
        _write_nifti(os.path.join(base_dir, "fixed_mask.nii.gz"), np.asarray(fixed["mask"][0]) > 0.5, affine, np.uint8)
        if "label" in fixed:
            _write_nifti(
                os.path.join(base_dir, "fixed_labels.nii.gz"), fixed["label"][0], fixed["label"].affine, np.int16
            )
        _write_nifti(paths["fixed"], fixed["image"][0], affine, np.float32)
    image, mask, affine = crop_to_mask(moving["image"], moving["mask"], MOVING_MARGIN_MM)
    _write_nifti(os.path.join(case_dir, "moving_mask.nii.gz"), mask, affine, np.uint8)
    if "label" in moving:
        _write_nifti(
            os.path.join(case_dir, "moving_labels.nii.gz"), moving["label"][0], moving["label"].affine, np.int16
        )
    _write_nifti(paths["moving"], image, affine, np.float32)
    truth = case.get("true_fixed_to_moving")
    description = {
        "case": case["case_id"],
        "modality_pair": case["modality_pair"],
        "rotation_deg": float(case["rotation_deg"]),
        "same_subject": bool(case["same_subject"]),
        "fixed_subject": fixed.get("subject", ""),
        "moving_subject": moving.get("subject", ""),
        "applied_transform": np.asarray(case["applied_transform"], dtype=np.float64).tolist(),
        "true_fixed_to_moving": None if truth is None else np.asarray(truth, dtype=np.float64).tolist(),
        "convention": "world RAS mm; true_fixed_to_moving maps fixed points to moving points",
    }
    write_text(os.path.join(case_dir, "case.json"), json.dumps(description, indent=2) + "\n")
    return paths


def write_phantom_pair(folder: str) -> dict:
    """A small brain-like phantom pair (the warm-up of each worker): ``{"fixed", "moving", "output_dir"}``."""
    paths = {
        "fixed": os.path.join(folder, "fixed.nii.gz"),
        "moving": os.path.join(folder, "moving.nii.gz"),
        "output_dir": os.path.join(folder, "output"),
    }
    if os.path.isfile(paths["fixed"]) and os.path.isfile(paths["moving"]):
        return paths
    size, spacing = 64, 2.5
    axis = (np.arange(size) - (size - 1) / 2) * spacing
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    brain = (x / 65) ** 2 + (y / 80) ** 2 + (z / 60) ** 2 <= 1
    ventricles = ((x - 10) / 8) ** 2 + ((y - 8) / 20) ** 2 + (z / 10) ** 2 <= 1
    ventricles |= ((x + 10) / 8) ** 2 + ((y - 8) / 20) ** 2 + (z / 10) ** 2 <= 1
    image = (0.6 + 0.25 * np.sin(x / 12) * np.cos(y / 17) + 0.1 * np.cos(z / 9)) * brain
    image[ventricles] = 0.15
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2 * spacing
    _write_nifti(paths["fixed"], image, affine, np.float32)
    shifted = affine.copy()
    shifted[:3, 3] += [4.0, -3.0, 2.0]
    _write_nifti(paths["moving"], image, shifted, np.float32)
    return paths


def build_datasets(settings: dict, label_maps: dict[str, str]) -> list[tuple[str, object]]:
    """``[(dataset name, RobustnessDataset)]``: the label-map cases and, with ``include_mni``, the template's."""
    from scripts.robustness_cases import SyntheticRobustnessDataset

    common = {
        "rotations": settings["rotations"],
        "scale_range": settings["scale_range"],
        "translate_mm": settings["translate_mm"],
        "resample_moving": True,
        "seed": settings["seed"],
    }
    datasets = [
        (
            "label_maps",
            SyntheticRobustnessDataset(
                label_maps,
                _unframed,
                settings["synthesis"],
                settings["spacing"],
                modality_pairs=settings["modality_pairs"],
                pairs_per_cell=settings["pairs_per_cell"],
                same_subject_fraction=settings["same_subject_fraction"],
                **common,
            ),
        )
    ]
    if settings["include_mni"]:
        from scripts.image_io import default_atlas_path

        pairs = [p for p in settings["modality_pairs"] if p.startswith("T1-")]
        datasets.append(
            (
                "mni152",
                make_atlas_dataset(
                    default_atlas_path(),
                    _unframed,
                    settings["spacing"],
                    settings["synthesis"],
                    modality_pairs=pairs,
                    **common,
                ),
            )
        )
    return datasets


def score_row(case: dict, dataset_name: str, method: str, result: dict) -> dict:
    """A row of ``cases.csv`` from a method's result (``matrix`` or ``error``) on a case."""
    import torch

    from scripts.evaluation import score_answer

    status, matrix = "ok", result.get("matrix")
    if result.get("error") is None and matrix is not None:
        matrix = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
    else:
        status = f"failed: {result.get('error') or 'no matrix'}"
    status, dice, tre = score_answer(case, matrix, status)
    if status != "ok":
        logger.warning(f"{case['case_id']} {method}: {status}")
    fixed, moving = case["fixed"], case["moving"]
    return {
        "case": case["case_id"],
        "dataset": dataset_name,
        "method": method,
        "modality_pair": case["modality_pair"],
        "fixed_subject": fixed.get("subject", ""),
        "moving_subject": moving.get("subject", ""),
        "same_subject": bool(case["same_subject"]),
        "rotation_deg": float(case["rotation_deg"]),
        "dice": dice,
        "tre_mm": tre,
        "seconds_compute": to_float(result.get("seconds_compute")) if status == "ok" else float("nan"),
        "seconds_end_to_end": to_float(result.get("seconds_end_to_end")) if status == "ok" else float("nan"),
        "peak_rss_mb": to_float(result.get("peak_rss_mb")),
        "qc_residual_mm": to_float(result.get("qc_residual_mm")),
        "qc_similarity": to_float(result.get("qc_similarity")),
        "status": status,
    }

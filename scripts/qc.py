"""Quality control of one registration: scores that flag doubtful results, and the ``qc.png`` figure.

Scores:

* ``residual``: RMS distance in mm between the fitted transform of the fixed keypoints and the moving keypoints. A
  good registration of similar anatomy leaves a few mm; keypoints that found no consistent anatomy leave far more.
* ``similarity``: normalized mutual information ``(H(F) + H(M)) / H(F, M) - 1`` of the fixed and aligned moving
  images on the fixed image's network grid, inside its brain mask (0: independent, 1: one determines the other),
  meaningful across contrasts.
* ``brain_fill``: the fraction of the moving image's field of view (native grid) inside its brain mask. A brain
  fills at most about half of its bounding box (an ellipsoid fills pi/6 = 0.52 of its box), so a mask that fills the
  image means no brain was found: pure noise, or a whole-head image given with ``--skull_strip none``.
* ``smoothness``: the correlation of the intensities of neighbouring brain voxels of the moving image (native grid,
  face neighbours both inside the brain mask). Anatomy varies slowly from voxel to voxel (0.94 for the MNI template
  at 1 mm, above 0.4 when subsampled to 6 mm or with Gaussian noise of 10% of its maximum); white noise does not
  (0.00 +- 0.02), whatever brain mask a skull stripper draws on it (deepbet finds a solid "brain" in noise).
* ``brain_overlap``: the Dice of the moving brain mask carried onto the fixed network grid by the registration and
  the fixed brain mask (both on the network grids; bilinear, then > 0.5). A brain registered in a wrong pose
  overlaps the fixed brain poorly even where the keypoints and the intensities do not tell. In the default-path
  pose benchmark of issue #10 (deepbet, whole-head synthetic inputs at any pose; 48 cases, the overlap measured on
  the native grids), four failed registrations (mean error 8.6-92 mm, label Dice 0.01-0.40) had keypoint residuals
  of 6.9-7.5 mm and NMI 0.02-0.04, within those thresholds, and overlaps of 0.70-0.82; every failure scored 0.82
  or less, every right registration with a decent moving mask 0.88-0.96 (different subjects 0.88-0.91, the same
  subject 0.93-0.96). A loose or eroded brain mask on either side lowers it too (right registrations whose moving
  mask took in part of the head, deepbet on T2 and PD: 0.75-0.81), which deserves a look as well: the mask places
  the network grid. Only the part of the carried mask inside the fixed network grid counts (the grid holds the
  fixed brain with a margin).

The decision (:func:`qc_flags`) is deliberately simple: a case is ``suspect`` when ANY score is on the wrong side of
its threshold, and the summary message names each one. The five thresholds are settings of
``configs/inference.yaml`` (``qc_min_similarity``, ``qc_max_residual_mm``, ``qc_max_brain_fill``,
``qc_min_smoothness``, ``qc_min_brain_overlap``). The first two depend on the trained network and are calibrated on
it by ``benchmarks/qc_calibration.py``, which scores right keypoint fits against those of wrongly turned grids (and
reports their ``brain_overlap`` too). ``qc_min_brain_overlap`` (0.85) lies between the failures of the pose
benchmark above and its right registrations with decent masks. ``brain_fill`` and ``smoothness`` look at the moving
image alone, are independent of the network, and flag an image of pure (white) noise whatever the keypoints do:
``smoothness`` below 0.1 with any skull stripping, and with ``--skull_strip none`` also ``brain_fill`` above 0.9 for
positive noise. Noise with spatial correlation (e.g. smoothed) is left to the similarity threshold.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.transforms import MapTransform  # noqa: E402
from monai.utils import convert_to_tensor  # noqa: E402

from scripts.coordinates import affine_of, world_to_voxel  # noqa: E402
from scripts.metrics import dice_per_structure  # noqa: E402
from scripts.registration import Registration, warp_moving  # noqa: E402

#: Default thresholds, the same as ``configs/inference.yaml``.
QC_THRESHOLDS = {
    "min_similarity": 0.01,
    "max_residual_mm": 8.0,
    "max_brain_fill": 0.9,
    "min_smoothness": 0.1,
    "min_brain_overlap": 0.85,
}


def brain_fill(mask: torch.Tensor) -> float:
    """Fraction of the voxels of a mask ``(1, D, H, W)`` (or ``(D, H, W)``) that are brain (> 0.5)."""
    mask = convert_to_tensor(mask, track_meta=False)
    return int(torch.count_nonzero(mask > 0.5)) / max(mask.numel(), 1)  # no float copy of a 512^3 mask


def neighbour_correlation(image: torch.Tensor, mask: torch.Tensor, max_pairs: int = 300_000) -> float:
    """Pearson correlation of the intensities of face-neighbouring voxel pairs that are both inside ``mask`` (> 0.5),
    pooled over the three axes; ``image`` and ``mask`` are ``(1, D, H, W)`` or ``(D, H, W)`` on one grid. 1.0 when
    the intensities inside the mask do not vary (nothing that looks like noise), 0.0 when no pair is inside.

    Large images use the pairs starting at every n-th voxel along each axis (n chosen so about ``max_pairs``
    positions per axis remain; the pairs are still neighbours), which keeps a 256^3 volume to a fraction of a second.
    """
    image = convert_to_tensor(image, track_meta=False)
    mask = convert_to_tensor(mask, track_meta=False)
    values, brain = image.reshape(image.shape[-3:]), mask.reshape(mask.shape[-3:]) > 0.5
    step = max(1, math.ceil((values.numel() / max_pairs) ** (1 / 3)))
    firsts, seconds = [], []
    for axis in range(3):
        size = values.shape[axis]
        if size < 2:
            continue
        pair = [
            (t.narrow(axis, 0, size - 1)[::step, ::step, ::step], t.narrow(axis, 1, size - 1)[::step, ::step, ::step])
            for t in (values, brain)
        ]
        both = pair[1][0] & pair[1][1]
        firsts.append(pair[0][0][both].to(torch.float64))
        seconds.append(pair[0][1][both].to(torch.float64))
    if not firsts or sum(len(f) for f in firsts) < 2:
        return 0.0
    first, second = torch.cat(firsts), torch.cat(seconds)
    first, second = first - first.mean(), second - second.mean()
    spread = float(first.pow(2).mean().sqrt() * second.pow(2).mean().sqrt())
    if spread <= 1e-12 * max(float(first.abs().max()), float(second.abs().max()), 1e-30) or spread == 0:
        return 1.0
    return float((first * second).mean()) / spread


class MovingImageStatsd(MapTransform):
    """Record the moving image's :func:`brain_fill` and ``smoothness`` (:func:`neighbour_correlation` inside the
    brain mask) on its native grid, before the network grid crops and resamples it: ``data["brain_fill"]`` and
    ``data["smoothness"]`` (see the module docstring).

    Args:
        keys: the image ``(1, D, H, W)`` (one key).
        mask_key: its brain mask on the same grid.
    """

    def __init__(self, keys="image", mask_key: str = "mask"):
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d["brain_fill"] = brain_fill(d[self.mask_key])
            d["smoothness"] = neighbour_correlation(d[key], d[self.mask_key])
        return d


def _grid(item: dict, key: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 1, D, H, W)`` network-grid volume ``key`` of a preprocessed item and its ``(1, 4, 4)`` float64 affine."""
    volume = item[key]
    return volume.as_tensor()[None].float(), affine_of(volume)[None]


def aligned_moving(
    registration: Registration, fixed: dict, moving: dict, keys: tuple[str, ...] = ("image",)
) -> torch.Tensor:
    """The moving network-grid volumes ``keys`` (the image, its brain mask: they share the network grid) warped onto
    the fixed network grid (bilinear) in one pass, one sampling grid for all: ``(len(keys), D, H, W)``."""
    fixed_image, fixed_affine = _grid(fixed)
    moving_volumes = torch.cat([_grid(moving, key)[0] for key in keys], dim=1)
    moving_affine = affine_of(moving[keys[0]])[None]
    return warp_moving(registration, moving_volumes, fixed_affine, moving_affine, fixed_image.shape[2:])[0]


def dice_with_fixed_brain(carried_mask: torch.Tensor, fixed: dict) -> float:
    """Dice of a moving brain mask carried onto the fixed network grid ``(D, H, W)`` (> 0.5) and the fixed brain mask
    (``fixed["mask"]``, > 0.5); NaN when neither holds brain."""
    carried = carried_mask > 0.5
    fixed_brain = fixed["mask"].as_tensor().reshape(carried.shape) > 0.5
    return float(dice_per_structure(carried[None, None], fixed_brain[None, None], label_values=(1,))[0, 0])


def brain_overlap(registration: Registration, fixed: dict, moving: dict) -> float:
    """Dice of the moving brain mask (``moving["mask"]``, network grid) carried onto the fixed network grid by the
    registration (bilinear, > 0.5) and the fixed brain mask (``fixed["mask"]``, > 0.5); NaN when neither holds
    brain (see the module docstring)."""
    return dice_with_fixed_brain(aligned_moving(registration, fixed, moving, keys=("mask",))[0], fixed)


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """``(H(a) + H(b)) / H(a, b) - 1`` of two equally long intensity samples, from a ``bins`` x ``bins`` histogram."""
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    joint = joint / max(joint.sum(), 1)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    joint_entropy = entropy(joint.ravel())
    return (entropy(joint.sum(0)) + entropy(joint.sum(1))) / max(joint_entropy, 1e-12) - 1.0


def qc_scores(registration: Registration, fixed: dict, moving: dict) -> dict[str, float]:
    """The scores of the module docstring for the first registration of the batch: ``residual`` (mm),
    ``similarity``, ``brain_overlap``, and ``brain_fill`` and ``smoothness`` as :class:`MovingImageStatsd` recorded
    them in ``moving`` (NaN when it did not)."""
    # the image and its brain mask share the moving network grid: one sampling grid carries both
    warped, carried_mask = aligned_moving(registration, fixed, moving, keys=("image", "mask"))
    mask = fixed["mask"][0].numpy() > 0.5
    fixed_values = fixed["image"][0].numpy()[mask]
    return {
        "residual": float(registration.residual[0]),
        "similarity": normalized_mutual_information(fixed_values, warped.numpy()[mask]) if mask.any() else 0.0,
        "brain_overlap": dice_with_fixed_brain(carried_mask, fixed),
        "brain_fill": float(moving.get("brain_fill", float("nan"))),
        "smoothness": float(moving.get("smoothness", float("nan"))),
    }


def qc_flags(scores: dict[str, float], thresholds: dict[str, float] | None = None) -> list[str]:
    """Why a registration is doubtful: one short reason per score beyond its threshold (empty: not flagged).

    Args:
        scores: as returned by :func:`qc_scores`; a missing or NaN score flags nothing.
        thresholds: ``min_similarity``, ``max_residual_mm``, ``max_brain_fill``, ``min_smoothness``,
            ``min_brain_overlap``; missing entries take :data:`QC_THRESHOLDS`.
    """
    limits = {**QC_THRESHOLDS, **(thresholds or {})}
    nan = float("nan")
    reasons = []
    if scores.get("similarity", nan) < limits["min_similarity"]:
        reasons.append(f"low similarity to the fixed image ({scores['similarity']:.3f})")
    if scores.get("residual", nan) > limits["max_residual_mm"]:
        reasons.append(f"large keypoint residual ({scores['residual']:.1f} mm)")
    if scores.get("brain_fill", nan) > limits["max_brain_fill"]:
        reasons.append(
            f"brain mask fills {100 * scores['brain_fill']:.0f}% of the image (noise, or not skull-stripped?)"
        )
    if scores.get("smoothness", nan) < limits["min_smoothness"]:
        reasons.append(
            f"neighbouring voxels are unrelated, like noise (smoothness {round(scores['smoothness'], 2) + 0.0:.2f})"
        )
    if scores.get("brain_overlap", nan) < limits["min_brain_overlap"]:
        reasons.append(
            f"brain mask overlaps the fixed brain only {scores['brain_overlap']:.2f} after registration"
            " (wrong pose, or a poor brain mask?)"
        )
    return reasons


def qc_figure(path: str, registration: Registration, fixed: dict, moving: dict) -> None:
    """Write a PNG with three orthogonal slices (rows) of the fixed image, the moving image before registration
    (same world position, no transform) and after, with the keypoints near each slice drawn on the fixed and
    aligned images."""
    fixed_image, fixed_affine = _grid(fixed)
    moving_image, moving_affine = _grid(moving)
    shape = fixed_image.shape[2:]
    identity = Registration(torch.eye(4, dtype=torch.float64)[None], *[registration.fixed_points] * 2, torch.zeros(1))
    before = warp_moving(identity, moving_image, fixed_affine, moving_affine, shape)[0, 0].numpy()
    after = aligned_moving(registration, fixed, moving)[0].numpy()
    volumes = {"fixed": fixed_image[0, 0].numpy(), "moving (before)": before, "moving (after)": after}
    points = world_to_voxel(fixed_affine[0], registration.fixed_points[0]).numpy()
    center = [s // 2 for s in shape]
    figure, axes = plt.subplots(3, 3, figsize=(9, 9))
    for row, axis in enumerate(range(3)):
        plane = [a for a in range(3) if a != axis]
        near = np.abs(points[:, axis] - center[axis]) < 4  # keypoints within 4 voxels of the slice
        for column, (title, volume) in enumerate(volumes.items()):
            ax = axes[row, column]
            ax.imshow(np.take(volume, center[axis], axis=axis).T, cmap="gray", origin="lower", vmin=0, vmax=1)
            if column != 1:
                ax.scatter(points[near, plane[0]], points[near, plane[1]], s=8, c="tab:red")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    residual = float(registration.residual[0])
    figure.suptitle(f"KeyMorph QC (network grid of the fixed image) - keypoint residual {residual:.2f} mm")
    figure.tight_layout()
    figure.savefig(path, dpi=80, format="png")
    plt.close(figure)

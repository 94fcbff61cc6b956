"""Quality control of one registration: scores that flag doubtful results, and the ``qc.png`` figure.

Scores (both on the network grid of the fixed image, inside its brain mask):

* ``residual``: RMS distance in mm between the fitted transform of the fixed keypoints and the moving keypoints. A
  good registration of similar anatomy leaves a few mm; keypoints that found no consistent anatomy leave far more.
* ``similarity``: normalized mutual information ``(H(F) + H(M)) / H(F, M) - 1`` of the fixed and aligned moving
  images (0: independent, 1: one determines the other), meaningful across contrasts.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scripts.coordinates import apply_affine  # noqa: E402
from scripts.registration import Registration, warp_moving  # noqa: E402


def _grid(item: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 1, D, H, W)`` network-grid image of a preprocessed item and its ``(1, 4, 4)`` float64 affine."""
    image = item["image"]
    return image.as_tensor()[None].float(), torch.as_tensor(image.affine, dtype=torch.float64)[None]


def aligned_moving(registration: Registration, fixed: dict, moving: dict) -> torch.Tensor:
    """The moving network-grid image warped onto the fixed network grid, ``(D, H, W)``."""
    fixed_image, fixed_affine = _grid(fixed)
    moving_image, moving_affine = _grid(moving)
    return warp_moving(registration, moving_image, fixed_affine, moving_affine, fixed_image.shape[2:])[0, 0]


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
    """``{"residual": mm, "similarity": NMI}`` of the first registration of the batch (see the module docstring)."""
    warped = aligned_moving(registration, fixed, moving).numpy()
    mask = fixed["mask"][0].numpy() > 0.5
    fixed_values = fixed["image"][0].numpy()[mask]
    return {
        "residual": float(registration.residual[0]),
        "similarity": normalized_mutual_information(fixed_values, warped[mask]) if mask.any() else 0.0,
    }


def qc_figure(path: str, registration: Registration, fixed: dict, moving: dict) -> None:
    """Write a PNG with three orthogonal slices (rows) of the fixed image, the moving image before registration
    (same world position, no transform) and after, with the keypoints near each slice drawn on the fixed and
    aligned images."""
    fixed_image, fixed_affine = _grid(fixed)
    moving_image, moving_affine = _grid(moving)
    shape = fixed_image.shape[2:]
    identity = Registration(torch.eye(4, dtype=torch.float64)[None], *[registration.fixed_points] * 2, torch.zeros(1))
    before = warp_moving(identity, moving_image, fixed_affine, moving_affine, shape)[0, 0].numpy()
    after = aligned_moving(registration, fixed, moving).numpy()
    volumes = {"fixed": fixed_image[0, 0].numpy(), "moving (before)": before, "moving (after)": after}
    points = apply_affine(torch.linalg.inv(fixed_affine[0]), registration.fixed_points[0]).numpy()
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

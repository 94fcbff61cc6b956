"""Small synthetic whole-head label maps for tests (no external data): nested ellipsoids with FreeSurfer labels.

A head is a ``(48, 48, 48)`` grid of 2 mm voxels centred on the world origin (96 mm field of view): scalp (511)
with a nose at the front, skull (507), extra-cerebral CSF (24), left / right cortex (3 / 42) and white matter
(2 / 41), lateral ventricles (4 / 43, in front of the centre, the left one larger) and hippocampi (17 / 53, behind
and below the centre). Left differs from right and front from back, so a mirrored or turned-around registration is
wrong on the labels. Each ``subject`` number draws a slightly different size and position, a different anatomy.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

SIZE = 48
SPACING = 2.0
#: Labels of the phantom's brain (1..499) and head (>= 500).
BRAIN = (2, 3, 4, 17, 24, 41, 42, 43, 53)
HEAD = (507, 511)


def head_label_map(subject: int = 0, size: int = SIZE, spacing: float = SPACING) -> tuple[np.ndarray, np.ndarray]:
    """The label map of one synthetic subject.

    Returns:
        ``(labels, affine)``: ``(size, size, size)`` int32 labels in RAS array order (first axis to the right,
        second to the front, third up) and their 4x4 voxel-to-world matrix (``spacing`` mm, centred on 0).
    """
    rng = np.random.RandomState(subject)
    grow = 1.0 + rng.uniform(-0.05, 0.05, 3)  # head size per axis of this subject
    shift = rng.uniform(-2.0, 2.0, 3)  # mm
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2 * spacing
    axis = (np.arange(size) - (size - 1) / 2) * spacing
    world = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1) - shift

    def inside(centre, radii) -> np.ndarray:
        return (((world - np.asarray(centre)) / (np.asarray(radii) * grow)) ** 2).sum(-1) <= 1.0

    left = world[..., 0] < 1.0  # the midline a little right of the centre: the left hemisphere is wider
    labels = np.zeros((size,) * 3, dtype=np.int32)
    labels[inside((0, 0, 0), (36, 41, 38)) | inside((0, 38, -12), (6, 7, 7))] = 511
    labels[inside((0, 0, 0), (33, 38, 35))] = 507
    labels[inside((0, -1, 2), (31, 36, 32))] = 24
    brain = inside((0, -1, 2), (27, 32, 28))
    labels[brain] = np.where(left, 3, 42)[brain]
    white = inside((0, -1, 3), (20, 25, 20))
    labels[white] = np.where(left, 2, 41)[white]
    labels[inside((-7, 6, 6), (5, 11, 7))] = 4
    labels[inside((7, 6, 6), (4, 9, 6))] = 43
    labels[inside((-15, -12, -12), (5, 10, 6))] = 17
    labels[inside((15, -13, -12), (4, 9, 5))] = 53
    return labels, affine


def write_head_label_map(path: str, subject: int = 0, axcodes: str = "RAS", **kwargs) -> str:
    """Write :func:`head_label_map` as NIfTI with its array in the orientation ``axcodes`` (e.g. "LIA", as some
    FreeSurfer files are); the world stays the same. Returns ``path``."""
    labels, affine = head_label_map(subject, **kwargs)
    image = nib.Nifti1Image(labels, affine)
    image.header.set_xyzt_units("mm")
    ras = nib.orientations.axcodes2ornt("RAS")
    image = image.as_reoriented(nib.orientations.ornt_transform(ras, nib.orientations.axcodes2ornt(tuple(axcodes))))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nib.save(image, path)
    return path


def write_label_maps_dir(folder: str, subjects=(1, 2, 3)) -> str:
    """Write ``folder/training_seg_NN.nii.gz`` for each subject number (alternating RAS and LIA arrays); returns
    ``folder``."""
    for index, subject in enumerate(subjects):
        axcodes = "RAS" if index % 2 == 0 else "LIA"
        write_head_label_map(os.path.join(folder, f"training_seg_{subject:02d}.nii.gz"), subject, axcodes)
    return folder


def make_ixi_test_set(root: str, subjects=(1, 2, 3), **kwargs) -> str:
    """Write synthetic label maps to ``root/label_maps`` and an IXI-layout test set made from them at 2 mm
    (:func:`scripts.make_test_set.make_test_set`, further arguments in ``kwargs``) to ``root/ixi``; returns the
    latter."""
    from scripts.make_test_set import make_test_set

    label_maps = write_label_maps_dir(os.path.join(root, "label_maps"), subjects)
    output_dir = os.path.join(root, "ixi")
    make_test_set(label_maps, output_dir, spacing=kwargs.pop("spacing", SPACING), **kwargs)
    return output_dir


def label_agreement(
    fixed_labels: np.ndarray,
    fixed_affine: np.ndarray,
    moving_labels: np.ndarray,
    moving_affine: np.ndarray,
    fixed_to_moving: np.ndarray,
) -> tuple[float, float]:
    """Fractions of the fixed brain voxels (labels 1..499) that a fixed-to-moving world matrix maps onto a moving
    voxel (nearest) of the same label: ``(all brain voxels, voxels away from label boundaries)``.

    Away from boundaries means all six face neighbours share the voxel's label. Every nearest-neighbour resampling
    of a label map shifts its boundaries by up to half a voxel, so voxels next to a boundary legitimately disagree
    after a few of them; the interior ones must agree whenever the matrix is right.

    Args:
        fixed_labels, moving_labels: ``(D, H, W)`` integer label maps.
        fixed_affine, moving_affine: their ``(4, 4)`` voxel-to-world matrices (RAS mm).
        fixed_to_moving: ``(4, 4)`` world matrix, fixed points to moving points.
    """
    fixed_labels, moving_labels = np.asarray(fixed_labels), np.asarray(moving_labels)
    voxels = np.argwhere((fixed_labels > 0) & (fixed_labels < 500))
    to_moving = np.linalg.inv(np.asarray(moving_affine, np.float64)) @ np.asarray(fixed_to_moving, np.float64)
    to_moving = to_moving @ np.asarray(fixed_affine, np.float64)
    target = np.rint(voxels @ to_moving[:3, :3].T + to_moving[:3, 3]).astype(int)
    inside = np.all((target >= 0) & (target < moving_labels.shape), axis=1)
    found = np.zeros(len(voxels), dtype=moving_labels.dtype)
    found[inside] = moving_labels[tuple(target[inside].T)]
    labels = fixed_labels[tuple(voxels.T)]
    same = found == labels
    interior = np.ones(len(voxels), dtype=bool)
    for axis in range(3):
        for step in (-1, 1):
            neighbour = voxels.copy()
            neighbour[:, axis] += step
            interior &= fixed_labels[tuple(np.clip(neighbour, 0, np.array(fixed_labels.shape) - 1).T)] == labels
    return float(same.mean()), float(same[interior].mean())

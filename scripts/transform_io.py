"""Reading and writing registration results in the formats other tools read.

* ``transform.tfm``: an ITK text ``AffineTransform_double_3_3`` mapping FIXED physical points to MOVING physical
  points in ITK's LPS world, what ``SimpleITK.Resample(moving, fixed, transform)``, ``antsApplyTransforms`` and
  3D Slicer expect.
* ``affine_ras.txt``: the 4x4 matrix taking MOVING RAS mm coordinates to FIXED RAS mm coordinates (the inverse
  of the fixed-to-moving matrix; see :mod:`scripts.coordinates`), as text with one row per line.
* ``keypoints_*.csv``: one keypoint per row, ``x, y, z`` in RAS mm and its ``weight``.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import SimpleITK as sitk
import torch

from scripts.coordinates import ras_to_lps


def itk_affine_from_ras(fixed_to_moving: np.ndarray | torch.Tensor) -> sitk.AffineTransform:
    """The SimpleITK transform of a 4x4 fixed-to-moving RAS matrix (centre of rotation at the origin)."""
    lps = ras_to_lps(torch.as_tensor(np.asarray(fixed_to_moving), dtype=torch.float64)).numpy()
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].ravel().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def ras_from_itk_affine(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 fixed-to-moving RAS matrix of an ITK affine-like transform (any centre)."""
    matrix = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.array(transform.GetCenter(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.array(transform.GetTranslation()) + center - matrix @ center
    return ras_to_lps(torch.from_numpy(lps)).numpy()


def write_itk_transform(path: str, fixed_to_moving: np.ndarray | torch.Tensor) -> None:
    """Write ``transform.tfm`` (see the module docstring)."""
    sitk.WriteTransform(itk_affine_from_ras(fixed_to_moving), path)


def read_itk_transform(path: str) -> np.ndarray:
    """Read an ITK affine ``.tfm``/``.txt``/``.mat`` as a 4x4 fixed-to-moving RAS matrix."""
    transform = sitk.ReadTransform(path)
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0)
    return ras_from_itk_affine(transform)


def write_ras_matrix(path: str, moving_to_fixed: np.ndarray | torch.Tensor) -> None:
    """Write a 4x4 matrix as text (``affine_ras.txt``: moving RAS mm -> fixed RAS mm)."""
    np.savetxt(path, np.asarray(moving_to_fixed, dtype=np.float64), fmt="%.10g")


def read_ras_matrix(path: str) -> np.ndarray:
    """Read a 4x4 matrix written by :func:`write_ras_matrix`."""
    matrix = np.loadtxt(path, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"{path}: expected a 4x4 matrix, found shape {matrix.shape}")
    return matrix


def write_keypoints_csv(path: str, points: np.ndarray | torch.Tensor, weights=None) -> None:
    """Write ``(N, 3)`` RAS mm keypoints with their weights (1 when not given) as ``x,y,z,weight`` rows."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    weights = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "z", "weight"])
        for (x, y, z), w in zip(points, weights):
            writer.writerow([f"{x:.4f}", f"{y:.4f}", f"{z:.4f}", f"{w:.6g}"])


def read_keypoints_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(N, 3)`` points and ``(N,)`` weights written by :func:`write_keypoints_csv`."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return data[:, :3], data[:, 3]


def write_atomically(path: str, write) -> None:
    """Call ``write(temporary_path)``, then rename the result to ``path``: a crash never leaves half a file.

    The temporary file sits in the same folder (so the rename is atomic) and keeps the extension, which the
    writers of NIfTI, ITK and PNG files read to choose the format.
    """
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)

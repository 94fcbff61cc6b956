"""Reading and writing registration results in the formats other tools read.

* ``transform.tfm``: an ITK text ``AffineTransform_double_3_3`` mapping FIXED physical points to MOVING physical
  points in ITK's LPS world, what ``SimpleITK.Resample(moving, fixed, transform)``, ``antsApplyTransforms`` and
  3D Slicer expect.
* ``affine_ras.txt``: the 4x4 matrix taking MOVING RAS mm coordinates to FIXED RAS mm coordinates (the inverse
  of the fixed-to-moving matrix; see :mod:`scripts.coordinates`), as text with one row per line.
* ``transform_inverse.tfm``: the ITK transform of the other direction (MOVING to FIXED physical points), what
  resampling the fixed image onto the moving grid needs (``antsApplyTransforms -r MOVING -i FIXED``).
* ``transform_flirt.mat``: FSL FLIRT's matrix for ``flirt -in MOVING -ref FIXED -applyxfm -init transform_flirt.mat``
  (FLIRT's convention: moving to fixed in each image's scaled-voxel coordinates, so it depends on both grids).
* ``transform.lta``: FreeSurfer's linear transform array (``LINEAR_RAS_TO_RAS``, with both volume geometries), for
  ``mri_vol2vol --mov MOVING --targ FIXED --lta transform.lta``.
* ``keypoints_*.csv``: one keypoint per row, ``x, y, z`` in RAS mm and its ``weight``.

The FLIRT and FreeSurfer conventions are nitransforms' (``nitransforms.linear.Affine``, whose matrix is, like ours,
the fixed-to-moving RAS map), not written by hand here.
"""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from nitransforms.linear import Affine

from scripts.coordinates import ras_to_lps


def itk_affine_from_ras(fixed_to_moving: np.ndarray | torch.Tensor) -> sitk.AffineTransform:
    """The SimpleITK transform of a 4x4 fixed-to-moving RAS matrix (centre of rotation at the origin)."""
    lps = ras_to_lps(torch.as_tensor(np.asarray(fixed_to_moving), dtype=torch.float64)).numpy()
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].ravel().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def ras_from_itk_parts(matrix, translation, center) -> np.ndarray:
    """The 4x4 fixed-to-moving RAS matrix of an ITK-style affine in LPS that maps ``p`` to
    ``A (p - c) + c + t`` (``matrix`` ``A`` (3, 3), ``translation`` ``t`` and ``center`` ``c`` (3,)): the centre
    folded into the translation, then x and y flipped."""
    matrix = np.asarray(matrix, dtype=np.float64).reshape(3, 3)
    center = np.asarray(center, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(translation, dtype=np.float64) + center - matrix @ center
    return ras_to_lps(torch.from_numpy(lps)).numpy()


def ras_from_itk_affine(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 fixed-to-moving RAS matrix of an ITK affine-like transform (any centre)."""
    return ras_from_itk_parts(transform.GetMatrix(), transform.GetTranslation(), transform.GetCenter())


def write_itk_transform(path: str, fixed_to_moving: np.ndarray | torch.Tensor) -> None:
    """Write ``transform.tfm`` (see the module docstring)."""
    sitk.WriteTransform(itk_affine_from_ras(fixed_to_moving), path)


def read_itk_transform(path: str) -> np.ndarray:
    """Read an ITK affine ``.tfm``/``.txt``/``.mat`` as a 4x4 fixed-to-moving RAS matrix."""
    transform = sitk.ReadTransform(path)
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0)
    return ras_from_itk_affine(transform)


def _as_array(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu()
    return np.asarray(matrix, dtype=np.float64)


def write_inverse_itk_transform(path: str, fixed_to_moving: np.ndarray | torch.Tensor) -> None:
    """Write ``transform_inverse.tfm``: ITK, MOVING physical points to FIXED physical points (see the module
    docstring). Written like ``transform.tfm`` (SimpleITK, full double precision; nitransforms' ITK writer keeps six
    significant digits, up to 1e-4 mm off at 100 mm); tests read it back with nitransforms."""
    write_itk_transform(path, np.linalg.inv(_as_array(fixed_to_moving)))


def write_flirt_matrix(
    path: str, fixed_to_moving: np.ndarray | torch.Tensor, fixed: nib.Nifti1Image, moving: nib.Nifti1Image
) -> None:
    """Write ``transform_flirt.mat``: FSL FLIRT's moving-to-fixed matrix for these two images (their grids)."""
    Affine(_as_array(fixed_to_moving), reference=fixed).to_filename(path, fmt="fsl", moving=moving)


def write_lta(
    path: str, fixed_to_moving: np.ndarray | torch.Tensor, fixed: nib.Nifti1Image, moving: nib.Nifti1Image
) -> None:
    """Write ``transform.lta``: FreeSurfer's RAS-to-RAS transform between these two images."""
    Affine(_as_array(fixed_to_moving), reference=fixed).to_filename(path, fmt="fs", moving=moving)


def write_transform_files(
    folder: str, fixed_to_moving: np.ndarray | torch.Tensor, fixed: nib.Nifti1Image, moving: nib.Nifti1Image
) -> None:
    """Write a case's transform files into ``folder``, each atomically: ``transform.tfm``, ``transform_inverse.tfm``,
    ``affine_ras.txt``, ``transform_flirt.mat`` and ``transform.lta`` (see the module docstring)."""
    matrix = _as_array(fixed_to_moving)
    writers = {
        "transform.tfm": lambda p: write_itk_transform(p, matrix),
        "transform_inverse.tfm": lambda p: write_inverse_itk_transform(p, matrix),
        "affine_ras.txt": lambda p: write_ras_matrix(p, np.linalg.inv(matrix)),
        "transform_flirt.mat": lambda p: write_flirt_matrix(p, matrix, fixed, moving),
        "transform.lta": lambda p: write_lta(p, matrix, fixed, moving),
    }
    for name, write in writers.items():
        write_atomically(os.path.join(folder, name), write)


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

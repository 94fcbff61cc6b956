"""Reading NIfTI volumes safely, writing them atomically, and the default atlas.

:func:`load_volume` is the one entry point for user images: it checks what commonly goes wrong with real files
and raises :class:`scripts.errors.KeyMorphInputError` with one line naming the file and the problem, instead of a
traceback from deep inside a library. Images come back as MONAI MetaTensors ``(1, D, H, W)`` float32 whose
``affine`` is the file's voxel-to-world matrix in RAS mm (nibabel's convention, see :mod:`scripts.coordinates`).
"""

from __future__ import annotations

import gzip
import os
import zlib

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.errors import KeyMorphInputError
from scripts.transform_io import write_atomically

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A brain is > 100 mm across; a field of view smaller than this along any axis cannot hold one.
MIN_EXTENT_MM = 40.0
SPATIAL_UNIT_SCALE = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def _read(path: str) -> nib.Nifti1Image:
    if not os.path.exists(path):
        raise KeyMorphInputError(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise KeyMorphInputError(f"{path}: file is not readable (permissions)")
    if os.path.getsize(path) == 0:
        raise KeyMorphInputError(f"{path}: file is empty")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (gzip.BadGzipFile, zlib.error, EOFError) as error:
        raise KeyMorphInputError(f"{path}: corrupt or truncated gzip ({error})") from None
    except Exception as error:  # nibabel raises many types for files that are not images
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise KeyMorphInputError(f"{path}: not a readable NIfTI image ({reason})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise KeyMorphInputError(f"{path}: not a NIfTI image ({type(image).__name__})")
    image._keymorph_data = data  # read once; the checks below and the caller share it
    return image


def _check_affine(path: str, image: nib.Nifti1Image) -> np.ndarray:
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise KeyMorphInputError(f"{path}: the voxel-to-world matrix has non-finite values")
    linear = affine[:3, :3]
    if abs(np.linalg.det(linear)) < 1e-9:
        raise KeyMorphInputError(f"{path}: the voxel-to-world matrix is singular (a zero voxel size?)")
    unit = image.header.get_xyzt_units()[0] or "unknown"
    if unit not in ("mm", "unknown"):
        raise KeyMorphInputError(f"{path}: spatial units are {unit!r}, not mm; convert the header to mm")
    directions = linear / np.linalg.norm(linear, axis=0)
    if np.abs(directions.T @ directions - np.eye(3)).max() > 1e-3:
        raise KeyMorphInputError(f"{path}: the header's axes are not orthogonal (sheared); resample it first")
    return affine


def _check_data(path: str, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        raise KeyMorphInputError(f"{path}: voxel type {data.dtype} is not a scalar (RGB or complex?); convert to grey")
    if data.ndim == 4 and data.shape[3] == 1 or data.ndim == 5 and data.shape[3:] == (1, 1):
        data = data.reshape(data.shape[:3])
    if data.ndim == 4:
        raise KeyMorphInputError(
            f"{path}: 4-D image with {data.shape[3]} volumes; extract one, e.g. `fslroi in out 0 1` or nibabel"
            " `image.slicer[..., 0]`"
        )
    if data.ndim != 3:
        raise KeyMorphInputError(f"{path}: {data.ndim}-D image of shape {data.shape}; a 3-D volume is needed")
    extent = np.linalg.norm(affine[:3, :3], axis=0) * np.array(data.shape)
    if extent.min() < MIN_EXTENT_MM or min(data.shape) < 8:
        raise KeyMorphInputError(
            f"{path}: field of view {np.round(extent, 1).tolist()} mm ({list(data.shape)} voxels) is too small"
            " to hold a brain"
        )
    data = data.astype(np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        raise KeyMorphInputError(f"{path}: every voxel is NaN or infinite")
    values = data[finite]
    if values.max() == values.min():
        raise KeyMorphInputError(f"{path}: the image is constant ({values.max():g} everywhere); nothing to register")
    return np.where(finite, data, 0.0).astype(np.float32)


def load_volume(path: str) -> MetaTensor:
    """Read and check a NIfTI volume; returns a ``(1, D, H, W)`` float32 MetaTensor with the RAS affine.

    Non-finite voxels become 0; ``meta["nonfinite_fraction"]`` tells how many there were. A 4-D file with a single
    volume is accepted. Raises :class:`KeyMorphInputError` for anything that cannot be registered.
    """
    image = _read(path)
    affine = _check_affine(path, image)
    raw = image._keymorph_data
    data = _check_data(path, np.asarray(raw), affine)
    meta = {
        "filename_or_obj": path,
        "original_affine": affine,
        "spatial_shape": np.array(data.shape),
        "nonfinite_fraction": float(1.0 - np.isfinite(np.asarray(raw, dtype=np.float64)).mean()),
    }
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(affine), meta=meta)


class LoadVolumed(MapTransform):
    """Replace the file paths under ``keys`` with checked volumes (:func:`load_volume`)."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_volume(str(d[key]))
        return d


def save_volume(path: str, data: np.ndarray | torch.Tensor, reference: nib.Nifti1Image, dtype=None) -> None:
    """Write ``data`` (the shape of ``reference``) atomically with ``reference``'s header (affine, units, codes)."""
    array = np.asarray(data.detach().cpu() if isinstance(data, torch.Tensor) else data)
    header = reference.header.copy()
    header.set_data_dtype(dtype or array.dtype)
    image = nib.Nifti1Image(array.astype(dtype or array.dtype), reference.affine, header)
    image.set_qform(reference.affine, int(reference.header["qform_code"]) or 1)
    image.set_sform(reference.affine, int(reference.header["sform_code"]) or 1)
    write_atomically(path, lambda temporary: nib.save(image, temporary))


def default_atlas_path(cache_dir: str | None = None) -> str:
    """Path of the default fixed image: the MNI152 2009 T1 template at 1 mm, brain-extracted, as nilearn ships it.

    Written once to ``cache_dir`` (default ``$XDG_CACHE_HOME/keymorph`` or ``~/.cache/keymorph``) so other tools
    can open the same file.
    """
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "keymorph")
    path = os.path.join(cache_dir, "mni152_2009_t1_1mm_brain.nii.gz")
    if not os.path.exists(path):
        from nilearn.datasets import load_mni152_template

        os.makedirs(cache_dir, exist_ok=True)
        template = load_mni152_template(resolution=1)
        image = nib.Nifti1Image(np.asarray(template.dataobj, dtype=np.float32), template.affine)
        image.header.set_xyzt_units("mm")
        write_atomically(path, lambda temporary: nib.save(image, temporary))
    return path

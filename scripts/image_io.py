"""Reading NIfTI volumes safely, writing them atomically, and the default atlas.

:func:`load_volume` is the one entry point for user images: it checks what commonly goes wrong with real files
and raises :class:`scripts.errors.KeyMorphInputError` with one line naming the file and the problem, instead of a
traceback from deep inside a library. Images come back as MONAI MetaTensors ``(1, D, H, W)`` float32 whose
``affine`` is the file's voxel-to-world matrix in RAS mm (nibabel's convention, see :mod:`scripts.coordinates`).

What is refused (:class:`KeyMorphInputError`) and what is accepted:

* the file: missing (or a broken symbolic link), a folder, unreadable, empty, not gzip although named ``.gz``,
  corrupt or truncated gzip, truncated data, not NIfTI-1/2: refused. Symbolic links, spaces and non-ASCII
  characters in the path: accepted.
* the header: a singular or non-finite voxel-to-world matrix, sheared (non-orthogonal) axes, spatial units other
  than mm (``unknown`` counts as mm), an invalid units code: refused. A header that nibabel and ITK (SimpleITK,
  ANTs, 3D Slicer) read differently, e.g. a qform that mirrors the sform (:func:`check_readers_agree`), and one
  setting no orientation at all (qform and sform codes both 0): refused, since ``transform.tfm`` must mean in ITK
  what ``registered.nii.gz`` shows. Any orientation, any voxel size and any
  anisotropy (e.g. 1 x 1 x 10 mm): accepted, as long as the field of view can hold a brain (>= ``MIN_EXTENT_MM``
  along every axis, >= ``MIN_VOXELS`` voxels per axis).
* the voxels: non-scalar types (RGB, complex), 2-D, 4-D with several volumes (the message says how to extract one),
  5-D and up, all NaN or infinite, constant: refused. Integer, boolean, float16/32/64 and scaled (``scl_slope``)
  data: accepted and converted to float32; a 4-D or 5-D file with a single volume: accepted. Some non-finite
  voxels: set to 0, their fraction kept in ``meta["nonfinite_fraction"]``.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Orientation
from monai.utils import convert_to_tensor

from scripts.coordinates import RAS_LPS_FLIP, affine_of, covering_grid_along, resample_onto
from scripts.errors import KeyMorphInputError
from scripts.transform_io import write_atomically

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A brain is > 100 mm across; a field of view smaller than this along any axis cannot hold one.
MIN_EXTENT_MM = 40.0
# Fewer voxels than this along an axis is a slab or a thumbnail, not a volume (10 mm voxels still give 10+).
MIN_VOXELS = 4
# Direction cosines whose dot products exceed this (about 0.06 degrees off square) are a sheared header.
MAX_SHEAR = 1e-3
# nibabel and ITK readings of one header whose field-of-view corners lie further apart than this fraction of the
# smallest voxel describe two different images (a mirrored or shifted qform). Both forms are stored as float32
# (about 1e-4 mm apart when they agree); a tenth of a voxel leaves room for a near-orthogonal sform ITK tidies up.
MAX_READER_DISAGREEMENT_VOXELS = 0.1
# Two grids whose voxel-to-world matrices differ by less than this (mm) are one grid.
GRID_ATOL_MM = 1e-4
SPATIAL_UNIT_SCALE = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
_GZIP_MAGIC = b"\x1f\x8b"


def is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str) -> str:
    """``DIR/NAME.nii.gz`` (or ``.nii``, any case) -> ``NAME``: a case's name, a subject's id."""
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _reason(error: BaseException, path: str) -> str:
    """The first line of a library's error message, without the file name (the caller's message starts with it)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text.replace(f'"{path}"', "the file").replace(f"'{path}'", "the file").replace(path, "the file")


def _read(path: str) -> nib.Nifti1Image:
    if not os.path.exists(path):
        if os.path.islink(path):
            raise KeyMorphInputError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
        raise KeyMorphInputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise KeyMorphInputError(f"{path}: is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise KeyMorphInputError(f"{path}: file is not readable (permissions)")
    if os.path.getsize(path) == 0:
        raise KeyMorphInputError(f"{path}: file is empty")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(2)
    except OSError as error:
        raise KeyMorphInputError(f"{path}: cannot read the file ({_reason(error, path)})") from None
    if path.lower().endswith(".gz") and magic != _GZIP_MAGIC:
        raise KeyMorphInputError(f"{path}: named .gz but not gzip-compressed (an uncompressed .nii renamed?)")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except (gzip.BadGzipFile, zlib.error, EOFError) as error:
        raise KeyMorphInputError(f"{path}: corrupt or truncated gzip data ({_reason(error, path)})") from None
    except Exception as error:  # nibabel raises many types for files that are not images
        raise KeyMorphInputError(f"{path}: not a readable NIfTI image ({_reason(error, path)})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise KeyMorphInputError(f"{path}: not a NIfTI image ({type(image).__name__})")
    image._keymorph_data = data  # read once; the checks below and the caller share it
    return image


def _check_affine(path: str, image: nib.Nifti1Image) -> np.ndarray:
    affine = np.asarray(image.affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise KeyMorphInputError(f"{path}: the voxel-to-world matrix has non-finite values")
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    with np.errstate(all="ignore"):
        determinant = np.linalg.det(linear)
        directions = linear / spacing
        shear = np.abs(directions.T @ directions - np.eye(3)).max()
    if not np.isfinite(determinant) or not np.all(np.isfinite(spacing)):
        raise KeyMorphInputError(f"{path}: the voxel-to-world matrix has non-finite values (overflow)")
    if abs(determinant) < 1e-9 or spacing.min() < 1e-6:
        raise KeyMorphInputError(f"{path}: the voxel-to-world matrix is singular (a zero voxel size?)")
    try:
        unit = image.header.get_xyzt_units()[0] or "unknown"
    except KeyError:
        raise KeyMorphInputError(
            f"{path}: invalid spatial units code {int(image.header['xyzt_units']) % 8} in the header"
        ) from None
    if unit not in ("mm", "unknown"):
        raise KeyMorphInputError(f"{path}: spatial units are {unit!r}, not mm; convert the header to mm")
    if not shear <= MAX_SHEAR:  # also catches NaN
        raise KeyMorphInputError(f"{path}: the header's axes are not orthogonal (sheared); resample it first")
    return affine


def itk_voxel_to_ras(path: str) -> np.ndarray | None:
    """The voxel-to-world matrix ``(4, 4)`` (RAS mm) ITK reads from the file's header, or None when ITK cannot read
    it (then no ITK tool can use the file either, and nibabel's reading stands alone)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        logger.debug("SimpleITK cannot read the header of %s: %s", path, error)
        return None
    dimension = reader.GetDimension()
    if dimension < 3:
        return None
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(dimension, dimension)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(reader.GetSpacing()[:3], dtype=np.float64)
    lps[:3, 3] = reader.GetOrigin()[:3]
    return RAS_LPS_FLIP.numpy() @ lps  # world axes only: voxel indices are the same in both


def _axis_codes(affine: np.ndarray) -> str:
    return "".join(nib.aff2axcodes(affine))


def check_readers_agree(path: str, image: nib.Nifti1Image, affine: np.ndarray, shape) -> None:
    """Refuse a header that sets no orientation, or that ITK reads differently from nibabel (see the module
    docstring); ``affine`` is nibabel's reading, ``shape`` the volume's ``(D, H, W)``."""
    itk = itk_voxel_to_ras(path)
    codes = int(image.header["qform_code"]), int(image.header["sform_code"])
    if codes == (0, 0):
        seen = f" (nibabel reads {_axis_codes(affine)}, ITK {_axis_codes(itk)})" if itk is not None else ""
        raise KeyMorphInputError(
            f"{path}: the header sets no orientation (qform_code and sform_code are both 0), so every reader guesses"
            f"{seen}; set the sform or qform to where the image lies"
        )
    if itk is None:
        return
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    distance = float(np.linalg.norm((affine - itk)[:3] @ corners, axis=0).max())
    smallest_voxel = float(np.linalg.norm(affine[:3, :3], axis=0).min())
    if not distance <= MAX_READER_DISAGREEMENT_VOXELS * smallest_voxel:
        used = "sform" if codes[1] > 0 else "qform"
        raise KeyMorphInputError(
            f"{path}: nibabel ({used}: {_axis_codes(affine)}) and ITK ({_axis_codes(itk)}) read the header's"
            f" position differently (up to {distance:.3g} mm apart): its qform and sform disagree; make them one,"
            " e.g. `fslorient -copysform2qform` or nibabel `image.set_qform(image.get_sform())`"
        )


def _check_data(path: str, data: np.ndarray, affine: np.ndarray, to_register: bool = True) -> tuple[np.ndarray, float]:
    """The checked volume ``(D, H, W)`` float32 with non-finite voxels set to 0, and the fraction that were."""
    if data.dtype.fields is not None:
        channels = "".join(data.dtype.names or ())
        raise KeyMorphInputError(f"{path}: {channels or 'multi-channel'} (colour) voxels; convert the image to grey")
    if data.dtype.kind not in "biuf":
        raise KeyMorphInputError(f"{path}: voxel type {data.dtype} is not a real scalar (complex?); convert it")
    if data.ndim > 3 and data.shape[3:] == (1,) * (data.ndim - 3):
        data = data.reshape(data.shape[:3])
    if data.ndim == 4:
        raise KeyMorphInputError(
            f"{path}: 4-D image with {data.shape[3]} volumes; extract one, e.g. `fslroi in out 0 1` or nibabel"
            " `image.slicer[..., 0]`"
        )
    if data.ndim != 3:
        raise KeyMorphInputError(f"{path}: {data.ndim}-D image of shape {data.shape}; a 3-D volume is needed")
    extent = np.linalg.norm(affine[:3, :3], axis=0) * np.array(data.shape)
    if to_register and (extent.min() < MIN_EXTENT_MM or min(data.shape) < MIN_VOXELS):
        raise KeyMorphInputError(
            f"{path}: field of view {np.round(extent, 1).tolist()} mm ({list(data.shape)} voxels) is too small"
            " to hold a brain"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        data = data.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    finite_count = int(np.count_nonzero(finite))
    if finite_count == 0:
        raise KeyMorphInputError(f"{path}: every voxel is NaN or infinite")
    if finite_count < data.size:  # the copies only when there is something to replace (a 1 mm head: ~0.3 s)
        data = np.where(finite, data, np.float32(0.0))
        values = data[finite]
        low, high = values.min(), values.max()
    else:
        low, high = data.min(), data.max()
    if to_register and high == low:
        raise KeyMorphInputError(f"{path}: the image is constant ({high:g} everywhere); nothing to register")
    return data, float(1.0 - finite_count / data.size)


def load_volume(path: str, to_register: bool = True) -> MetaTensor:
    """Read and check a NIfTI volume; returns a ``(1, D, H, W)`` float32 MetaTensor with the RAS affine.

    Non-finite voxels become 0; ``meta["nonfinite_fraction"]`` tells how many there were. A 4-D file with a single
    volume is accepted. Raises :class:`KeyMorphInputError` for anything that cannot be registered (see the module
    docstring); never another exception type for a bad file.

    Args:
        path: the NIfTI file.
        to_register: refuse a constant image (nothing to register) and a field of view too small to hold a brain.
            False for files that only follow a registration: a brain mask, an empty lesion mask given with
            ``apply_to``.
    """
    path = os.fspath(path)
    image = _read(path)
    affine = _check_affine(path, image)
    data, nonfinite = _check_data(path, np.asarray(image._keymorph_data), affine, to_register)
    check_readers_agree(path, image, affine, data.shape)
    meta = {
        "filename_or_obj": path,
        "original_affine": affine,
        "spatial_shape": np.array(data.shape),
        "nonfinite_fraction": nonfinite,
    }
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(affine), meta=meta)


def load_onto_grid(path: str, image: MetaTensor, to_register: bool = True) -> MetaTensor:
    """Read a file that belongs with ``image`` (a label map, a mask) through :func:`load_volume`'s checks, reorient
    it to RAS and bring it onto ``image``'s grid (nearest neighbour, through world coordinates) when it lies on
    another; returns ``(1, D, H, W)`` float32 (values as in the file) with ``image``'s affine."""
    loaded = Orientation(axcodes="RAS", labels=None)(load_volume(path, to_register))
    loaded_affine, image_affine = affine_of(loaded), affine_of(image).cpu()
    shape = tuple(image.shape[1:])
    if tuple(loaded.shape[1:]) != shape or not torch.allclose(loaded_affine, image_affine, atol=GRID_ATOL_MM):
        identity = torch.eye(4, dtype=torch.float64)
        values = resample_onto(loaded.as_tensor(), loaded_affine, image_affine, shape, identity, mode="nearest")
        loaded = MetaTensor(values, affine=image_affine, meta={"filename_or_obj": path})
    return loaded


def moved_by(image: torch.Tensor, matrix: torch.Tensor) -> MetaTensor:
    """The same voxels with the voxel-to-world matrix ``matrix @ affine``: the content moved by ``matrix``, exactly."""
    moved = image.clone() if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(image))
    moved.affine = matrix @ affine_of(moved)
    return moved


def resample_world_aligned(image: torch.Tensor, spacing: Sequence[float], mode: str = "bilinear") -> MetaTensor:
    """Resample a ``(1, D, H, W)`` MetaTensor onto the world-aligned (RAS) grid of ``spacing`` mm ``(3,)`` that holds
    its whole field of view (the bounding box of its voxel centres); outside the old field of view is 0.

    ``mode`` "bilinear" (intensities) or "nearest" (masks, labels: dtype kept). Returns the resampled MetaTensor with
    the new grid's affine.
    """
    affine = affine_of(image)
    new_affine, new_shape = covering_grid_along(torch.eye(3, dtype=torch.float64), affine, image.shape[1:], spacing)
    data = convert_to_tensor(image, track_meta=False)
    resampled = resample_onto(data, affine, new_affine, new_shape, torch.eye(4, dtype=torch.float64), mode=mode)
    meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
    meta.pop("affine", None)
    meta["spatial_shape"] = np.array(new_shape)
    return MetaTensor(resampled, affine=new_affine, meta=meta)


def source_name(image) -> str:
    """The file an image was read from (its ``filename_or_obj``), ``<image>`` when it has none."""
    meta = image.meta if isinstance(image, MetaTensor) else {}
    return str(meta.get("filename_or_obj", "<image>"))


def is_label_map(path: str) -> bool:
    """Whether a NIfTI file holds a label map: integer voxels stored without intensity scaling."""
    image = nib.load(path)
    if not np.issubdtype(image.get_data_dtype(), np.integer):
        return False
    # nibabel moves the header's scl_slope / scl_inter to the data proxy when it loads a file
    slope, inter = getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)
    return float(slope) == 1.0 and float(inter) == 0.0


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
    """Write ``data`` atomically with ``reference``'s header: the same voxel-to-world matrix, qform and sform (matrices
    and codes, copied verbatim, so every reader puts the voxels where it puts the reference's), units and NIfTI
    version. Intensity scaling, display range and description are reset, since the voxels are new."""
    array = np.asarray(data.detach().cpu() if isinstance(data, torch.Tensor) else data)
    dtype = np.dtype(dtype or array.dtype)
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)
    header["cal_min"], header["cal_max"] = 0.0, 0.0
    header["descrip"] = b"KeyMorph registration output"
    image_class = type(reference) if isinstance(reference, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    # With an affine equal to the header's, nibabel leaves the header's qform and sform (and their codes) untouched.
    image = image_class(array.astype(dtype, copy=False), reference.affine, header)
    write_atomically(path, lambda temporary: nib.save(image, temporary))


def header_moved(image: nib.Nifti1Image, moving_to_fixed: np.ndarray, fixed: nib.Nifti1Image) -> nib.Nifti1Image:
    """``image`` (the moving image) with its voxels untouched and its header moved into the fixed space: the
    voxel-to-world matrix becomes ``moving_to_fixed @ image.affine`` (RAS mm), so each voxel lands where the
    registration puts it, without resampling (resolution, field of view, data type and scaling are kept).

    The sform holds the new matrix with the fixed image's code (its space; 2, "aligned", when it has none). The
    qform holds it too when it can (no shear: rigid and similarity results); otherwise the qform code is 0, so no
    reader falls back to a different matrix.
    """
    affine = np.asarray(moving_to_fixed, dtype=np.float64) @ image.affine
    moved = type(image)(image.dataobj, affine, image.header.copy())
    code = int(fixed.header["sform_code"]) or int(fixed.header["qform_code"]) or 2
    moved.set_sform(affine, code)
    moved.set_qform(affine, code)  # nibabel strips what a quaternion cannot hold (shear)
    if not np.allclose(moved.header.get_qform(), affine, atol=1e-5):
        moved.set_qform(None)
    moved.header["descrip"] = b"KeyMorph: moving voxels, header in the fixed space"
    return moved


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

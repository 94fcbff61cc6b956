"""The transform files other tools read (FSL FLIRT, FreeSurfer LTA, the inverse ITK transform), the header-only
image and the moving brain mask: each read back by an independent reader maps points as ``transform.tfm`` does."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nibabel.processing import resample_from_to
from nitransforms.linear import Affine
from test_inference import grid_affine, phantom_volume, rigid, rotation, write_nifti

from scripts.coordinates import resample_onto
from scripts.image_io import header_moved
from scripts.transform_io import write_transform_files

# A general affine (rotation, anisotropic scaling, shear, translation): fixed RAS mm -> moving RAS mm.
FIXED_TO_MOVING = rigid([0.3, -0.2, 1.0], 23.0, [6.0, -9.0, 4.0]) @ np.array(
    [[1.08, 0.05, 0.0, 0.0], [0.0, 0.93, 0.04, 0.0], [0.02, 0.0, 1.02, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
FIXED_SHAPE, MOVING_SHAPE = (42, 40, 36), (44, 40, 30)
FIXED_GRID = {
    "RAS": grid_affine((2.0, 2.0, 2.2), FIXED_SHAPE, rotation([1, 0, 0], 8.0), (1.0, 2.0, -1.0)),
    "LAS": grid_affine((-2.0, 2.0, 2.2), FIXED_SHAPE, rotation([1, 0, 0], 8.0), (1.0, 2.0, -1.0)),
}
MOVING_GRID = {
    "LPS": grid_affine((-1.8, -2.2, 2.5), MOVING_SHAPE, rotation([0, 0, 1], -12.0), (5.0, -8.0, 3.0)),
    "RAS": grid_affine((1.8, 2.2, 2.5), MOVING_SHAPE, rotation([0, 1, 0], 20.0), (5.0, -8.0, 3.0)),
}


def sample_points(count: int = 50, seed: int = 0) -> np.ndarray:
    """Points of a brain-sized region around the origin (RAS mm)."""
    return np.random.default_rng(seed).uniform(-90, 90, size=(count, 3))


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def itk_maps(path: str, points: np.ndarray) -> np.ndarray:
    """What SimpleITK's transform of ``path`` does to RAS points (it works in LPS)."""
    transform = sitk.ReadTransform(path)
    flip = np.array([-1.0, -1.0, 1.0])
    return np.array([np.array(transform.TransformPoint((p * flip).tolist())) * flip for p in points])


@pytest.fixture(params=[("RAS", "LPS"), ("LAS", "RAS")], ids=lambda p: f"fixed {p[0]}, moving {p[1]}")
def written(request, tmp_path):
    """The transform files of FIXED_TO_MOVING between a fixed and a moving image of these orientations."""
    fixed_code, moving_code = request.param
    fixed_path = write_nifti(
        tmp_path / "fixed.nii.gz", np.zeros(FIXED_SHAPE, np.float32), FIXED_GRID[fixed_code], sform_code=4
    )
    moving_affine = MOVING_GRID[moving_code]
    moving_path = write_nifti(
        tmp_path / "moving.nii.gz", phantom_volume(moving_affine, MOVING_SHAPE, FIXED_TO_MOVING), moving_affine
    )
    folder = tmp_path / "case"
    folder.mkdir()
    fixed, moving = nib.load(fixed_path), nib.load(moving_path)
    write_transform_files(str(folder), torch.from_numpy(FIXED_TO_MOVING), fixed, moving)
    return {"folder": folder, "fixed": fixed, "moving": moving, "fixed_path": fixed_path, "moving_path": moving_path}


def test_transform_tfm_is_the_fixed_to_moving_map(written):
    points = sample_points()
    np.testing.assert_allclose(
        itk_maps(str(written["folder"] / "transform.tfm"), points), apply(FIXED_TO_MOVING, points), atol=1e-6
    )


def test_inverse_itk_transform_undoes_transform_tfm(written):
    points = sample_points()
    moved = itk_maps(str(written["folder"] / "transform.tfm"), points)
    back = Affine.from_filename(str(written["folder"] / "transform_inverse.tfm"), fmt="itk").map(moved)
    np.testing.assert_allclose(back, points, atol=1e-4)
    np.testing.assert_allclose(itk_maps(str(written["folder"] / "transform_inverse.tfm"), moved), points, atol=1e-4)


def test_flirt_matrix_read_by_nitransforms_maps_like_transform_tfm(written):
    points = sample_points()
    expected = itk_maps(str(written["folder"] / "transform.tfm"), points)
    flirt = Affine.from_filename(
        str(written["folder"] / "transform_flirt.mat"),
        fmt="fsl",
        reference=written["fixed_path"],
        moving=written["moving_path"],
    )
    np.testing.assert_allclose(flirt.map(points), expected, atol=1e-4)


def fsl_scaled_voxels(image: nib.Nifti1Image) -> np.ndarray:
    """FSL's coordinates of an image: voxel indices times voxel sizes, with the first axis reversed when the
    voxel-to-world matrix has a positive determinant (FSL's "neurological" storage)."""
    zooms = np.array(image.header.get_zooms()[:3], dtype=np.float64)
    scale = np.diag([*zooms, 1.0])
    if np.linalg.det(image.affine[:3, :3]) > 0:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, image.shape[0] - 1
        scale = scale @ flip
    return scale


def test_flirt_matrix_is_flirts_convention(written):
    """FLIRT's matrix maps the MOVING image's FSL coordinates to the FIXED image's (``-in moving -ref fixed``);
    checked against FSL's definition written out here, not against nitransforms."""
    fixed, moving = written["fixed"], written["moving"]
    moving_to_fixed = np.linalg.inv(FIXED_TO_MOVING)
    expected = (
        fsl_scaled_voxels(fixed)
        @ np.linalg.inv(fixed.affine)
        @ moving_to_fixed
        @ moving.affine
        @ np.linalg.inv(fsl_scaled_voxels(moving))
    )
    np.testing.assert_allclose(np.loadtxt(written["folder"] / "transform_flirt.mat"), expected, atol=1e-6)


def test_lta_read_by_nitransforms_maps_like_transform_tfm(written):
    points = sample_points()
    expected = itk_maps(str(written["folder"] / "transform.tfm"), points)
    lta = Affine.from_filename(str(written["folder"] / "transform.lta"), fmt="fs")
    np.testing.assert_allclose(lta.map(points), expected, atol=1e-4)
    text = (written["folder"] / "transform.lta").read_text()
    assert "type      = 1" in text  # LINEAR_RAS_TO_RAS, with both volume geometries
    assert text.count("volume = ") == 2


def test_affine_ras_is_the_moving_to_fixed_matrix(written):
    np.testing.assert_allclose(
        np.loadtxt(written["folder"] / "affine_ras.txt"), np.linalg.inv(FIXED_TO_MOVING), atol=1e-8
    )


def test_header_only_image_agrees_with_the_resampled_image(written):
    """The moving voxels with the moved header, resampled onto the fixed grid by nibabel (scipy), give what the
    registration resamples (``registered.nii.gz``: :func:`scripts.coordinates.resample_onto`)."""
    fixed, moving = written["fixed"], written["moving"]
    moved = header_moved(moving, np.linalg.inv(FIXED_TO_MOVING), fixed)
    assert np.array_equal(np.asarray(moved.dataobj), np.asarray(moving.dataobj))  # no resampling
    assert moved.header["sform_code"] == 4  # the fixed image's space
    assert moved.header["qform_code"] == 0  # a sheared matrix cannot be a quaternion: no second, different matrix
    resampled = np.asarray(resample_from_to(moved, fixed, order=1, mode="constant", cval=0.0).dataobj)
    registered = resample_onto(
        torch.from_numpy(np.asarray(moving.dataobj, dtype=np.float32))[None],
        torch.from_numpy(moving.affine),
        torch.from_numpy(fixed.affine),
        fixed.shape,
        torch.from_numpy(FIXED_TO_MOVING),
    )[0].numpy()
    inside = registered > 0.05  # away from the field-of-view border, where the two treat the edge differently
    assert inside.sum() > 1000
    np.testing.assert_allclose(resampled[inside], registered[inside], atol=1e-4)


def test_header_only_of_a_rigid_result_keeps_a_qform(tmp_path):
    fixed = nib.Nifti1Image(np.zeros(FIXED_SHAPE, np.float32), FIXED_GRID["RAS"])
    moving = nib.Nifti1Image(np.ones(MOVING_SHAPE, np.int16), MOVING_GRID["LPS"])
    moved = header_moved(moving, rigid([1, 1, 0], 30.0, [1, 2, 3]), fixed)
    assert moved.header["qform_code"] == 2 == moved.header["sform_code"]  # the fixed image's (nibabel: aligned)
    np.testing.assert_allclose(moved.header.get_qform(), moved.affine, atol=1e-5)
    assert moved.get_data_dtype() == np.int16

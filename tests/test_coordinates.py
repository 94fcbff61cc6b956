"""The coordinate convention of :mod:`scripts.coordinates`, checked against exact answers and against SimpleITK.

The central test resamples an oblique, anisotropic, non-RAS moving volume onto a differently oriented fixed grid
through a known fixed-to-moving RAS matrix, once with SimpleITK reading the NIfTI files and the written
``transform.tfm`` and once with :func:`scripts.coordinates.resample_onto`; the two must agree.
"""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from scripts.coordinates import (
    apply_affine,
    ras_to_lps,
    resample_onto,
    sampling_grid,
    voxel_grid_world,
    voxel_to_normalized,
    warp,
    world_points_to_grid,
)
from scripts.transform_io import read_itk_transform, write_itk_transform

DTYPE = torch.float64


def rotation_matrix(axis, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    angle = math.radians(degrees)
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def voxel_affine(direction: np.ndarray, spacing, origin) -> np.ndarray:
    """4x4 voxel-to-RAS matrix from direction cosines (columns), spacing and the world position of voxel 0."""
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def oblique_affine() -> np.ndarray:
    """An oblique, anisotropic voxel-to-world matrix whose axes point L, P, I (LPI-like, flipped)."""
    direction = rotation_matrix([0.3, -0.5, 1.0], 17.0) @ np.diag([-1.0, -1.0, -1.0])
    return voxel_affine(direction, [1.2, 0.9, 2.5], [22.0, 18.0, 26.0])


def to_torch(array: np.ndarray) -> torch.Tensor:
    """float64 tensor of a numpy array."""
    return torch.as_tensor(np.asarray(array, dtype=np.float64))


# --- the grid ----------------------------------------------------------------------------------------------------


def test_voxel_to_normalized_maps_centres_of_end_voxels_to_minus_and_plus_one():
    matrix = voxel_to_normalized((5, 8, 13))
    ends = torch.tensor([[0.0, 0.0, 0.0, 1.0], [4.0, 7.0, 12.0, 1.0], [2.0, 3.5, 6.0, 1.0]], dtype=DTYPE)
    torch.testing.assert_close((ends @ matrix.T)[:, :3], torch.tensor([[-1.0] * 3, [1.0] * 3, [0.0] * 3], dtype=DTYPE))


def test_identity_reproduces_image_exactly():
    """Identical grids and the identity: the warped image is the image (no half-voxel or (S-1)/S drift)."""
    torch.manual_seed(0)
    affine = to_torch(oblique_affine())[None]
    image = torch.rand(2, 3, 7, 9, 11)
    identity, grids = torch.eye(4, dtype=DTYPE).expand(2, 4, 4), affine.expand(2, 4, 4)
    grid = sampling_grid(identity, grids, grids, (7, 9, 11), (7, 9, 11))
    assert grid.shape == (2, 7, 9, 11, 3) and grid.dtype == torch.float32
    torch.testing.assert_close(warp(image, grid), image, atol=1e-6, rtol=0)
    torch.testing.assert_close(warp(image, grid, mode="nearest"), image, atol=0, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_voxel_world_translation_shifts_by_one_voxel(axis):
    """Fixed-to-moving translation by one voxel step along array axis ``axis``: warped[i] = moving[i + 1]."""
    torch.manual_seed(1)
    affine = to_torch(oblique_affine())
    shape = (6, 7, 8)
    image = torch.rand(1, 1, *shape)
    shift = torch.eye(4, dtype=DTYPE)
    shift[:3, 3] = affine[:3, axis]  # the world vector of one step along that array axis
    grid = sampling_grid(shift[None], affine[None], affine[None], shape, shape)
    warped = warp(image, grid)
    size = shape[axis]
    torch.testing.assert_close(
        warped.narrow(axis + 2, 0, size - 1), image.narrow(axis + 2, 1, size - 1), atol=1e-5, rtol=0
    )
    assert float(warped.narrow(axis + 2, size - 1, 1).abs().max()) < 1e-4  # beyond the field of view


def test_sampling_grid_matches_manual_world_mapping():
    """Oblique, anisotropic, differently shaped grids and a general fixed-to-moving matrix, two routes, one answer."""
    fixed_affine = to_torch(voxel_affine(rotation_matrix([1.0, 0.2, -0.4], 35.0), [1.5, 1.1, 0.8], [-30.0, 5.0, 2.0]))
    moving_affine = to_torch(oblique_affine())
    fixed_shape, moving_shape = (9, 6, 7), (11, 8, 5)
    transform = torch.eye(4, dtype=DTYPE)
    transform[:3, :3] = to_torch(rotation_matrix([0.2, 1.0, 0.3], 23.0) * np.array([1.05, 0.97, 1.02]))
    transform[:3, 3] = torch.tensor([3.0, -2.0, 4.5], dtype=DTYPE)
    grid = sampling_grid(transform[None], fixed_affine[None], moving_affine[None], fixed_shape, moving_shape)
    world = apply_affine(transform[None], voxel_grid_world(fixed_affine[None], fixed_shape))
    manual = world_points_to_grid(world, moving_affine[None], moving_shape)
    assert float(manual.abs().max()) > 1.0  # the test spans more than the moving field of view
    torch.testing.assert_close(grid.reshape(1, -1, 3).to(DTYPE), manual, atol=1e-5, rtol=0)


def test_world_points_to_grid_reverses_axes():
    """A point at moving voxel (i, j, k) lands at PyTorch grid (x, y, z) = normalized (k, j, i)."""
    affine = to_torch(oblique_affine())
    shape = (5, 9, 3)
    voxels = torch.tensor([[[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 2.0], [2.0, 4.0, 1.0]]])
    world = apply_affine(affine[None], voxels.to(DTYPE))
    expected = torch.tensor([[[-1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1], [0, 0, 0]]], dtype=DTYPE)
    torch.testing.assert_close(world_points_to_grid(world, affine[None], shape), expected, atol=1e-12, rtol=0)


def test_voxel_grid_world_is_c_ordered():
    affine = to_torch(oblique_affine())
    points = voxel_grid_world(affine[None], (2, 3, 4))
    assert points.shape == (1, 24, 3)
    torch.testing.assert_close(points[0, 1], affine[:3, 2] + affine[:3, 3])  # (0, 0, 1): last axis fastest
    torch.testing.assert_close(points[0, 12], affine[:3, 0] + affine[:3, 3])  # (1, 0, 0)


@pytest.mark.filterwarnings("ignore:Since version 1.3.0")  # PyTorch warns about unit-size grids; still exact
def test_single_voxel_axis_matches_affine_grid():
    """Extracting one slice (fixed grid one voxel thick) takes that slice, not a blend with its neighbour."""
    volume = torch.arange(5 * 4 * 3, dtype=torch.float32).reshape(1, 5, 4, 3)
    moving_affine = torch.eye(4, dtype=DTYPE)
    for index in range(5):
        fixed_affine = moving_affine.clone()
        fixed_affine[0, 3] = float(index)
        out = resample_onto(volume, moving_affine, fixed_affine, (1, 4, 3), torch.eye(4, dtype=DTYPE))
        torch.testing.assert_close(out[0, 0], volume[0, index])


def test_ras_to_lps_is_an_involution_and_flips_x_y():
    generator = torch.Generator().manual_seed(2)
    matrix = torch.eye(4, dtype=DTYPE)
    matrix[:3] = torch.randn(3, 4, dtype=DTYPE, generator=generator)
    torch.testing.assert_close(ras_to_lps(ras_to_lps(matrix)), matrix, atol=0, rtol=0)
    batch = matrix.expand(3, 4, 4)
    torch.testing.assert_close(ras_to_lps(ras_to_lps(batch)), batch, atol=0, rtol=0)
    # The same map in other axes: LPS(T p) = T_lps LPS(p).
    point = torch.randn(1, 1, 3, dtype=DTYPE, generator=generator)
    flip = torch.tensor([-1.0, -1.0, 1.0], dtype=DTYPE)
    torch.testing.assert_close(apply_affine(ras_to_lps(matrix), point * flip), apply_affine(matrix, point) * flip)
    assert not torch.allclose(ras_to_lps(matrix), matrix)


def test_resample_onto_nearest_keeps_label_dtype_and_values():
    torch.manual_seed(3)
    labels = torch.randint(0, 5, (1, 8, 9, 10), dtype=torch.int64)
    affine = to_torch(oblique_affine())
    transform = torch.eye(4, dtype=DTYPE)
    transform[:3, 3] = torch.tensor([0.4, -0.3, 0.7], dtype=DTYPE)
    out = resample_onto(labels, affine, affine, (8, 9, 10), transform, mode="nearest")
    assert out.dtype == torch.int64 and out.shape == (1, 8, 9, 10)
    assert set(out.unique().tolist()) <= set(range(5))
    same = resample_onto(labels, affine, affine, (8, 9, 10), torch.eye(4, dtype=DTYPE), mode="nearest")
    assert torch.equal(same, labels)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resample_onto_samples_only_where_the_content_reaches_and_misses_none_of_it(mode):
    """A small non-zero block in a large field of view (a brain-extracted image): resample_onto samples only the part
    of the fixed grid that reaches it, in slabs, and gives what one whole-grid grid_sample gives, the block's edges
    included; a transform that moves the block off the fixed grid gives zeros."""
    generator = torch.Generator().manual_seed(5)
    moving = torch.zeros(1, 30, 34, 28)
    moving[0, 8:14, 20:27, 5:12] = torch.rand(6, 7, 7, generator=generator) + 0.5
    moving_affine = to_torch(oblique_affine())
    fixed_affine = to_torch(voxel_affine(rotation_matrix([1.0, 0.2, -0.4], 30.0), [0.8, 1.1, 0.9], [-10, -25, -5]))
    fixed_shape = (40, 44, 50)
    transform = torch.eye(4, dtype=DTYPE)
    transform[:3, :3] = to_torch(rotation_matrix([0.2, 1.0, 0.3], 20.0) * 1.05)
    transform[:3, 3] = torch.tensor([3.0, -2.0, 4.0], dtype=DTYPE)
    grid = sampling_grid(transform[None], fixed_affine[None], moving_affine[None], fixed_shape, moving.shape[1:])
    whole = warp(moving[None], grid, mode=mode)[0]
    out = resample_onto(moving, moving_affine, fixed_affine, fixed_shape, transform, mode=mode)
    assert 0 < int((whole > 0).sum()) < whole.numel() // 10  # the block lands inside, on a small part of the grid
    if mode == "nearest":
        assert torch.equal(out, whole)
    else:
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=0)
    away = transform.clone()
    away[:3, 3] += 500.0
    assert not bool(resample_onto(moving, moving_affine, fixed_affine, fixed_shape, away, mode=mode).any())


# --- the world round trip against SimpleITK -------------------------------------------------------------------------


def smooth_volume(shape, seed: int = 0) -> np.ndarray:
    """A smooth, random-ish, asymmetric pattern: a sum of anisotropic Gaussian blobs in voxel space, float32."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    volume = np.zeros(shape)
    for _ in range(12):
        centre = rng.uniform(0.15, 0.85, 3) * np.array(shape)
        width = rng.uniform(0.12, 0.3, 3) * np.array(shape)
        volume += rng.uniform(0.5, 2.0) * np.exp(-0.5 * (((grid - centre) / width) ** 2).sum(-1))
    return volume.astype(np.float32)


@pytest.fixture(scope="module")
def round_trip_case(tmp_path_factory):
    """NIfTI files of an oblique LPI-like moving volume and a differently oriented fixed grid, and a known matrix."""
    folder = tmp_path_factory.mktemp("world")
    moving_shape, fixed_shape = (40, 48, 20), (34, 30, 36)
    moving_affine = oblique_affine()
    # Fixed axes permuted (i -> A, j -> S, k -> R), rotated the other way, another spacing.
    permuted = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    fixed_affine = voxel_affine(rotation_matrix([-0.6, 0.4, 0.2], 12.0) @ permuted, [1.3, 1.5, 1.4], [-5, -5, -5])
    # Centre both fields of view on the same world point so most of the fixed grid falls inside the moving one.
    moving_centre = moving_affine[:3, :3] @ ((np.array(moving_shape) - 1) / 2) + moving_affine[:3, 3]
    fixed_centre = fixed_affine[:3, :3] @ ((np.array(fixed_shape) - 1) / 2) + fixed_affine[:3, 3]
    fixed_affine[:3, 3] += moving_centre - fixed_centre
    moving = smooth_volume(moving_shape)
    nib.Nifti1Image(moving, moving_affine).to_filename(str(folder / "moving.nii.gz"))
    nib.Nifti1Image(np.zeros(fixed_shape, np.float32), fixed_affine).to_filename(str(folder / "fixed.nii.gz"))
    # Known fixed-to-moving RAS matrix: 25 degrees, a translation and a slight scale, about the FOV centre.
    linear = rotation_matrix([1.0, 2.0, 0.5], 25.0) @ np.diag([1.04, 0.97, 1.02])
    transform = np.eye(4)
    transform[:3, :3] = linear
    transform[:3, 3] = moving_centre - linear @ moving_centre + np.array([4.0, -3.0, 2.5])
    write_itk_transform(str(folder / "transform.tfm"), transform)
    return folder, transform


def resample_with_project(folder, transform: np.ndarray) -> np.ndarray:
    """Our resampling from nibabel arrays and RAS affines; ``(i, j, k)`` array on the fixed grid."""
    moving = nib.load(str(folder / "moving.nii.gz"))
    fixed = nib.load(str(folder / "fixed.nii.gz"))
    out = resample_onto(
        torch.from_numpy(np.asarray(moving.dataobj, dtype=np.float32))[None],
        to_torch(moving.affine),
        to_torch(fixed.affine),
        fixed.shape,
        to_torch(transform),
    )
    return out[0].numpy()


def resample_with_sitk(folder) -> np.ndarray:
    """SimpleITK reading the NIfTIs and transform.tfm; returned as an ``(i, j, k)`` array."""
    moving = sitk.ReadImage(str(folder / "moving.nii.gz"), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(folder / "fixed.nii.gz"), sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(folder / "transform.tfm"))
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)


def interior_mask(folder, transform: np.ndarray, margin: float = 1.5) -> np.ndarray:
    """Fixed voxels whose image in the moving grid lies at least ``margin`` voxels inside its field of view."""
    moving, fixed = nib.load(str(folder / "moving.nii.gz")), nib.load(str(folder / "fixed.nii.gz"))
    to_moving_voxels = np.linalg.inv(moving.affine) @ transform @ fixed.affine
    voxels = np.stack(np.meshgrid(*[np.arange(s) for s in fixed.shape], indexing="ij"), -1).astype(np.float64)
    moving_voxels = voxels @ to_moving_voxels[:3, :3].T + to_moving_voxels[:3, 3]
    upper = np.array(moving.shape, dtype=np.float64) - 1 - margin
    return ((moving_voxels >= margin) & (moving_voxels <= upper)).all(-1)


def test_sitk_reads_the_same_grids_as_nibabel(round_trip_case):
    """Sanity of the setup: both readers see the same voxel-to-world matrices (ITK in LPS)."""
    folder, _ = round_trip_case
    for name in ("moving", "fixed"):
        image = sitk.ReadImage(str(folder / f"{name}.nii.gz"))
        direction = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        lps = np.eye(4)
        lps[:3, :3], lps[:3, 3] = direction, image.GetOrigin()
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # world axes flip, voxel axes do not
        np.testing.assert_allclose(ras, nib.load(str(folder / f"{name}.nii.gz")).affine, atol=1e-4)


def test_world_round_trip_matches_simpleitk(round_trip_case):
    folder, transform = round_trip_case
    ours = resample_with_project(folder, transform)
    theirs = resample_with_sitk(folder)
    assert ours.shape == theirs.shape
    mask = interior_mask(folder, transform)
    assert mask.mean() > 0.2  # a large part of the fixed grid is compared
    intensity_range = float(np.ptp(theirs[mask]))
    assert intensity_range > 0.5  # and it is not flat there
    assert float(np.abs(ours - theirs)[mask].max()) < 1e-3 * intensity_range
    # Negative control: the inverse matrix (the classic direction mix-up) resamples something else.
    wrong = resample_with_project(folder, np.linalg.inv(transform))
    assert float(np.abs(wrong - theirs)[mask].max()) > 0.1 * intensity_range


def test_transform_file_round_trip(round_trip_case):
    folder, transform = round_trip_case
    np.testing.assert_allclose(read_itk_transform(str(folder / "transform.tfm")), transform, atol=1e-12, rtol=0)


def test_ants_reads_the_same_transform(round_trip_case):
    """antsApplyTransforms with transform.tfm resamples like SimpleITK (skipped without antspyx)."""
    ants = pytest.importorskip("ants")
    folder, transform = round_trip_case
    fixed = ants.image_read(str(folder / "fixed.nii.gz"))
    moving = ants.image_read(str(folder / "moving.nii.gz"))
    warped = ants.apply_transforms(fixed, moving, transformlist=[str(folder / "transform.tfm")], interpolator="linear")
    theirs = resample_with_sitk(folder)
    mask = interior_mask(folder, transform)
    assert float(np.abs(warped.numpy() - theirs)[mask].max()) < 1e-3 * float(np.ptp(theirs[mask]))
    read_back = ants.read_transform(str(folder / "transform.tfm"))
    point = [10.0, -5.0, 3.0]  # LPS, as ANTs works in ITK physical space
    expected = ras_to_lps(to_torch(transform)).numpy() @ np.array(point + [1.0])
    np.testing.assert_allclose(read_back.apply_to_point(point), expected[:3], atol=1e-6)


def test_ants_style_matlab_transform_with_centre_reads_the_same(round_trip_case, tmp_path):
    """ANTs writes ``.mat`` affines with a rotation centre (FixedParameters); reading folds the centre in."""
    _, transform = round_trip_case
    lps = ras_to_lps(to_torch(transform)).numpy()
    centre = np.array([12.0, -30.0, 7.5])
    itk = sitk.AffineTransform(3)
    itk.SetCenter(centre.tolist())
    itk.SetMatrix(lps[:3, :3].ravel().tolist())
    itk.SetTranslation((lps[:3, 3] - centre + lps[:3, :3] @ centre).tolist())  # same map as the centre-free one
    path = str(tmp_path / "ants0GenericAffine.mat")
    sitk.WriteTransform(itk, path)
    np.testing.assert_allclose(read_itk_transform(path), transform, atol=1e-9, rtol=0)


def test_tfm_file_is_in_lps(round_trip_case):
    """The parameters in the file are ``F T F``: x and y of the translation flip sign, as do the mixed entries."""
    folder, transform = round_trip_case
    with open(os.path.join(folder, "transform.tfm")) as handle:
        lines = dict(line.split(": ", 1) for line in handle.read().splitlines() if ": " in line)
    assert lines["Transform"].strip() == "AffineTransform_double_3_3"
    parameters = np.array(lines["Parameters"].split(), dtype=np.float64)
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(parameters[:9].reshape(3, 3), flip @ transform[:3, :3] @ flip, atol=1e-12)
    np.testing.assert_allclose(parameters[9:], flip @ transform[:3, 3], atol=1e-12)

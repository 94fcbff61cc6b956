"""Behaviour of :mod:`scripts.brain_frame` and :mod:`scripts.random_motions`: the brain frame, the principal axes and the random world affine.

The central property is equivariance: moving an image and its brain mask by a rigid transform ``T`` of the world
moves the network grid (the frame) by exactly ``T``, so the network sees the same image whatever the pose.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from test_inference import grid_affine, phantom_at, phantom_volume, rigid, rotation

from scripts.brain_frame import BrainFramed, brain_moments, principal_axes
from scripts.coordinates import apply_affine
from scripts.errors import KeyMorphInputError
from scripts.random_draws import random_points_in_mask
from scripts.random_motions import RandWorldAffined, random_affine_matrix

SHAPE = (40, 40, 40)
AFFINE = grid_affine((2.0, 2.0, 2.0), SHAPE, rotation([1.0, -1.0, 0.5], 20.0), (3.0, -2.0, 1.0))
DTYPE = torch.float64


def meta(array: np.ndarray, affine: np.ndarray, name: str = "/data/brain.nii.gz", dtype=torch.float32) -> MetaTensor:
    return MetaTensor(
        torch.as_tensor(np.ascontiguousarray(array), dtype=dtype)[None],
        affine=torch.as_tensor(affine, dtype=DTYPE),
        meta={"filename_or_obj": name},
    )


def brain_item(affine=AFFINE, shape=SHAPE, fixed_to_moving=None) -> dict:
    """Image, mask and a label map of the phantom on a grid (optionally the phantom moved by ``fixed_to_moving``)."""
    image = phantom_volume(affine, shape, fixed_to_moving)
    labels = (image > 0).astype(np.int16) + (image > 0.75)
    labels = meta(labels, affine, dtype=torch.int16)
    return {"image": meta(image, affine), "mask": meta(image > 0, affine), "labels": labels}


def moved_by(item: dict, matrix: np.ndarray) -> dict:
    """The same voxels with every affine left-multiplied by ``matrix``: the content moved exactly by it."""
    out = {}
    for key, value in item.items():
        moved = value.clone()
        moved.affine = torch.as_tensor(matrix, dtype=DTYPE) @ torch.as_tensor(value.affine, dtype=DTYPE)
        out[key] = moved
    return out


def random_rigid(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rigid(rng.normal(size=3), rng.uniform(-180, 180), rng.uniform(-30, 30, 3))


def is_rotation(matrix: torch.Tensor, atol: float = 1e-9) -> bool:
    eye = torch.eye(3, dtype=matrix.dtype)
    return torch.allclose(matrix.T @ matrix, eye, atol=atol) and abs(float(torch.linalg.det(matrix)) - 1) < atol


# --- the brain frame ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_frame_moves_exactly_with_a_rigid_move_of_image_and_mask(seed):
    matrix = random_rigid(seed)
    frame = BrainFramed(keys="image", spatial_size=32, spacing=2.0)
    item = brain_item()
    before = frame.frame_affine(item["mask"])
    after = frame.frame_affine(moved_by(item, matrix)["mask"])
    torch.testing.assert_close(after, torch.as_tensor(matrix) @ before, atol=1e-8, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_network_sees_the_same_image_after_a_rigid_move(seed):
    matrix = random_rigid(seed)
    frame = BrainFramed(keys="image", label_keys="labels", spatial_size=32, spacing=2.0)
    original, moved = frame(brain_item()), frame(moved_by(brain_item(), matrix))
    for key in ("image", "mask", "labels"):
        torch.testing.assert_close(moved[key].as_tensor(), original[key].as_tensor(), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.as_tensor(moved[key].affine, dtype=DTYPE),
            torch.as_tensor(matrix) @ torch.as_tensor(original[key].affine, dtype=DTYPE),
            atol=1e-8,
            rtol=0,
        )


def test_frame_does_not_depend_on_how_the_voxels_are_stored():
    """The same world image stored with its first axis reversed gives the same frame."""
    item = brain_item()
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, SHAPE[0] - 1
    flipped = {k: meta(v[0].numpy()[::-1], AFFINE @ flip, dtype=v.dtype) for k, v in item.items()}
    frame = BrainFramed(keys="image", spatial_size=32)
    torch.testing.assert_close(frame.frame_affine(flipped["mask"]), frame.frame_affine(item["mask"]), atol=1e-8, rtol=0)


def test_frame_follows_the_brain_resampled_on_another_grid():
    """A moving image of its own (another grid, the brain moved by T): the frame moves by T up to sampling."""
    matrix = rigid([0.2, 1.0, 0.3], 130.0, [10.0, -5.0, 8.0])
    other = grid_affine((1.5, 2.5, 1.8), (48, 36, 40), rotation([0, 0, 1], 33.0), matrix[:3, 3])
    frame = BrainFramed(keys="image", spatial_size=32, spacing=2.0)
    fixed = frame.frame_affine(brain_item()["mask"])
    moving = frame.frame_affine(brain_item(other, (48, 36, 40), matrix)["mask"])
    expected = torch.as_tensor(matrix) @ fixed
    assert torch.linalg.norm(moving[:3, 3] - expected[:3, 3]) < 1.0  # grid corner, mm
    cosine = (moving[:3, :3] / 2.0).T @ (expected[:3, :3] / 2.0)
    assert float(cosine.diagonal().min()) > math.cos(math.radians(3.0))  # each axis within 3 degrees


def test_brain_framed_output_grid_and_label_types():
    frame = BrainFramed(keys="image", label_keys="labels", spatial_size=32, spacing=2.0)
    item = brain_item()
    out = frame(item)
    affine = frame.frame_affine(item["mask"])
    for key in ("image", "mask", "labels"):
        assert out[key].shape == (1, 32, 32, 32)
        torch.testing.assert_close(torch.as_tensor(out[key].affine, dtype=DTYPE), affine)
    assert is_rotation(affine[:3, :3] / 2.0)
    assert out["labels"].dtype == torch.int16 and set(out["labels"].unique().tolist()) == {0, 1, 2}
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    # the grid is centred on the brain's centre of mass
    centre, _, _ = brain_moments(item["mask"])
    middle = torch.full((1, 3), 15.5, dtype=DTYPE)
    torch.testing.assert_close(apply_affine(affine, middle)[0], centre, atol=1e-8, rtol=0)
    # what the network sees at a grid voxel is what the image shows at that voxel's world position
    index = torch.tensor([[16.0, 12.0, 18.0], [10.0, 20.0, 15.0]], dtype=DTYPE)
    world = apply_affine(affine, index).numpy()
    seen = out["image"][0].numpy()[tuple(index.long().T.numpy())]
    np.testing.assert_allclose(seen, phantom_at(world), atol=0.2)


def test_training_jitter_and_flips_keep_a_proper_frame_on_the_brain():
    mask = brain_item()["mask"]
    exact = BrainFramed(keys="image", spatial_size=32, spacing=2.0).frame_affine(mask)
    centre, _, _ = brain_moments(mask)
    middle = torch.full((1, 3), 15.5, dtype=DTYPE)
    for jitter, flips in ((0.3, 0.0), (0.0, 1.0), (0.3, 0.5)):
        frame = BrainFramed(keys="image", spatial_size=32, spacing=2.0, rotation_jitter=jitter, flip_probability=flips)
        frame.set_random_state(seed=0)
        affines = [frame.frame_affine(mask) for _ in range(8)]
        frame.set_random_state(seed=0)
        torch.testing.assert_close(frame.frame_affine(mask), affines[0])  # seeded
        for affine in affines:
            assert is_rotation(affine[:3, :3] / 2.0)  # never a mirror image
            torch.testing.assert_close(apply_affine(affine, middle)[0], centre, atol=1e-8, rtol=0)  # on the brain
            turn = (exact[:3, :3] / 2.0).T @ (affine[:3, :3] / 2.0)  # in the exact frame's axes
            if flips == 1.0:  # a 180-degree turn about one axis: two axes reversed
                torch.testing.assert_close(turn.abs(), torch.eye(3, dtype=DTYPE), atol=1e-9, rtol=0)
                assert sorted(turn.diagonal().round().tolist()) == [-1.0, -1.0, 1.0]
            if flips == 0.0:
                angle = math.degrees(math.acos(min(1.0, (float(turn.trace()) - 1) / 2)))
                assert 0 < angle < math.degrees(0.3) * math.sqrt(3) + 1e-6


def test_without_principal_axes_the_grid_keeps_the_world_axes():
    affine = BrainFramed(keys="image", spatial_size=32, spacing=3.0, align_principal_axes=False).frame_affine(
        brain_item()["mask"]
    )
    torch.testing.assert_close(affine[:3, :3], 3.0 * torch.eye(3, dtype=DTYPE))


def test_empty_mask_names_the_file():
    item = brain_item()
    item["mask"] = meta(np.zeros(SHAPE), AFFINE, "/data/empty_brain.nii.gz")
    with pytest.raises(KeyMorphInputError, match="empty_brain.nii.gz"):
        BrainFramed(keys="image")(item)


# --- principal axes -----------------------------------------------------------------------------------------------


@st.composite
def point_clouds(draw):
    """Point clouds of many shapes: anisotropic, isotropic, flat, symmetric (no skew), mirrored."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    count = draw(st.integers(10, 300))
    scales = draw(st.lists(st.sampled_from([0.0, 1e-3, 1.0, 1.0, 5.0, 20.0]), min_size=3, max_size=3))
    points = rng.normal(size=(count, 3)) * np.asarray(scales)
    if draw(st.booleans()):
        points = np.concatenate([points, -points])  # perfectly symmetric: every third moment is zero
    if draw(st.booleans()):
        points = points**2 * np.sign(points)  # skewed tails
    if draw(st.booleans()):
        points[:, 0] = -points[:, 0]  # a mirror image
    points = points @ rotation(rng.normal(size=3), rng.uniform(0, 360)).T
    return torch.as_tensor(points - points.mean(0), dtype=DTYPE)


@settings(max_examples=150, deadline=None)
@given(points=point_clouds())
def test_principal_axes_are_always_a_proper_rotation(points):
    covariance = points.T @ points / len(points)
    axes = principal_axes(covariance, points)
    assert torch.isfinite(axes).all()
    assert is_rotation(axes, atol=1e-8)


def test_principal_axes_rotate_with_the_points():
    rng = np.random.default_rng(0)
    points = rng.gamma(2.0, 1.0, size=(500, 3)) * [9.0, 4.0, 2.0]  # skewed along each axis
    points = torch.as_tensor(points - points.mean(0), dtype=DTYPE)
    turn = torch.as_tensor(rotation([0.3, -0.4, 1.0], 140.0), dtype=DTYPE)
    axes = principal_axes(points.T @ points / len(points), points)
    turned = points @ turn.T
    torch.testing.assert_close(principal_axes(turned.T @ turned / len(turned), turned), turn @ axes)
    # longest axis first; the third points away from where the ends of the first axis lie
    projected = points @ axes
    spread = projected.var(0)
    assert spread[0] > spread[1] and spread[0] > spread[2]
    assert (projected[:, 0].pow(2) * projected[:, 2]).mean() <= 0


def test_principal_axes_find_up_from_the_shape_not_from_the_widths():
    """A brain-like cloud: longest front-back (skewed forwards), WIDER left-right than tall, and its front and back
    ends below the centre. The frame is (front-back, left-right, up) whatever the widths."""
    rng = np.random.default_rng(1)
    front_back = rng.gamma(4.0, 1.0, 4000) * 10.0
    front_back = front_back - front_back.mean()
    left_right = rng.normal(0, 1, 4000) * 14.0  # wider than tall
    up = rng.normal(0, 1, 4000) * 8.0 - 0.01 * front_back**2  # the ends droop
    points = np.stack([left_right, front_back, up], 1)  # world axes: x = left-right, y = front-back, z = up
    points = torch.as_tensor(points - points.mean(0), dtype=DTYPE)
    axes = principal_axes(points.T @ points / len(points), points)
    assert axes[1, 0] > 0.95  # first axis: +y (towards the longer tail)
    assert axes[2, 2] > 0.95  # third axis: +z (up)
    assert abs(axes[0, 1]) > 0.95  # second axis: left-right
    assert is_rotation(axes, atol=1e-8)


# --- random world affine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_random_affine_matrix_keeps_its_centre_and_never_mirrors(seed):
    center = [12.0, -30.0, 7.0]
    matrix = random_affine_matrix(np.random.RandomState(seed), math.pi, 0.2, 0.1, (0, 0, 0), center)
    assert matrix.dtype == DTYPE and matrix.shape == (4, 4)
    torch.testing.assert_close(
        apply_affine(matrix, torch.tensor([center], dtype=DTYPE))[0], torch.tensor(center, dtype=DTYPE)
    )
    singular_values = torch.linalg.svdvals(matrix[:3, :3])
    assert float(torch.linalg.det(matrix[:3, :3])) > 0
    assert 0.6 < float(singular_values.min()) and float(singular_values.max()) < 1.4
    torch.testing.assert_close(matrix[3], torch.tensor([0, 0, 0, 1.0], dtype=DTYPE))


def test_random_affine_matrix_ranges_and_reproducibility():
    rng = np.random.RandomState(3)
    matrix = random_affine_matrix(rng, 0.0, 0.0, 0.0, (5.0, 10.0, 0.0))
    torch.testing.assert_close(matrix[:3, :3], torch.eye(3, dtype=DTYPE))
    assert abs(float(matrix[0, 3])) <= 5 and abs(float(matrix[1, 3])) <= 10 and float(matrix[2, 3]) == 0
    rotation_only = random_affine_matrix(np.random.RandomState(4), math.pi, 0.0, 0.0)
    assert is_rotation(rotation_only[:3, :3])
    torch.testing.assert_close(
        random_affine_matrix(np.random.RandomState(9)), random_affine_matrix(np.random.RandomState(9))
    )


def test_rand_world_affine_moves_images_and_points_together():
    item = brain_item()
    rng = np.random.default_rng(0)
    voxels = torch.as_tensor(rng.uniform(0, 39, (25, 3)), dtype=DTYPE)
    points = apply_affine(torch.as_tensor(AFFINE), voxels)
    transform = RandWorldAffined(keys=["image", "mask", "labels"], point_keys="points", prob=1.0)
    transform.set_random_state(seed=5)
    out = transform({**item, "points": points})
    matrix = out["world_transform"]
    assert matrix.shape == (4, 4) and not torch.allclose(matrix, torch.eye(4, dtype=DTYPE))
    for key in ("image", "mask", "labels"):
        torch.testing.assert_close(out[key].as_tensor(), item[key].as_tensor())  # same voxels...
        torch.testing.assert_close(torch.as_tensor(out[key].affine, dtype=DTYPE), matrix @ torch.as_tensor(AFFINE))
    torch.testing.assert_close(out["points"], apply_affine(matrix, points))
    # ...so each moved point still sits on the voxel it sat on: points and images moved consistently
    torch.testing.assert_close(
        apply_affine(torch.linalg.inv(torch.as_tensor(out["image"].affine, dtype=DTYPE)), out["points"]), voxels
    )
    assert item["image"].affine is not out["image"].affine  # the input is not modified
    torch.testing.assert_close(torch.as_tensor(item["image"].affine, dtype=DTYPE), torch.as_tensor(AFFINE))


def test_rand_world_affine_rotates_about_the_field_of_view_centre_and_is_seeded():
    item = brain_item()
    first = RandWorldAffined(keys="image", prob=1.0, translate_range=0.0)
    first.set_random_state(seed=11)
    second = RandWorldAffined(keys="image", prob=1.0, translate_range=0.0)
    second.set_random_state(seed=11)
    matrix = first(item)["world_transform"]
    torch.testing.assert_close(second(item)["world_transform"], matrix)
    centre = apply_affine(torch.as_tensor(AFFINE), torch.full((1, 3), 19.5, dtype=DTYPE))
    torch.testing.assert_close(apply_affine(matrix, centre), centre)


def test_rand_world_affine_with_prob_zero_is_the_identity():
    item = brain_item()
    points = torch.randn(7, 3, dtype=DTYPE)
    out = RandWorldAffined(keys=["image", "mask"], point_keys="points", prob=0.0)({**item, "points": points})
    torch.testing.assert_close(out["world_transform"], torch.eye(4, dtype=DTYPE))
    torch.testing.assert_close(out["points"], points)
    for key in ("image", "mask"):
        torch.testing.assert_close(torch.as_tensor(out[key].affine, dtype=DTYPE), torch.as_tensor(AFFINE))
        torch.testing.assert_close(out[key].as_tensor(), item[key].as_tensor())


def test_random_points_in_mask_lie_in_the_brain():
    item = brain_item()
    points = random_points_in_mask(item["mask"], 200, np.random.RandomState(0))
    assert points.shape == (200, 3)
    voxels = apply_affine(torch.linalg.inv(torch.as_tensor(AFFINE)), points).round().long().clamp(0, 39)
    assert item["mask"][0][tuple(voxels.T)].float().mean() > 0.9  # jittered within their voxel

"""The brain's pose from :class:`scripts.head_pose.HeadPoseSearch`: turns in the header and in the voxels, another
contrast, determinism, and the coarse grids it works on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.coordinates import rotation_angle_deg
from scripts.head_pose import HeadPoseSearch, box_average
from scripts.image_io import resample_world_aligned
from scripts.random_motions import axis_angle_rotation, misalignment


@pytest.fixture(scope="module")
def search():
    return HeadPoseSearch.mni152()


@pytest.fixture(scope="module")
def brain():
    """nilearn's MNI152 T1 brain (the search's own template: a real image; other brains are the benchmark's)."""
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    return torch.from_numpy(np.asarray(template.dataobj, dtype=np.float32)), torch.from_numpy(template.affine)


@pytest.mark.parametrize("angle, axis", [(0, (0, 0, 1)), (70, (1, -2, 0.5)), (125, (0.3, 1, 1)), (180, (-1, 0.2, 0.7))])
def test_a_turn_in_the_header_is_the_frame(search, brain, angle, axis):
    image, affine = brain
    move = torch.as_tensor(misalignment(angle, np.asarray(axis), np.ones(3), np.array([12.0, -8.0, 5.0]), np.zeros(3)))
    frame = search(image, move @ affine)
    assert rotation_angle_deg(frame.T @ move[:3, :3]) < 5


def test_a_turn_in_the_voxels_of_another_contrast_is_the_frame(search, brain):
    """T2-like (the brain's intensities inverted), turned 140 degrees and resampled onto a 2 mm world-aligned grid."""
    image, affine = brain
    inverted = torch.where(image > 0, 1.2 * image.max() - image, torch.zeros(()))
    move = torch.as_tensor(
        misalignment(140, np.array([0.5, -1.0, 0.4]), np.ones(3), np.array([0, 15.0, 0]), np.zeros(3))
    )
    turned = resample_world_aligned(MetaTensor(inverted[None], affine=move @ affine), [2.0, 2.0, 2.0])
    frame = search(turned[0].as_tensor(), turned.affine)
    assert rotation_angle_deg(frame.T @ torch.as_tensor(axis_angle_rotation(np.array([0.5, -1.0, 0.4]), 140))) < 8


def test_the_same_image_gives_the_same_frame(search, brain):
    image, affine = brain
    move = torch.as_tensor(misalignment(100, np.array([1.0, 1.0, 0.0]), np.ones(3), np.zeros(3), np.zeros(3)))
    assert torch.equal(search(image, move @ affine), search(image, move @ affine))


def test_box_average_keeps_world_positions():
    """A coarse voxel is the mean of its box, and its world centre the mean of the box's voxel centres."""
    affine = torch.tensor([[0, -1.0, 0, 10], [0.5, 0, 0, -3], [0, 0, 2.0, 7], [0, 0, 0, 1]], dtype=torch.float64)
    index = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (16, 8, 4)], indexing="ij"), -1).to(torch.float64)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    values, coarse = box_average(world[..., 0].to(torch.float32), affine, 4.0)  # boxes of 8 x 4 x 2 voxels
    assert tuple(values.shape) == (2, 2, 2)
    expected = world[:8, :4, :2].reshape(-1, 3).mean(0)
    assert torch.allclose(coarse[:3, 3], expected, atol=1e-9)
    assert float(values[0, 0, 0]) == pytest.approx(float(expected[0]), abs=1e-4)

"""Behaviour of :mod:`scripts.keypoint_net`: shapes, the centre-of-mass head, TorchScript and gradients.

Translation equivariance is not a property of this network (strided convolutions, instance norm, zero padding),
so it is deliberately not tested.
"""

from __future__ import annotations

import pytest
import torch

from scripts.keypoint_net import CenterOfMass, KeypointDetector

SMALL = {"num_keypoints": 6, "channels": (4, 8, 8, 8)}


def test_output_shape_default_arguments():
    torch.manual_seed(0)
    model = KeypointDetector().eval()
    with torch.no_grad():
        points = model(torch.randn(2, 1, 32, 32, 32))
    assert points.shape == (2, 128, 3) and points.dtype == torch.float32
    assert bool(torch.isfinite(points).all())


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 32, 40)])
def test_output_shape_and_range(shape):
    """Keypoints are input voxel indices: within the volume, for non-cubic inputs too."""
    torch.manual_seed(1)
    model = KeypointDetector(in_channels=2, **SMALL).eval()
    with torch.no_grad():
        features = model.features(torch.randn(3, 2, *shape))
        points = model(torch.randn(3, 2, *shape))
    assert features.shape == (3, 6, *[s // 8 for s in shape])
    assert points.shape == (3, 6, 3)
    upper = torch.tensor([s - 1 for s in shape], dtype=torch.float32)
    assert bool((points >= 0).all()) and bool((points <= upper).all())


def test_zero_heatmap_gives_finite_points():
    points = CenterOfMass(stride=8)(torch.zeros(2, 3, 4, 5, 6))
    assert points.shape == (2, 3, 3)
    assert bool(torch.isfinite(points).all())
    assert torch.equal(points, torch.zeros(2, 3, 3))  # the documented fallback: the grid's origin
    negative = CenterOfMass(stride=8)(-torch.rand(1, 2, 3, 3, 3))  # ReLU clips everything
    assert bool(torch.isfinite(negative).all())


@pytest.mark.parametrize("stride", [1, 4, 8])
def test_single_voxel_heatmap_gives_stride_times_index(stride):
    heatmaps = torch.zeros(1, 2, 5, 6, 7)
    heatmaps[0, 0, 1, 4, 6] = 1.0
    heatmaps[0, 1, 3, 0, 2] = 1.0
    points = CenterOfMass(stride=stride)(heatmaps)
    expected = stride * torch.tensor([[[1.0, 4.0, 6.0], [3.0, 0.0, 2.0]]])
    assert torch.equal(points, expected)


@pytest.mark.parametrize("mass", [1e-4, 0.37, 250.0])
def test_single_voxel_position_does_not_depend_on_its_mass(mass):
    """No pull towards the origin for weak heatmaps (the mass floor is a clamp, not an added epsilon)."""
    heatmaps = torch.zeros(1, 1, 4, 4, 4)
    heatmaps[0, 0, 2, 3, 1] = mass
    heatmaps[0, 0, 0, 0, 0] = -5.0  # negative responses do not count
    torch.testing.assert_close(CenterOfMass(stride=8)(heatmaps), torch.tensor([[[16.0, 24.0, 8.0]]]))


def test_centre_of_mass_of_two_voxels_is_weighted_mean():
    heatmaps = torch.zeros(1, 1, 4, 4, 4)
    heatmaps[0, 0, 0, 0, 0] = 1.0
    heatmaps[0, 0, 3, 2, 1] = 3.0
    expected = 2 * (1.0 * torch.tensor([0.0, 0.0, 0.0]) + 3.0 * torch.tensor([3.0, 2.0, 1.0])) / 4.0
    torch.testing.assert_close(CenterOfMass(stride=2)(heatmaps)[0, 0], expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_matches_eager():
    torch.manual_seed(2)
    model = KeypointDetector(**SMALL).eval()
    scripted = torch.jit.script(model)
    image = torch.randn(2, 1, 32, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), model(image), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(3)
    model = KeypointDetector(**SMALL)
    points = model(torch.randn(1, 1, 32, 32, 32))
    points.pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), name


def test_centre_of_mass_gradcheck():
    heatmaps = torch.rand(1, 2, 3, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1
    assert torch.autograd.gradcheck(CenterOfMass(stride=8), (heatmaps.requires_grad_(),))

"""Keypoint coverage: the spread metric, the spread term of the training loss, and the power-weighted fit."""

import math

import pytest
import torch

from scripts.aligners import fit_affine
from scripts.coordinates import apply_affine
from scripts.keypoint_net import KeypointDetector
from scripts.metrics import distinct_locations, grid_frame_points, keypoint_spread, spread_scalars
from scripts.registration import power_weights, register
from scripts.training import brain_spread, spread_shortfall


def _turned_grid(spacing: float = 2.0) -> torch.Tensor:
    """``(1, 4, 4)`` voxel-to-world matrix of a grid turned 30 degrees about z and shifted."""
    angle = math.radians(30)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    affine[:3, :3] *= spacing
    affine[:3, 3] = torch.tensor([-40.0, 12.0, 7.0])
    return affine[None]


# ------------------------------------------------------------------------------------------------------ metric


def test_distinct_locations_merges_points_closer_than_the_radius():
    # 0, 3 and 6 mm chain into one group; 20 and 40 mm stand alone
    points = torch.tensor([[[0.0, 0, 0], [3, 0, 0], [6, 0, 0], [20, 0, 0], [40, 0, 0]]])
    assert distinct_locations(points, 5.0).tolist() == [3]
    assert distinct_locations(points, 2.0).tolist() == [5]
    assert distinct_locations(torch.zeros(2, 7, 3), 5.0).tolist() == [1, 1]


def test_keypoint_spread_of_a_known_point_set():
    # +-10 mm along x, +-20 mm along y, 0 along z: SD sqrt(4 * 10^2 / 3) and sqrt(4 * 20^2 / 3), four locations
    points = torch.tensor([[[10.0, 20, 0], [-10, 20, 0], [10, -20, 0], [-10, -20, 0]]])
    spread = keypoint_spread(points)
    expected = torch.tensor([[math.sqrt(400 / 3), math.sqrt(1600 / 3), 0.0]], dtype=torch.float64)
    assert torch.allclose(spread["sd_mm"], expected)
    assert spread["distinct"].tolist() == [4]


def test_grid_frame_points_measure_along_the_grid_axes_in_mm():
    """Points spread along the second axis of a turned grid only: all their spread is along that axis."""
    affine = _turned_grid()
    voxels = torch.zeros(1, 5, 3, dtype=torch.float64)
    voxels[0, :, 1] = torch.arange(5.0) * 10  # 0, 10, ..., 40 voxels = 0, 20, ..., 80 mm
    frame = grid_frame_points(apply_affine(affine, voxels), affine)
    assert torch.allclose(frame[0, :, 1], torch.arange(5.0, dtype=torch.float64) * 20, atol=1e-9)
    assert torch.allclose(frame[0, :, [0, 2]], torch.zeros(5, 2, dtype=torch.float64), atol=1e-9)
    scalars = spread_scalars(apply_affine(affine, voxels), affine)
    assert scalars["spread_left_right_mm"] == pytest.approx(float(torch.arange(5.0).std() * 20))
    assert scalars["spread_front_back_mm"] == pytest.approx(0.0, abs=1e-9)
    assert scalars["distinct_5mm"] == 5


# ------------------------------------------------------------------------------------------------- spread term


def _cloud(scale: float) -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.randn(1, 128, 3, dtype=torch.float64) * torch.tensor([30.0, 25.0, 25.0]) * scale)[None][0]


def test_the_spread_term_cannot_be_lowered_by_collapsing_the_keypoints():
    brain = torch.tensor([[35.0, 30.0, 28.0]], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)[None]
    values = [spread_shortfall(_cloud(s), affine, brain, 0.8).item() for s in (1.0, 0.5, 0.1, 0.0)]
    assert values[0] < 0.02  # about the brain's spread: (almost) nothing to pay
    assert values[0] < values[1] < values[2] < values[3]
    assert values[3] == pytest.approx(1.0, abs=1e-3)  # all on one point: the most it can be


def test_the_spread_term_charges_a_narrow_axis_and_has_finite_gradients_when_collapsed():
    brain = torch.tensor([[35.0, 30.0, 28.0]], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)[None]
    midline = _cloud(1.0).clone()
    midline[..., 1] *= 0.3  # left-right spread 7.5 mm against a 24 mm target
    assert spread_shortfall(midline, affine, brain, 0.8).item() > 0.1
    collapsed = torch.zeros(1, 16, 3, dtype=torch.float64, requires_grad=True)
    spread_shortfall(collapsed + 1e-3 * torch.randn(1, 16, 3, dtype=torch.float64), affine, brain, 0.8).backward()
    assert torch.isfinite(collapsed.grad).all()


def test_the_spread_term_uses_the_fit_weights():
    """A cloud that looks spread but puts its weight on a few close points is not spread for the fit."""
    brain = torch.tensor([[35.0, 30.0, 28.0]], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)[None]
    cloud = _cloud(1.0)
    weights = torch.full((1, 128), 1e-3, dtype=torch.float64)
    weights[0, :4] = 1.0
    cloud[0, :4] = torch.tensor([0.0, 0, 0])
    assert spread_shortfall(cloud, affine, brain, 0.8, weights).item() > 0.5
    assert spread_shortfall(cloud, affine, brain, 0.8).item() < 0.05


def test_brain_spread_of_a_box_mask():
    from monai.data import MetaTensor

    mask = torch.zeros(1, 20, 20, 20)
    mask[0, 2:12, 5:7, :] = 1  # 10, 2 and 20 voxels of 2 mm along the three axes
    spread = brain_spread(MetaTensor(mask, affine=_turned_grid()[0]))
    expected = torch.tensor([10, 2, 20], dtype=torch.float64)
    # a uniform run of n voxels has SD sqrt((n^2 - 1) / 12) voxels (sample SD: a hair more)
    assert torch.allclose(spread, 2 * ((expected**2 - 1) / 12).sqrt(), rtol=0.01)


# -------------------------------------------------------------------------------------------- power weighting


def test_power_weights_are_finite_positive_and_trust_keypoints_both_images_are_sure_of():
    fixed_power = torch.tensor([[4.0, 1.0, 1.0, 0.0]])
    moving_power = torch.tensor([[4.0, 1.0, 0.0, 0.0]])
    weights = power_weights(fixed_power, moving_power)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0, 0] > weights[0, 1] > weights[0, 2]  # sure in both > sure in one > sure in neither (floor)
    assert weights[0, 2] == weights[0, 3]
    assert torch.isfinite(power_weights(torch.zeros(1, 4), torch.zeros(1, 4))).all()


def test_the_detector_reports_each_heatmaps_power():
    torch.manual_seed(0)
    network = KeypointDetector(num_keypoints=8, channels=(4, 4, 8, 8)).eval()
    image = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        points, power = network(image, with_power=True)
        heatmaps = network.features(image)
    assert torch.equal(points, network(image))
    assert torch.allclose(power, heatmaps.clamp(min=0).sum((2, 3, 4)))


class _OracleWithPower(torch.nn.Module):
    """Keypoints at fixed voxel positions, the last one wrong on the moving image (batch item 1) and dark there."""

    def forward(self, image, with_power=False):
        torch.manual_seed(1)
        points = (torch.rand(1, 12, 3) * 24 + 4).expand(len(image), 12, 3).clone()
        points[1, -1] += 6.0  # the moving image's last keypoint is 6 voxels off
        power = torch.ones(len(image), 12)
        power[1, -1] = 0.0
        return (points, power) if with_power else points


def test_a_power_weighted_fit_ignores_a_keypoint_the_detector_is_unsure_of():
    affine = torch.eye(4, dtype=torch.float64)[None]
    image = torch.zeros(1, 1, 32, 32, 32)
    uniform = register(_OracleWithPower(), image, affine, image, affine)
    weighted = register(_OracleWithPower(), image, affine, image, affine, weighting="power")
    identity = torch.eye(4, dtype=torch.float64)
    assert (uniform.fixed_to_moving[0] - identity).abs().max() > 0.2
    assert (weighted.fixed_to_moving[0] - identity).abs().max() < 0.05  # the floor leaves it a trace of weight
    expected = fit_affine(weighted.fixed_points, weighted.moving_points, weighted.weights)
    assert torch.allclose(weighted.fixed_to_moving, expected)
    with pytest.raises(ValueError, match="keypoint weighting"):
        register(_OracleWithPower(), image, affine, image, affine, weighting="softmax")

"""The 180-degree turn search of the inferer: exact turned grids, and the right turn found by the residual."""

import torch
from test_registration import CentroidNetwork

from scripts.coordinates import apply_affine, turned
from scripts.registration import GRID_TURNS, KeyMorphInferer, register, register_best_turn


def blob_image(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric blob ``(1, 1, S, S, S)`` (no turn maps it onto itself) and a 2 mm grid affine ``(1, 4, 4)``."""
    axes = [torch.arange(size, dtype=torch.float64)] * 3
    i, j, k = torch.meshgrid(*axes, indexing="ij")
    image = torch.exp(-((i - 5) ** 2 + (j - 9) ** 2 + (k - 7) ** 2) / 8) + 0.6 * torch.exp(
        -((i - 11) ** 2 + (j - 4) ** 2 + (k - 10) ** 2) / 6
    )
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-15.0, 4.0, 30.0])
    return image[None, None], affine[None]


def test_turned_grid_keeps_the_world_content():
    image, affine = blob_image()
    peak = torch.tensor([[5.0, 9.0, 7.0]], dtype=torch.float64)
    for axes in GRID_TURNS:
        turned_image, turned_affine = turned(image, affine, axes)
        index = torch.nonzero(turned_image[0, 0] == image.max()).to(torch.float64)
        assert torch.allclose(apply_affine(turned_affine[0], index), apply_affine(affine[0], peak))
        assert torch.linalg.det(turned_affine[0, :3, :3]) > 0  # a turn, never a mirror image


def test_turn_search_finds_the_pose_the_principal_axes_missed():
    """The moving image is the fixed one on a grid turned by 180 degrees (same world content): the true transform
    is the identity. Octant centroids then disagree unless the search turns the grid back."""
    fixed, affine = blob_image()
    moving, moving_affine = turned(fixed, affine, (0, 2))
    network = CentroidNetwork()
    plain = register(network, fixed, affine, moving, moving_affine)
    searched = register_best_turn(network, fixed, affine, moving, moving_affine)
    identity = torch.eye(4, dtype=torch.float64)
    assert (plain.fixed_to_moving[0] - identity).abs().max() > 0.5
    assert torch.allclose(searched.fixed_to_moving[0], identity, atol=1e-6)
    assert searched.residual[0] < 1e-6 < plain.residual[0]


def test_inferer_searches_turns_when_asked():
    from monai.data import MetaTensor

    fixed, affine = blob_image()
    moving, moving_affine = turned(fixed, affine, (1, 2))
    inferer = KeyMorphInferer(search_turns=True)
    result = inferer(
        MetaTensor(fixed, affine=affine[0]), MetaTensor(moving, affine=moving_affine[0]), CentroidNetwork()
    )
    assert torch.allclose(result.fixed_to_moving[0], torch.eye(4, dtype=torch.float64), atol=1e-6)


class CountingNetwork(CentroidNetwork):
    """Counts the images it has seen."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, image):
        self.images += len(image)
        return super().forward(image)


def test_a_consistent_first_pose_skips_the_other_turns():
    fixed, affine = blob_image()
    network = CountingNetwork()
    first = register_best_turn(network, fixed, affine, fixed.clone(), affine.clone(), accept_residual_mm=1.0)
    assert network.images == 2  # the fixed image and the moving grid as it is: no turn tried
    assert torch.allclose(first.fixed_to_moving[0], torch.eye(4, dtype=torch.float64), atol=1e-6)


def test_an_inconsistent_first_pose_still_finds_the_right_turn():
    fixed, affine = blob_image()
    moving, moving_affine = turned(fixed, affine, (0, 1))
    network = CountingNetwork()
    plain_residual = float(register(CentroidNetwork(), fixed, affine, moving, moving_affine).residual[0])
    searched = register_best_turn(network, fixed, affine, moving, moving_affine, accept_residual_mm=1e-3)
    assert plain_residual > 1e-3
    assert network.images == 2 + 3  # the first pass on both, then the three other turns of the moving grid
    assert torch.allclose(searched.fixed_to_moving[0], torch.eye(4, dtype=torch.float64), atol=1e-6)

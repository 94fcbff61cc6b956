"""Behaviour of :mod:`scripts.registration` with network-free keypoints.

An oracle network returns known voxel keypoints, so the world conversion (each grid's own affine) and the fit must
recover a known fixed-to-moving world transform exactly, for every aligner and for the thin-plate spline's sampling
grid. A real (random) detector on identical images must give the identity. Last, a "centroid" network (centres of
intensity of fixed sub-boxes of its grid, a keypoint detector with no weights) runs through the config's own
preprocessing: the brain frames make its keypoints correspond, and the known transform between two synthetic brains
on different grids comes back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.data import MetaTensor
from test_inference import (
    FIXED_AFFINE,
    FIXED_SHAPE,
    ROOT,
    grid_affine,
    phantom_at,
    rigid,
    rotation,
    write_fixed,
    write_moving,
)

from scripts.aligners import MATRIX_ALIGNERS
from scripts.coordinates import apply_affine, sampling_grid, voxel_grid_world, world_points_to_grid
from scripts.keypoint_net import KeypointDetector
from scripts.registration import KeyMorphInferer, fit, register, warp_moving

DTYPE = torch.float64
GRID = 16  # network grid of the oracle tests
# Exact up to rounding; the affine fit's ridge (1e-8 of the point spread) biases it by about 1e-7 mm here.
EXACT = {"rigid": 1e-9, "similarity": 1e-9, "affine": 1e-6}


class OracleNetwork(nn.Module):
    """Returns the given voxel keypoints ``(2B, K, 3)`` for the batch ``cat([fixed, moving])`` it is called on."""

    def __init__(self, voxels: torch.Tensor):
        super().__init__()
        self.voxels = voxels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        assert image.shape[0] == self.voxels.shape[0] and image.ndim == 5
        return self.voxels  # float64: "exactly" means to rounding


class CentroidNetwork(nn.Module):
    """Keypoints without weights: the centre of intensity of each octant of the grid, in voxel indices (8 points,
    never coplanar). Equivariant like a trained detector as long as the grids follow the brain."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[2:]
        axes = [torch.arange(s, dtype=image.dtype) for s in size]
        index = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (D, H, W, 3)
        half = (index >= (torch.tensor(size, dtype=image.dtype) - 1) / 2).long()
        octant = half[..., 0] * 4 + half[..., 1] * 2 + half[..., 2]  # (D, H, W)
        weights = image[:, 0, ..., None].clamp(min=0) * nn.functional.one_hot(octant, 8).to(image.dtype)
        mass = weights.sum((1, 2, 3)).clamp(min=1e-6)  # (B, 8)
        return torch.einsum("bdhwk,dhwc->bkc", weights, index) / mass[..., None]


def random_affine(generator: torch.Generator, kind: str) -> torch.Tensor:
    """A random world transform of the given kind, about a brain-sized neighbourhood (mm)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=DTYPE, generator=generator))
    turn = q * torch.sign(torch.diagonal(r))
    turn[:, 0] *= torch.linalg.det(turn)
    linear = {
        "rigid": turn,
        "similarity": 1.3 * turn,
        "affine": turn @ (torch.eye(3, dtype=DTYPE) + 0.2 * torch.randn(3, 3, dtype=DTYPE, generator=generator)),
    }[kind]
    matrix = torch.eye(4, dtype=DTYPE)
    matrix[:3, :3] = linear
    matrix[:3, 3] = 20 * torch.randn(3, dtype=DTYPE, generator=generator)
    return matrix


def frame(seed: int) -> torch.Tensor:
    """A network-grid voxel-to-world matrix like BrainFramed's: turned, 2.5 mm voxels, somewhere in the world."""
    rng = np.random.default_rng(seed)
    return torch.as_tensor(
        grid_affine(
            (2.5, 2.5, 2.5), (GRID,) * 3, rotation(rng.normal(size=3), rng.uniform(0, 360)), rng.normal(0, 9, 3)
        )
    )


def oracle_case(matrices: torch.Tensor, count: int = 20, seed: int = 0):
    """Fixed world keypoints, their images under ``matrices`` ``(B, 4, 4)``, both grids' affines and the oracle."""
    batch = len(matrices)
    generator = torch.Generator().manual_seed(seed)
    fixed_points = 25 * torch.randn(batch, count, 3, dtype=DTYPE, generator=generator)
    moving_points = apply_affine(matrices, fixed_points)
    fixed_affine = torch.stack([frame(seed + 10 * b) for b in range(batch)])
    moving_affine = torch.stack([frame(seed + 10 * b + 5) for b in range(batch)])
    voxels = torch.cat(
        [
            apply_affine(torch.linalg.inv(fixed_affine), fixed_points),
            apply_affine(torch.linalg.inv(moving_affine), moving_points),
        ]
    )
    return fixed_points, moving_points, fixed_affine, moving_affine, OracleNetwork(voxels)


def images(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 1, GRID, GRID, GRID)


@pytest.mark.parametrize("aligner", MATRIX_ALIGNERS)
def test_known_keypoints_recover_the_world_transform_exactly(aligner):
    generator = torch.Generator().manual_seed(1)
    truth = torch.stack([random_affine(generator, aligner) for _ in range(2)])
    fixed_points, moving_points, fixed_affine, moving_affine, oracle = oracle_case(truth)
    registration = register(oracle, images(2), fixed_affine, images(2), moving_affine, aligner)
    torch.testing.assert_close(registration.fixed_to_moving, truth, atol=EXACT[aligner], rtol=0)
    torch.testing.assert_close(registration.fixed_points, fixed_points, atol=1e-9, rtol=0)
    torch.testing.assert_close(registration.moving_points, moving_points, atol=1e-9, rtol=0)
    assert float(registration.residual.max()) < 10 * EXACT[aligner]


def test_inferer_reads_the_grids_from_the_metatensors():
    generator = torch.Generator().manual_seed(2)
    truth = random_affine(generator, "affine")[None]
    _, _, fixed_affine, moving_affine, oracle = oracle_case(truth, seed=3)
    fixed = MetaTensor(images(1), affine=fixed_affine[0])
    moving = MetaTensor(images(1), affine=moving_affine[0])
    registration = KeyMorphInferer("affine")(fixed, moving, oracle)
    torch.testing.assert_close(registration.fixed_to_moving, truth, atol=EXACT["affine"], rtol=0)


def test_inferer_refuses_an_unknown_aligner():
    with pytest.raises(ValueError, match="bspline"):
        KeyMorphInferer("bspline")


def test_tps_of_affine_keypoints_gives_the_affine_sampling_grid():
    generator = torch.Generator().manual_seed(4)
    truth = random_affine(generator, "affine")[None]
    _, _, fixed_affine, moving_affine, oracle = oracle_case(truth, seed=5)
    registration = register(oracle, images(1), fixed_affine, images(1), moving_affine, "tps")
    assert registration.spline is not None
    torch.testing.assert_close(registration.fixed_to_moving, truth, atol=EXACT["affine"], rtol=0)
    shape = (GRID,) * 3
    expected = sampling_grid(truth, fixed_affine, moving_affine, shape, shape)
    torch.testing.assert_close(
        registration.grid(fixed_affine, moving_affine, shape, shape), expected, atol=1e-4, rtol=0
    )


def test_tps_grid_interpolates_non_affine_keypoints():
    """Fixed keypoints on fixed voxel centres, moved non-linearly: the TPS grid sends those voxels exactly to the
    moving keypoints (lambda = 0 interpolates), the affine grid does not."""
    fixed_affine, moving_affine = frame(7)[None], frame(8)[None]
    generator = torch.Generator().manual_seed(6)
    voxels = torch.randint(2, GRID - 2, (1, 30, 3), generator=generator).to(DTYPE)
    voxels = torch.unique(voxels[0], dim=0)[None]
    fixed_points = apply_affine(fixed_affine, voxels)
    moving_points = fixed_points + 3.0 * torch.sin(fixed_points / 7.0)  # a smooth non-affine displacement
    registration = fit(fixed_points, moving_points, "tps")
    shape = (GRID,) * 3
    grid = registration.grid(fixed_affine, moving_affine, shape, shape)
    at_keypoints = grid[0][tuple(voxels[0].long().T)]
    expected = world_points_to_grid(moving_points, moving_affine, shape)[0].to(torch.float32)
    torch.testing.assert_close(at_keypoints, expected, atol=1e-4, rtol=0)
    affine_grid = fit(fixed_points, moving_points, "affine").grid(fixed_affine, moving_affine, shape, shape)
    assert (affine_grid[0][tuple(voxels[0].long().T)] - expected).abs().max() > 1e-2


def test_warp_moving_pulls_the_moving_image_onto_the_fixed_grid():
    """The direction convention end to end: a moving image that is the fixed image moved by T comes back."""
    truth = rigid([0.3, 1.0, -0.2], 35.0, [4.0, -3.0, 2.0])
    fixed_affine = torch.as_tensor(grid_affine((2.0, 2.0, 2.0), (24,) * 3))[None]
    moving_affine = torch.as_tensor(grid_affine((1.5, 2.5, 2.0), (30, 20, 24), rotation([0, 0, 1], 20.0)))[None]
    world = voxel_grid_world(fixed_affine, (24,) * 3)[0]
    fixed = torch.cos(world / 9.0).prod(-1).reshape(1, 1, 24, 24, 24).float()
    moving_world = voxel_grid_world(moving_affine, (30, 20, 24))[0]
    pulled_back = apply_affine(torch.linalg.inv(torch.as_tensor(truth)), moving_world)
    moving = torch.cos(pulled_back / 9.0).prod(-1).reshape(1, 1, 30, 20, 24).float()
    registration = fit(world[None, ::97], apply_affine(torch.as_tensor(truth), world[None, ::97]))
    warped = warp_moving(registration, moving, fixed_affine, moving_affine, (24,) * 3)
    inside = (registration.grid(fixed_affine, moving_affine, (24,) * 3, (30, 20, 24)).abs() < 0.9).all(-1)[:, None]
    assert inside.float().mean() > 0.3
    assert (warped - fixed)[inside].abs().max() < 0.03  # trilinear interpolation error only


def test_identical_images_give_the_identity():
    torch.manual_seed(0)
    network = KeypointDetector(1, 16, (8, 8, 16, 16)).eval()
    affine = frame(9)
    image = MetaTensor(torch.rand(1, 1, 32, 32, 32), affine=affine)
    with torch.no_grad():
        for aligner in ("affine", "rigid", "similarity"):
            registration = KeyMorphInferer(aligner)(image, image.clone(), network)
            torch.testing.assert_close(registration.fixed_to_moving[0], torch.eye(4, dtype=DTYPE), atol=1e-6, rtol=0)
            assert float(registration.residual[0]) < 1e-6
            points = registration.fixed_points[0]
            assert torch.allclose(points, registration.moving_points[0])
            # world millimetres, inside the grid: the keypoints went through the grid's affine
            voxels = apply_affine(torch.linalg.inv(affine), points)
            assert float(voxels.min()) > -1 and float(voxels.max()) < 32


@pytest.mark.parametrize("aligner, degrees", [("rigid", 150.0), ("affine", 70.0)])
def test_centroid_keypoints_through_the_preprocessing_recover_a_known_move(tmp_path, aligner, degrees):
    """Two synthetic brains on different grids, the moving one moved by T: brain frames + world keypoints + fit give
    T back to within a millimetre over the brain (the frames themselves agree to about 0.2 mm)."""
    from monai.bundle import ConfigParser

    truth = rigid([0.3, -0.2, 1.0], degrees, [6.0, -4.0, 3.0])
    fixed_path = write_fixed(tmp_path / "fixed.nii.gz")
    moving_path = write_moving(tmp_path / "moving.nii.gz", truth)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    # the keypoint path alone (refinement off): this checks the frames and the coordinate convention
    parser.update({"skull_strip": "none", "spatial_size": 32, "aligner": aligner, "refine_iterations": 0})
    fixed = parser.get_parsed_content("fixed_preprocessing")({"image": fixed_path})
    moving = parser.get_parsed_content("preprocessing")({"image": moving_path})
    inferer = parser.get_parsed_content("inferer")
    registration = inferer(fixed["image"][None], moving["image"][None], CentroidNetwork())
    world = voxel_grid_world(torch.as_tensor(FIXED_AFFINE), FIXED_SHAPE)[0]
    brain = world[torch.as_tensor(phantom_at(world.numpy()) > 0)]
    moved = apply_affine(registration.fixed_to_moving[0], brain)
    error = (moved - apply_affine(torch.as_tensor(truth), brain)).norm(dim=-1)
    assert float(error.mean()) < 0.5 and float(error.max()) < 1.0, (float(error.mean()), float(error.max()))

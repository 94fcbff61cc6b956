"""Mutual-information refinement (scripts/refinement.py): it corrects a small residual misalignment across contrasts,
down to the images' own resolution, and it never returns a result its independent check finds worse."""

import math

import torch

from scripts.coordinates import apply_affine
from scripts.refinement import refine_affine, region_voxels, sample_points


def phantom(size: int = 48, spacing: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A brain-like ellipsoid ``(1, S, S, S)`` with smooth structure and two 'ventricles', its mask and its
    voxel-to-world matrix (centred on the origin)."""
    axis = (torch.arange(size, dtype=torch.float64) - (size - 1) / 2) * spacing
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    brain = (x / 38) ** 2 + (y / 44) ** 2 + (z / 34) ** 2 <= 1
    image = (0.6 + 0.25 * torch.sin(x / 7) * torch.cos(y / 9) + 0.15 * torch.cos(z / 6)) * brain
    for side in (-1, 1):
        image[((x - side * 8) / 5) ** 2 + ((y - 5) / 14) ** 2 + (z / 6) ** 2 <= 1] = 0.1
    affine = torch.diag(torch.tensor([spacing, spacing, spacing, 1.0], dtype=torch.float64))
    affine[:3, 3] = -(size - 1) / 2 * spacing
    return image[None].float(), brain[None].float(), affine


def inverted(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same anatomy in another contrast: brain intensities inverted, background 0."""
    return torch.where(mask > 0, 1.0 - image, torch.zeros_like(image))


def small_move(degrees: float, shift_mm: tuple[float, float, float], scale: float) -> torch.Tensor:
    angle = math.radians(degrees)
    move = torch.eye(4, dtype=torch.float64)
    move[:3, :3] = scale * torch.tensor(
        [[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    move[:3, 3] = torch.tensor(shift_mm, dtype=torch.float64)
    return move


def mean_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, affine: torch.Tensor) -> float:
    points = apply_affine(affine, torch.nonzero(mask[0] > 0.5).to(torch.float64))
    return float((apply_affine(a, points) - apply_affine(b, points)).norm(dim=-1).mean())


def test_refinement_recovers_a_small_misalignment_across_contrasts():
    fixed, mask, affine = phantom()
    # the moving image is the same anatomy in an inverted contrast on a grid moved by `truth`:
    # moving voxel v shows the anatomy at world point truth^-1 (affine v), so fixed-to-moving world is `truth`
    truth = small_move(4.0, (3.0, -2.0, 1.5), 1.03)
    start = torch.eye(4, dtype=torch.float64)
    before = mean_error(start, truth, mask, affine)
    refined = refine_affine(fixed, affine, mask, inverted(fixed, mask), truth @ affine, start)
    after = mean_error(refined, truth, mask, affine)
    assert before > 3.0
    assert after < 0.5, (before, after)


def test_the_fine_level_decides_the_result():
    """The 1 mm images (the fine level) show a 1.5 mm shift and a 1 degree turn the 2 mm grids do not: the result
    follows the fine images, read only at the sampled points."""
    fixed, mask, affine = phantom(48, 2.0)
    fixed_fine, mask_fine, affine_fine = phantom(96, 1.0)
    truth = small_move(1.0, (1.5, -1.0, 0.5), 1.0)
    start = torch.eye(4, dtype=torch.float64)
    args = (fixed, affine, mask, inverted(fixed, mask), affine, start)
    assert mean_error(refine_affine(*args), start, mask, affine) < 0.2  # the grids alone: aligned as they are
    fine = (fixed_fine, affine_fine, inverted(fixed_fine, mask_fine), truth @ affine_fine)
    refined = refine_affine(*args, fine=fine)
    assert mean_error(start, truth, mask, affine) > 1.5
    assert mean_error(refined, truth, mask, affine) < 0.25


def test_no_iterations_returns_the_keypoint_solution():
    fixed, mask, affine = phantom(24, 4.0)
    start = small_move(2.0, (1.0, 0.0, 0.0), 1.0)
    assert refine_affine(fixed, affine, mask, fixed, affine, start, iterations=0) is start


def test_refinement_never_ends_worse_than_the_keypoint_solution():
    """Steps far too large for the cost throw Adam off the exact solution: the result stays the best it met."""
    fixed, mask, affine = phantom()
    truth = small_move(3.0, (2.0, -1.0, 1.0), 1.02)
    moving = inverted(fixed, mask)
    refined = refine_affine(fixed, affine, mask, moving, truth @ affine, truth, iterations=10, learning_rate=3.0)
    assert mean_error(refined, truth, mask, affine) < 0.3


def test_the_independent_check_keeps_the_initial_solution_when_the_sample_is_overfitted():
    """In noisy images, 40 points make a cost whose lowest value lies millimetres from the exact transform (it fits
    those points' noise); on other points the exact one scores better, so the check returns it unchanged."""
    fixed, mask, affine = phantom()
    truth = small_move(3.0, (2.0, -1.0, 1.0), 1.02)
    generator = torch.Generator().manual_seed(1)
    fixed_noisy = fixed + 0.15 * torch.randn(fixed.shape, generator=generator)
    moving_noisy = inverted(fixed, mask) + 0.15 * torch.randn(fixed.shape, generator=generator)
    args = (fixed_noisy, affine, mask, moving_noisy, truth @ affine, truth)
    options = {"iterations": 40, "samples": 40, "learning_rate": 0.1}
    unchecked = refine_affine(*args, **options, check_samples=0)
    assert mean_error(unchecked, truth, mask, affine) > 1.0  # without the check the overfitted result is returned
    assert refine_affine(*args, **options) is truth


def test_points_cover_the_brain_edge():
    """The points are drawn in the mask dilated by the margin: some lie outside the brain, within the margin."""
    _, mask, affine = phantom()
    points = sample_points(region_voxels(mask, affine, 6.0), affine, 4000, torch.Generator().manual_seed(0))
    x, y, z = points.T
    radius = ((x / 38) ** 2 + (y / 44) ** 2 + (z / 34) ** 2).sqrt()
    assert points.shape == (4000, 3)
    assert float((radius > 1.0).float().mean()) > 0.1
    assert float(radius.max()) < 1.0 + 2 * 6.0 * 1.8 / 34  # within the margin (a cube's corner) of the ellipsoid

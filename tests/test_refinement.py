"""Mutual-information refinement (scripts/refinement.py) corrects a small residual misalignment across contrasts."""

import math

import torch

from scripts.coordinates import apply_affine
from scripts.refinement import refine_affine


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
    moving = torch.where(mask > 0, 1.0 - fixed, torch.zeros_like(fixed))
    moving_affine = truth @ affine
    start = torch.eye(4, dtype=torch.float64)
    before = mean_error(start, truth, mask, affine)
    refined = refine_affine(fixed, affine, mask, moving, moving_affine, start)
    after = mean_error(refined, truth, mask, affine)
    assert before > 3.0
    assert after < 0.5, (before, after)


def test_no_iterations_returns_the_keypoint_solution():
    fixed, mask, affine = phantom(24, 4.0)
    start = small_move(2.0, (1.0, 0.0, 0.0), 1.0)
    assert refine_affine(fixed, affine, mask, fixed, affine, start, iterations=0) is start


def test_refinement_never_ends_worse_than_the_keypoint_solution():
    """Steps far too large for the cost throw Adam off the exact solution: the result stays the best it met."""
    fixed, mask, affine = phantom()
    truth = small_move(3.0, (2.0, -1.0, 1.0), 1.02)
    moving = torch.where(mask > 0, 1.0 - fixed, torch.zeros_like(fixed))
    refined = refine_affine(fixed, affine, mask, moving, truth @ affine, truth, iterations=10, learning_rate=3.0)
    assert mean_error(refined, truth, mask, affine) < 0.3

"""Registration accuracy measures used by validation, evaluation and the benchmark."""

from __future__ import annotations

import torch

from scripts.coordinates import affine_of, apply_affine, world_to_voxel

#: FreeSurfer brain structures scored by Dice (left and right kept apart: a mirror-image registration is wrong).
BRAIN_LABELS = (
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60,
)  # fmt: skip


def dice_per_structure(warped: torch.Tensor, fixed: torch.Tensor, label_values=BRAIN_LABELS) -> torch.Tensor:
    """Dice ``(B, L)`` of each brain structure between two label maps ``(B, 1, D, H, W)`` on one grid; NaN where a
    structure is in neither."""
    values = torch.tensor(label_values, device=fixed.device).view(1, -1, 1, 1, 1)
    a, b = warped.long() == values, fixed.long() == values
    overlap = (a & b).sum((2, 3, 4)).double()
    total = (a.sum((2, 3, 4)) + b.sum((2, 3, 4))).double()
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.full_like(total, float("nan")))


def mean_dice(warped: torch.Tensor, fixed: torch.Tensor, label_values=BRAIN_LABELS) -> torch.Tensor:
    """Mean Dice ``(B,)`` over the brain structures present in the FIXED label map (missing in the warped: 0)."""
    dice = dice_per_structure(warped, fixed, label_values)
    present = torch.stack([(fixed.long() == v).flatten(1).any(1) for v in label_values], 1)
    dice = torch.where(present, torch.nan_to_num(dice, nan=0.0), torch.full_like(dice, float("nan")))
    return torch.nanmean(dice, dim=1)


def brain_points(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """World coordinates ``(N, 3)`` float64 (mm) of the brain voxels (> 0.5) of a mask ``(1, D, H, W)`` (a
    MetaTensor with its affine); with ``count``, an even subsample of about that many."""
    voxels = torch.nonzero(torch.as_tensor(mask[0]) > 0.5).to(torch.float64)
    if count is not None:
        voxels = voxels[:: max(1, len(voxels) // count)]
    return apply_affine(affine_of(mask), voxels)


def target_registration_error(predicted: torch.Tensor, truth: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Mean distance in mm between the points ``(..., N, 3)`` mapped by two fixed-to-moving world matrices
    ``(..., 4, 4)`` (the estimate and the truth): the target registration error averaged over the points, ``(...)``;
    differentiable (the training's transform term)."""
    return (apply_affine(predicted, points) - apply_affine(truth, points)).norm(dim=-1).mean(-1)


def brain_tre(predicted: torch.Tensor, truth: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """:func:`target_registration_error` ``(B,)`` of fixed-to-moving world matrices ``(B, 4, 4)`` over every brain
    voxel of each fixed image (``masks``: ``(1, D, H, W)`` MetaTensors with their affines), on the CPU."""
    errors = [
        target_registration_error(predicted[i].cpu().double(), truth[i].cpu().double(), brain_points(mask))
        for i, mask in enumerate(masks)
    ]
    return torch.stack(errors)


#: Names of the network grid's axes (:func:`scripts.brain_frame.principal_axes`): a brain's own axes in any pose.
GRID_AXES = ("front_back", "left_right", "bottom_top")


def distinct_locations(points: torch.Tensor, radius_mm: float = 5.0) -> torch.Tensor:
    """Number ``(B,)`` of distinct locations among keypoints ``(B, K, 3)`` (mm): the groups that remain when every
    two points closer than ``radius_mm`` are merged (connected components of that neighbourhood graph)."""
    near = torch.cdist(points.double(), points.double()) < radius_mm  # (B, K, K), reflexive
    group = torch.arange(points.shape[1], device=points.device).expand(points.shape[:2]).clone()
    while True:  # each point takes the smallest group number among its neighbours until nothing changes
        merged = torch.where(near, group[:, None, :], points.shape[1]).amin(-1)
        if torch.equal(merged, group):
            return torch.tensor([len(torch.unique(g)) for g in group], device=points.device)
        group = merged


def keypoint_spread(points: torch.Tensor, radius_mm: float = 5.0) -> dict[str, torch.Tensor]:
    """How well keypoints ``(B, K, 3)`` in mm cover the brain: ``sd_mm`` ``(B, 3)``, their standard deviation along
    each coordinate axis of ``points``, and ``distinct`` ``(B,)``, their :func:`distinct_locations` at
    ``radius_mm``. A fit constrains scale and shear along an axis only as well as the points spread along it.

    Give world points (RAS) of images in standard pose for left-right / back-front / bottom-top spreads, or
    :func:`grid_frame_points` for the brain's own axes in any pose (training, where images are turned at random).
    """
    return {"sd_mm": points.double().std(dim=1), "distinct": distinct_locations(points, radius_mm)}


def grid_frame_points(points: torch.Tensor, grid_affine: torch.Tensor) -> torch.Tensor:
    """World keypoints ``(B, K, 3)`` -> mm along the network grid's axes ``(B, K, 3)`` (the axes of
    :data:`GRID_AXES`; origin at the grid's first voxel), for grids with voxel-to-world matrices ``(B, 4, 4)``."""
    affine = grid_affine.to(torch.float64)
    spacing = affine[:, :3, :3].norm(dim=1)  # (B, 3): column norms, the voxel size along each grid axis
    return world_to_voxel(affine, points.to(torch.float64)) * spacing[:, None, :]


def spread_scalars(points: torch.Tensor, grid_affine: torch.Tensor, radius_mm: float = 5.0) -> dict[str, float]:
    """Batch means of :func:`keypoint_spread` along the brain's own axes, named for logging: ``spread_<axis>_mm``
    for each of :data:`GRID_AXES` and ``distinct_<radius>mm``."""
    spread = keypoint_spread(grid_frame_points(points, grid_affine), radius_mm)
    scalars = {f"spread_{name}_mm": float(v) for name, v in zip(GRID_AXES, spread["sd_mm"].mean(0))}
    scalars[f"distinct_{radius_mm:g}mm"] = float(spread["distinct"].double().mean())
    return scalars

"""Registration accuracy measures used by validation, evaluation and the benchmark."""

from __future__ import annotations

import torch

from scripts.coordinates import apply_affine
from scripts.training_data import BRAIN_LABELS


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


def brain_voxel_error(predicted: torch.Tensor, truth: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Mean distance ``(B,)`` in mm between two fixed-to-moving world matrices ``(B, 4, 4)`` over the brain voxels
    of each fixed image (``masks``: ``(1, D, H, W)`` MetaTensors with their affines): the target registration error
    averaged over the brain."""
    errors = []
    for i, mask in enumerate(masks):
        voxels = torch.nonzero(torch.as_tensor(mask[0]) > 0.5).to(torch.float64)
        points = apply_affine(torch.as_tensor(mask.affine, dtype=torch.float64), voxels)
        difference = apply_affine(predicted[i].cpu().double(), points) - apply_affine(truth[i].cpu().double(), points)
        errors.append(difference.norm(dim=-1).mean())
    return torch.stack(errors)

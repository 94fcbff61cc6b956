"""KeyMorph registration: keypoints of both images, a closed-form fit in world millimetres, the warp.

The detector (:class:`scripts.keypoint_net.KeypointDetector`) gives keypoints in the network grid's voxel indices;
each grid's voxel-to-world matrix turns them into RAS millimetres, and the fit maps the FIXED keypoints onto the
MOVING ones, which is the fixed-to-moving transform of :mod:`scripts.coordinates` with no inversion anywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from scripts.aligners import ALIGNERS, MATRIX_ALIGNERS, ThinPlateSpline, fit_residual
from scripts.cli import as_bool
from scripts.coordinates import (
    affine_of,
    apply_affine,
    batched_affine,
    sampling_grid,
    turned,
    voxel_grid_world,
    warp,
    world_points_to_grid,
)
from scripts.refinement import refine_affine


@dataclass
class Registration:
    """One batch of registrations.

    Attributes:
        fixed_to_moving: ``(B, 4, 4)`` float64 world matrix (the affine part; the TPS's affine part for "tps").
        fixed_points, moving_points: ``(B, K, 3)`` keypoints in world mm.
        residual: ``(B,)`` RMS distance in mm between the transformed fixed keypoints and the moving keypoints.
        spline: the fitted thin-plate spline when the aligner is "tps", else None.
        weights: ``(B, K)`` weights of the keypoints in the fit (see :func:`power_weights`), or None (uniform).
    """

    fixed_to_moving: torch.Tensor
    fixed_points: torch.Tensor
    moving_points: torch.Tensor
    residual: torch.Tensor
    spline: ThinPlateSpline | None = None
    weights: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> Registration:
        """The same registrations with every tensor (the spline's too) on ``device``: the writer works on the CPU
        whatever device the network ran on."""
        spline = copy.copy(self.spline)
        if spline is not None:
            spline.__dict__.update({k: v.to(device) for k, v in vars(spline).items() if isinstance(v, torch.Tensor)})
        tensors = (self.fixed_to_moving, self.fixed_points, self.moving_points, self.residual)
        return Registration(*(t.to(device) for t in tensors), spline)

    def grid(self, fixed_affine: torch.Tensor, moving_affine: torch.Tensor, fixed_shape, moving_shape) -> torch.Tensor:
        """Sampling grid ``(B, D, H, W, 3)`` pulling the moving image onto the fixed grid (``align_corners=True``)."""
        if self.spline is None:
            return sampling_grid(self.fixed_to_moving, fixed_affine, moving_affine, fixed_shape, moving_shape)
        moved = self.spline(voxel_grid_world(fixed_affine.to(torch.float64), fixed_shape))
        grid = world_points_to_grid(moved, moving_affine.to(torch.float64), moving_shape)
        return grid.reshape(len(grid), *[int(s) for s in fixed_shape], 3).to(torch.float32)


#: How the keypoints are weighted in the fit: all alike, or by their heatmaps' power (:func:`power_weights`).
KEYPOINT_WEIGHTINGS = ("uniform", "power")


def keypoints_world(network: nn.Module, image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Keypoints ``(B, K, 3)`` in world mm of images ``(B, 1, D, H, W)`` whose grids have ``(B, 4, 4)`` affines."""
    voxels = network(image).to(torch.float64)
    return apply_affine(affine.to(torch.float64), voxels)


def detect(
    network: nn.Module, image: torch.Tensor, affine: torch.Tensor, weighting: str = "uniform"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keypoints ``(B, K, 3)`` in world mm of images ``(B, 1, D, H, W)`` on grids with ``(B, 4, 4)`` affines, and
    with ``weighting`` "power" their heatmaps' powers ``(B, K)`` (None for "uniform"; see
    :data:`KEYPOINT_WEIGHTINGS`; "power" needs a network whose ``forward`` takes ``with_power``, as
    :class:`scripts.keypoint_net.KeypointDetector`'s)."""
    if weighting == "uniform":
        return keypoints_world(network, image, affine), None
    if weighting != "power":
        raise ValueError(f"unknown keypoint weighting {weighting!r}; choose one of {KEYPOINT_WEIGHTINGS}")
    voxels, power = network(image, with_power=True)
    return apply_affine(affine.to(torch.float64), voxels.to(torch.float64)), power


def power_weights(fixed_power: torch.Tensor, moving_power: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """Fit weights ``(B, K)`` from the heatmap powers ``(B, K)`` of the fixed and the moving keypoints (KeyMorph
    2.0's "power" weighting): each image's powers relative to their mean, multiplied, so a keypoint counts in the fit
    as much as BOTH images are sure of it, and floored at ``floor`` (relative to the mean) so every weight is
    positive and an all-dark heatmap cannot make the fit singular. Mean 1 per pair, float64."""
    fixed_power, moving_power = fixed_power.to(torch.float64), moving_power.to(torch.float64)
    relative = [power / power.mean(-1, keepdim=True).clamp(min=1e-12) for power in (fixed_power, moving_power)]
    weights = (relative[0] * relative[1]).clamp(min=floor)
    return weights / weights.mean(-1, keepdim=True)


def fit(
    fixed_points: torch.Tensor,
    moving_points: torch.Tensor,
    aligner: str = "affine",
    tps_lambda: float = 0.0,
    weights: torch.Tensor | None = None,
) -> Registration:
    """Fit the fixed-to-moving transform of world keypoints with ``aligner`` (affine, rigid, similarity or tps),
    with keypoint ``weights`` ``(B, K)`` (None: uniform; the spline itself is unweighted)."""
    if aligner not in ALIGNERS:
        raise ValueError(f"unknown aligner {aligner!r}; choose one of {sorted(ALIGNERS)}")
    transform = ALIGNERS[aligner](fixed_points, moving_points, weights, tps_lambda)
    residual = fit_residual(transform.matrix, fixed_points, moving_points)
    return Registration(transform.matrix, fixed_points, moving_points, residual, transform.spline, weights)


def fit_detected(fixed, moving, aligner: str = "affine", tps_lambda: float = 0.0) -> Registration:
    """:func:`fit` of two :func:`detect` results (points and powers), power-weighted when the powers are there."""
    (fixed_points, fixed_power), (moving_points, moving_power) = fixed, moving
    weights = None if fixed_power is None else power_weights(fixed_power, moving_power)
    return fit(fixed_points, moving_points, aligner, tps_lambda, weights)


def register(
    network: nn.Module,
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    aligner: str = "affine",
    tps_lambda: float = 0.0,
    weighting: str = "uniform",
) -> Registration:
    """Register network-grid images ``(B, 1, D, H, W)`` with grid affines ``(B, 4, 4)``: one detector pass on both.
    ``weighting`` is one of :data:`KEYPOINT_WEIGHTINGS` (see :func:`detect`)."""
    points, power = detect(network, torch.cat([fixed, moving]), torch.cat([fixed_affine, moving_affine]), weighting)
    fixed_points, moving_points = points.split(len(fixed))
    fixed_power, moving_power = (None, None) if power is None else power.split(len(fixed))
    return fit_detected((fixed_points, fixed_power), (moving_points, moving_power), aligner, tps_lambda)


#: The four proper 180-degree turns of a network grid about its centre, as pairs of flipped array axes: the sign
#: choices of the principal axes that are not mirror images (:func:`scripts.brain_frame.principal_axes`).
GRID_TURNS = ((), (0, 1), (0, 2), (1, 2))


def register_best_turn(
    network: nn.Module,
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    aligner: str = "affine",
    accept_residual_mm: float = 0.0,
    weighting: str = "uniform",
) -> Registration:
    """:func:`register` (affine, rigid or similarity), trying the moving grid in each of its four 180-degree turns
    (:data:`GRID_TURNS`) and keeping, per pair, the fit with the smallest keypoint residual.

    A principal-axes frame can come out turned by 180 degrees when a third moment is nearly zero; the network then
    sees an unfamiliar pose and its keypoints stop agreeing, which the residual shows. With ``accept_residual_mm``
    > 0 the grid as it is goes first, and the other three turns are tried only when a pair's residual exceeds it
    (the usual case then costs one detector pass on each image instead of five passes). ``weighting``: as in
    :func:`register`.
    """
    fits, turns = [], GRID_TURNS
    fixed_detected = detect(network, fixed, fixed_affine, weighting)
    if accept_residual_mm > 0:
        first = fit_detected(fixed_detected, detect(network, moving, moving_affine, weighting), aligner)
        if bool((first.residual <= accept_residual_mm).all()):
            return first
        fits, turns = [first], GRID_TURNS[1:]
    candidates = [turned(moving, moving_affine, axes) for axes in turns]
    images = torch.cat([image for image, _ in candidates])
    affines = torch.cat([affine for _, affine in candidates])
    points, power = detect(network, images, affines, weighting)
    powers = [None] * len(turns) if power is None else power.split(len(moving))
    fits += [fit_detected(fixed_detected, turn, aligner) for turn in zip(points.split(len(moving)), powers)]
    best = torch.stack([f.residual for f in fits]).argmin(0)  # (B,): the turn kept for each pair
    batch = torch.arange(len(moving))
    matrix, points, residual = (
        torch.stack([getattr(f, name) for f in fits])[best, batch]
        for name in ("fixed_to_moving", "moving_points", "residual")
    )
    weights = None if power is None else torch.stack([f.weights for f in fits])[best, batch]
    return Registration(matrix, fixed_detected[0], points, residual, weights=weights)


def warp_moving(
    registration: Registration,
    moving: torch.Tensor,
    fixed_affine: torch.Tensor,
    moving_affine: torch.Tensor,
    fixed_shape,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Moving ``(B, C, D, H, W)`` (images, or one-hot labels with bilinear for a differentiable Dice) on the fixed
    grid."""
    grid = registration.grid(fixed_affine, moving_affine, fixed_shape, moving.shape[2:])
    return warp(moving, grid, mode=mode)


def native_pair(fixed_native: list | None, moving_native: list | None, index: int) -> tuple | None:
    """``(fixed, fixed_affine, moving, moving_affine)`` of case ``index`` at the images' own resolution (plain
    tensors), or None when either is missing."""
    if fixed_native is None or moving_native is None:
        return None
    fixed, moving = fixed_native[index], moving_native[index]
    if fixed is None or moving is None:
        return None
    plain = [convert_to_tensor(image, track_meta=False) for image in (fixed, moving)]
    return plain[0], affine_of(fixed), plain[1], affine_of(moving)


class KeyMorphInferer(Inferer):
    """The bundle's ``inferer``: registers a fixed and a moving network-grid image with a keypoint network.

    ``inferer(fixed, moving, network)`` takes ``(B, 1, D, H, W)`` MetaTensors whose ``affine`` is the network
    grid's voxel-to-world matrix and returns a :class:`Registration`.

    Args:
        aligner: "affine" (default), "rigid", "similarity" or "tps".
        tps_lambda: smoothing of the thin-plate spline.
        refine_iterations: steps of mutual-information refinement of the affine keypoint solution
            (:func:`scripts.refinement.refine_affine`); 0 keeps the keypoint solution.
        refine_options: further keyword arguments of :func:`scripts.refinement.refine_affine` (e.g.
            ``fine_iterations``, ``margin_mm``, ``check_samples``).
        search_turns: also try the moving grid turned by 180 degrees about each axis and keep the most consistent
            keypoints (:func:`register_best_turn`).
        turn_search_above_mm: with ``search_turns``, try the other turns only when the keypoint residual of the
            grid as it is exceeds this (mm); 0 always tries all four.
        keypoint_weighting: "uniform" or "power" (:data:`KEYPOINT_WEIGHTINGS`): as the network was trained.
    """

    def __init__(
        self,
        aligner: str = "affine",
        tps_lambda: float = 0.0,
        refine_iterations: int = 0,
        refine_options: dict | None = None,
        search_turns: bool = False,
        turn_search_above_mm: float = 0.0,
        keypoint_weighting: str = "uniform",
    ):
        super().__init__()
        if aligner not in ALIGNERS:
            raise ValueError(f"unknown aligner {aligner!r}; choose one of {sorted(ALIGNERS)}")
        if keypoint_weighting not in KEYPOINT_WEIGHTINGS:
            raise ValueError(f"unknown keypoint weighting {keypoint_weighting!r}; choose one of {KEYPOINT_WEIGHTINGS}")
        self.keypoint_weighting = keypoint_weighting
        self.aligner, self.tps_lambda, self.refine_iterations = aligner, tps_lambda, refine_iterations
        self.refine_options = dict(refine_options or {})
        self.search_turns = as_bool(search_turns, "search_turns")
        if self.search_turns and aligner not in MATRIX_ALIGNERS:
            raise ValueError(f"search_turns works with the aligners {', '.join(MATRIX_ALIGNERS)}, not {aligner}")
        self.turn_search_above_mm = float(turn_search_above_mm)

    def __call__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        network: nn.Module,
        fixed_mask: torch.Tensor | None = None,
        fixed_native: list | None = None,
        moving_native: list | None = None,
    ) -> Registration:
        """Register ``(B, 1, D, H, W)`` network-grid images; ``fixed_mask`` (same shape; default: fixed > 0) is where
        the refinement measures similarity; ``fixed_native`` and ``moving_native`` (one ``(1, D', H', W')``
        MetaTensor per case, intensities as the network grids', or None) are the images at their own resolution,
        the refinement's fine level."""
        fixed_data = convert_to_tensor(fixed, track_meta=False)
        moving_data = convert_to_tensor(moving, track_meta=False)
        fixed_affine, moving_affine = batched_affine(fixed), batched_affine(moving)
        if self.search_turns:
            registration = register_best_turn(
                network,
                fixed_data,
                fixed_affine,
                moving_data,
                moving_affine,
                self.aligner,
                self.turn_search_above_mm,
                self.keypoint_weighting,
            )
        else:
            registration = register(
                network,
                fixed_data,
                fixed_affine,
                moving_data,
                moving_affine,
                self.aligner,
                self.tps_lambda,
                self.keypoint_weighting,
            )
        if self.refine_iterations and registration.spline is None:
            mask = fixed_data > 0 if fixed_mask is None else torch.as_tensor(fixed_mask)
            refined = [
                refine_affine(
                    fixed_data[i],
                    fixed_affine[i],
                    mask[i],
                    moving_data[i],
                    moving_affine[i],
                    registration.fixed_to_moving[i],
                    self.refine_iterations,
                    fine=native_pair(fixed_native, moving_native, i),
                    **self.refine_options,
                )
                for i in range(len(fixed_data))
            ]
            matrix = torch.stack(refined)
            # the residual stays the keypoint fit's own: it measures how consistent the keypoints were
            registration = Registration(
                matrix,
                registration.fixed_points,
                registration.moving_points,
                registration.residual,
                weights=registration.weights,
            )
        return registration

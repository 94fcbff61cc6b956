"""MONAI dictionary transforms of the registration pipeline that MONAI itself does not provide.

* :class:`BrainFramed` places the network grid on the brain: centred on the brain mask's centre of mass and, if
  asked, turned along its principal axes, at the network spacing and size, in ONE resampling; the grid's
  voxel-to-world matrix goes into the output ``affine`` so world coordinates stay exact.
* :class:`RandWorldAffined` moves images, masks, labels and points by one random affine of the world, the
  training augmentation, and records the applied matrix so evaluation knows the truth.

All matrices follow :mod:`scripts.coordinates` (RAS mm, voxel centres on integers).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from scipy.ndimage import gaussian_filter

from scripts.coordinates import affine_of, apply_affine, sampling_grid, warp
from scripts.errors import KeyMorphInputError
from scripts.random_motions import random_affine_matrix


def _source_name(image: torch.Tensor) -> str:
    meta = image.meta if isinstance(image, MetaTensor) else {}
    return str(meta.get("filename_or_obj", "<image>"))


def brain_moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre of mass ``(3,)``, covariance ``(3, 3)`` (mm^2) and third moments along world axes of a brain mask.

    Args:
        mask: ``(1, D, H, W)`` MetaTensor, brain > 0.5; voxels finer than 2 mm are sampled every ``2 mm // spacing``.

    Returns:
        ``(center, covariance, points)`` where ``points`` are the sampled brain voxels' world coordinates minus the
        centre,
        ``(N, 3)`` float64, kept for the sign choice of the principal axes.
    """
    affine = affine_of(mask)
    # moments of a lattice of about 2 mm are as good for placing a grid and 8x cheaper on a 1 mm mask
    stride = [max(1, int(2.0 / float(s))) for s in affine[:3, :3].norm(dim=0)]
    sampled = torch.as_tensor(mask[0])[:: stride[0], :: stride[1], :: stride[2]]
    voxels = torch.nonzero(sampled > 0.5).to(torch.float64) * torch.tensor(stride, dtype=torch.float64)
    if len(voxels) < 8:
        raise KeyMorphInputError(f"{_source_name(mask)}: the brain mask is empty; no brain to register")
    points = apply_affine(affine, voxels)
    center = points.mean(0)
    points = points - center
    return center, points.T @ points / len(points), points


def principal_axes(covariance: torch.Tensor, centred_points: torch.Tensor) -> torch.Tensor:
    """A proper rotation ``(3, 3)`` whose columns are the brain's axes: front-back, left-right, bottom-top.

    The first is the longest principal axis, pointing towards the brain's longer tail (positive third moment):
    brains are clearly longest front to back (variance ratio 1.4-2.0 to the next axis in the 16 SynthSeg maps).
    Their left-right and top-bottom extents are too close for the eigenvalues to tell apart (ratios 1.03-1.3), so
    the vertical axis comes from the shape instead: the front and back ends of a brain (frontal pole, occipital pole
    and cerebellum) lie below its centre, so ``E[(x . a)^2 x]`` (a: the first axis), taken perpendicular to ``a``,
    points down; it was negative along the true up direction, by 0.1-0.2 standard deviations, in every map. The
    left-right axis follows from the right-hand rule, so the frame is never a mirror image.
    """
    _, vectors = torch.linalg.eigh(covariance)  # ascending
    front_back = vectors[:, 2]
    if (centred_points @ front_back).pow(3).mean() < 0:
        front_back = -front_back
    ends_below = ((centred_points @ front_back).pow(2)[:, None] * centred_points).mean(0)
    down = ends_below - (ends_below @ front_back) * front_back
    if down.norm() <= 1e-9 * (ends_below.norm() + 1e-12):  # no up-down asymmetry at all (not a brain)
        down = vectors[:, 0]
    down = down - (down @ front_back) * front_back  # exactly perpendicular, whatever the rounding above
    up = -down / down.norm()
    # (a0, a1, a2) is right-handed iff a1 = a2 x a0
    return torch.stack([front_back, torch.linalg.cross(up, front_back), up], dim=1)


class BrainFramed(RandomizableTransform, MapTransform):
    """Resample images, masks and labels onto the network grid placed on the brain.

    The grid has ``spatial_size`` voxels of ``spacing`` mm per axis, its centre on the brain mask's centre of mass
    and, with ``align_principal_axes``, its axes along the brain's principal axes (see :func:`principal_axes`), so
    that the network sees every brain in about the same pose whatever the scan's orientation. Its voxel-to-world
    matrix becomes the outputs' ``affine``. Images, mask and labels must share one source grid (as they do after
    skull stripping or synthesis): they are resampled with one sampling grid.

    Args:
        keys: intensity images, resampled trilinearly after a Gaussian anti-aliasing blur.
        mask_key: the brain mask ``(1, D, H, W)`` that places the grid (also resampled, trilinear then > 0.5).
        label_keys: label maps, resampled by nearest neighbour.
        spatial_size: network grid size (voxels per axis).
        spacing: network grid spacing in mm.
        align_principal_axes: turn the grid along the brain's principal axes.
        rotation_jitter: for training only: turn the grid by a random rotation of up to this angle (radians) about
            each of its axes, so the network learns poses the principal axes leave (0: exact frame, inference).
        flip_probability: for training only: probability of replacing the principal axes' sign choice by one of
            the three other proper ones (a 180-degree turn), as when a third moment is nearly zero.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        label_keys: KeysCollection = (),
        spatial_size: int = 96,
        spacing: float = 2.0,
        align_principal_axes: bool = True,
        rotation_jitter: float = 0.0,
        flip_probability: float = 0.0,
        allow_missing_keys: bool = False,
    ):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.rotation_jitter, self.flip_probability = rotation_jitter, flip_probability
        self.mask_key = mask_key
        self.label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        self.spatial_size = int(spatial_size)
        self.spacing = float(spacing)
        self.align_principal_axes = align_principal_axes

    def frame_affine(self, mask: torch.Tensor) -> torch.Tensor:
        """The network grid's voxel-to-world matrix ``(4, 4)`` float64 for this brain mask."""
        center, covariance, points = brain_moments(mask)
        rotation = (
            principal_axes(covariance, points) if self.align_principal_axes else torch.eye(3, dtype=torch.float64)
        )
        rotation = rotation @ self._jitter()
        affine = torch.eye(4, dtype=torch.float64)
        affine[:3, :3] = rotation * self.spacing
        affine[:3, 3] = center - affine[:3, :3] @ torch.full((3,), (self.spatial_size - 1) / 2, dtype=torch.float64)
        return affine

    def _jitter(self) -> torch.Tensor:
        """The random turn ``(3, 3)`` of the grid in its own axes (identity without jitter or flips)."""
        turn = torch.eye(3, dtype=torch.float64)
        if self.rotation_jitter > 0:
            turn = random_affine_matrix(self.R, self.rotation_jitter, 0.0, 0.0)[:3, :3]
        if self.flip_probability > 0 and self.R.rand() < self.flip_probability:
            signs = [(-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, -1.0, -1.0)][self.R.randint(3)]
            turn = turn @ torch.diag(torch.tensor(signs, dtype=torch.float64))
        return turn

    def _grid(self, source: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        """The sampling grid from the source grid (shared by all keys) onto the frame."""
        shape = (self.spatial_size,) * 3
        return sampling_grid(
            torch.eye(4, dtype=torch.float64)[None], frame[None], affine_of(source)[None], shape, source.shape[1:]
        )

    def _sample(
        self, image: torch.Tensor, frame: torch.Tensor, grid: torch.Tensor, mode: str, anti_alias: bool = False
    ) -> MetaTensor:
        data = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        if anti_alias:
            data = _anti_alias(data.to(torch.float32), affine_of(image), self.spacing)
        warped = warp(data[None].to(torch.float32), grid, mode=mode)[0]
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        meta.pop("affine", None)
        meta["spatial_shape"] = np.array(grid.shape[1:4])
        return MetaTensor(warped if mode == "bilinear" else warped.to(data.dtype), affine=frame, meta=meta)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        mask = d[self.mask_key]
        frame = self.frame_affine(mask)
        grid = self._grid(mask, frame)
        for key in self.key_iterator(d):
            d[key] = self._sample(d[key], frame, grid, "bilinear", anti_alias=True)
        # the mask is thresholded after resampling: no blur needed
        d[self.mask_key] = (self._sample(mask, frame, grid, "bilinear") > 0.5).to(torch.float32)
        for key in self.label_keys:
            if key in d:
                d[key] = self._sample(d[key], frame, grid, "nearest")
        return d


def _anti_alias(image: torch.Tensor, affine: torch.Tensor, target_spacing: float) -> torch.Tensor:
    """Gaussian blur ``(C, D, H, W)`` before downsampling to ``target_spacing`` mm (sigma = (factor - 1) / 2 voxels
    per axis; scipy's recursive-free separable filter is ~20x faster than a 3-D convolution here)."""
    spacing = affine[:3, :3].norm(dim=0)
    sigma = ((target_spacing / spacing - 1).clamp(min=0) / 2).tolist()
    if max(sigma) <= 0.1:
        return image
    blurred = torch.empty_like(image)  # filled channel by channel: no stacked copy of a 512^3 volume
    for channel, out in zip(image, blurred):
        gaussian_filter(channel.numpy(), sigma=sigma, truncate=2.0, output=out.numpy())
    return blurred


def image_center(image: torch.Tensor) -> torch.Tensor:
    """World coordinates ``(3,)`` of the centre of an image's field of view."""
    middle = torch.tensor([(s - 1) / 2 for s in image.shape[1:]], dtype=torch.float64)
    return apply_affine(affine_of(image), middle[None])[0]


def field_of_view(image: torch.Tensor) -> torch.Tensor:
    """Extent ``(3,)`` in mm of an image's field of view along its voxel axes."""
    return affine_of(image)[:3, :3].norm(dim=0) * torch.tensor(image.shape[1:], dtype=torch.float64)


class RandWorldAffined(RandomizableTransform, MapTransform):
    """Move images, masks, labels and points by one random affine ``T`` of the world (the training augmentation).

    The move is exact and costs nothing: each image keeps its voxels and gets the voxel-to-world matrix
    ``T @ affine``, so its content now lies at ``T p`` for every point ``p`` it held; point sets ``(N, 3)`` (world
    mm) under ``point_keys`` become ``T p``. ``T`` rotates about the first image's field-of-view centre and is
    written to ``data[matrix_key]`` (``(4, 4)`` float64, old world -> new world); identity when not applied.

    Args:
        keys: images, masks and label maps (MetaTensors) to move.
        point_keys: ``(N, 3)`` world point sets to move.
        prob: probability of applying a random affine.
        rotate_range: maximum rotation about each axis, radians (pi: any orientation).
        scale_range: maximum relative scaling per axis (0.2: 0.8 to 1.2).
        shear_range: maximum shear term.
        translate_range: maximum translation as a fraction of the field of view per axis.
        matrix_key: where the applied matrix goes.
    """

    def __init__(
        self,
        keys: KeysCollection,
        point_keys: KeysCollection = (),
        prob: float = 1.0,
        rotate_range: float = math.pi,
        scale_range: float = 0.2,
        shear_range: float = 0.1,
        translate_range: float = 0.1,
        matrix_key: str = "world_transform",
        allow_missing_keys: bool = False,
    ):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.point_keys = [point_keys] if isinstance(point_keys, str) else list(point_keys)
        self.rotate_range, self.scale_range = rotate_range, scale_range
        self.shear_range, self.translate_range = shear_range, translate_range
        self.matrix_key = matrix_key
        self.matrix = torch.eye(4, dtype=torch.float64)

    def randomize(self, reference: torch.Tensor) -> None:
        super().randomize(None)
        self.matrix = torch.eye(4, dtype=torch.float64)
        if self._do_transform:
            self.matrix = random_affine_matrix(
                self.R,
                self.rotate_range,
                self.scale_range,
                self.shear_range,
                (self.translate_range * field_of_view(reference)).tolist(),
                image_center(reference).tolist(),
            )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        self.randomize(d[keys[0]])
        for key in keys:
            moved = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(d[key])
            moved = moved.clone()
            moved.affine = self.matrix @ affine_of(moved)
            d[key] = moved
        for key in self.point_keys:
            if key in d:
                d[key] = apply_affine(self.matrix.to(torch.as_tensor(d[key]).dtype), torch.as_tensor(d[key]))
        d[self.matrix_key] = self.matrix.clone()
        return d


def random_points_in_mask(mask: torch.Tensor, count: int, rng: np.random.RandomState) -> torch.Tensor:
    """``count`` world points ``(count, 3)`` (float64, mm) drawn uniformly among a mask's voxels, jittered
    within their voxel so they are not on the lattice."""
    voxels = torch.nonzero(torch.as_tensor(mask[0]) > 0.5).to(torch.float64)
    if len(voxels) == 0:
        raise KeyMorphInputError(f"{_source_name(mask)}: the brain mask is empty; cannot place keypoints")
    chosen = voxels[torch.from_numpy(rng.choice(len(voxels), size=count, replace=len(voxels) < count))]
    chosen = chosen + torch.from_numpy(rng.uniform(-0.5, 0.5, chosen.shape))
    return apply_affine(affine_of(mask), chosen)

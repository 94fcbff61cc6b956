"""Where is up? The pose of a brain in any orientation, by a global search against the MNI152 brain.

deepbet, the brain extractor, was trained on upright heads. Turned about an oblique axis, a whole head loses it
(brain-mask Dice 0.96 upright, 0.87 at 30 degrees, 0.77-0.80 from 45 degrees on); turned by half or quarter turns
about the array axes it does not (0.91-0.96 at 90 and 180 degrees about R, A or S). Its rough mask of a turned head
still holds most of the brain, though, and a brain (unlike a whole head) has a pose that mutual information finds
reliably against a brain template. So :class:`scripts.skull_strip.SkullStripd` runs deepbet, finds the pose of
what deepbet kept with :class:`HeadPoseSearch`, and runs deepbet again on a view turned upright when the pose is
oblique. No trained weights: the search is FSL FLIRT's recipe, a rigid transform that maximises the normalised
mutual information (NMI) between the MNI152 2009 T1 brain (nilearn's, the bundle's default atlas) and the image:

1. the template (its brain plus a :data:`TEMPLATE_MARGIN_MM` margin of background) and the image are box-averaged
   onto coarse grids (:data:`LEVEL_SPACINGS`, 8 then 4 mm); intensities are put in :data:`BINS` bins between their
   1st and 99th percentiles; a fixed random sample of template voxels is compared with the image interpolated
   where the transform puts them (outside the image: background);
2. ``starts`` rotations drawn uniformly from all 3-D rotations (a fixed seed: the same image gives the same pose),
   about the image's foreground centre, are scored at 8 mm;
3. the best ``keep`` of them that are more than 45 degrees apart are refined by a shrinking random local search
   (rotation and translation) at 8 mm, then at 4 mm; the best at 4 mm wins.

Mutual information needs no model of the contrast: T1, T2, PD and FLAIR brains all work. On whole heads the same
search is unreliable (the brain template settles on the head's outline and confuses the brain's axes), hence
deepbet first. The registration resolves the brain's orientation again afterwards (the turn search of
:mod:`scripts.registration`); the pose here only needs to be close enough for deepbet.

The frame ``U`` ``(3, 3)`` is a proper rotation whose columns are the subject's right, anterior and superior
directions in world coordinates (RAS mm, :mod:`scripts.coordinates`): the template's axes carried into the image's
world. ``U`` = identity for a brain upright in an RAS scanner frame. :func:`scripts.coordinates.covering_grid_along`
builds a grid along ``U``, on which the brain looks upright.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from scripts.coordinates import apply_affine, rotation_angle_deg, voxel_to_normalized, warp

#: Coarse grid spacings (mm) of the search: the global stage runs on the first, the last decides.
LEVEL_SPACINGS = (8.0, 4.0)
#: Background kept around the template brain (mm): a scalp or skull must have somewhere to fall.
TEMPLATE_MARGIN_MM = 24.0
#: Intensity bins of the joint histogram, per image.
BINS = 16
# Local search per level: rounds, proposals per candidate and round, first step (rotation degrees, translation
# mm); each round shrinks the steps by _SHRINK.
_LOCAL_SEARCH = {8.0: (10, 24, 20.0, 20.0), 4.0: (6, 16, 6.0, 6.0)}
_SHRINK = 0.75
# Starts closer than this (degrees) are one candidate.
_DISTINCT_DEG = 45.0


def box_average(image: torch.Tensor, affine: torch.Tensor, spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Average an image ``(D, H, W)`` over boxes of about ``spacing`` mm; returns the coarse image and its affine.

    The box is a whole number of voxels per axis (at least 1); a coarse voxel's centre is its box's centre.
    """
    affine = affine.to(torch.float64)
    factors = [max(1, int(round(spacing / float(s)))) for s in affine[:3, :3].norm(dim=0)]
    values = torch.nan_to_num(image.to(torch.float32))
    values = F.avg_pool3d(values[None, None], kernel_size=factors, stride=factors, ceil_mode=True)[0, 0]
    scale = torch.tensor(factors, dtype=torch.float64)
    coarse = affine.clone()
    coarse[:3, :3] = affine[:3, :3] * scale
    coarse[:3, 3] = apply_affine(affine, ((scale - 1) / 2)[None])[0]
    return values, coarse


def intensity_bins(values: torch.Tensor) -> torch.Tensor:
    """Intensities scaled to bin units (float32, same shape): [0, :data:`BINS`) from the 1st to the 99th
    percentile, clipped; the bin of a value is its integer part."""
    flat = values.flatten()
    low, high = torch.quantile(flat[:: max(1, flat.numel() // 200_000)], torch.tensor([0.01, 0.99]))
    return ((values - low) / (high - low).clamp(min=1e-8) * BINS).clamp(0, BINS - 1e-3)


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Boolean mask (same shape) of the voxels brighter than 10 % of the image's 99th percentile: the head (or the
    brain) of any MR contrast, whose background is dark."""
    flat = image.flatten()
    return image > 0.1 * torch.quantile(flat[:: max(1, flat.numel() // 200_000)].to(torch.float32), 0.99)


def foreground_centre(image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World centre ``(3,)`` of the :func:`foreground` of an image ``(D, H, W)`` with voxel-to-world ``affine``."""
    voxels = torch.nonzero(foreground(image)).to(torch.float64)
    if len(voxels) == 0:
        voxels = torch.tensor([[(s - 1) / 2 for s in image.shape]], dtype=torch.float64)
    return apply_affine(affine.to(torch.float64), voxels).mean(0)


class _Level:
    """The template at one spacing: a fixed sample of its voxels (world points, bins); the image, once set."""

    def __init__(self, template: torch.Tensor, affine: torch.Tensor, spacing: float, points: int, seed: int):
        values, affine = box_average(template, affine, spacing)
        self.template_centre = foreground_centre(values, affine)
        brain = torch.nonzero(values > 0.05 * values.max())
        margin = int(round(TEMPLATE_MARGIN_MM / spacing))
        low = (brain.min(0).values - margin).clamp(min=0)
        high = brain.max(0).values + margin + 1
        box = values[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        voxels = torch.stack(torch.meshgrid(*[torch.arange(n) for n in box.shape], indexing="ij"), -1).reshape(-1, 3)
        chosen = torch.from_numpy(np.random.RandomState(seed).permutation(len(voxels))[:points])
        world = apply_affine(affine, (voxels[chosen] + low).to(torch.float64))
        self.points = torch.cat([world, torch.ones(len(world), 1, dtype=torch.float64)], 1).to(torch.float32)
        self.template_bins = intensity_bins(box).flatten()[chosen].long()
        self.spacing = spacing

    def set_image(self, image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
        """Take the image ``(D, H, W)`` to compare with; returns the world centre ``(3,)`` of its foreground at
        this level's spacing."""
        values, coarse = box_average(image, affine, self.spacing)
        self.image_bins = intensity_bins(values)[None, None]
        # image world -> PyTorch grid coordinates (normalized, reversed axis order) of the coarse image
        to_grid = voxel_to_normalized(values.shape) @ torch.linalg.inv(coarse)
        self.world_to_grid = to_grid[[2, 1, 0, 3]]
        return foreground_centre(values, coarse)

    def nmi(self, matrices: torch.Tensor) -> torch.Tensor:
        """NMI ``(N,)`` of ``N`` template-to-image world matrices ``(N, 4, 4)``: (H(T) + H(I)) / H(T, I)."""
        to_grid = (self.world_to_grid @ matrices)[:, :3].to(torch.float32)
        grid = torch.einsum("nij,pj->npi", to_grid, self.points)
        # the image interpolated at each template point (outside the image: bin 0, background), then binned
        image_bins = warp(self.image_bins, grid.reshape(1, -1, 1, 1, 3), mode="bilinear").view(len(matrices), -1)
        joint = torch.zeros(len(matrices), BINS * BINS)
        joint.scatter_add_(1, self.template_bins * BINS + image_bins.long(), torch.ones(image_bins.shape))
        joint = joint.view(-1, BINS, BINS) / self.points.shape[0]

        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * torch.log(p.clamp(min=1e-12))).flatten(1).sum(1)

        return (entropy(joint.sum(2)) + entropy(joint.sum(1))) / entropy(joint)


class HeadPoseSearch:
    """The upright frame of a head or brain in any pose (see the module docstring).

    Args:
        template: ``(D, H, W)`` the MNI152 T1 brain (0 outside the brain) and ``template_affine`` its ``(4, 4)``
            voxel-to-world matrix.
        starts: rotations tried at the coarsest level.
        keep: candidates refined.
        points: template voxels sampled per level.
        seed: seed of the starts, the samples and the local search (the result is deterministic).
    """

    def __init__(
        self,
        template: torch.Tensor,
        template_affine: torch.Tensor,
        starts: int = 300,
        keep: int = 6,
        points: int = 10_000,
        seed: int = 0,
    ):
        template, template_affine = torch.as_tensor(template), torch.as_tensor(template_affine, dtype=torch.float64)
        self.levels = [_Level(template, template_affine, s, points, seed) for s in LEVEL_SPACINGS]
        self.template_centre = self.levels[-1].template_centre
        self.starts = torch.from_numpy(Rotation.random(starts, random_state=seed).as_matrix())
        self.keep, self.seed = keep, seed

    @classmethod
    def mni152(cls, **kwargs) -> "HeadPoseSearch":
        """The search against the MNI152 2009 T1 brain at 1 mm that nilearn ships (the default atlas)."""
        from nilearn.datasets import load_mni152_template

        template = load_mni152_template(resolution=1)
        values = torch.from_numpy(np.asarray(template.dataobj, dtype=np.float32))
        return cls(values, torch.from_numpy(np.asarray(template.affine, dtype=np.float64)), **kwargs)

    def __call__(self, image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
        """The frame ``U`` ``(3, 3)`` float64 of an image ``(D, H, W)`` with voxel-to-world ``affine`` ``(4, 4)``."""
        affine = torch.as_tensor(affine, dtype=torch.float64)
        centre = [level.set_image(image, affine) for level in self.levels][0]
        rotations = self.starts
        shifts = centre.expand(len(rotations), 3)
        scores = self.levels[0].nmi(self.matrices(rotations, shifts))
        chosen = self._distinct_best(rotations, scores)
        rotations, shifts = rotations[chosen], shifts[chosen]
        rng = np.random.RandomState(self.seed)
        for level in self.levels:
            rotations, shifts, scores = self._refine(level, rotations, shifts, rng)
        return rotations[int(scores.argmax())]

    def matrices(self, rotations: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Template-to-image world matrices ``(N, 4, 4)``: ``x -> R (x - c) + t``, c the template's centre."""
        matrices = torch.eye(4, dtype=torch.float64).repeat(len(rotations), 1, 1)
        matrices[:, :3, :3] = rotations
        matrices[:, :3, 3] = shifts - rotations @ self.template_centre
        return matrices

    def _distinct_best(self, rotations: torch.Tensor, scores: torch.Tensor) -> list[int]:
        """Indices of the ``keep`` best-scoring rotations, each more than 45 degrees from the better ones."""
        chosen: list[int] = []
        for index in scores.argsort(descending=True).tolist():
            if all(rotation_angle_deg(rotations[index] @ rotations[other].T) > _DISTINCT_DEG for other in chosen):
                chosen.append(index)
            if len(chosen) == self.keep:
                break
        return chosen

    def _refine(self, level: _Level, rotations: torch.Tensor, shifts: torch.Tensor, rng: np.random.RandomState):
        """Random local search of each candidate at one level: each round tries random steps around each
        candidate, keeps the best if it scores higher, and shrinks the steps. Returns rotations, shifts, scores."""
        rounds, proposals, degrees, millimetres = _LOCAL_SEARCH[level.spacing]
        count = len(rotations)
        scores = level.nmi(self.matrices(rotations, shifts))
        for _ in range(rounds):
            turns = rng.normal(size=(count * proposals, 3)) * np.deg2rad(degrees) / np.sqrt(3)
            tried_rotations = torch.from_numpy(Rotation.from_rotvec(turns).as_matrix()) @ rotations.repeat_interleave(
                proposals, 0
            )
            moves = rng.normal(size=(count * proposals, 3)) * millimetres / np.sqrt(3)
            tried_shifts = shifts.repeat_interleave(proposals, 0) + torch.from_numpy(moves)
            tried = level.nmi(self.matrices(tried_rotations, tried_shifts)).view(count, proposals)
            best, which = tried.max(1)
            better = best > scores
            picked = torch.arange(count) * proposals + which
            rotations = torch.where(better[:, None, None], tried_rotations[picked], rotations)
            shifts = torch.where(better[:, None], tried_shifts[picked], shifts)
            scores = torch.where(better, best, scores)
            degrees, millimetres = degrees * _SHRINK, millimetres * _SHRINK
        return rotations, shifts, scores

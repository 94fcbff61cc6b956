"""Groupwise registration: every image of a folder registered to the group's own mean space, and a template.

``configs/groupwise.yaml`` (an overlay on ``configs/inference.yaml``) runs :func:`run_groupwise`, in passes over the
folder, keeping between them only each image's keypoints, its transform and a few numbers, never an image, so the
memory does not grow with the folder:

1. **Keypoints** (:meth:`GroupwiseRegistration.collect`): each image is preprocessed as inference does it (read,
   RAS, brain mask, [0, 1] intensities, the network grid on the brain; the brain extracted here, once per run: see
   below) and the keypoint network gives its keypoints
   in world millimetres (RAS), with ``search_turns`` also those of its grid turned by 180 degrees about each axis
   (:data:`scripts.registration.GRID_TURNS`). Kept per image: the keypoints ``(T, K, 3)``, an outline of its
   brain (64 extreme points, world mm), the QC scores of the moving image alone (``brain_fill``, ``smoothness``)
   and its tissue contrast (:func:`brain_contrast`).
2. **Group space and template** (:func:`fit_group`, :meth:`GroupwiseRegistration.build_template`): the mean keypoint
   configuration by generalised Procrustes analysis with the chosen aligner (:func:`generalised_procrustes`), each
   image's transform from the group space to the image (the bundle's FIXED-to-MOVING direction, the group space
   being the fixed one: :mod:`scripts.coordinates`), then the template on a grid covering every brain mapped into
   the group space: ``template.nii.gz``, the mean of the registered brains, each scaled to [0, 1] and given the
   contrast of one member (:func:`in_contrast_of`: the member with the most tissue contrast, a T1 in a mixed group),
   and ``template_mask.nii.gz``, the fraction of brains covering each voxel.
3. **Template rounds** (``template_iterations``, as template builders iterate): each image's transform refined
   against the template by mutual information from its current one (:meth:`GroupwiseRegistration.refine_round`,
   ``refine_iterations`` steps as inference refines a keypoint solution), the group space re-pinned
   (:func:`repinned`), the template rebuilt from the refined transforms. Two passes per round.
4. **Per-case outputs** (:class:`GroupwiseEvaluator` with :class:`GroupwiseWriter`): the usual case folders
   (``registered.nii.gz`` on the template grid, the transform files with the template as the fixed image,
   keypoints, QC figures, provenance) and ``summary.csv``, through the inference writer, with the transforms the
   template was made with. Each case's QC similarity, brain overlap (its brain mask against the template's,
   ``template_mask`` > 0.5) and ``qc.png`` compare it with the template.

**Each brain is extracted once.** Every pass reads the images through the inference preprocessing again (3 +
2 x ``template_iterations`` reads, 7 by default, plus the template's contrast reference once per template), and
brain extraction (``skull_strip`` deepbet, with the head-pose search and a second deepbet pass on turned heads, or
bundle) is the slow part of a read. :class:`CachedSkullStripd` writes each image's mask, the first time the image
is read, to ``OUT_DIR/.brain_masks/NAME.nii.gz`` (the image file's grid, uint8, atomically), and the later reads
take the image with it through the "mask" backend, which gives the same mask voxel for voxel: the masks,
keypoints, transforms and template are those of extracting it in every pass. Memory stays independent of the
folder (the masks are on disk). The folder belongs to one run: emptied before the first pass (a killed run's masks
are never trusted) and removed at the end; a rerun extracts again. ``skull_strip`` mask and none read no network
and are not cached. On three whole-head 1 mm T1 images (deepbet, default settings: 24 extractions before, 3 now) the
run took 623 s before and 117 s after (medians of 3 and 4 runs on this machine's 2 shared cores; the README's
groupwise section has the command and every run).

Why rounds, and why one contrast: on held-out subject 13's T1, T2 and PD at 1.5 mm
(``python benchmarks/groupwise_consistency.py --seeds 0``) the keypoint solutions alone are 2.40 mm from the truth
(pairwise consistency error) and one refinement against their template 0.84 mm, where registering each image to one
member gives 0.60 mm. The plain mean of a T1, a T2 and a PD has almost no tissue contrast left (white matter 0.72,
grey matter 0.75, fluid 0.67 where the T1 has 0.89, 0.64, 0.34), so mutual information against it sees little but
the brain's outline, and rebuilding it helps little (0.74 mm after two rounds, then 0.81, 0.77). Given one member's
contrast, the template keeps its tissues: 0.37 mm after one round, 0.35 after two (the default), 0.41 after three,
and the label Dice on one grid (the first image's) 0.833 against 0.823 for registering to one member.

Images that cannot be read or preprocessed get an ``error`` row and are left out; the others are processed and the
run exits with code 1. Images that are ``suspect`` before the template exists (keypoint residual to the group mean
above ``qc_max_residual_mm``, or the moving image's own QC: brain mask filling the image, noise) are excluded from
the mean, the group space and the template: :func:`fit_group` drops the worst one and fits again until none is
left. They are still registered to the group space; ``summary.csv`` says ``in_template`` = ``no`` and why. A case
flagged only by its similarity or brain overlap to the template (measured in the last pass) is ``suspect`` but was
part of the mean; its ``in_template`` says ``yes``.

The group space is pinned to the average of the included images' world spaces (an affine mean could otherwise
drift or shrink from one iteration to the next, and would keep the pose of the image it started from): its centroid
and size (RMS distance of the keypoints from their centroid) are the averages of the images' keypoint centroids and
sizes, and its orientation is their average (the group-to-image maps turn by no rotation on average), so scans taken
upright give an upright template. The template rounds keep it there: the corrections the refinements make to the
keypoint solutions average to the identity (:func:`repinned`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Transform

from scripts.aligners import ALIGNERS, MATRIX_ALIGNERS, fit_residual
from scripts.case_outputs import SUMMARY_COLUMNS, RegistrationWriter, source_path, write_native_mask
from scripts.cli import as_bool, optional
from scripts.coordinates import affine_of, apply_affine, coarser_grid, grid_around, resample_onto, turned
from scripts.errors import KeyMorphInputError, fail, message_naming, worker_died, workflow_step
from scripts.image_io import source_name
from scripts.inference import RegistrationEvaluator, one_line_if_a_worker_dies, run_registration
from scripts.qc import QC_THRESHOLDS, qc_flags
from scripts.refinement import refine_affine
from scripts.registration import GRID_TURNS, Registration, keypoints_world
from scripts.settings_checks import _number_problem
from scripts.skull_strip import SkullStripd
from scripts.transform_io import write_atomically

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "template.nii.gz"
TEMPLATE_MASK_FILE = "template_mask.nii.gz"
#: OUT_DIR's hidden folder of the brain masks the first pass extracts (``NAME.nii.gz``) and the later passes read.
BRAIN_MASK_CACHE = ".brain_masks"
#: The skull-stripping backends that extract a brain (slow: seconds per head); "mask" and "none" read it as it is.
EXTRACTING_BACKENDS = ("deepbet", "bundle")
#: summary.csv of a groupwise run: the inference columns and whether the case is part of the mean.
GROUPWISE_SUMMARY_COLUMNS = [*SUMMARY_COLUMNS, "in_template"]


# --- the maths: generalised Procrustes analysis on keypoints ----------------------------------------------------


def centroid_and_size(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids ``(..., 3)`` and sizes ``(...)`` (RMS distance from the centroid, mm) of point sets ``(..., K, 3)``."""
    centroid = points.mean(-2)
    size = (points - centroid[..., None, :]).pow(2).sum(-1).mean(-1).sqrt()
    return centroid, size


def with_centroid_and_size(points: torch.Tensor, centroid: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The point set ``(K, 3)`` moved and scaled about its centroid to have this ``centroid`` ``(3,)`` and ``size``."""
    own_centroid, own_size = centroid_and_size(points)
    return (points - own_centroid) * (size / own_size.clamp(min=1e-12)) + centroid


def fit_to_mean(mean: torch.Tensor, points: torch.Tensor, aligner: str) -> torch.Tensor:
    """Each image's group-to-image transform ``(N, 4, 4)`` float64: ``aligner``'s closed-form fit of the mean
    keypoints ``(K, 3)`` (source: the group space is the fixed one) onto the image's keypoints ``(N, K, 3)``
    (target), as inference fits fixed keypoints onto moving ones."""
    source = mean.to(torch.float64).expand(len(points), -1, -1)
    return ALIGNERS[aligner](source, points.to(torch.float64)).matrix


def residuals(fixed_to_moving: torch.Tensor, mean: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """RMS distance ``(N,)`` in image mm between the mapped mean keypoints and each image's keypoints: the keypoint
    residual of :mod:`scripts.qc`."""
    return fit_residual(fixed_to_moving, mean.to(torch.float64).expand(len(points), -1, -1), points)


def rotation_factor(linear: torch.Tensor) -> torch.Tensor:
    """The proper rotation ``(..., 3, 3)`` closest to each matrix ``(..., 3, 3)`` (the rotation factor of its polar
    decomposition, ``U V^T`` of the SVD, a reflection turned into a rotation): the orientation of a linear map."""
    u, _, vh = torch.linalg.svd(linear)
    signs = torch.ones(*linear.shape[:-2], 3, dtype=linear.dtype)
    signs[..., 2] = torch.sign(torch.linalg.det(u @ vh))
    return u @ torch.diag_embed(signs) @ vh


def with_mean_orientation(mean: torch.Tensor, fixed_to_moving: torch.Tensor) -> torch.Tensor:
    """The mean ``(K, 3)`` turned about its centroid so that the group-to-image maps ``(N, 4, 4)`` fitted to it are
    turned by no rotation on average (the chordal mean of their rotation factors becomes the identity): the group
    space takes the images' average orientation."""
    average = rotation_factor(rotation_factor(fixed_to_moving[:, :3, :3]).sum(0))
    centroid = mean.mean(0)
    return (mean - centroid) @ average.T + centroid


def generalised_procrustes(
    points: torch.Tensor, aligner: str = "affine", tolerance_mm: float = 0.01, max_iterations: int = 20
) -> tuple[torch.Tensor, int]:
    """The mean keypoint configuration of a group by generalised Procrustes analysis.

    Starting from the first image's keypoints, each iteration fits every image's keypoints to the current mean
    (:func:`fit_to_mean`), maps them into the group space (the inverse of that 4x4 fit: a matrix of keypoints, never
    an image), averages them and gives the average the group's centroid and size (the averages of the images' own,
    see the module docstring), until no mean keypoint moves by ``tolerance_mm`` or more, or ``max_iterations``. The
    converged mean is then turned to the images' average orientation (:func:`with_mean_orientation`).

    Args:
        points: ``(N, K, 3)`` keypoints of N images in world mm (row k of each image is keypoint k).
        aligner: "affine", "similarity" or "rigid".

    Returns:
        The mean ``(K, 3)`` float64 in group-space mm, and the number of iterations made.
    """
    if aligner not in MATRIX_ALIGNERS:
        raise ValueError(
            f"groupwise registration needs one of the aligners {', '.join(MATRIX_ALIGNERS)}, not {aligner}"
        )
    points = points.to(torch.float64)
    centroids, sizes = centroid_and_size(points)
    centroid, size = centroids.mean(0), sizes.mean()
    mean = with_centroid_and_size(points[0], centroid, size)
    iteration = 0
    for iteration in range(1, max_iterations + 1):
        to_group = torch.linalg.inv(fit_to_mean(mean, points, aligner))
        updated = with_centroid_and_size(apply_affine(to_group, points).mean(0), centroid, size)
        change = float((updated - mean).norm(dim=-1).max())
        mean = updated
        if change < tolerance_mm:
            break
    return with_mean_orientation(mean, fit_to_mean(mean, points, aligner)), iteration


def in_contrast_of(
    values: torch.Tensor, reference: torch.Tensor, overlap: torch.Tensor, bins: int = 64
) -> torch.Tensor:
    """An image's intensities ``values`` (any shape, in [0, 1]) given the contrast of a ``reference`` image aligned
    with it (same shape): each intensity becomes the mean reference intensity where the image has it, over the
    ``overlap`` (bool, same shape: both brains) in ``bins`` intensity bins, piecewise linear between bin centres
    (bins the overlap does not reach take their neighbours' values). The regression behind mutual information: a T2
    or PD image turns into a T1-like one when the reference is a T1, and an image of the reference's contrast stays
    as it is, so the mean of a mixed-contrast group keeps its tissue contrast instead of cancelling it."""
    binned = (values * bins).long().clamp(0, bins - 1)
    counts = torch.bincount(binned[overlap], minlength=bins).to(torch.float64)
    sums = torch.bincount(binned[overlap], weights=reference[overlap].to(torch.float64), minlength=bins)
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    reached = counts > 0
    if not bool(reached.any()):
        return values
    table = np.interp(centres.numpy(), centres[reached].numpy(), (sums[reached] / counts[reached]).numpy())
    mapped = np.interp(values.to(torch.float64).numpy(), centres.numpy(), table)
    return torch.from_numpy(mapped).to(values.dtype)


def repinned(refined: torch.Tensor, keypoint_solution: torch.Tensor, included: torch.Tensor) -> torch.Tensor:
    """Refined group-to-image matrices ``(N, 4, 4)`` moved, all by one group-space transform, back into the group
    space of the keypoint solutions ``(N, 4, 4)``: afterwards the corrections the refinement made to the included
    images' (``(N,)`` bool) keypoint solutions, ``refined_i^-1 keypoint_solution_i`` (group space to group space),
    average to the identity. A refinement round can then move each image against the others but not the group space
    as a whole, so the space the Procrustes fit pinned to the images' average position, size and orientation neither
    drifts nor shrinks from round to round, as template builders re-centre the template on the mean transform."""
    refined, keypoint_solution = refined.to(torch.float64), keypoint_solution.to(torch.float64)
    if not bool(included.any()):  # every refinement failed: nothing to average
        return refined
    corrections = torch.linalg.inv(refined[included]) @ keypoint_solution[included]
    return refined @ corrections.mean(0)


@dataclass
class GroupFit:
    """The group space of :func:`fit_group`.

    Attributes:
        mean: ``(K, 3)`` mean keypoints in group-space mm.
        fixed_to_moving: ``(N, 4, 4)`` float64 group-to-image world matrices (every image, included or not).
        residual: ``(N,)`` keypoint residuals in mm (:func:`residuals`).
        included: ``(N,)`` bool, part of the mean.
        turns: ``(N,)`` index of the keypoint set used per image (into :data:`scripts.registration.GRID_TURNS`).
        iterations: of the last Procrustes fit.
    """

    mean: torch.Tensor
    fixed_to_moving: torch.Tensor
    residual: torch.Tensor
    included: torch.Tensor
    turns: torch.Tensor
    iterations: int


def fit_group(
    candidates: torch.Tensor,
    aligner: str = "affine",
    max_residual_mm: float = QC_THRESHOLDS["max_residual_mm"],
    excluded: torch.Tensor | None = None,
    turn_search_above_mm: float = 0.0,
    tolerance_mm: float = 0.01,
    max_iterations: int = 20,
) -> GroupFit:
    """The group space of keypoint sets, with outliers left out of the mean.

    Args:
        candidates: ``(N, T, K, 3)`` keypoints of N images in world mm, T candidate sets per image (the grid turns of
            the turn search; T = 1 without it). The first set of each image is used unless the turn search changes
            it.
        aligner: "affine", "similarity" or "rigid".
        max_residual_mm: an image whose keypoint residual to the mean exceeds it is excluded from the mean, the worst
            first, refitting after each, until every included image is within it.
        excluded: ``(N,)`` bool, images left out of the mean from the start (QC flags of the image itself).
        turn_search_above_mm: with T > 1, an image whose residual exceeds it takes the candidate set with the
            smallest residual to the mean, and the group is fitted again.
        tolerance_mm, max_iterations: of :func:`generalised_procrustes`.

    If every image is excluded from the start, the mean is made of all of them (a warning says so) rather than of
    none; the residual never excludes the last image left.
    """
    count = len(candidates)
    candidates = candidates.to(torch.float64)
    excluded = torch.zeros(count, dtype=torch.bool) if excluded is None else excluded.clone()
    if bool(excluded.all()):
        logger.warning("every image of the group is suspect; the group mean is made of all of them")
        excluded[:] = False
    included, turns = ~excluded, torch.zeros(count, dtype=torch.long)
    everyone = torch.arange(count)
    # each round either changes a turn (strictly better residual) or excludes one image: a few rounds in practice
    for _ in range(2 * count + 2):
        points = candidates[everyone, turns]
        mean, iterations = generalised_procrustes(points[included], aligner, tolerance_mm, max_iterations)
        fixed_to_moving = fit_to_mean(mean, points, aligner)
        residual = residuals(fixed_to_moving, mean, points)
        if candidates.shape[1] > 1 and bool((residual > turn_search_above_mm).any()):
            per_turn = torch.stack(
                [
                    residuals(fit_to_mean(mean, candidates[:, t], aligner), mean, candidates[:, t])
                    for t in range(len(candidates[0]))
                ],
                dim=1,
            )
            best = per_turn.argmin(1)
            better = (residual > turn_search_above_mm) & (per_turn[everyone, best] < residual - 1e-9)
            if bool(better.any()):
                turns = torch.where(better, best, turns)
                continue
        worst = torch.where(included, residual, torch.full_like(residual, -1.0)).argmax()
        if residual[worst] <= max_residual_mm or int(included.sum()) == 1:
            break
        included[worst] = False
    return GroupFit(mean, fixed_to_moving, residual, included, turns, iterations)


def pairwise_consistency_mm(
    fixed_to_moving: torch.Tensor, true_fixed_to_moving: torch.Tensor, points: torch.Tensor
) -> float:
    """How far a recovered group space is from the true one up to one global transform, in mm.

    For every ordered pair of images (i, j), the recovered map from image i to image j (``T_j T_i^-1``) is compared
    with the true one (``G_j G_i^-1``) at the points ``G_i p`` (``points`` ``(M, 3)`` in the true group space mapped
    into image i); a global transform of the group space cancels in both. Returns the mean over the pairs of the RMS
    distance (mm).

    Args:
        fixed_to_moving: ``(N, 4, 4)`` recovered group-to-image matrices.
        true_fixed_to_moving: ``(N, 4, 4)`` true ones.
        points: ``(M, 3)`` world mm of the true group space where the maps are compared (e.g. the keypoints or a
            brain's voxels).
    """
    recovered, truth = fixed_to_moving.to(torch.float64), true_fixed_to_moving.to(torch.float64)
    points = points.to(torch.float64)
    errors = []
    for i in range(len(truth)):
        in_image = apply_affine(truth[i], points)
        for j in range(len(truth)):
            if i != j:
                image_to_image = recovered[j] @ torch.linalg.inv(recovered[i])
                error = apply_affine(image_to_image, in_image) - apply_affine(truth[j], points)
                errors.append(error.pow(2).sum(-1).mean().sqrt())
    return float(torch.stack(errors).mean()) if errors else 0.0


@workflow_step
def check_groupwise_settings(
    pairs_csv, template_spacing, template_margin_mm, tolerance_mm, max_iterations, template_iterations=2
) -> None:
    """The settings only a groupwise run has, checked before any work; exits (:func:`fail`, code 2) with one line."""
    if optional(pairs_csv) is not None:
        fail(f"--pairs_csv {pairs_csv}: a groupwise run registers a folder (--dataset_dir) to its own mean, not pairs")
    problem = (
        _number_problem("template_spacing", template_spacing)
        or _number_problem("template_margin_mm", template_margin_mm, 0)
        or _number_problem("procrustes_tolerance_mm", tolerance_mm)
        or _number_problem("procrustes_max_iterations", max_iterations, 1, integer=True)
        or _number_problem("template_iterations", template_iterations, 0, integer=True)
    )
    if problem:
        fail(problem)
    for name, value in (("template_spacing", template_spacing), ("procrustes_tolerance_mm", tolerance_mm)):
        if not value > 0:
            fail(f"--{name} {value!r}: must be positive (mm)")


# --- each brain extracted once per run --------------------------------------------------------------------------


class CachedSkullStripd(Transform):
    """The preprocessing's brain extraction (``extractor``, a one-key :class:`scripts.skull_strip.SkullStripd`), run
    once per image in a run that reads each image several times.

    Items are the dataset's: ``name`` (a checked case name) and the extractor's key, a ``(1, D, H, W)`` MetaTensor
    read from a file and reoriented to RAS. The first time a case comes through, ``extractor`` finds the brain and
    its mask is written to ``cache_dir/NAME.nii.gz`` as ``moving_mask.nii.gz`` is (:func:`write_native_mask`: the
    image file's own grid and header, uint8 0/1, atomically: a killed run leaves a whole mask or none). The next
    times, the image is stripped with that mask by the "mask" backend (``--skull_strip mask``'s path). The mask comes
    back onto the image's RAS grid as it was (the same header, reoriented the same way: no resampling), so the image,
    the mask and all that is computed from them are those the extractor gave. With the backends that extract nothing
    (:data:`EXTRACTING_BACKENDS`: "mask" and "none" read the brain as it is), ``extractor`` runs every time.

    The folder is the run's own: :meth:`GroupwiseRegistration.run` empties it before the first pass (a killed run's
    masks may be of other files) and removes it at the end. An image whose extraction fails leaves no mask and is
    extracted (and fails) again in each pass, as before.
    """

    # the item key the cached mask's path goes under, for the "mask" backend only (the item keeps no trace of it)
    MASK_PATH_KEY = "cached_mask_path"

    def __init__(self, extractor: SkullStripd, cache_dir: str):
        if len(extractor.keys) != 1:
            raise ValueError(f"CachedSkullStripd needs an extractor of one key, not {extractor.keys}")
        self.extractor, self.cache_dir = extractor, os.fspath(cache_dir)
        self.key, self.mask_key = extractor.keys[0], extractor.mask_keys[0]
        self.from_file = SkullStripd(
            self.key, self.mask_key, backend="mask", mask_path_key=self.MASK_PATH_KEY, device=extractor.device
        )

    def mask_path(self, name: str) -> str:
        """Where the brain mask of case ``name`` is kept."""
        return os.path.join(self.cache_dir, f"{name}.nii.gz")

    def __call__(self, data: dict) -> dict:
        if self.extractor.backend not in EXTRACTING_BACKENDS:
            return self.extractor(data)
        path = self.mask_path(data["name"])
        if os.path.exists(path):
            stripped = self.from_file({**data, self.MASK_PATH_KEY: path})
            del stripped[self.MASK_PATH_KEY]
            return stripped
        stripped = self.extractor(data)
        os.makedirs(self.cache_dir, exist_ok=True)
        write_native_mask(path, stripped[self.mask_key], nib.load(source_name(stripped[self.key])))
        return stripped


# --- the passes: keypoints, template, template rounds -----------------------------------------------------------


@dataclass
class GroupMember:
    """What pass 1 keeps of an image: ``keypoints`` ``(T, K, 3)`` world mm (one set per grid turn tried),
    ``brain_outline`` ``(M, 3)`` world mm (:func:`brain_outline`), the QC scores of the image alone and its tissue
    ``contrast`` (:func:`brain_contrast`)."""

    name: str
    keypoints: torch.Tensor
    brain_outline: torch.Tensor
    scores: dict = field(default_factory=dict)
    contrast: float = 0.0


def brain_contrast(image, mask) -> float:
    """The standard deviation of a network-grid image's intensities ``(1, D, H, W)`` (scaled to [0, 1]) in its
    brain (``mask`` > 0.5, same grid): how far apart its tissues are. A T1's white matter, grey matter and fluid
    spread over the range; a T2's or a PD's grey matter and fluid (of the same brain) lie close together."""
    brain = torch.as_tensor(mask)[0] > 0.5
    values = torch.as_tensor(image)[0][brain].to(torch.float64)
    return float(values.std()) if len(values) > 1 else 0.0


def sphere_directions(count: int = 64) -> torch.Tensor:
    """``(count, 3)`` unit vectors spread evenly over the sphere (a Fibonacci lattice)."""
    index = torch.arange(count, dtype=torch.float64) + 0.5
    height = 1 - 2 * index / count
    angle = math.pi * (1 + math.sqrt(5)) * index
    radius = (1 - height**2).sqrt()
    return torch.stack([radius * angle.cos(), radius * angle.sin(), height], dim=1)


def brain_outline(mask, directions: int = 64, max_voxels: int = 64**3) -> torch.Tensor:
    """The brain's extreme points ``(directions, 3)`` (world mm) along directions spread over the sphere: a small
    outline whose image under any affine map bounds the mapped brain to within a few mm (a bounding box's corners
    would not: the box of a turned box grows), so the template grid holds the mapped brains without the brains.

    Args:
        mask: ``(1, D, H, W)`` MetaTensor, brain > 0.5 (empty: the whole grid).
        max_voxels: the mask is max-pooled onto a grid of at most about this many voxels first (cells of up to a
            few mm, which the template margin absorbs), so a 512^3 mask costs what a 64^3 one does.
    """
    brain = torch.as_tensor(mask)[0].float()
    affine = affine_of(mask)
    factor = max(1, math.ceil((brain.numel() / max_voxels) ** (1 / 3)))
    if factor > 1:
        brain = F.max_pool3d(brain[None, None], factor, ceil_mode=True)[0, 0]
        affine = coarser_grid(affine, factor)
    voxels = torch.nonzero(brain > 0.5).to(torch.float64)
    if len(voxels) == 0:
        voxels = torch.nonzero(torch.ones_like(brain, dtype=torch.bool)).to(torch.float64)
    world = apply_affine(affine, voxels)
    return world[(world @ sphere_directions(directions).T).argmax(0)]


class GroupwiseRegistration:
    """The groupwise run of ``configs/groupwise.yaml`` (see the module docstring): :meth:`run`.

    Args:
        dataloader: the inference dataloader (its dataset preprocesses each image as inference does; items carry
            ``image`` on the network grid, ``original``, ``native_mask``, ``brain_fill``, ``smoothness``).
        network: the keypoint network (weights loaded).
        evaluator: a :class:`GroupwiseEvaluator` writing the per-case outputs (the last pass).
        intensity_scaling: a dictionary transform on ``image`` (the inference one: [0, 1] by percentiles) applied to
            each original image before it is averaged into the template.
        output_dir: OUT_DIR; the template files are written there.
        aligner: "affine", "similarity" or "rigid".
        search_turns, turn_search_above_mm: as for inference (here: four keypoint sets per image in pass 1, and the
            set kept is the one that fits the group mean best, see :func:`fit_group`).
        qc_thresholds: ``max_residual_mm``, ``max_brain_fill``, ``min_smoothness`` (the similarity and the brain
            overlap need the template and are only scored in the last pass, by the writer).
        template_spacing: mm of the template grid; template_margin_mm: room around the mapped brains.
        tolerance_mm, max_iterations: of the Procrustes fit.
        refine_iterations: steps of each mutual-information refinement (:func:`scripts.refinement.refine_affine`,
            as inference refines); 0 keeps the keypoint solutions and makes no template round.
        template_iterations: rounds of refining every image against the template, re-pinning the group space
            (:func:`repinned`) and rebuilding the template from the refined transforms; 0 keeps the keypoint
            solutions.
    """

    def __init__(
        self,
        dataloader,
        network,
        evaluator,
        intensity_scaling,
        output_dir: str,
        device="cpu",
        aligner: str = "affine",
        search_turns=True,
        turn_search_above_mm: float = 0.0,
        qc_thresholds: dict | None = None,
        template_spacing: float = 1.0,
        template_margin_mm: float = 10.0,
        tolerance_mm: float = 0.01,
        max_iterations: int = 20,
        refine_iterations: int = 60,
        template_iterations: int = 2,
    ):
        if aligner not in MATRIX_ALIGNERS:
            raise KeyMorphInputError(f"--aligner {aligner!r}: groupwise needs one of {', '.join(MATRIX_ALIGNERS)}")
        self.dataloader, self.network, self.evaluator = dataloader, network, evaluator
        self.intensity_scaling, self.output_dir, self.device = intensity_scaling, output_dir, torch.device(device)
        self.aligner, self.search_turns = aligner, as_bool(search_turns, "search_turns")
        self.turn_search_above_mm = float(turn_search_above_mm)
        self.thresholds = {**QC_THRESHOLDS, **{k: float(v) for k, v in (qc_thresholds or {}).items()}}
        self.template_spacing, self.template_margin_mm = float(template_spacing), float(template_margin_mm)
        self.tolerance_mm, self.max_iterations = float(tolerance_mm), int(max_iterations)
        self.refine_iterations, self.template_iterations = int(refine_iterations), int(template_iterations)

    @property
    def template_path(self) -> str:
        return os.path.join(self.output_dir, TEMPLATE_FILE)

    @property
    def template_mask_path(self) -> str:
        return os.path.join(self.output_dir, TEMPLATE_MASK_FILE)

    def _items(self):
        """The preprocessed items, one at a time (failed ones carry ``error``, unread ones ``skipped``)."""
        for batch in self.dataloader:
            yield batch[0]

    def keypoints(self, image) -> torch.Tensor:
        """``(T, K, 3)`` world-mm keypoints of a network-grid image ``(1, D, H, W)`` MetaTensor: as it is and, with
        the turn search, on its grid turned about each pair of axes (one detector pass over the T grids)."""
        data = image.as_tensor()[None].to(self.device)
        affine = affine_of(image)[None].to(self.device)
        grids = [turned(data, affine, axes) for axes in (GRID_TURNS if self.search_turns else GRID_TURNS[:1])]
        self.network.eval()
        with torch.no_grad():
            points = keypoints_world(self.network, torch.cat([g for g, _ in grids]), torch.cat([a for _, a in grids]))
        return points.cpu()

    def collect(self) -> list[GroupMember]:
        """Pass 1: the :class:`GroupMember` of every image that could be preprocessed and detected."""
        members = []
        for item in self._items():
            if item.get("skipped") or "error" in item:
                continue
            try:
                points = self.keypoints(item["image"])
            except Exception as error:  # the last pass gives the image its error row
                if worker_died(error):
                    raise
                logger.debug("keypoints of %s failed", source_path(item), exc_info=True)
                self.evaluator.failures[item["name"]] = message_naming(error, source_path(item))
                continue
            scores = {
                "brain_fill": float(item.get("brain_fill", "nan")),
                "smoothness": float(item.get("smoothness", "nan")),
            }
            outline, contrast = brain_outline(item["native_mask"]), brain_contrast(item["image"], item["mask"])
            members.append(GroupMember(item["name"], points, outline, scores, contrast))
        return members

    def fit(self, members: list[GroupMember]) -> GroupFit:
        """The group space of the members, leaving out of the mean the images QC flags on their own."""
        flagged = torch.tensor([bool(qc_flags(m.scores, self.thresholds)) for m in members])
        return fit_group(
            torch.stack([m.keypoints for m in members]),
            self.aligner,
            self.thresholds["max_residual_mm"],
            flagged,
            self.turn_search_above_mm,
            self.tolerance_mm,
            self.max_iterations,
        )

    def template_grid(self, members: list[GroupMember], group: GroupFit) -> tuple[torch.Tensor, list[int]]:
        """The template grid: world-aligned, ``template_spacing`` mm, holding every included brain's outline mapped
        into the group space, with ``template_margin_mm`` around."""
        to_group = torch.linalg.inv(group.fixed_to_moving[group.included])
        outlines = torch.stack([m.brain_outline for m, keep in zip(members, group.included) if keep])
        mapped = apply_affine(to_group, outlines).reshape(-1, 3)
        return grid_around(mapped, self.template_spacing, margin_mm=self.template_margin_mm)

    @staticmethod
    def contrast_reference(members: list[GroupMember], group: GroupFit) -> str:
        """The name of the image whose contrast the template takes: of the images in the mean, the one with the
        most tissue contrast (:func:`brain_contrast`; in a mixed group, a T1), whatever the order of the folder.
        Mutual information against the template measures alignment by the template's tissues: on held-out subject
        13's T1, T2 and PD, a template in T1 contrast gave a pairwise consistency error of 0.37 mm after one round,
        one in T2 contrast 0.66 mm."""
        contrast = torch.tensor([m.contrast for m in members], dtype=torch.float64)
        return members[int(torch.where(group.included, contrast, torch.full_like(contrast, -1.0)).argmax())].name

    def registered_onto(self, item: dict, fixed_to_moving: torch.Tensor, affine: torch.Tensor, shape) -> tuple:
        """An image (scaled to [0, 1] as the network sees it) and its brain mask resampled onto a grid of the group
        space through its group-to-image matrix: two ``shape`` float32 tensors."""
        original = self.intensity_scaling({"image": item["original"]})["image"]
        values = resample_onto(original.as_tensor().float(), affine_of(original), affine, shape, fixed_to_moving)[0]
        mask = item["native_mask"]
        return values, resample_onto(mask.as_tensor().float(), affine_of(mask), affine, shape, fixed_to_moving)[0]

    def build_template(self, members: list[GroupMember], group: GroupFit) -> None:
        """Write the template of the group's current transforms on :meth:`template_grid`: ``template.nii.gz``, the
        mean of the included registered brains (each scaled to [0, 1], given the contrast of
        :meth:`contrast_reference` by :func:`in_contrast_of`, and weighted by its brain mask: 0 outside the brains),
        and ``template_mask.nii.gz``, the mean of their brain masks (float32). Reads the reference image once more
        (first) and every included image once; holds two template-sized sums and the reference's resampled brain."""
        affine, shape = self.template_grid(members, group)
        index = {m.name: i for i, m in enumerate(members)}
        dataset = self.dataloader.dataset
        reference_name = self.contrast_reference(members, group)
        reference_item = dataset[next(i for i, d in enumerate(dataset.data) if d["name"] == reference_name)]
        reference = None  # unreadable now: the plain mean
        if "error" not in reference_item:
            reference, reference_mask = self.registered_onto(
                reference_item, group.fixed_to_moving[index[reference_name]], affine, shape
            )
        image_sum, mask_sum = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
        count = 0
        for item in self._items():
            number = index.get(item["name"]) if "error" not in item and not item.get("skipped") else None
            if number is None or not bool(group.included[number]):
                continue
            count += 1
            values, mask = self.registered_onto(item, group.fixed_to_moving[number], affine, shape)
            if reference is not None:
                values = in_contrast_of(values, reference, (mask > 0.5) & (reference_mask > 0.5))
            image_sum += values * mask
            mask_sum += mask
        for path, total in ((self.template_path, image_sum), (self.template_mask_path, mask_sum)):
            image = nib.Nifti1Image((total / max(count, 1)).numpy().astype(np.float32), affine.numpy())
            image.set_qform(affine.numpy(), 1)
            image.set_sform(affine.numpy(), 1)
            image.header.set_xyzt_units("mm")
            write_atomically(path, lambda p, img=image: nib.save(img, p))

    def refined(self, template: dict, item: dict, fixed_to_moving: torch.Tensor) -> torch.Tensor:
        """The ``(4, 4)`` group-to-image matrix after ``refine_iterations`` steps of mutual-information refinement
        from ``fixed_to_moving``, on the network grids of the template (``template``: ``image`` and ``mask``) and of
        the image (``item``)."""
        return refine_affine(
            template["image"].as_tensor().to(self.device),
            affine_of(template["image"]).to(self.device),
            template["mask"].as_tensor().to(self.device),
            item["image"].as_tensor().to(self.device),
            affine_of(item["image"]).to(self.device),
            fixed_to_moving.to(self.device),
            self.refine_iterations,
        ).cpu()

    def refine_round(self, members: list[GroupMember], group: GroupFit) -> torch.Tensor:
        """One template round's registrations: every image's group-to-image matrix refined against the current
        template, starting from its current one (``group.fixed_to_moving``); returns them ``(N, 4, 4)``, not yet
        re-pinned. An image whose refinement fails keeps its matrix, leaves the mean and gets an error row (its
        message in the evaluator's ``failures``); one that cannot be read this time keeps its matrix (the last pass
        gives it its error row). A template that cannot be prepared leaves every matrix as it is (the last pass gives
        each case the error)."""
        try:
            template = self.evaluator.fixed_preprocessing({"image": self.template_path})
        except Exception as error:
            logger.warning(f"the template cannot be refined against: {message_naming(error, self.template_path)}")
            return group.fixed_to_moving
        index = {m.name: i for i, m in enumerate(members)}
        matrices = group.fixed_to_moving.clone()
        for item in self._items():
            number = index.get(item["name"]) if "error" not in item and not item.get("skipped") else None
            if number is None or item["name"] in self.evaluator.failures:
                continue
            try:
                matrices[number] = self.refined(template, item, matrices[number])
            except Exception as error:
                if worker_died(error):
                    raise
                logger.debug("refinement of %s failed", source_path(item), exc_info=True)
                self.evaluator.failures[item["name"]] = message_naming(error, source_path(item))
                group.included[number] = False
        return matrices

    def passes(self) -> int:
        """How many times the folder is read: keypoints, template, two per template round, the case outputs."""
        return 3 + 2 * (self.template_iterations if self.refine_iterations else 0)

    @property
    def brain_mask_cache(self) -> str:
        """The folder of :class:`CachedSkullStripd` (``configs/groupwise.yaml`` gives it the same one)."""
        return os.path.join(self.output_dir, BRAIN_MASK_CACHE)

    def run(self) -> None:
        """The passes of the module docstring, each image's brain extracted in the first one only
        (:class:`CachedSkullStripd`: its folder is emptied first and removed at the end, whatever the end); the exit
        code is that of :func:`run_registration`."""
        shutil.rmtree(self.brain_mask_cache, ignore_errors=True)
        try:
            self._run_passes()
        finally:
            shutil.rmtree(self.brain_mask_cache, ignore_errors=True)

    def _run_passes(self) -> None:
        passes = self.passes()
        logger.info(f"groupwise pass 1 of {passes}: the keypoints of {len(self.dataloader.dataset)} input(s)")
        members = self.collect()
        if members:
            group = self.fit(members)
            logger.info(
                f"group space: {int(group.included.sum())} of {len(members)} image(s) in the mean"
                f" ({group.iterations} Procrustes iteration(s), aligner {self.aligner})"
            )
            left_out = [m.name for m, keep in zip(members, group.included) if not keep]
            if left_out:
                logger.warning(f"left out of the group mean and the template (suspect): {', '.join(left_out)}")
            logger.info(f"groupwise pass 2 of {passes}: the template of the keypoint solutions, {self.template_path}")
            self.build_template(members, group)
            keypoint_solution = group.fixed_to_moving
            for round_ in range(1, (passes - 3) // 2 + 1):
                logger.info(f"groupwise pass {2 * round_ + 1} of {passes}: each image refined against the template")
                refined = self.refine_round(members, group)
                group.fixed_to_moving = repinned(refined, keypoint_solution, group.included)
                logger.info(f"groupwise pass {2 * round_ + 2} of {passes}: the template of the refined transforms")
                self.build_template(members, group)
            self.evaluator.group = {
                m.name: GroupCase(
                    group.fixed_to_moving[i],
                    group.mean,
                    m.keypoints[int(group.turns[i])],
                    float(group.residual[i]),
                    bool(group.included[i]),
                )
                for i, m in enumerate(members)
                if m.name not in self.evaluator.failures
            }
        logger.info(f"groupwise pass {passes} of {passes}: each case written with its transform to the template")
        run_registration(self.evaluator)


@workflow_step
def run_groupwise(registration: GroupwiseRegistration, lock) -> None:
    """Run :class:`GroupwiseRegistration` holding the output folder's lock from the first pass on (``lock``: the
    writer's :class:`scripts.output_folder.RunLock`, which the writer releases at the end); one line on a bad input
    folder or a taken output folder."""
    try:
        lock.acquire()
    except KeyMorphInputError as error:
        fail(str(error))
    try:
        with one_line_if_a_worker_dies():
            registration.run()
    finally:
        lock.release()


# --- the last pass: the per-case outputs ------------------------------------------------------------------------


@dataclass
class GroupCase:
    """One image's place in the group: its group-to-image ``fixed_to_moving`` ``(4, 4)``, the group ``mean``
    ``(K, 3)`` and its ``keypoints`` ``(K, 3)`` (world mm), the keypoint ``residual`` (mm) and ``in_template``."""

    fixed_to_moving: torch.Tensor
    mean: torch.Tensor
    keypoints: torch.Tensor
    residual: float
    in_template: bool

    def registration(self) -> Registration:
        """This case as a :class:`scripts.registration.Registration` (batch of one); the residual is the keypoint
        fit's, also when ``fixed_to_moving`` was refined."""
        return Registration(
            self.fixed_to_moving[None], self.mean[None], self.keypoints[None], torch.tensor([self.residual])
        )


class GroupwiseEvaluator(RegistrationEvaluator):
    """The inference evaluator with the group's transforms instead of a fit per pair: the fixed image of every
    case is the template, and each case's registration is its :class:`GroupCase` (``group``, set by
    :class:`GroupwiseRegistration` before the run, with the transform the template was made with). Outputs carry
    ``in_template`` ("yes"/"no") for the summary; a case left out of the mean says why in its message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group: dict[str, GroupCase] = {}
        self.failures: dict[str, str] = {}  # why an image has no transform (no keypoints, refinement failed), by name

    def _iteration(self, engine, batchdata):
        item = batchdata[0]
        case = self.group.get(item["name"])
        if item.get("skipped") or "error" in item:
            return {**super()._iteration(engine, batchdata), "in_template": "no"}
        if case is None:
            message = self.failures.get(item["name"], f"{source_path(item)}: no keypoints in the first pass")
            return {"name": item["name"], "status": "error", "message": message, "seconds": 0.0, "in_template": "no"}
        start = time.perf_counter() - item.get("seconds", 0.0)
        try:
            fixed = self.fixed(item["fixed"])
        except Exception as error:
            if worker_died(error):
                raise
            logger.debug("registration of %s failed", source_path(item), exc_info=True)
            message = message_naming(error, source_path(item))
            return {"name": item["name"], "status": "error", "message": message, "seconds": 0.0, "in_template": "no"}
        if not case.in_template:
            note = "not in the template (excluded from the group mean: suspect before the template was made)"
            item = {**item, "notes": [*item.get("notes", []), note]}
        return {
            "name": item["name"],
            "status": "ok",
            "message": "",
            "seconds": 0.0,
            "registration": case.registration(),
            "fixed": fixed,
            "moving": item,
            "start": start,
            "in_template": "yes" if case.in_template else "no",
        }


class GroupwiseWriter(RegistrationWriter):
    """The inference writer with the ``in_template`` column in ``summary.csv``."""

    summary_columns = GROUPWISE_SUMMARY_COLUMNS

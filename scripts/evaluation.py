"""The robustness sweep of ``configs/evaluate.yaml``: registration accuracy against the initial rotation, for every
pair of modalities.

Cases
-----
For each modality pair ``FIXED-MOVING`` (``T1-T1, T2-T2, PD-PD, T1-T2, T1-PD, T2-PD`` by default), each initial
rotation (``0, 45, 90, 135, 180`` degrees) and each pair index ``k < pairs_per_cell``, one case: a fixed and a moving
image synthesized (:mod:`scripts.synthesis`, preset contrasts) from the held-out label maps, or, with an IXI folder
or a CSV datalist as ``dataset_dir``, real images of the test subjects (:class:`ImageRobustnessDataset`). The first
``ceil(same_subject_fraction * pairs_per_cell)`` pairs of a cell are SAME-subject pairs (one anatomy in two
contrasts: the true transform is known, so both Dice and TRE are scored); the others are DIFFERENT-subject pairs
(Dice only).

Rotation convention
-------------------
The fixed image stays where it is. The moving image is moved by the world affine ::

    M = C(c) @ Tr(t) @ R(axis, angle) @ S(s) @ C(-c)

``C(c)`` a translation to the moving brain's centre ``c`` (centre of mass of its brain mask, world mm), ``S(s)`` a
scale ``s`` drawn uniformly in ``1 +- scale_range`` per world axis, ``R`` a rotation by exactly ``angle`` about an
``axis`` drawn uniformly on the unit sphere, ``Tr(t)`` a translation drawn uniformly in ``+- translate_mm`` per
axis. The true fixed-to-moving world matrix (:mod:`scripts.coordinates`) is ``M`` itself, and as ``R S`` is a polar
decomposition (``S`` symmetric positive definite), the NET rotation of the true transform is exactly ``angle``
(:func:`rotation_angle_deg`). The move itself is exact (the voxels keep their values, the voxel-to-world matrix
becomes ``M @ affine``); with ``resample_moving`` (the default) the moved image and its brain mask are then
resampled onto a world-aligned grid of the original spacing that holds the whole moved field of view, as a scanner
would acquire a turned head, so a method sees interpolated voxels on a grid that did not turn with the head (which
also keeps a rotation from being a mere header change that a method could undo exactly). The moving LABEL map is
only moved, never resampled: it serves the scoring alone. (Real images of one subject in different poses are first
put into the fixed image's pose, see :class:`RobustnessDataset`, so the truth is still ``M``.)

The cases of one modality pair and pair index share their images, axis, scale and translation; only the angle
changes along a curve (a paired design: the curve shows the rotation's effect, not a new draw). Everything is a
function of ``seed``, the modality pair and ``k``: the cases do not depend on their order, on ``epoch_length`` or on
the global random state.

Scores
------
* ``dice``: mean Dice over the brain structures of the fixed label map (:func:`scripts.metrics.mean_dice`), on the
  FIXED image's own grid (its label map at ``spacing`` mm, cropped to the head; NOT the network grid): the moving
  label map is pulled onto that grid by nearest neighbour through the estimated transform. The fixed labels are
  therefore never resampled, and the true transform scores 1 on a synthetic same-subject pair.
* ``tre_mm``: target registration error, the mean distance in mm over the fixed brain voxels between the estimated
  and the true fixed-to-moving transforms (:func:`scripts.metrics.brain_voxel_error`); same-subject pairs only.
* ``seconds``: wall time of the method's call (for KeyMorph: the network on both network-grid images and the fit;
  building the network grids belongs to the data pipeline, as in inference).

Methods
-------
A method is any callable ``method(case) -> (4, 4)`` float64 fixed-to-moving world matrix (RAS mm). It may read
``case["fixed"]`` and ``case["moving"]`` (images on their own grids and on the network grids, see
:class:`RobustnessDataset`), never the truth. :data:`METHODS` names the built-in ones: ``keymorph`` (the network),
``truth`` (the true transform: a check of the scoring, TRE 0) and ``identity`` (no registration: the starting
misalignment). Other methods (ANTs, elastix) plug in as another callable.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import CropForeground, Identityd
from torch.utils.data import Dataset

from scripts.coordinates import (  # noqa: F401 (re-exported)
    affine_of,
    covering_grid_along,
    resample_onto,
    rotation_angle_deg,
)
from scripts.datalists import csv_datalist, detect_source, ixi_datalist, select_subjects
from scripts.errors import KeyMorphInputError, fail, first_line, workflow_step
from scripts.image_pairs import ImagePairDataset
from scripts.metrics import brain_voxel_error, mean_dice
from scripts.settings_checks import writable_folder_problem
from scripts.synthesis import CONTRAST_PRESETS, SynthesizeImaged, load_label_map
from scripts.training_data import find_label_maps
from scripts.transform_io import write_atomically
from scripts.transforms import brain_moments

logger = logging.getLogger(__name__)

MODALITY_PAIRS = ("T1-T1", "T2-T2", "PD-PD", "T1-T2", "T1-PD", "T2-PD")
ROTATIONS_DEG = (0, 45, 90, 135, 180)
CASE_COLUMNS = [
    "case",
    "method",
    "modality_pair",
    "fixed_modality",
    "moving_modality",
    "fixed_subject",
    "moving_subject",
    "same_subject",
    "rotation_deg",
    "dice",
    "tre_mm",
    "seconds",
    "status",
]
OUTPUT_FILES = ("cases.csv", "summary.json", "dice_vs_rotation.png", "tre_vs_rotation.png")


# ---------------------------------------------------------------------------------------------------------------
# The initial misalignment
# ---------------------------------------------------------------------------------------------------------------


def random_axis(rng: np.random.RandomState) -> np.ndarray:
    """A unit vector ``(3,)`` uniform on the sphere (a normalised isotropic Gaussian draw)."""
    while True:
        axis = rng.normal(size=3)
        norm = np.linalg.norm(axis)
        if norm > 1e-8:
            return axis / norm


def axis_angle_rotation(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` by ``angle_deg`` degrees about the unit ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    cross = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    angle = math.radians(angle_deg)
    return np.eye(3) * math.cos(angle) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(a, a)


def misalignment(
    angle_deg: float,
    axis: Sequence[float],
    scale: Sequence[float],
    translation_mm: Sequence[float],
    center_mm: Sequence[float],
) -> torch.Tensor:
    """The move ``M = C(c) Tr(t) R(axis, angle) S(s) C(-c)`` of the module docstring, ``(4, 4)`` float64 (world mm).

    Args:
        angle_deg: net rotation angle in degrees.
        axis: ``(3,)`` rotation axis (normalised here).
        scale: ``(3,)`` scale per world axis, applied before the rotation.
        translation_mm: ``(3,)`` translation in mm, applied after the rotation.
        center_mm: ``(3,)`` world point (mm) the rotation and scale are about.
    """
    center = np.asarray(center_mm, dtype=np.float64)
    linear = axis_angle_rotation(axis, angle_deg) @ np.diag(np.asarray(scale, dtype=np.float64))
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = center - linear @ center + np.asarray(translation_mm, dtype=np.float64)
    return torch.from_numpy(matrix)


def _moved(image: torch.Tensor, matrix: torch.Tensor) -> MetaTensor:
    """The same voxels with the voxel-to-world matrix ``matrix @ affine``: the content moved by ``matrix``, exactly."""
    moved = image.clone() if isinstance(image, MetaTensor) else MetaTensor(torch.as_tensor(image))
    moved.affine = matrix @ affine_of(moved)
    return moved


def resample_world_aligned(image: torch.Tensor, spacing: Sequence[float], mode: str = "bilinear") -> MetaTensor:
    """Resample a ``(1, D, H, W)`` MetaTensor onto the world-aligned (RAS) grid of ``spacing`` mm ``(3,)`` that holds
    its whole field of view (the bounding box of its voxel centres); outside the old field of view is 0.

    ``mode`` "bilinear" (intensities) or "nearest" (masks, labels: dtype kept). Returns the resampled MetaTensor with
    the new grid's affine.
    """
    affine = affine_of(image)
    new_affine, new_shape = covering_grid_along(torch.eye(3, dtype=torch.float64), affine, image.shape[1:], spacing)
    data = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    resampled = resample_onto(data, affine, new_affine, new_shape, torch.eye(4, dtype=torch.float64), mode=mode)
    meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
    meta.pop("affine", None)
    meta["spatial_shape"] = np.array(new_shape)
    return MetaTensor(resampled, affine=new_affine, meta=meta)


def _stable_seed(*parts) -> int:
    """A seed in ``[0, 2**32)`` from strings and integers that does not depend on Python's hash randomisation."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def parse_modality_pair(pair: str) -> tuple[str, str]:
    """``"T1-T2"`` -> ``("T1", "T2")`` (fixed, moving); raises :class:`KeyMorphInputError` for unknown contrasts."""
    parts = str(pair).split("-")
    if len(parts) != 2 or any(p not in CONTRAST_PRESETS for p in parts):
        raise KeyMorphInputError(
            f"modality pair {pair!r}: expected FIXED-MOVING with contrasts among {sorted(CONTRAST_PRESETS)}"
        )
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------------


class RobustnessDataset(Dataset):
    """The cases of the sweep, one dict per case (batch them with ``monai.data.utils.no_collation``).

    A case is ``{"case", "modality_pair", "rotation_deg", "same_subject", "fixed", "moving", "applied_transform",
    "true_fixed_to_moving"}``: ``applied_transform`` is the ``(4, 4)`` float64 world matrix the moving image was
    moved by (``M``, times the pose below); ``true_fixed_to_moving`` is ``M`` for a same-subject pair and None
    otherwise. ``fixed`` and ``moving`` are items ``{"image", "mask", "label"}`` on the image's own grid
    (``(1, D, H, W)`` MetaTensors whose affine is the voxel-to-world matrix; for the moving image, ``image`` and
    ``mask`` are moved and, with ``resample_moving``, resampled onto a world-aligned grid, ``label`` only moved: see
    the module docstring), ``{"net_image", "net_mask"}`` on its network grid (``(1, S, S, S)``, from ``frame``),
    ``"subject"`` and ``"modality"``.

    Subclasses provide the images: :meth:`base_pair` returns the unmoved fixed and moving items of pair ``k`` of a
    modality pair. :class:`SyntheticRobustnessDataset` synthesizes them from label maps,
    :class:`ImageRobustnessDataset` reads real images (an IXI folder or a CSV datalist).

    A same-subject pair whose items carry ``world_transform`` ``W`` (the subject's common world -> the image's
    world, see :mod:`scripts.datalists`) is first put into the fixed image's pose: the moving image is moved by
    ``M @ W_f @ inv(W_m)``, so the true fixed-to-moving transform is still exactly ``M`` with the stated angle.

    Args:
        frame: a :class:`scripts.transforms.BrainFramed` (keys ``image``, mask_key ``mask``) building the network grid.
        modality_pairs: ``"FIXED-MOVING"`` contrast pairs.
        rotations: net initial rotation angles, degrees in ``[0, 180]``.
        pairs_per_cell: pairs per modality pair and rotation.
        same_subject_fraction: the first ``ceil(fraction * pairs_per_cell)`` pairs of a cell are same-subject pairs.
        scale_range: scale per axis drawn in ``1 +- scale_range``.
        translate_mm: translation per axis drawn in ``+- translate_mm``.
        resample_moving: resample the moved image and mask onto a world-aligned grid (else only move the header).
        max_cases: keep only the first cases (order: modality pair, pair index, rotation); None keeps all.
        seed: the seed every draw derives from.
    """

    def __init__(
        self,
        frame,
        modality_pairs: Sequence[str] = MODALITY_PAIRS,
        rotations: Sequence[float] = ROTATIONS_DEG,
        pairs_per_cell: int = 2,
        same_subject_fraction: float = 0.5,
        scale_range: float = 0.1,
        translate_mm: float = 10.0,
        resample_moving: bool = True,
        max_cases: int | None = None,
        seed: int = 0,
    ):
        self.frame = frame
        self.resample_moving = bool(resample_moving)
        self.modality_pairs = [str(p) for p in modality_pairs]
        for pair in self.modality_pairs:
            parse_modality_pair(pair)
        self.rotations = [float(r) for r in rotations]
        if any(not 0.0 <= r <= 180.0 for r in self.rotations):
            raise KeyMorphInputError(
                f"rotations {list(rotations)}: net rotation angles must be within [0, 180] degrees"
            )
        if int(pairs_per_cell) < 1:
            raise KeyMorphInputError(f"pairs_per_cell {pairs_per_cell}: need at least 1")
        self.pairs_per_cell = int(pairs_per_cell)
        self.n_same = min(self.pairs_per_cell, math.ceil(float(same_subject_fraction) * self.pairs_per_cell))
        self.scale_range, self.translate_mm = float(scale_range), float(translate_mm)
        self.seed = int(seed)
        cases = [(p, k, r) for p in self.modality_pairs for k in range(self.pairs_per_cell) for r in self.rotations]
        self.cases = cases if max_cases is None else cases[: int(max_cases)]
        # rotation is the innermost loop: one cached base pair serves all the angles of a curve
        self._bases: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.cases)

    def same_subject(self, k: int) -> bool:
        return k < self.n_same

    def base_pair(self, modality_pair: str, k: int, rng: np.random.RandomState) -> tuple[dict, dict]:
        """The unmoved ``(fixed, moving)`` items of pair ``k`` of ``modality_pair``: ``{"image", "mask"[, "label"],
        "subject", "modality"[, "world_transform"]}`` each, on their own grids; draws come from ``rng`` only. A
        same-subject pair (:meth:`same_subject`) must show one anatomy, related by the items' ``world_transform``
        (identity when absent)."""
        raise NotImplementedError

    def _base(self, modality_pair: str, k: int) -> dict:
        key = (modality_pair, k)
        if key not in self._bases:
            rng = np.random.RandomState(_stable_seed(self.seed, modality_pair, k))
            fixed, moving = self.base_pair(modality_pair, k, rng)
            fixed.update(self._framed(fixed))
            # same subject: into the fixed image's pose first (exact, through the headers)
            pose = torch.eye(4, dtype=torch.float64)
            if self.same_subject(k):
                world_fixed = torch.as_tensor(fixed.get("world_transform", torch.eye(4)), dtype=torch.float64)
                world_moving = torch.as_tensor(moving.get("world_transform", torch.eye(4)), dtype=torch.float64)
                pose = world_fixed @ torch.linalg.inv(world_moving)
            center = brain_moments(moving["mask"])[0]
            self._bases[key] = {
                "fixed": fixed,
                "moving": moving,
                "pose": pose,
                "axis": random_axis(rng),
                "scale": rng.uniform(1 - self.scale_range, 1 + self.scale_range, 3),
                "translation": rng.uniform(-self.translate_mm, self.translate_mm, 3),
                "center": (pose[:3, :3] @ center + pose[:3, 3]).numpy(),
            }
            while len(self._bases) > 1:
                self._bases.popitem(last=False)
        return self._bases[key]

    def _framed(self, item: dict) -> dict:
        out = self.frame({"image": item["image"], "mask": item["mask"]})
        return {"net_image": out["image"], "net_mask": out["mask"]}

    def __getitem__(self, index: int) -> dict:
        modality_pair, k, angle = self.cases[index]
        base = self._base(modality_pair, k)
        truth = misalignment(angle, base["axis"], base["scale"], base["translation"], base["center"])
        move = truth @ base["pose"]
        moving = dict(base["moving"])
        for key in ("image", "mask", "label"):
            if key in moving:
                moving[key] = _moved(moving[key], move)
        if self.resample_moving:
            spacing = affine_of(base["moving"]["image"])[:3, :3].norm(dim=0)
            moving["image"] = resample_world_aligned(moving["image"], spacing, "bilinear")
            moving["mask"] = resample_world_aligned(moving["mask"], spacing, "nearest")
        moving.update(self._framed(moving))
        fixed = dict(base["fixed"])
        for item in (fixed, moving):  # the poses before the move: no longer what the images show
            item.pop("world_transform", None)
        same = self.same_subject(k)
        return {
            "case": index,
            "modality_pair": modality_pair,
            "rotation_deg": angle,
            "same_subject": same,
            "fixed": fixed,
            "moving": moving,
            "applied_transform": move,
            "true_fixed_to_moving": truth if same else None,
        }


class SyntheticRobustnessDataset(RobustnessDataset):
    """Cases synthesized from held-out label maps (see the module docstring).

    Same-subject pairs: one label map, two contrasts (the moving image re-uses the fixed image's anatomy, so the
    labels agree voxel for voxel). Different-subject pairs: two distinct label maps. Label maps are read once,
    resampled to ``spacing`` mm and cropped to the head.

    Args:
        label_maps: ``{subject id: path}`` of the held-out label maps.
        frame: see :class:`RobustnessDataset`.
        synthesis: keyword arguments of :class:`scripts.synthesis.SynthesizeImaged` except ``contrast`` (set per
            image from the modality pair), e.g. ``{"deform_std": 0.0, "skull_probability": 0.0}``.
        spacing: label map spacing in mm (also the grid Dice is measured on).
        kwargs: the other arguments of :class:`RobustnessDataset`.
    """

    def __init__(
        self, label_maps: dict[str, str], frame, synthesis: dict | None = None, spacing: float = 2.0, **kwargs
    ):
        super().__init__(frame, **kwargs)
        self.label_maps = dict(label_maps)
        self.subjects = sorted(self.label_maps)
        if not self.subjects:
            raise KeyMorphInputError("no held-out label maps to evaluate on")
        if self.n_same < self.pairs_per_cell and len(self.subjects) < 2:
            raise KeyMorphInputError(
                f"different-subject pairs need at least 2 subjects, got {self.subjects}; add test_subjects or set "
                "same_subject_fraction: 1.0"
            )
        self.synthesis = {"deform_std": 0.0, "skull_probability": 0.0, **dict(synthesis or {})}
        self.synthesis.pop("contrast", None)
        self.spacing = float(spacing)
        self.crop = CropForeground(select_fn=lambda labels: labels > 0, margin=4)
        self._label_cache: dict[str, torch.Tensor] = {}

    def label_map(self, subject: str) -> torch.Tensor:
        if subject not in self._label_cache:
            self._label_cache[subject] = self.crop(load_label_map(self.label_maps[subject], spacing=self.spacing))
        return self._label_cache[subject]

    def _synthesize(self, label: torch.Tensor, contrast: str, seed: int, deform: bool) -> dict:
        arguments = dict(self.synthesis)
        if not deform:
            arguments["deform_std"] = 0.0
        transform = SynthesizeImaged(contrast=contrast, **arguments)
        transform.set_random_state(seed=seed)
        return transform({"label": label})

    def base_pair(self, modality_pair: str, k: int, rng: np.random.RandomState) -> tuple[dict, dict]:
        fixed_modality, moving_modality = parse_modality_pair(modality_pair)
        fixed_seed, moving_seed = (int(s) for s in rng.randint(0, 2**31 - 1, 2))
        if self.same_subject(k):
            fixed_subject = moving_subject = self.subjects[rng.randint(len(self.subjects))]
        else:
            fixed_subject, moving_subject = (self.subjects[i] for i in rng.choice(len(self.subjects), 2, replace=False))
        fixed = self._synthesize(self.label_map(fixed_subject), fixed_modality, fixed_seed, deform=True)
        if self.same_subject(k):
            # the same (possibly deformed) anatomy in the second contrast: no second deformation
            moving = self._synthesize(fixed["label"].clone(), moving_modality, moving_seed, deform=False)
        else:
            moving = self._synthesize(self.label_map(moving_subject), moving_modality, moving_seed, deform=True)
        fixed.update(subject=fixed_subject, modality=fixed_modality)
        moving.update(subject=moving_subject, modality=moving_modality)
        return fixed, moving


class ImageRobustnessDataset(RobustnessDataset):
    """Cases of real images: an IXI folder or a CSV datalist (:mod:`scripts.datalists`), prepared once as in
    training (:class:`scripts.image_pairs.ImagePreparation`: RAS, [0, 1] intensities, brain mask from the
    mask file or ``skull_strip``, labels onto the image grid, ``spacing`` mm, cropped to the brain).

    A same-subject pair takes one subject's images of the two modalities (one image against itself when the
    modalities are equal and the subject has one such image, e.g. IXI's single T1); its truth rests on the
    images' ``world_transform`` (the identity when the datalist has none: scans of one session taken to share
    scanner coordinates, so the TRE then includes any head motion between the scans; exact for IXI's dual-echo
    T2/PD). A different-subject pair takes an image of each modality from two subjects. Dice needs label files.

    Args:
        datalist: the test images.
        frame: see :class:`RobustnessDataset`.
        preprocessing, spacing, skull_strip: see :class:`scripts.image_pairs.ImagePairDataset`.
        kwargs: the other arguments of :class:`RobustnessDataset`.
    """

    def __init__(
        self, datalist: list[dict], frame, preprocessing=None, spacing: float = 2.0, skull_strip="deepbet", **kwargs
    ):
        super().__init__(frame, **kwargs)
        images = ImagePairDataset(datalist, 0, Identityd(keys="image"), frame, preprocessing, spacing, 0.5, skull_strip)
        self.entries, self.prepared, self.worlds = images.datalist, images.cache, images.world
        self.subjects = sorted({entry["subject"] for entry in self.entries})
        for modality_pair in self.modality_pairs:
            fixed_modality, moving_modality = parse_modality_pair(modality_pair)
            if self.n_same and not self._same_candidates(fixed_modality, moving_modality):
                raise KeyMorphInputError(
                    f"no test subject has both a {fixed_modality} and a {moving_modality} image (same-subject pairs"
                    f" of {modality_pair})"
                )
            if self.n_same < self.pairs_per_cell and not self._different_candidates(fixed_modality, moving_modality):
                raise KeyMorphInputError(
                    f"no two test subjects with a {fixed_modality} and a {moving_modality} image (different-subject"
                    f" pairs of {modality_pair})"
                )

    def _images(self, subject: str, modality: str) -> list[int]:
        return [i for i, e in enumerate(self.entries) if e["subject"] == subject and e["modality"] == modality]

    def _same_candidates(self, fixed_modality: str, moving_modality: str) -> list[str]:
        return [s for s in self.subjects if self._images(s, fixed_modality) and self._images(s, moving_modality)]

    def _different_candidates(self, fixed_modality: str, moving_modality: str) -> list[tuple[str, str]]:
        return [
            (a, b)
            for a in self.subjects
            for b in self.subjects
            if a != b and self._images(a, fixed_modality) and self._images(b, moving_modality)
        ]

    def _item(self, index: int) -> dict:
        entry = self.entries[index]
        item = dict(self.prepared[index])
        item["mask"] = item["mask"].to(torch.float32)
        item.update(subject=entry["subject"], modality=entry["modality"], world_transform=self.worlds[index])
        return item

    def base_pair(self, modality_pair: str, k: int, rng: np.random.RandomState) -> tuple[dict, dict]:
        fixed_modality, moving_modality = parse_modality_pair(modality_pair)
        if self.same_subject(k):
            candidates = self._same_candidates(fixed_modality, moving_modality)
            subject = candidates[rng.randint(len(candidates))]
            fixed_images, moving_images = self._images(subject, fixed_modality), self._images(subject, moving_modality)
            fixed_index = fixed_images[rng.randint(len(fixed_images))]
            others = [i for i in moving_images if i != fixed_index] or moving_images
            moving_index = others[rng.randint(len(others))]
        else:
            candidates = self._different_candidates(fixed_modality, moving_modality)
            fixed_subject, moving_subject = candidates[rng.randint(len(candidates))]
            fixed_images = self._images(fixed_subject, fixed_modality)
            moving_images = self._images(moving_subject, moving_modality)
            fixed_index = fixed_images[rng.randint(len(fixed_images))]
            moving_index = moving_images[rng.randint(len(moving_images))]
        return self._item(fixed_index), self._item(moving_index)


def _subject_id(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def held_out_label_maps(source: str, subjects: Sequence[str]) -> dict[str, str]:
    """``{subject id: path}`` of the label maps in the folder ``source`` whose file names contain an entry of
    ``subjects``; raises :class:`KeyMorphInputError` (one line) when a subject has none."""
    paths = find_label_maps(source)
    label_maps = {}
    for subject in subjects:
        found = [p for p in paths if subject and subject in os.path.basename(p)]
        if not found:
            raise KeyMorphInputError(f"{source}: no label map of the test subject {subject!r}")
        for path in found:
            label_maps[_subject_id(path)] = path
    return label_maps


def held_out_datalist(source: str, subjects: Sequence[str]) -> list[dict]:
    """The test images of an IXI folder or a CSV datalist: the CSV's ``split == "test"`` rows when it has a split
    column, else the images whose subject contains an entry of ``subjects``."""
    datalist = csv_datalist(source) if detect_source(source) == "csv" else ixi_datalist(source)
    return select_subjects(datalist, "test", include=list(subjects), source=source)


def make_robustness_dataset(
    source: str,
    subjects: Sequence[str],
    frame,
    spacing: float = 2.0,
    synthesis: dict | None = None,
    preprocessing=None,
    skull_strip: str = "deepbet",
    **kwargs,
) -> RobustnessDataset:
    """The sweep's dataset for ``source`` (``dataset_dir``, see :func:`scripts.datalists.detect_source`).

    A folder of label maps gives :class:`SyntheticRobustnessDataset` on the label maps whose file names contain an
    entry of ``subjects`` (the held-out test subjects; ``synthesis`` used); an IXI folder or a CSV datalist gives
    :class:`ImageRobustnessDataset` on the test images (:func:`held_out_datalist`; ``preprocessing`` and
    ``skull_strip`` used). ``kwargs`` go to :class:`RobustnessDataset`. Raises :class:`KeyMorphInputError`.
    """
    if detect_source(source) == "label_maps":
        label_maps = held_out_label_maps(source, subjects)
        return SyntheticRobustnessDataset(label_maps, frame, synthesis, spacing, **kwargs)
    datalist = held_out_datalist(source, subjects)
    return ImageRobustnessDataset(datalist, frame, preprocessing, spacing, skull_strip, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Methods: case -> (4, 4) fixed-to-moving world matrix
# ---------------------------------------------------------------------------------------------------------------


def _batched(image: torch.Tensor, device) -> MetaTensor:
    """``(1, S, S, S)`` MetaTensor -> ``(1, 1, S, S, S)`` on ``device`` with its ``(4, 4)`` affine."""
    data = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    return MetaTensor(data[None].to(device=device, dtype=torch.float32), affine=torch.as_tensor(image.affine))


class KeyMorphMethod:
    """KeyMorph: ``inferer(fixed, moving, network)`` on the two network-grid images (``net_image``).

    Args:
        network: the keypoint detector (weights loaded by the engine's CheckpointLoader).
        inferer: a :class:`scripts.registration.KeyMorphInferer` (its aligner sets the fit).
        device: where the network runs.
    """

    name = "keymorph"

    def __init__(self, network: torch.nn.Module, inferer, device="cpu"):
        self.network, self.inferer, self.device = network, inferer, torch.device(device)

    def __call__(self, case: dict) -> torch.Tensor:
        self.network.eval()
        with torch.no_grad():
            registration = self.inferer(
                _batched(case["fixed"]["net_image"], self.device),
                _batched(case["moving"]["net_image"], self.device),
                self.network,
            )
        return registration.fixed_to_moving[0].detach().cpu().to(torch.float64)


class TrueTransform:
    """The true transform of a same-subject pair, the applied move otherwise: a check of the scoring code (TRE 0,
    Dice 1 on synthetic same-subject pairs) and, on different-subject pairs, the alignment the subjects had before
    the move."""

    name = "truth"

    def __call__(self, case: dict) -> torch.Tensor:
        truth = case.get("true_fixed_to_moving")
        return torch.as_tensor(case["applied_transform"] if truth is None else truth, dtype=torch.float64).clone()


class IdentityTransform:
    """No registration: the scores of the starting misalignment."""

    name = "identity"

    def __call__(self, case: dict) -> torch.Tensor:
        return torch.eye(4, dtype=torch.float64)


#: Built-in methods by name: ``factory(network, inferer, device) -> method``.
METHODS: dict[str, Callable] = {
    "keymorph": KeyMorphMethod,
    "truth": lambda network, inferer, device: TrueTransform(),
    "identity": lambda network, inferer, device: IdentityTransform(),
}


def make_method(method, network: torch.nn.Module | None = None, inferer=None, device="cpu") -> Callable:
    """A method from its name in :data:`METHODS`, or ``method`` itself when it is already a callable."""
    if callable(method):
        return method
    if method not in METHODS:
        raise KeyMorphInputError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    return METHODS[method](network, inferer, device)


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


def score_case(case: dict, matrix: torch.Tensor) -> tuple[float, float]:
    """``(dice, tre_mm)`` of an estimated fixed-to-moving matrix ``(4, 4)`` for a case (module docstring, Scores).

    Dice is NaN without label maps; TRE is NaN when the truth is unknown.
    """
    fixed, moving = case["fixed"], case["moving"]
    dice = float("nan")
    if "label" in fixed and "label" in moving:
        target = fixed["label"]
        warped = resample_onto(
            moving["label"].as_tensor(),
            affine_of(moving["label"]),
            affine_of(target),
            target.shape[1:],
            matrix,
            mode="nearest",
        )
        dice = float(mean_dice(warped[None], target.as_tensor()[None])[0])
    tre = float("nan")
    truth = case.get("true_fixed_to_moving")
    if truth is not None:
        tre = float(
            brain_voxel_error(matrix[None], torch.as_tensor(truth, dtype=torch.float64)[None], [fixed["mask"]])[0]
        )
    return dice, tre


class FiniteMean(Metric):
    """Ignite metric: the mean of the finite values of the outputs over a pass (a float or a tensor of per-case
    values per iteration); NaN when there is none. The sweep's key metric ``mean_dice`` is this on ``dice``."""

    def reset(self) -> None:
        self._sum, self._count = 0.0, 0

    def update(self, output) -> None:
        values = torch.as_tensor(output, dtype=torch.float64).detach().cpu().flatten()
        values = values[torch.isfinite(values)]
        self._sum += float(values.sum())
        self._count += int(values.numel())

    def compute(self) -> float:
        return self._sum / self._count if self._count else float("nan")


class RobustnessEvaluator(SupervisedEvaluator):
    """One pass over the sweep's cases; each iteration estimates and scores the cases of its batch.

    The iteration output is ``{"rows": [one dict per case, keys CASE_COLUMNS], "dice": (B,) float64 tensor of
    their Dice (NaN without labels)}`` (the key metric ``mean_dice``, a :class:`FiniteMean`, averages the latter;
    :class:`RobustnessReport` writes the former).

    Args:
        method: a name of :data:`METHODS` or a callable ``case -> (4, 4)`` fixed-to-moving world matrix.
        max_epochs: accepted for uniformity with the training configs; the cases are fixed, so one pass is made.
        kwargs: :class:`monai.engines.SupervisedEvaluator` arguments (``device``, ``val_data_loader``, ``network``,
            ``inferer``, ``key_val_metric``, ``val_handlers``, ...).
    """

    def __init__(self, *args, method="keymorph", max_epochs: int = 1, **kwargs):
        kwargs.setdefault("decollate", False)  # the batch is a list of case dicts; nothing to decollate
        super().__init__(*args, **kwargs)
        self.max_epochs = int(max_epochs)
        if self.max_epochs != 1:
            logger.warning(f"max_epochs {max_epochs}: the evaluation cases are fixed; running one pass")
        self.method = make_method(method, self.network, self.inferer, self.state.device)
        self.method_name = getattr(self.method, "name", getattr(self.method, "__name__", type(self.method).__name__))

    def evaluate_case(self, case: dict) -> dict:
        """Estimate and score one case; returns its row of ``cases.csv``.

        A method that raises or returns no finite 4x4 matrix fails the case (``status`` says why): Dice 0, no TRE.
        """
        status, matrix = "ok", None
        start = time.perf_counter()
        try:
            matrix = torch.as_tensor(self.method(case), dtype=torch.float64).cpu()
            if torch.device(self.state.device).type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # one failing case (an external tool crashing) must not stop the sweep
            reason = first_line(str(error))
            status = f"failed: {type(error).__name__}: {reason}"
        seconds = time.perf_counter() - start
        if status == "ok" and (matrix.shape != (4, 4) or not torch.isfinite(matrix).all()):
            status = "failed: the method returned no finite 4x4 matrix"
        if status == "ok":
            dice, tre = score_case(case, matrix)
        else:
            logger.warning(f"case {case['case']}: {status}")
            dice, tre = (0.0 if "label" in case["fixed"] else float("nan")), float("nan")
        fixed_modality, moving_modality = parse_modality_pair(case["modality_pair"])
        return {
            "case": case["case"],
            "method": self.method_name,
            "modality_pair": case["modality_pair"],
            "fixed_modality": fixed_modality,
            "moving_modality": moving_modality,
            "fixed_subject": case["fixed"].get("subject", ""),
            "moving_subject": case["moving"].get("subject", ""),
            "same_subject": bool(case["same_subject"]),
            "rotation_deg": float(case["rotation_deg"]),
            "dice": dice,
            "tre_mm": tre,
            "seconds": seconds,
            "status": status,
        }

    def _iteration(self, engine: Engine, batchdata: list[dict]) -> dict:
        rows = [self.evaluate_case(case) for case in batchdata]
        return {"rows": rows, "dice": torch.tensor([row["dice"] for row in rows], dtype=torch.float64)}


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _stats(rows: list[dict]) -> dict:
    """Mean/std Dice, mean/median TRE (mm), mean/median seconds and counts of a group of rows (None when empty).

    ``dice_std`` is the sample standard deviation (None for fewer than 2 cases). Failed cases count in Dice as 0
    and have no TRE; ``n_failed`` says how many there are.
    """
    dice = np.array([r["dice"] for r in rows], dtype=np.float64)
    dice = dice[np.isfinite(dice)]
    tre = np.array([r["tre_mm"] for r in rows], dtype=np.float64)
    tre = tre[np.isfinite(tre)]
    seconds = np.array([r["seconds"] for r in rows], dtype=np.float64)

    def value(x) -> float | None:
        return None if x is None or not np.isfinite(x) else round(float(x), 6)

    return {
        "n": len(rows),
        "dice_mean": value(dice.mean()) if len(dice) else None,
        "dice_std": value(dice.std(ddof=1)) if len(dice) > 1 else None,
        "n_tre": int(len(tre)),
        "tre_mean_mm": value(tre.mean()) if len(tre) else None,
        "tre_median_mm": value(np.median(tre)) if len(tre) else None,
        "seconds_mean": value(seconds.mean()) if len(seconds) else None,
        "seconds_median": value(np.median(seconds)) if len(seconds) else None,
        "n_failed": sum(r["status"] != "ok" for r in rows),
    }


def _angle_key(angle: float) -> str:
    return f"{angle:g}"


def summarize(rows: list[dict]) -> dict:
    """``summary.json``: statistics (:func:`_stats`) overall, per rotation, per modality pair, and per modality pair
    and rotation. Angles are keys such as ``"45"``."""
    pairs = list(dict.fromkeys(r["modality_pair"] for r in rows))
    angles = sorted({r["rotation_deg"] for r in rows})
    overall = _stats(rows)
    return {
        "method": rows[0]["method"] if rows else None,
        "mean_dice": overall["dice_mean"],
        "overall": overall,
        "by_rotation": {_angle_key(a): _stats([r for r in rows if r["rotation_deg"] == a]) for a in angles},
        "by_modality_pair": {
            pair: {
                "overall": _stats([r for r in rows if r["modality_pair"] == pair]),
                "by_rotation": {
                    _angle_key(a): _stats([r for r in rows if r["modality_pair"] == pair and r["rotation_deg"] == a])
                    for a in angles
                    if any(r["modality_pair"] == pair and r["rotation_deg"] == a for r in rows)
                },
            }
            for pair in pairs
        },
    }


def write_cases_csv(path: str, rows: list[dict], columns: list[str] = CASE_COLUMNS, sort_key=None) -> None:
    """``cases.csv``: one row per case (sorted by ``sort_key``, default the case number), ``columns`` (default
    :data:`CASE_COLUMNS`); unknown values (missing or NaN) are empty. Written atomically."""

    def cell(value):
        if isinstance(value, float):
            return "" if not math.isfinite(value) else f"{value:.6g}"
        return value

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in sorted(rows, key=sort_key or (lambda r: r["case"])):
                writer.writerow({column: cell(row.get(column, "")) for column in columns})

    write_atomically(path, write)


def plot_against_rotation(path: str, summary: dict, statistic: str, ylabel: str, title: str) -> None:
    """One line per modality pair of ``summary["by_modality_pair"][pair]["by_rotation"][angle][statistic]``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    plotted = False
    for pair, group in summary["by_modality_pair"].items():
        points = [(float(a), s[statistic]) for a, s in group["by_rotation"].items() if s[statistic] is not None]
        if points:
            angles, values = zip(*sorted(points))
            ax.plot(angles, values, marker="o", label=pair)
            plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no values (truth or labels unknown)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("initial rotation (degrees, net angle)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({float(a) for g in summary["by_modality_pair"].values() for a in g["by_rotation"]}))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(title="fixed-moving", fontsize="small")
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


class RobustnessReport:
    """Ignite handler: collects the rows of every iteration and, when the pass completes, writes ``cases.csv``,
    ``summary.json``, ``dice_vs_rotation.png`` and ``tre_vs_rotation.png`` into ``output_dir`` (each atomically).

    ``engine.state.robustness_summary`` holds the summary afterwards.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine) -> None:
        self.rows = []

    def collect(self, engine: Engine) -> None:
        self.rows.extend(engine.state.output["rows"])

    def write(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        summary = summarize(self.rows)
        write_cases_csv(os.path.join(self.output_dir, "cases.csv"), self.rows)

        def dump(temporary: str) -> None:
            with open(temporary, "w") as handle:
                json.dump(summary, handle, indent=2)
                handle.write("\n")

        write_atomically(os.path.join(self.output_dir, "summary.json"), dump)
        method = summary["method"]
        plot_against_rotation(
            os.path.join(self.output_dir, "dice_vs_rotation.png"),
            summary,
            "dice_mean",
            "mean Dice of brain structures",
            f"{method}: Dice against the initial rotation",
        )
        plot_against_rotation(
            os.path.join(self.output_dir, "tre_vs_rotation.png"),
            summary,
            "tre_mean_mm",
            "mean TRE over the brain (mm)",
            f"{method}: TRE (same-subject pairs) against the initial rotation",
        )
        engine.state.robustness_summary = summary
        overall = summary["overall"]
        logger.info(
            f"{overall['n']} cases: mean Dice {overall['dice_mean']}, mean TRE {overall['tre_mean_mm']} mm; "
            f"outputs in {os.path.abspath(self.output_dir)}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Command-line entry points
# ---------------------------------------------------------------------------------------------------------------


@workflow_step
def check_evaluation_settings(
    dataset_dir: str,
    output_dir: str,
    ckpt_path: str,
    method,
    test_subjects: Sequence[str] = (),
    modality_pairs: Sequence[str] = (),
    rotations: Sequence[float] = (),
) -> None:
    """Check, before any work starts, what would otherwise fail late: exits with one line on the first problem."""
    if not callable(method) and method not in METHODS:
        fail(f"--method {method!r} is not one of {', '.join(METHODS)}")
    try:
        for pair in modality_pairs:
            parse_modality_pair(pair)
    except KeyMorphInputError as error:
        fail(f"--modality_pairs: {error}")
    if any(not 0.0 <= float(r) <= 180.0 for r in rotations):
        fail(f"--rotations {list(rotations)}: net rotation angles must be within [0, 180] degrees")
    if not os.path.exists(dataset_dir):
        fail(f"{dataset_dir}: dataset_dir not found (--dataset_dir)")
    try:
        if detect_source(dataset_dir) == "label_maps":
            held_out_label_maps(dataset_dir, test_subjects)
        else:
            held_out_datalist(dataset_dir, test_subjects)
    except KeyMorphInputError as error:
        fail(str(error))
    if method == "keymorph" and not os.path.isfile(ckpt_path):
        fail(f"{ckpt_path}: model weights not found (--ckpt_path)")
    problem = writable_folder_problem(output_dir)
    if problem:
        fail(problem)


@workflow_step
def run_evaluation(evaluator: RobustnessEvaluator) -> None:
    """Run the sweep; a :class:`KeyMorphInputError` (bad data or setting) exits 2 with one line."""
    try:
        evaluator.run()
    except KeyMorphInputError as error:
        fail(str(error))

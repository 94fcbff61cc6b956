"""The cases of the robustness sweep (``configs/evaluate.yaml``, :mod:`scripts.evaluation`) and of the benchmarks:
pairs of images with a known initial misalignment.

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
(:func:`scripts.coordinates.rotation_angle_deg`). The move itself is exact (the voxels keep their values, the voxel-to-world matrix
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

The moves are built by :mod:`scripts.random_motions`; the scoring is :mod:`scripts.evaluation`.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import CropForeground, Identityd
from torch.utils.data import Dataset

from scripts.brain_frame import brain_moments
from scripts.coordinates import affine_of
from scripts.datalists import csv_datalist, detect_source, ixi_datalist, select_subjects
from scripts.errors import KeyMorphInputError
from scripts.image_io import moved_by, nifti_stem, resample_world_aligned
from scripts.image_pairs import ImagePairDataset
from scripts.random_motions import misalignment, random_axis
from scripts.synthesis import CONTRAST_PRESETS, SynthesizeImaged, load_label_map
from scripts.training_data import find_label_maps

MODALITY_PAIRS = ("T1-T1", "T2-T2", "PD-PD", "T1-T2", "T1-PD", "T2-PD")
ROTATIONS_DEG = (0, 45, 90, 135, 180)


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
        frame: a :class:`scripts.brain_frame.BrainFramed` (keys ``image``, mask_key ``mask``) building the network grid.
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
                moving[key] = moved_by(moving[key], move)
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
            label_maps[nifti_stem(path)] = path
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

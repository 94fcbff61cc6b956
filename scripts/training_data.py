"""Training data. Pairs: two images on their network grids, with labels, masks and, for one subject, the true transform.
Pretraining items: one reference subject's image moved by a random affine, with K reference points that move with it.

A pair is ``{"fixed": item, "moving": item, "same_subject": bool}``; an item is the dict of one image after the
training pipeline (``image``, ``mask`` and optional ``label`` as ``(1, S, S, S)`` MetaTensors on the network grid,
whose ``affine`` is that grid's voxel-to-world matrix, plus ``world_transform``: the ``(4, 4)`` random affine the
augmentation applied, and ``modality``). For two images of one subject the true fixed-to-moving world matrix is
``T_moving @ inv(T_fixed)`` (see :func:`true_fixed_to_moving`).
"""

from __future__ import annotations

import copy
import glob
import logging
import os

import numpy as np
import torch
from monai.transforms import CropForeground
from torch.utils.data import Dataset

from scripts.coordinates import apply_affine
from scripts.datalists import csv_datalist, detect_source, ixi_datalist, select_subjects
from scripts.errors import KeyMorphInputError
from scripts.image_pairs import ImagePairDataset, ImagePreparation, world_transforms
from scripts.random_draws import RandomDrawDataset, random_points_in_mask
from scripts.synthesis import EXTRA_CEREBRAL_MIN, load_label_map

logger = logging.getLogger(__name__)


def true_fixed_to_moving(pair: dict) -> torch.Tensor:
    """``(4, 4)`` float64 fixed-to-moving world matrix of a same-subject pair (both moved by known affines)."""
    return pair["moving"]["world_transform"] @ torch.linalg.inv(pair["fixed"]["world_transform"])


def find_label_maps(label_maps_dir: str, exclude: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Sorted ``.nii``/``.nii.gz`` label maps of a folder, without those whose file name contains any of ``exclude``
    (held-out evaluation subjects). Raises :class:`KeyMorphInputError` when there are none."""
    paths = sorted(glob.glob(os.path.join(label_maps_dir, "*.nii*")))
    paths = [p for p in paths if not any(e and e in os.path.basename(p) for e in exclude)]
    if not paths:
        raise KeyMorphInputError(f"{label_maps_dir}: no label maps (.nii/.nii.gz) to synthesize training images from")
    return paths


class SyntheticPairDataset(RandomDrawDataset):
    """Pairs of images synthesized on the fly from label maps (SynthMorph-style training data).

    Each draw picks two label maps (different subjects), or with ``same_subject_probability`` one label map seen
    in two contrasts (deformed once, so the true transform between the two is exactly the augmentations' affine).
    Each image then goes through ``mask_errors`` (a :class:`scripts.mask_errors.RandBrainMaskErrord`: skull
    stripping with a brain extractor's errors, as at inference), ``augmentation`` (a
    :class:`scripts.random_motions.RandWorldAffined`) and ``frame`` (a :class:`scripts.brain_frame.BrainFramed`). Label maps are read once, resampled to ``spacing`` mm, and kept.

    Args:
        label_maps: paths of label maps.
        length: pairs per epoch (the draws are random; the index only counts).
        synthesis: a :class:`scripts.synthesis.SynthesizeImaged` (keys label -> image, label, mask).
        augmentation: random world affine applied to image, label and mask.
        frame: network-grid resampling of image, mask and label.
        spacing: spacing (mm) the label maps are resampled to before synthesis (then cropped to the head).
        same_subject_probability: probability of a same-subject, two-contrast pair.
        mask_errors: the brain mask an extractor would give, and the image cut to it (None: the exact mask).
    """

    def __init__(
        self,
        label_maps: list[str],
        length: int,
        synthesis,
        augmentation,
        frame,
        spacing: float = 2.0,
        same_subject_probability: float = 0.5,
        mask_errors=None,
    ):
        self.label_maps = list(label_maps)
        self.length = int(length)
        self.synthesis = synthesis
        # the second contrast of one subject keeps the first draw's anatomy: no second deformation
        self.recontrast = copy.deepcopy(synthesis)
        self.recontrast.deform_std = 0.0
        self.augmentation, self.frame, self.mask_errors = augmentation, frame, mask_errors
        self.spacing = spacing
        self.same_subject_probability = same_subject_probability
        self._cache: dict[int, torch.Tensor] = {}
        self.crop = CropForeground(select_fn=lambda labels: labels > 0, margin=4)

    def __len__(self) -> int:
        return self.length

    def label_map(self, index: int) -> torch.Tensor:
        if index not in self._cache:
            # cropped to the head: synthesis costs what the grid holds, and air is a third of it
            self._cache[index] = self.crop(load_label_map(self.label_maps[index], spacing=self.spacing))
        return self._cache[index]

    def _finish(self, item: dict, modality: str) -> dict:
        if self.mask_errors is not None:
            item = self.mask_errors(item)
        item = self.frame(self.augmentation(item))
        item["modality"] = modality
        return item

    def __getitem__(self, index: int) -> dict:
        same = len(self.label_maps) == 1 or self.R.rand() < self.same_subject_probability
        first = self.R.randint(len(self.label_maps))
        fixed = self.synthesis({"label": self.label_map(first)})
        fixed_modality = self.synthesis._contrast
        if same:
            moving = self.recontrast({"label": fixed["label"].clone()})
            moving_modality = self.recontrast._contrast
        else:
            second = (first + 1 + self.R.randint(len(self.label_maps) - 1)) % len(self.label_maps)
            moving = self.synthesis({"label": self.label_map(second)})
            moving_modality = self.synthesis._contrast
        return {
            "fixed": self._finish(fixed, fixed_modality),
            "moving": self._finish(moving, moving_modality),
            "same_subject": same,
        }

    def random_parts(self) -> tuple:
        parts = (self.synthesis, self.recontrast, self.augmentation, self.frame)
        return parts if self.mask_errors is None else parts + (self.mask_errors,)


class PretrainingDataset(RandomDrawDataset):
    """Items for keypoint pretraining: one reference subject, synthesized anew each time, moved by a random affine,
    with K reference points that move with it.

    The K points are drawn once, uniformly inside the reference label map's brain (labels 1..499), in world mm;
    ``augmentation`` must move them too (``point_keys="points"``). The synthesis must not deform (``deform_std=0``),
    or the points would no longer mark the same anatomy. Items: ``image``, ``mask``, ``label`` on the network grid
    and ``points`` ``(K, 3)`` float64.

    Args:
        label_map: path of the reference subject's label map.
        num_keypoints: K.
        length: items per epoch.
        synthesis, augmentation, frame: as in :class:`SyntheticPairDataset`.
        spacing: label map spacing (mm) for synthesis.
        seed: seed of the reference points (fixed for a run, so a resumed run regresses the same points).
    """

    def __init__(
        self,
        label_map: str,
        num_keypoints: int,
        length: int,
        synthesis,
        augmentation,
        frame,
        spacing: float = 2.0,
        seed: int = 0,
    ):
        crop = CropForeground(select_fn=lambda labels: labels > 0, margin=4)
        self.label = crop(load_label_map(label_map, spacing=spacing))
        brain = ((self.label > 0) & (self.label < EXTRA_CEREBRAL_MIN)).to(torch.float32)
        self.points = random_points_in_mask(brain, num_keypoints, np.random.RandomState(seed))
        self.length = int(length)
        self.synthesis, self.augmentation, self.frame = synthesis, augmentation, frame
        if getattr(synthesis, "deform_std", 0.0):
            raise ValueError("pretraining synthesis must not deform the label map (set deform_std: 0)")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        item = self.synthesis({"label": self.label})
        item["points"] = self.points.clone()
        return self.frame(self.augmentation(item))

    def random_parts(self) -> tuple:
        return (self.synthesis, self.augmentation, self.frame)


class ImagePretrainingDataset(RandomDrawDataset):
    """Items for keypoint pretraining from real images: one reference subject's images (all its modalities, one
    picked at random for each item, so pretraining also teaches contrast invariance), moved by a random affine,
    with K reference points that move with them.

    The images are prepared once as for training pairs (:class:`scripts.image_pairs.ImagePreparation`: RAS,
    [0, 1] intensities, the brain mask from the ``mask`` file or ``skull_strip``, ``spacing`` mm, cropped to the
    brain) and kept. The K points are drawn once, uniformly inside the first image's brain mask, in its world, and
    kept in the subject's common world (see :mod:`scripts.image_pairs`): an image whose datalist entry has
    ``world_transform`` ``W`` (common world -> its world) gets the points ``W q``, so they mark the same anatomy in
    every modality (images without one are taken to share the common world). ``augmentation`` moves image, mask,
    label and points (``point_keys="points"``); it is used as given, not copied (a
    :class:`scripts.training.AugmentationRamp` adjusts its ranges during training), and told to tolerate images
    without a label file. Items, in the format of :class:`PretrainingDataset`: ``image``, ``mask`` and (with a
    label file) ``label`` on the network grid, ``points`` ``(K, 3)`` float64 world mm, plus ``world_transform``
    (augmentation @ ``W``, as in :class:`scripts.image_pairs.ImagePairDataset`) and ``modality``.

    Args:
        datalist: the reference subject's images (entries of :func:`scripts.datalists.ixi_datalist` or
            :func:`scripts.datalists.csv_datalist`, one subject).
        num_keypoints: K.
        length: items per epoch (the draws are random; the index only counts).
        augmentation: random world affine of image, label, mask and points.
        frame: network-grid resampling of image, mask and label.
        preprocessing, spacing, skull_strip: see :class:`scripts.image_pairs.ImagePreparation`.
        seed: seed of the reference points (fixed for a run, so a resumed run regresses the same points).

    Raises:
        KeyMorphInputError: an unreadable image, label or mask file, or an empty brain (naming the file).
    """

    def __init__(
        self,
        datalist: list[dict],
        num_keypoints: int,
        length: int,
        augmentation,
        frame,
        preprocessing=None,
        spacing: float | None = 2.0,
        seed: int = 0,
        skull_strip: str = "deepbet",
    ):
        subjects = {entry["subject"] for entry in datalist}
        if len(subjects) != 1:
            raise ValueError(f"pretraining needs the images of one subject, got {len(subjects)} subjects")
        self.datalist = [dict(entry) for entry in datalist]
        self.length = int(length)
        self.augmentation, self.frame = augmentation, frame
        if any(not entry.get("label") for entry in self.datalist):
            self.augmentation.allow_missing_keys = True
        self.world = world_transforms(self.datalist)
        self.cache = ImagePreparation(preprocessing, spacing, skull_strip).prepare_all(self.datalist)
        points = random_points_in_mask(self.cache[0]["mask"], num_keypoints, np.random.RandomState(seed))
        #: the reference points in the subject's common world, ``(K, 3)`` float64
        self.points = apply_affine(torch.linalg.inv(self.world[0]), points)

    def __len__(self) -> int:
        return self.length

    def make_item(self, index: int) -> dict:
        """One item from the kept image ``index`` of the datalist: its reference points, augmented and framed."""
        item = dict(self.cache[index])  # the augmentation moves copies: the cache stays
        item["points"] = apply_affine(self.world[index], self.points)
        item = self.augmentation(item)
        item["world_transform"] = item["world_transform"] @ self.world[index]
        item = self.frame(item)
        item["modality"] = self.datalist[index]["modality"]
        return item

    def __getitem__(self, index: int) -> dict:
        return self.make_item(self.R.randint(len(self.datalist)))

    def random_parts(self) -> tuple:
        return (self.augmentation, self.frame)


class FixedPairs(Dataset):
    """The first ``len(dataset)`` draws of a random pair dataset with ``seed``, drawn once and kept: a validation set
    that stays the same across epochs and resumed runs."""

    def __init__(self, dataset, seed: int = 0):
        dataset.set_random_state(seed)
        self.pairs = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return self.pairs[index]


def training_images(
    source: str, split: str, exclude: list[str] | tuple[str, ...] = (), include: list[str] | tuple[str, ...] = ()
) -> tuple[str, list]:
    """What ``source`` (see :func:`scripts.datalists.detect_source`) holds for one split: ``("label_maps", paths)``
    or ``("ixi" | "csv", datalist)``.

    Subjects whose file name (label maps) or subject id (IXI, CSV) contains an entry of ``exclude`` are left out;
    with ``include``, only those are used (the validation split). A CSV with a ``split`` column instead gives the
    rows whose split is ``split``. Raises :class:`KeyMorphInputError` (one line naming ``source`` or the bad file)
    when ``source`` is missing or holds nothing usable for the split.
    """
    if not os.path.exists(source):
        raise KeyMorphInputError(f"{source}: dataset_dir not found")
    kind = detect_source(source)
    if kind != "label_maps":
        datalist = csv_datalist(source) if kind == "csv" else ixi_datalist(source)
        return kind, select_subjects(datalist, split, exclude, include, source)
    label_maps = find_label_maps(source, exclude)
    if include:
        label_maps = [p for p in label_maps if any(name in os.path.basename(p) for name in include)]
        if not label_maps:
            raise KeyMorphInputError(f"{source}: no label maps of the {split} subjects {list(include)}")
    return kind, label_maps


def can_validate(source: str, validation_subjects: list[str] | tuple[str, ...]) -> bool:
    """Whether training on ``source`` can validate: there are validation subjects (see
    :func:`scripts.datalists.subject_split`) and, for real images, every image of theirs has a label file (the
    validation Dice needs them). Otherwise one warning line says why validation is skipped."""
    if not validation_subjects:
        logger.warning(f"{source}: no validation subjects; training without validation")
        return False
    try:
        kind, images = training_images(source, "validation", include=list(validation_subjects))
    except KeyMorphInputError:
        return True  # the settings check reports the problem
    unlabeled = [image["image"] for image in images if kind != "label_maps" and "label" not in image]
    if unlabeled:
        logger.warning(f"{unlabeled[0]}: a validation image without labels (no Dice); training without validation")
    return not unlabeled


def make_pair_dataset(
    source: str,
    split: str,
    length: int,
    synthesis,
    augmentation,
    frame,
    preprocessing=None,
    exclude: list[str] | tuple[str, ...] = (),
    include: list[str] | tuple[str, ...] = (),
    spacing: float = 2.0,
    same_subject_probability: float = 0.5,
    skull_strip: str = "deepbet",
    mask_errors=None,
):
    """The pair dataset for ``source`` (see :func:`scripts.datalists.detect_source`): a folder of label maps gives
    synthetic pairs (:class:`SyntheticPairDataset`, ``synthesis`` used), an IXI-layout folder or a CSV datalist
    real ones (:class:`scripts.image_pairs.ImagePairDataset`, with ``preprocessing`` and, for images without a mask
    file, the brain-mask backend ``skull_strip``; ``spacing`` is then the spacing the images are kept at).

    The subjects of ``split`` are chosen by :func:`training_images` (``exclude``, ``include`` or a CSV ``split``
    column). ``mask_errors`` (synthetic pairs only: a real image's mask is already an extractor's) is the
    :class:`scripts.mask_errors.RandBrainMaskErrord` of :class:`SyntheticPairDataset`. Raises
    :class:`KeyMorphInputError` (one line) when ``source`` holds nothing usable.
    """
    kind, found = training_images(source, split, exclude, include)
    if kind != "label_maps":
        return ImagePairDataset(
            found, length, augmentation, frame, preprocessing, spacing, same_subject_probability, skull_strip
        )
    return SyntheticPairDataset(
        found, length, synthesis, augmentation, frame, spacing, same_subject_probability, mask_errors
    )


def make_pretraining_dataset(
    source: str,
    num_keypoints: int,
    length: int,
    synthesis,
    augmentation,
    frame,
    preprocessing=None,
    exclude: list[str] | tuple[str, ...] = (),
    spacing: float = 2.0,
    seed: int = 0,
    skull_strip: str = "deepbet",
    reference_label_map: str | None = None,
):
    """The pretraining dataset for ``source`` (see :func:`scripts.datalists.detect_source`); the reference subject
    is the first one not excluded (subjects named like an entry of ``exclude``; a CSV ``split`` column instead
    gives its ``train`` rows).

    * a folder of label maps: :class:`PretrainingDataset` on the first label map, synthesized anew by
      ``synthesis`` for each item (``reference_label_map``, when given, is used instead, as before: then
      ``source`` is not read);
    * an IXI-layout folder or a CSV datalist: :class:`ImagePretrainingDataset` on all images of the first subject
      (``preprocessing``, ``skull_strip`` for images without a mask file, kept at ``spacing`` mm).

    Raises :class:`KeyMorphInputError` (one line) when ``source`` holds nothing usable.
    """
    if reference_label_map:
        return PretrainingDataset(
            reference_label_map, num_keypoints, length, synthesis, augmentation, frame, spacing, seed
        )
    kind, found = training_images(source, "train", exclude)
    if kind == "label_maps":
        return PretrainingDataset(found[0], num_keypoints, length, synthesis, augmentation, frame, spacing, seed)
    reference = [entry for entry in found if entry["subject"] == found[0]["subject"]]
    return ImagePretrainingDataset(
        reference, num_keypoints, length, augmentation, frame, preprocessing, spacing, seed, skull_strip
    )

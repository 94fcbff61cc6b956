"""Training data. Pairs: two images on their network grids, with labels, masks and, for one subject, the true transform.

A pair is ``{"fixed": item, "moving": item, "same_subject": bool}``; an item is the dict of one image after the
training pipeline (``image``, ``mask`` and optional ``label`` as ``(1, S, S, S)`` MetaTensors on the network grid,
whose ``affine`` is that grid's voxel-to-world matrix, plus ``world_transform``: the ``(4, 4)`` random affine the
augmentation applied, and ``modality``). For two images of one subject the true fixed-to-moving world matrix is
``T_moving @ inv(T_fixed)`` (see :func:`true_fixed_to_moving`).
"""

from __future__ import annotations

import copy
import glob
import os

import numpy as np
import torch
from monai.transforms import CropForeground, Randomizable
from torch.utils.data import Dataset

from scripts.datalists import csv_datalist, detect_source, ixi_datalist, select_subjects
from scripts.errors import KeyMorphInputError
from scripts.image_pairs import ImagePairDataset
from scripts.synthesis import EXTRA_CEREBRAL_MIN, load_label_map
from scripts.transforms import random_points_in_mask

#: FreeSurfer brain structures scored by Dice (left and right kept apart: a mirror-image registration is wrong).
BRAIN_LABELS = (
    2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
    41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60,
)  # fmt: skip

DEFAULT_LABEL_MAPS_DIR = os.path.join("..", "shared", "data", "label_maps")


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


class SyntheticPairDataset(Randomizable, Dataset):
    """Pairs of images synthesized on the fly from label maps (SynthMorph-style training data).

    Each draw picks two label maps (different subjects), or with ``same_subject_probability`` one label map seen
    in two contrasts (deformed once, so the true transform between the two is exactly the augmentations' affine).
    Each image then goes through ``augmentation`` (a :class:`scripts.transforms.RandWorldAffined`) and ``frame``
    (a :class:`scripts.transforms.BrainFramed`). Label maps are read once, resampled to ``spacing`` mm, and kept.

    Args:
        label_maps: paths of label maps.
        length: pairs per epoch (the draws are random; the index only counts).
        synthesis: a :class:`scripts.synthesis.SynthesizeImaged` (keys label -> image, label, mask).
        augmentation: random world affine applied to image, label and mask.
        frame: network-grid resampling of image, mask and label.
        spacing: spacing (mm) the label maps are resampled to before synthesis (then cropped to the head).
        same_subject_probability: probability of a same-subject, two-contrast pair.
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
    ):
        self.label_maps = list(label_maps)
        self.length = int(length)
        self.synthesis = synthesis
        # the second contrast of one subject keeps the first draw's anatomy: no second deformation
        self.recontrast = copy.deepcopy(synthesis)
        self.recontrast.deform_std = 0.0
        self.augmentation, self.frame = augmentation, frame
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

    def randomize(self, data=None) -> None:  # draws happen in __getitem__ with self.R
        pass

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        for transform in (self.synthesis, self.recontrast, self.augmentation, self.frame):
            transform.set_random_state(seed=None if seed is None else seed + 1, state=None)
        return self


class PretrainingDataset(Randomizable, Dataset):
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

    def randomize(self, data=None) -> None:  # the transforms draw their own randomness
        pass

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        for transform in (self.synthesis, self.augmentation, self.frame):
            transform.set_random_state(seed=seed, state=None)
        return self


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
):
    """The pair dataset for ``source`` (see :func:`scripts.datalists.detect_source`): a folder of label maps gives
    synthetic pairs (:class:`SyntheticPairDataset`, ``synthesis`` used), an IXI-layout folder or a CSV datalist
    real ones (:class:`scripts.image_pairs.ImagePairDataset`, with ``preprocessing`` and, for images without a mask
    file, the brain-mask backend ``skull_strip``; ``spacing`` is then the spacing the images are kept at).

    Subjects whose file name (label maps) or subject id (IXI, CSV) contains an entry of ``exclude`` are left out;
    with ``include``, only those are used (the validation split). A CSV with a ``split`` column instead gives the
    rows whose split is ``split``. Raises :class:`KeyMorphInputError` (one line) when ``source`` holds nothing
    usable.
    """
    if not os.path.exists(source):
        raise KeyMorphInputError(f"{source}: dataset_dir not found")
    kind = detect_source(source)
    if kind != "label_maps":
        datalist = csv_datalist(source) if kind == "csv" else ixi_datalist(source)
        datalist = select_subjects(datalist, split, exclude, include, source)
        return ImagePairDataset(
            datalist, length, augmentation, frame, preprocessing, spacing, same_subject_probability, skull_strip
        )
    label_maps = find_label_maps(source, exclude)
    if include:
        label_maps = [p for p in label_maps if any(name in os.path.basename(p) for name in include)]
        if not label_maps:
            raise KeyMorphInputError(f"{source}: no label maps of the {split} subjects {list(include)}")
    return SyntheticPairDataset(label_maps, length, synthesis, augmentation, frame, spacing, same_subject_probability)

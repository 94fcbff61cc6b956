"""Training items of the brain-parts network (:mod:`scripts.head_pose`): synthetic heads in any pose.

Each item is a label map of a random training subject, synthesized in a random contrast (with or without the
skull, at a random resolution, SynthSeg-style), turned by a rotation drawn uniformly from all 3-D rotations, scaled
by +-10 % per axis, possibly cut by the field of view, and resampled onto the coarse head grid exactly as
inference does: 64^3 voxels of 4 mm along the world axes, centred on the visible head (or brain) with a few mm
of jitter. Items: ``image`` ``(1, 64, 64, 64)`` float32 in [0, 1] and ``label`` ``(1, 64, 64, 64)`` int64 part
indices (:data:`scripts.head_pose.PARTS`).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from monai.transforms import CropForeground
from scipy.spatial.transform import Rotation

from scripts.coordinates import apply_affine, resample_onto
from scripts.errors import KeyMorphInputError
from scripts.head_pose import (
    HEAD_GRID_SIZE,
    HEAD_GRID_SPACING,
    PARTS,
    head_grid,
    normalise_intensity,
    parts_from_labels,
)
from scripts.random_draws import RandomDrawDataset
from scripts.synthesis import EXTRA_CEREBRAL_MIN, load_label_map
from scripts.training_data import FixedPairs, find_label_maps

# The head is rendered at half the grid spacing and averaged down, as inference averages a finer scan.
_RENDER_FACTOR = 2


class HeadPoseDataset(RandomDrawDataset):
    """Synthetic heads in random poses on the coarse head grid (see the module docstring).

    Args:
        label_maps: paths of the training subjects' label maps.
        length: items per epoch.
        synthesis: a :class:`scripts.synthesis.SynthesizeImaged` (its own skull and contrast probabilities).
        scale_range: per-axis scaling ``1 +- scale_range``.
        centre_jitter: largest offset (mm, per axis) of the grid centre from the visible head's centre.
        cut_probability: probability of cutting the field of view across a random world axis, through the brain,
            up to ``cut_depth`` mm deep (a scan that misses the top of the head or the cerebellum).
    """

    def __init__(
        self,
        label_maps: list[str],
        length: int,
        synthesis,
        scale_range: float = 0.1,
        centre_jitter: float = 10.0,
        cut_probability: float = 0.2,
        cut_depth: float = 25.0,
    ):
        spacing = HEAD_GRID_SPACING / _RENDER_FACTOR
        crop = CropForeground(select_fn=lambda labels: labels > 0, margin=4)
        self.label_maps = [crop(load_label_map(path, spacing=spacing)) for path in label_maps]
        self.length = int(length)
        self.synthesis = synthesis
        self.scale_range, self.centre_jitter = scale_range, centre_jitter
        self.cut_probability, self.cut_depth = cut_probability, cut_depth

    def __len__(self) -> int:
        return self.length

    def random_parts(self) -> tuple:
        return (self.synthesis,)

    def __getitem__(self, index: int) -> dict:
        label_map = self.label_maps[self.R.randint(len(self.label_maps))]
        item = self.synthesis({"label": label_map})
        affine = torch.as_tensor(label_map.affine, dtype=torch.float64)
        labels = item["label"]
        visible = torch.nonzero(labels[0] > 0).to(torch.float64)
        centre = apply_affine(affine, visible).mean(0)

        move = torch.eye(4, dtype=torch.float64)
        rotation = torch.as_tensor(Rotation.random(random_state=self.R).as_matrix())
        scale = torch.as_tensor(self.R.uniform(1 - self.scale_range, 1 + self.scale_range, 3))
        move[:3, :3] = rotation @ torch.diag(scale)
        move[:3, 3] = centre - move[:3, :3] @ centre
        jitter = torch.as_tensor(self.R.uniform(-self.centre_jitter, self.centre_jitter, 3))
        fine = head_grid(centre + jitter)
        fine[:3, :3] /= _RENDER_FACTOR
        fine[:3, 3] -= HEAD_GRID_SPACING * (1 - 1 / _RENDER_FACTOR) / 2  # same extent as the coarse grid
        shape = (HEAD_GRID_SIZE * _RENDER_FACTOR,) * 3
        to_subject = torch.linalg.inv(move)
        image = resample_onto(item["image"].as_tensor(), affine, fine, shape, to_subject)[0]
        labels = resample_onto(labels.as_tensor(), affine, fine, shape, to_subject, mode="nearest")[0]
        if self.R.rand() < self.cut_probability:
            image, labels = self._cut(image, labels)

        image = F.avg_pool3d(image[None, None], _RENDER_FACTOR)[0]
        parts = F.one_hot(parts_from_labels(labels), len(PARTS)).permute(3, 0, 1, 2).to(torch.float32)
        parts = F.avg_pool3d(parts[None], _RENDER_FACTOR)[0].argmax(0)
        return {"image": normalise_intensity(image), "label": parts[None]}

    def _cut(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blank everything beyond a plane across one grid axis, up to ``cut_depth`` mm into the brain."""
        axis, from_top = self.R.randint(3), self.R.rand() < 0.5
        brain = torch.nonzero((labels > 0) & (labels < EXTRA_CEREBRAL_MIN))[:, axis]
        if len(brain) == 0:
            return image, labels
        depth = int(self.R.uniform(0, self.cut_depth) * _RENDER_FACTOR / HEAD_GRID_SPACING)
        index = [slice(None)] * 3
        index[axis] = slice(int(brain.max()) - depth, None) if from_top else slice(None, int(brain.min()) + depth + 1)
        image, labels = image.clone(), labels.clone()
        image[tuple(index)] = 0
        labels[tuple(index)] = 0
        return image, labels


def head_pose_datasets(
    label_maps_dir: str, validation_subjects: list[str], exclude: list[str], length: int, val_items: int, synthesis
) -> tuple[HeadPoseDataset, FixedPairs]:
    """The training dataset (subjects neither validation nor ``exclude``) and a fixed validation set of
    ``val_items`` draws of the validation subjects."""
    train = HeadPoseDataset(
        find_label_maps(label_maps_dir, list(validation_subjects) + list(exclude)), length, synthesis
    )
    held_out = [
        p for p in find_label_maps(label_maps_dir) if any(s in os.path.basename(p) for s in validation_subjects)
    ]
    if not held_out:
        raise KeyMorphInputError(f"{label_maps_dir}: no label maps of the validation subjects {validation_subjects}")
    return train, FixedPairs(HeadPoseDataset(held_out, val_items, copy.deepcopy(synthesis)))

"""Random draws of the training data: the base of the datasets whose items are random draws rather than indexed
records, and random points in a mask."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from scripts.coordinates import affine_of, apply_affine
from scripts.errors import KeyMorphInputError
from scripts.image_io import source_name


class RandomDrawDataset(Randomizable, Dataset):
    """A dataset whose every item is a fresh random draw (the index only counts): it draws with ``self.R`` in
    ``__getitem__``, and seeding it (MONAI's DataLoader seeds each worker) also seeds the random transforms it
    holds, listed by :meth:`random_parts`, so one seed fixes every draw."""

    def random_parts(self) -> tuple:
        """The random transforms this dataset applies (seeded with ``seed + 1``)."""
        return ()

    def randomize(self, data=None) -> None:  # draws happen in __getitem__ with self.R
        pass

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        for transform in self.random_parts():
            transform.set_random_state(seed=None if seed is None else seed + 1, state=None)
        return self


def random_points_in_mask(mask: torch.Tensor, count: int, rng: np.random.RandomState) -> torch.Tensor:
    """``count`` world points ``(count, 3)`` (float64, mm) drawn uniformly among a mask's voxels, jittered
    within their voxel so they are not on the lattice."""
    voxels = torch.nonzero(torch.as_tensor(mask[0]) > 0.5).to(torch.float64)
    if len(voxels) == 0:
        raise KeyMorphInputError(f"{source_name(mask)}: the brain mask is empty; cannot place keypoints")
    chosen = voxels[torch.from_numpy(rng.choice(len(voxels), size=count, replace=len(voxels) < count))]
    chosen = chosen + torch.from_numpy(rng.uniform(-0.5, 0.5, chosen.shape))
    return apply_affine(affine_of(mask), chosen)

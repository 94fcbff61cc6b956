"""The base of the training datasets whose items are random draws rather than indexed records."""

from __future__ import annotations

from monai.transforms import Randomizable
from torch.utils.data import Dataset


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

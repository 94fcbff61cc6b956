"""Preprocessing steps that give the results of their MONAI counterparts with fewer full-size copies.

A 512^3 float32 volume is 0.5 GB; the inference preprocessing of ``configs/inference.yaml`` used to hold up to
six such arrays at once (3.8 GB peak for one such input). Two of them came from steps that need no copy:

* :class:`KeepOriginald` keeps the loaded image for the native-grid output by reference where MONAI's
  ``CopyItemsd`` deep-copies it: every later step returns a new tensor and leaves its input as it was (tested).
* :class:`ScaleIntensityRangePercentilesd` is MONAI's ``ScaleIntensityRangePercentilesd`` scaling in place in
  one output tensor, where MONAI makes a temporary per arithmetic step, and finding both percentiles with one
  partial sort where MONAI sorts twice. The percentiles are MONAI's (the same order statistics) and the
  arithmetic is MONAI's, step for step in float32, so the result is bit-identical (tested), as the trained
  weights expect.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.transforms import ScaleIntensityRangePercentiles as MonaiScaleIntensityRangePercentiles
from monai.transforms import ScaleIntensityRangePercentilesd as MonaiScaleIntensityRangePercentilesd
from monai.transforms.utils_pytorch_numpy_unification import percentile


class KeepOriginald(MapTransform):
    """``data[name] = data[key]``: the same tensor, not a copy (see the module docstring)."""

    def __init__(self, keys: KeysCollection, names: str = "original"):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("KeepOriginald keeps one key")
        self.name = names

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        d[self.name] = d[self.keys[0]]
        return d


class _Scaler(MonaiScaleIntensityRangePercentiles):
    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        a_min, a_max = percentile(img, [self.lower, self.upper])  # one partial sort for both (the same values)
        if self.relative or self.b_min is None or self.b_max is None or bool(a_max == a_min):
            return super()._normalize(img)  # the uncommon settings: MONAI's own way
        scaled = img - a_min
        scaled /= a_max - a_min
        scaled *= self.b_max - self.b_min
        scaled += self.b_min
        return scaled.clamp_(self.b_min, self.b_max) if self.clip else scaled


class ScaleIntensityRangePercentilesd(MonaiScaleIntensityRangePercentilesd):
    """MONAI's ``ScaleIntensityRangePercentilesd`` (same arguments, same result) with two full-size temporaries
    instead of five or more (see the module docstring). CPU tensors only."""

    def __init__(self, keys: KeysCollection, lower: float, upper: float, b_min, b_max, clip: bool = False, **kwargs):
        super().__init__(keys, lower, upper, b_min, b_max, clip, **kwargs)
        scaler = self.scaler
        self.scaler = _Scaler(
            scaler.lower,
            scaler.upper,
            scaler.b_min,
            scaler.b_max,
            scaler.clip,
            scaler.relative,
            scaler.channel_wise,
            scaler.dtype,
        )

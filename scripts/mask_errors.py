"""Skull stripping as a real brain extractor does it: the MONAI dictionary transform :class:`RandBrainMaskErrord`.

At inference the keypoint network sees an image cut to the mask of a brain extractor (deepbet or the bundle's own
network), and such masks are never the anatomy's brain: they are a few millimetres too tight in one place (cortex
or cerebellum cut off) and too loose in another (skull and dura left). Trained on exact masks only, the network
placed keypoints that no longer agreed (keypoint residuals of 8-15 mm and failed registrations on held-out heads
whose masks had a Dice of 0.8-0.85, where the exact masks gave 0.2-1.3 mm). Training on images stripped with
masks whose surface is moved in and out by a smooth random amount teaches it to read the anatomy, not the cut.

The moved surface is a level set of the mask's signed distance (:func:`scripts.brain_mask.signed_distance`, mm,
negative inside): the new mask is where the distance is below an offset that varies smoothly in space, a mean
drawn from ``offset_range_mm`` plus a smooth field (MONAI's :class:`~monai.transforms.SmoothField`, trilinear
between ``control_points`` random values per axis) of amplitude drawn up to ``variation_mm``. A negative offset
erodes, a positive one dilates (on a whole-head image, skull comes back in).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.transforms.smooth_field.array import SmoothField
from monai.utils import convert_to_dst_type

from scripts.brain_mask import DISTANCE_CLIP_MM, signed_distance
from scripts.coordinates import affine_of


class RandBrainMaskErrord(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace ``data[mask_key]`` by a brain mask with a brain extractor's errors and cut
    the images of ``keys`` to it (0 outside); otherwise leave everything as it is (an exact mask, or a whole head
    that was never stripped).

    Args:
        keys: the images to cut, ``(C, D, H, W)`` on the mask's grid.
        mask_key: the brain mask ``(1, D, H, W)`` (brain > 0.5), a MetaTensor whose affine gives the voxel size
            (isotropic voxels; their mean size is used).
        prob: probability of replacing the mask.
        offset_range_mm: range of the mean offset of the surface (mm; negative: inwards).
        variation_mm: largest amplitude of the smooth variation of the offset about its mean (mm).
        control_points: random values per axis the smooth variation interpolates between.

    The offsets are kept within the signed distance's clip, +-:data:`scripts.brain_mask.DISTANCE_CLIP_MM`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "mask",
        prob: float = 0.75,
        offset_range_mm: tuple[float, float] = (-4.0, 6.0),
        variation_mm: float = 4.0,
        control_points: int = 4,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = float(offset_range_mm[0]), float(offset_range_mm[1])
        if not -DISTANCE_CLIP_MM < low <= high < DISTANCE_CLIP_MM:
            raise ValueError(f"offset_range_mm must lie within +-{DISTANCE_CLIP_MM} mm, got {offset_range_mm}")
        if variation_mm < 0 or control_points < 2:
            raise ValueError(f"need variation_mm >= 0 and control_points >= 2, got {variation_mm}, {control_points}")
        self.mask_key, self.offset_range_mm = mask_key, (low, high)
        self.variation_mm, self.control_points = float(variation_mm), int(control_points)

    def offset_field(self, shape) -> torch.Tensor:
        """The surface offset ``(D, H, W)`` (mm) of one draw: the mean plus the smooth variation, clipped."""
        mean = self.R.uniform(*self.offset_range_mm)
        amplitude = self.R.uniform(0.0, self.variation_mm)
        field = SmoothField(
            rand_size=(self.control_points,) * 3,
            spatial_size=tuple(int(s) for s in shape),
            low=-1.0,
            high=1.0,
            mode="trilinear",
            align_corners=True,
        )
        field.set_random_state(int(self.R.randint(2**31)))
        field.randomize()
        limit = DISTANCE_CLIP_MM - 1e-3
        return (mean + amplitude * field()[0]).clamp(-limit, limit)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        mask = d[self.mask_key]
        spacing = float(affine_of(mask)[:3, :3].norm(dim=0).mean())
        distance = signed_distance(torch.as_tensor(mask[0]) > 0.5, spacing_mm=spacing)
        extracted = distance < self.offset_field(distance.shape)
        for key in self.key_iterator(d):
            d[key] = d[key] * extracted.to(d[key].dtype)
        d[self.mask_key] = convert_to_dst_type(extracted[None], mask, dtype=torch.float32)[0]
        return d

"""Training data of the brain-mask network (:mod:`scripts.brain_mask`): synthetic heads and brains of any contrast
in any pose, each with its exact brain mask, on the grid the network sees at inference.

An item is ``{"image", "label"}``: ``(1, D, H, W)`` float32 MetaTensors on one 2 mm world-aligned grid (its
``affine``), the image in ``[0, 1]`` (0 outside the field of view) and the label the signed distance from the
surface of the brain on that grid, in units of :data:`scripts.brain_mask.DISTANCE_CLIP_MM` (so in ``[-1, 1]``;
:func:`scripts.brain_mask.signed_distance`: negative inside; the brain is where the trilinear resampling of the 0/1
brain mask exceeds one half).
"""

from __future__ import annotations

import math

import torch
from monai.data import MetaTensor

from scripts.brain_mask import DISTANCE_CLIP_MM, NETWORK_SPACING_MM, SHAPE_MULTIPLE, network_grid, signed_distance
from scripts.coordinates import affine_of, apply_affine, resample_onto
from scripts.random_draws import RandomDrawDataset
from scripts.random_motions import image_center, random_affine_matrix
from scripts.synthesis import load_label_map


class BrainMaskDataset(RandomDrawDataset):
    """Random draws of (image, brain mask) for training the brain-mask network, SynthStrip-style.

    Each draw picks a label map (read once at :data:`scripts.brain_mask.NETWORK_SPACING_MM` and kept), synthesizes
    an image of it with ``synthesis`` (a :class:`scripts.synthesis.SynthesizeImaged`: contrast, whole head or brain,
    resolution, bias, noise), moves it by a random world affine (any rotation, scale ``1 +- scale_range`` per axis,
    shear, shift up to ``shift_mm``) and resamples it onto the network's grid as inference builds it
    (:func:`scripts.brain_mask.network_grid`) for one of the two ways a turned head reaches a user:

    * the turn is in the header (the voxels keep the head upright): the grid covers the moved field of view, whose
      tilted edges bound the image;
    * the turn is in the voxels (a head tilted in the scanner): the grid covers the unmoved field of view, and the
      moved one leaves its corners empty.

    Grids larger than ``max_size`` voxels along an axis are cut to a window of that size around the brain (shifted
    at random by up to a quarter of the excess), which bounds a step's cost. With ``cut_probability`` the field of
    view is cut through the brain's top or bottom 30 % along a random grid axis (image and brain are zeroed
    beyond), as scans that miss the top of the head or the cerebellum do.

    Args:
        label_maps: paths of whole-head label maps (labels >= 500 extra-cerebral).
        length: draws per epoch (the index only counts).
        synthesis: :class:`scripts.synthesis.SynthesizeImaged` (keys label -> image, label, mask).
        scale_range, shear_range: as :func:`scripts.random_motions.random_affine_matrix`.
        shift_mm: largest shift per axis (mm).
        voxel_turn_probability: probability of the turn being in the voxels rather than the header.
        max_size: largest grid size per axis (a multiple of :data:`scripts.brain_mask.SHAPE_MULTIPLE`).
        cut_probability: probability of a field-of-view cut through the brain.
    """

    def __init__(
        self,
        label_maps: list[str],
        length: int,
        synthesis,
        scale_range: float = 0.15,
        shear_range: float = 0.05,
        shift_mm: float = 20.0,
        voxel_turn_probability: float = 0.5,
        max_size: int = 144,
        cut_probability: float = 0.2,
    ):
        if max_size % SHAPE_MULTIPLE:
            raise ValueError(f"max_size must be a multiple of {SHAPE_MULTIPLE}, got {max_size}")
        self.label_maps, self.length, self.synthesis = list(label_maps), int(length), synthesis
        self.scale_range, self.shear_range, self.shift_mm = scale_range, shear_range, shift_mm
        self.voxel_turn_probability, self.max_size = voxel_turn_probability, max_size
        self.cut_probability = cut_probability
        self._cache: dict[int, MetaTensor] = {}

    def __len__(self) -> int:
        return self.length

    def random_parts(self) -> tuple:
        return (self.synthesis,)

    def label_map(self, index: int) -> MetaTensor:
        if index not in self._cache:
            self._cache[index] = load_label_map(self.label_maps[index], spacing=NETWORK_SPACING_MM)
        return self._cache[index]

    def _window(self, grid: torch.Tensor, shape: list[int], brain_centre: torch.Tensor):
        """``grid``/``shape`` cut to at most ``max_size`` voxels per axis, around the brain centre (world mm)."""
        centre = torch.linalg.solve(grid, torch.cat([brain_centre, brain_centre.new_ones(1)]))[:3]
        window = grid.clone()
        sizes = []
        for axis, size in enumerate(shape):
            if size <= self.max_size:
                sizes.append(size)
                continue
            excess = size - self.max_size
            start = float(centre[axis]) - (self.max_size - 1) / 2 + self.R.uniform(-0.25, 0.25) * excess
            start = int(round(min(max(start, 0.0), excess)))
            window[:3, 3] += grid[:3, axis] * start
            sizes.append(self.max_size)
        return window, sizes

    def _cut(self, image: torch.Tensor, brain: torch.Tensor) -> None:
        """Zero image and brain ``(1, D, H, W)`` beyond a plane through the top or bottom 30 % of the brain."""
        axis = self.R.randint(3)
        occupied = torch.nonzero(brain[0].amax(dim=[a for a in range(3) if a != axis]) > 0.5)[:, 0]
        if len(occupied) == 0:
            return
        low, high = int(occupied.min()), int(occupied.max())
        depth = int(self.R.uniform(0.0, 0.3) * (high - low))
        index = [slice(None)] * 4
        index[axis + 1] = slice(high - depth + 1, None) if self.R.rand() < 0.5 else slice(None, low + depth)
        image[tuple(index)] = 0
        brain[tuple(index)] = 0

    def __getitem__(self, index: int) -> dict:
        drawn = self.synthesis({"label": self.label_map(self.R.randint(len(self.label_maps)))})
        image, brain = drawn["image"], drawn["mask"]
        affine = affine_of(image)
        motion = random_affine_matrix(
            self.R, math.pi, self.scale_range, self.shear_range, [self.shift_mm] * 3, image_center(image).tolist()
        )
        moved = motion @ affine
        grid, shape = network_grid(affine if self.R.rand() < self.voxel_turn_probability else moved, image.shape[1:])
        voxels = torch.nonzero(brain[0] > 0.5).to(torch.float64)
        grid, shape = self._window(grid, shape, apply_affine(moved, voxels).mean(0))
        identity = torch.eye(4, dtype=torch.float64)
        on_grid = resample_onto(torch.cat([image, brain]).as_tensor(), moved, grid, shape, identity)
        image, brain = on_grid[:1].clone(), on_grid[1:].clamp(0, 1)
        if self.R.rand() < self.cut_probability:
            self._cut(image, brain)
        distance = signed_distance(brain[0] > 0.5)[None] / DISTANCE_CLIP_MM
        return {"image": MetaTensor(image, affine=grid), "label": MetaTensor(distance, affine=grid)}

"""The bundle's own brain-extraction network: a 3-D U-Net that maps a head (or brain) image of any MR contrast, in
any pose, to its brain mask, on a 2 mm world-aligned grid.

Method
------
SynthStrip's recipe (Hoopes et al., "SynthStrip: skull-stripping for any brain image", NeuroImage 260, 2022):
train a segmentation network only on images synthesized from label maps (:mod:`scripts.synthesis`, random and
preset contrasts, whole heads and brains), so that it depends on neither the contrast nor, with full-rotation
augmentation (:mod:`scripts.brain_mask_data`), the head's orientation. The target is the label map's brain:
labels 1..499, cerebrospinal fluid included, as the benchmarks score it.

Grid
----
The network sees the image resampled (trilinear, 0 outside its field of view) onto the world-aligned RAS grid of
:data:`NETWORK_SPACING_MM` that covers the image's whole field of view, grown to a multiple of
:data:`SHAPE_MULTIPLE` voxels per axis (four halvings in the U-Net). Finer images are box-averaged to about that
spacing first, so the 2 mm samples do not alias. Intensities are mapped to ``[0, 1]`` between the 0.5th and 99.5th
percentiles, as the synthesis does. The brain probability comes back onto the image's own grid through world
coordinates (trilinear), is thresholded at 0.5, and the largest connected component, holes filled, is the mask.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import UNet
from scipy import ndimage

from scripts.coordinates import covering_grid_along, resample_onto
from scripts.head_pose import box_average

#: Voxel size (mm) of the grid the network works on.
NETWORK_SPACING_MM = 2.0
#: The network grid's shape is a multiple of this per axis: the U-Net halves it four times.
SHAPE_MULTIPLE = 16
#: Percentiles mapped to 0 and 1 (those of :class:`scripts.synthesis.SynthesizeImaged`).
PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 2**19


def brain_mask_network() -> UNet:
    """The brain-mask U-Net: 1 input channel (the image), 1 output channel (the brain logit), five levels of 16 to
    256 features, two residual units per level, instance normalisation (contrast changes scale the features)."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="instance",
    )


def unit_range(image: torch.Tensor) -> torch.Tensor:
    """An image of any shape mapped linearly to ``[0, 1]`` between its :data:`PERCENTILES` (clipped); NaN -> 0."""
    image = torch.nan_to_num(image.to(torch.float32))
    flat = image.reshape(-1)
    sample = flat[:: max(1, flat.numel() // _PERCENTILE_SAMPLES)]
    low, high = torch.quantile(sample, torch.tensor([p / 100 for p in PERCENTILES]))
    return ((image - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)


def network_grid(affine: torch.Tensor, spatial_shape) -> tuple[torch.Tensor, list[int]]:
    """The network's world-aligned grid for an image: :data:`NETWORK_SPACING_MM` voxels covering its field of view
    (``affine`` ``(4, 4)`` voxel-to-world, ``spatial_shape`` its 3 sizes), padded evenly on both sides of each axis
    to a multiple of :data:`SHAPE_MULTIPLE`. Returns the ``(4, 4)`` float64 voxel-to-world matrix and the shape."""
    grid, shape = covering_grid_along(torch.eye(3, dtype=torch.float64), affine, spatial_shape, NETWORK_SPACING_MM)
    padded = [-(-size // SHAPE_MULTIPLE) * SHAPE_MULTIPLE for size in shape]
    before = torch.tensor([(p - s) / 2 for p, s in zip(padded, shape)], dtype=torch.float64)
    grid[:3, 3] -= grid[:3, :3] @ before
    return grid, padded


def largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask, its enclosed holes filled (empty stays empty)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(components == sizes.argmax())


@torch.no_grad()
def brain_probability(network: torch.nn.Module, image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """The network's brain probability ``(D, H, W)`` in ``[0, 1]`` on the grid of ``image`` ``(D, H, W)`` (any
    intensity unit; ``affine`` its ``(4, 4)`` voxel-to-world matrix in RAS mm)."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    coarse, coarse_affine = box_average(unit_range(image), affine, NETWORK_SPACING_MM)
    grid, shape = network_grid(affine, image.shape)
    identity = torch.eye(4, dtype=torch.float64)
    device = next(network.parameters()).device
    on_grid = resample_onto(coarse[None], coarse_affine, grid, shape, identity)
    network.eval()
    probability = torch.sigmoid(network(on_grid[None].to(device))[0].float().cpu())
    return resample_onto(probability, grid, affine, image.shape, identity)[0]


def predict_brain_mask(network: torch.nn.Module, image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Boolean brain mask ``(D, H, W)`` of ``image`` ``(D, H, W)`` on its own grid: :func:`brain_probability`
    above 0.5, the largest connected component with its holes filled."""
    probability = brain_probability(network, image, affine)
    return torch.from_numpy(largest_component_filled((probability > 0.5).numpy()))

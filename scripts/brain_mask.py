"""The bundle's own brain-extraction network: a 3-D U-Net that maps a head (or brain) image of any MR contrast, in
any pose, to the signed distance from its brain's surface, on a 2 mm world-aligned grid.

Method
------
SynthStrip's recipe (Hoopes et al., "SynthStrip: skull-stripping for any brain image", NeuroImage 260, 2022):
train the network only on images synthesized from label maps (:mod:`scripts.synthesis`, random and preset
contrasts, whole heads and brains), so that it depends on neither the contrast nor, with full-rotation
augmentation (:mod:`scripts.brain_mask_data`), the head's orientation. The brain is the label map's labels
1..499, cerebrospinal fluid included, as the benchmarks score it. As in SynthStrip, the network regresses the
brain's signed distance transform (:func:`signed_distance`: mm, negative inside, clipped at
:data:`DISTANCE_CLIP_MM`) rather than a class probability: every voxel near the surface is told how far it is from
it, so the loss keeps pulling the predicted surface onto the anatomy's, where a probability target is satisfied
early by a smooth blob in the right place. The network's output is in units of :data:`DISTANCE_CLIP_MM` (the target
lies in ``[-1, 1]``, the scale its normalised features have from the start). The mask is where the predicted
distance is below 0.

Grid
----
The image is box-averaged to about :data:`NETWORK_SPACING_MM` (so the 2 mm samples do not alias) and its
intensities are mapped to ``[0, 1]`` between the 0.5th and 99.5th percentiles, as the synthesis does. The network
sees it resampled (trilinear, 0 outside its field of view) onto the world-aligned RAS grid of
:data:`NETWORK_SPACING_MM` that covers the head, :data:`HEAD_MARGIN_MM` beyond its foreground, grown to a multiple of
:data:`SHAPE_MULTIPLE` voxels per axis (four halvings in the U-Net): a head turned in its header has a field of view
up to twice as wide as the head along each world axis, and the network's time grows with the grid's volume. On that
grid the largest connected component below distance 0, holes filled, is kept; the kept distance comes back onto the
image's own grid through world coordinates (trilinear, only over the brain's box) and is thresholded at 0 again, so
the mask's edge is as smooth as the distance, not 2 mm steps.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.nets import UNet
from scipy import ndimage

from scripts.coordinates import apply_affine, covering_grid_along, grid_around, resample_onto, world_to_voxel
from scripts.head_pose import box_average, foreground

#: Voxel size (mm) of the grid the network works on.
NETWORK_SPACING_MM = 2.0
#: The network grid's shape is a multiple of this per axis: the U-Net halves it four times.
SHAPE_MULTIPLE = 16
#: Percentiles mapped to 0 and 1 (those of :class:`scripts.synthesis.SynthesizeImaged`).
PERCENTILES = (0.5, 99.5)
#: Background (mm) the network grid keeps around the head's foreground.
HEAD_MARGIN_MM = 16.0
#: The signed distance target is clipped to +- this (mm): far from the surface only the side matters.
DISTANCE_CLIP_MM = 10.0
_PERCENTILE_SAMPLES = 2**19


def brain_mask_network() -> UNet:
    """The brain-mask U-Net: 1 input channel (the image), 1 output channel (the signed distance from the brain's
    surface in units of :data:`DISTANCE_CLIP_MM`, negative inside), five levels of 16 to 256 features, two residual units per level, instance normalisation (contrast changes scale the features).
    """
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
    eye = torch.eye(3, dtype=torch.float64)
    return padded_to_multiple(*covering_grid_along(eye, affine, spatial_shape, NETWORK_SPACING_MM))


def padded_to_multiple(grid: torch.Tensor, shape: list[int]) -> tuple[torch.Tensor, list[int]]:
    """A grid (``(4, 4)`` voxel-to-world, its shape) grown evenly on both sides of each axis to a multiple of
    :data:`SHAPE_MULTIPLE` voxels; the new matrix and shape."""
    padded = [-(-size // SHAPE_MULTIPLE) * SHAPE_MULTIPLE for size in shape]
    before = torch.tensor([(p - s) / 2 for p, s in zip(padded, shape)], dtype=torch.float64)
    grid = grid.clone()
    grid[:3, 3] -= grid[:3, :3] @ before
    return grid, padded


def head_grid(coarse: torch.Tensor, coarse_affine: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The network grid (as :func:`network_grid`) of the head in a box-averaged image ``(D, H, W)``: its
    :func:`scripts.head_pose.foreground`'s largest connected component and :data:`HEAD_MARGIN_MM` around it
    (the whole field of view if nothing stands out from the background). Only the component's extent counts, and
    filling its holes would not change it (a hole lies between the component's voxels along every axis)."""
    head = torch.from_numpy(largest_component(foreground(coarse).numpy()))
    voxels = torch.nonzero(head).to(torch.float64)
    if len(voxels) == 0:
        return network_grid(coarse_affine, coarse.shape)
    points = apply_affine(coarse_affine, voxels)
    return padded_to_multiple(*grid_around(points, NETWORK_SPACING_MM, margin_mm=HEAD_MARGIN_MM))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == sizes.argmax()


def largest_component_filled(mask: np.ndarray) -> np.ndarray:
    """The :func:`largest_component` of a boolean mask, its enclosed holes filled (empty stays empty)."""
    return ndimage.binary_fill_holes(largest_component(mask))


def signed_distance(brain: torch.Tensor, spacing_mm: float = NETWORK_SPACING_MM) -> torch.Tensor:
    """The signed distance (mm, float32, same shape) from the surface of a boolean mask ``(X, Y, Z)`` on a grid of
    ``spacing_mm`` voxels: negative inside, positive outside, half a voxel at the voxels on either side of the
    surface, clipped to +-:data:`DISTANCE_CLIP_MM`. An empty mask is +:data:`DISTANCE_CLIP_MM` everywhere."""
    inside = brain.numpy().astype(bool)
    distance = np.full(inside.shape, DISTANCE_CLIP_MM, dtype=np.float32)
    if not inside.any():
        return torch.from_numpy(distance)
    # beyond this many voxels from the brain's box every distance is clipped: the transforms run on the box only
    margin = int(np.ceil(DISTANCE_CLIP_MM / spacing_mm)) + 1
    occupied = np.nonzero(inside)
    box = tuple(slice(max(0, int(i.min()) - margin), int(i.max()) + margin + 1) for i in occupied)
    inside = inside[box]
    outside_distance = ndimage.distance_transform_edt(~inside, sampling=spacing_mm)
    inside_distance = ndimage.distance_transform_edt(inside, sampling=spacing_mm)
    distance[box] = np.where(inside, 0.5 * spacing_mm - inside_distance, outside_distance - 0.5 * spacing_mm)
    return torch.from_numpy(distance).clamp(-DISTANCE_CLIP_MM, DISTANCE_CLIP_MM)


@torch.no_grad()
def brain_distance(
    network: torch.nn.Module, image: torch.Tensor, affine: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's signed distance from the brain's surface (mm, negative inside) for ``image`` ``(D, H, W)``
    (any intensity unit; ``affine`` its ``(4, 4)`` voxel-to-world matrix in RAS mm), on the network grid of
    :func:`head_grid`: returns the distance ``(X, Y, Z)`` and the grid's ``(4, 4)`` float64 voxel-to-world
    matrix."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    coarse, coarse_affine = box_average(image, affine, NETWORK_SPACING_MM)
    coarse = unit_range(coarse)
    grid, shape = head_grid(coarse, coarse_affine)
    on_grid = resample_onto(coarse[None], coarse_affine, grid, shape, torch.eye(4, dtype=torch.float64))
    device = next(network.parameters()).device
    network.eval()
    return DISTANCE_CLIP_MM * network(on_grid[None].to(device))[0, 0].float().cpu(), grid


def kept_distance(distance: torch.Tensor) -> torch.Tensor:
    """``distance`` ``(X, Y, Z)`` with only its largest component below 0 left below it: other components are
    raised to 0 and the kept component's holes set to -:data:`DISTANCE_CLIP_MM`, so thresholding it (or its
    trilinear interpolation) at 0 gives that component, holes filled, with the distance's own edge."""
    kept = torch.from_numpy(largest_component_filled((distance < 0).numpy()))
    return torch.where(kept, torch.where(distance < 0, distance, -DISTANCE_CLIP_MM), distance.clamp(min=0.0))


def predict_brain_mask(network: torch.nn.Module, image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Boolean brain mask ``(D, H, W)`` of ``image`` ``(D, H, W)`` on its own grid: :func:`brain_distance`'s
    largest component below 0, holes filled (:func:`kept_distance`), brought back through world coordinates over
    the box of the image's voxels it can reach and thresholded at 0."""
    affine = torch.as_tensor(affine, dtype=torch.float64)
    distance, grid = brain_distance(network, image, affine)
    distance = kept_distance(distance)
    mask = torch.zeros(image.shape, dtype=torch.bool)
    brain = torch.nonzero(distance < 0).to(torch.float64)
    if len(brain) == 0:
        return mask
    # The brain's 2 mm voxels, one voxel out (trilinear reaches that far), in the image's voxel indices.
    cube = torch.tensor([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=torch.float64)
    reach = world_to_voxel(affine, apply_affine(grid, (brain[:, None] + cube).reshape(-1, 3)))
    size = torch.tensor(image.shape)
    low = reach.min(0).values.floor().long().clamp(min=0).minimum(size)
    high = (reach.max(0).values.ceil().long() + 1).clamp(min=0).minimum(size)
    if (high <= low).any():
        return mask
    box = affine.clone()
    box[:3, 3] = apply_affine(affine, low[None].to(torch.float64))[0]
    box_shape = [int(n) for n in high - low]
    # outside the grid, resampling gives 0, which is not below 0: not brain
    back = resample_onto(distance[None], grid, box, box_shape, torch.eye(4, dtype=torch.float64))[0]
    mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = back < 0
    return mask

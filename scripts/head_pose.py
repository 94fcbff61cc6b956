"""Where is up? The pose of a head (or brain) in any orientation, from a coarse segmentation of brain parts.

Brain extraction networks (deepbet) are trained on upright heads and fail on turned ones (brain-mask Dice 0.96
upright, 0.87 at 30 degrees, 0.6-0.8 from 45 degrees on), and the moments of a brain mask cannot tell up from
down reliably on an imperfect mask. So the pose comes first, from a small network trained in this bundle with
full-rotation augmentation (any pose, any contrast, with or without skull):

1. the image is resampled onto a coarse head grid: :data:`HEAD_GRID_SIZE`^3 voxels of :data:`HEAD_GRID_SPACING`
   mm along the world (RAS) axes, centred on the image foreground's centre of mass (no pose assumed);
2. :class:`BrainPartsNet` labels each voxel as one of :data:`PARTS`: background, cerebrum, the posterior fossa
   (cerebellum and brain stem) or other brain (CSF, ventricles, midline structures). Left and right hemispheres are
   one class: a brain is nearly its own mirror image, so a network cannot tell them apart in an arbitrary pose
   (trained with both, it plateaued), and a proper rotation needs only two axes;
3. :func:`pose_from_parts` turns the parts into an upright frame: front = the cerebrum's longest principal axis
   (1.4-2 times the next in the 16 SynthSeg maps), pointing away from the posterior fossa; up = the part of the
   direction from the posterior fossa to the cerebrum perpendicular to front (the posterior fossa lies behind and
   below the cerebrum, on the midline); right = front x up.

The frame is a proper rotation ``U`` (3, 3) whose columns are the subject's right, anterior and superior
directions in world coordinates (RAS mm, :mod:`scripts.coordinates`); ``U`` = identity for an upright head in a
RAS scanner frame. :func:`scripts.coordinates.covering_grid_along` builds a grid along those directions, on
which the head looks upright.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from scripts.coordinates import apply_affine, resample_onto

#: Coarse grid the parts network sees: 64^3 voxels of 4 mm (a 256 mm cube holds any head in any pose).
HEAD_GRID_SIZE = 64
HEAD_GRID_SPACING = 4.0

#: Output classes of the parts network.
PARTS = ("background", "cerebrum", "posterior_fossa", "other_brain")

#: FreeSurfer labels of each part (other brain labels 1..499 are "other_brain"; extra-cerebral labels background).
_CEREBRUM = (2, 3, 10, 11, 12, 13, 17, 18, 26, 28, 41, 42, 49, 50, 51, 52, 53, 54, 58, 60)
_POSTERIOR_FOSSA = (7, 8, 46, 47, 15, 16)


def parts_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """FreeSurfer label map (any shape, integers) -> part indices of :data:`PARTS` (int64, same shape)."""
    parts = torch.zeros(labels.shape, dtype=torch.int64)
    parts[(labels > 0) & (labels < 500)] = PARTS.index("other_brain")
    for name, values in (("cerebrum", _CEREBRUM), ("posterior_fossa", _POSTERIOR_FOSSA)):
        parts[torch.isin(labels, torch.tensor(values, dtype=labels.dtype))] = PARTS.index(name)
    return parts


class BrainPartsNet(UNet):
    """A small 3-D U-Net: image ``(B, 1, 64, 64, 64)`` in [0, 1] -> part logits ``(B, 4, 64, 64, 64)``."""

    def __init__(self, channels: tuple = (16, 32, 64, 128)):
        super().__init__(
            spatial_dims=3,
            in_channels=1,
            out_channels=len(PARTS),
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=0,
            norm="instance",
        )


def foreground_centre(image: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World centre ``(3,)`` of the voxels brighter than 10 % of the image's 99th percentile (head or brain).

    Args:
        image: ``(D, H, W)`` intensities of any unit; background dark, as in any MR scan.
        affine: ``(4, 4)`` voxel-to-world matrix.
    """
    values = torch.nan_to_num(image.to(torch.float32))
    stride = max(1, int(round(min(values.shape) / 64)))  # ~64^3 samples are plenty for a centre
    sampled = values[::stride, ::stride, ::stride]
    threshold = 0.1 * torch.quantile(sampled.flatten()[:: max(1, sampled.numel() // 200_000)], 0.99)
    voxels = torch.nonzero(sampled > threshold).to(torch.float64) * stride
    if len(voxels) == 0:
        voxels = torch.tensor([[(s - 1) / 2 for s in values.shape]], dtype=torch.float64)
    return apply_affine(affine.to(torch.float64), voxels).mean(0)


def head_grid(centre: torch.Tensor) -> torch.Tensor:
    """``(4, 4)`` voxel-to-world matrix of the coarse head grid: RAS axes, 4 mm voxels, centred on ``centre``."""
    grid = torch.diag(torch.tensor([HEAD_GRID_SPACING] * 3 + [1.0], dtype=torch.float64))
    grid[:3, 3] = centre.to(torch.float64) - HEAD_GRID_SPACING * (HEAD_GRID_SIZE - 1) / 2
    return grid


def normalise_intensity(image: torch.Tensor) -> torch.Tensor:
    """Map the 0.5th-99.5th percentiles of an image to [0, 1] (clipped), as the synthesis and the bundle do."""
    flat = image.flatten()
    low, high = torch.quantile(flat[:: max(1, flat.numel() // 500_000)], torch.tensor([0.005, 0.995]))
    return ((image - low) / (high - low).clamp(min=1e-8)).clamp(0, 1)


def to_head_grid(image: torch.Tensor, affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample an image ``(D, H, W)`` onto its coarse head grid: returns ``(64, 64, 64)`` in [0, 1] and the grid.

    Voxels finer than the grid are averaged first (box filter of the spacing ratio), so thin structures do not
    alias; the rest is one trilinear resampling through world coordinates.
    """
    affine = affine.to(torch.float64)
    values = torch.nan_to_num(image.to(torch.float32))
    spacing = affine[:3, :3].norm(dim=0)
    factors = [max(1, int(HEAD_GRID_SPACING / float(s))) for s in spacing]
    if any(f > 1 for f in factors):
        values = F.avg_pool3d(values[None, None], kernel_size=factors, stride=factors, ceil_mode=True)[0, 0]
        scale = torch.tensor(factors, dtype=torch.float64)
        pooled = affine.clone()
        pooled[:3, :3] = affine[:3, :3] * scale
        pooled[:3, 3] = apply_affine(affine, ((scale - 1) / 2)[None])[0]
        affine = pooled
    grid = head_grid(foreground_centre(values, affine))
    identity = torch.eye(4, dtype=torch.float64)
    resampled = resample_onto(values[None], affine, grid, (HEAD_GRID_SIZE,) * 3, identity)[0]
    return normalise_intensity(resampled), grid


def pose_from_parts(parts: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The upright frame ``U`` ``(3, 3)`` (columns: right, anterior, superior in world RAS) of a parts map.

    Args:
        parts: ``(D, H, W)`` part indices (:data:`PARTS`) on the grid ``grid`` (``(4, 4)`` voxel-to-world).

    Raises:
        ValueError: a part needed for the pose (the cerebrum, the posterior fossa) is missing.
    """
    points = {}
    for name in ("cerebrum", "posterior_fossa"):
        voxels = torch.nonzero(parts == PARTS.index(name)).to(torch.float64)
        if len(voxels) < 8:
            raise ValueError(f"no {name.replace('_', ' ')} found")
        points[name] = apply_affine(grid, voxels)
    cerebrum = points["cerebrum"].mean(0)
    towards_cerebrum = cerebrum - points["posterior_fossa"].mean(0)
    centred = points["cerebrum"] - cerebrum
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    front = vectors[:, 2] if vectors[:, 2] @ towards_cerebrum >= 0 else -vectors[:, 2]
    up = towards_cerebrum - (towards_cerebrum @ front) * front
    up = up / up.norm()
    return torch.stack([torch.linalg.cross(front, up), front, up], dim=1)

"""The keypoint detector: a lean 3-D CNN for CPUs that turns an image into K heatmaps, then K points.

Architecture (defaults, 96^3 input at 2 mm): a stride-2 stem and three stride-2 levels bring the volume to 1/16
(a receptive field covering the whole brain, needed to tell a keypoint's anatomy apart at any orientation); one
decoder step returns to 1/8 and a 1x1 convolution gives K heatmaps. Narrow early layers carry almost all the
voxels, so they stay narrow; channels grow only where the volume is small. Each heatmap becomes one point by its
centre of mass (ReLU, no softmax), in the input's voxel-index coordinates (see :mod:`scripts.coordinates`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution


def _conv(in_channels: int, out_channels: int, strides: int = 1, kernel_size: int = 3) -> Convolution:
    """Conv -> InstanceNorm -> ReLU, the unit every level is made of."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=strides,
        kernel_size=kernel_size,
        norm="instance",
        act="relu",
    )


class CenterOfMass(nn.Module):
    """Centre of mass of each of K heatmaps ``(B, K, d, h, w)`` -> ``(B, K, 3)`` voxel indices of the input.

    Heatmap voxel ``(a, b, c)`` is the output of a receptive field centred on input voxel ``stride * (a, b, c)``
    (stride-2 convolutions with kernel 3 and padding 1 keep that alignment). Negative responses are clipped
    (ReLU); ``eps`` (a floor on the total mass) keeps an all-zero heatmap finite: it then gives the grid's origin
    instead of NaN, while any heatmap of mass >= ``eps`` gives its exact centre of mass.
    """

    def __init__(self, stride: int, eps: float = 1e-6):
        super().__init__()
        self.stride = stride
        self.eps = eps

    def forward(self, heatmaps: torch.Tensor) -> torch.Tensor:
        mass = F.relu(heatmaps)
        total = mass.sum(dim=(2, 3, 4)).clamp(min=self.eps)  # (B, K); clamp, not + eps, so no bias to the origin
        coords = []
        for axis in range(3):
            size = heatmaps.shape[axis + 2]
            position = torch.arange(size, dtype=heatmaps.dtype, device=heatmaps.device) * float(self.stride)
            keep = [2, 3, 4]
            keep.remove(axis + 2)
            profile = mass.sum(dim=keep)  # (B, K, size): marginal along this axis
            coords.append((profile * position).sum(-1) / total)
        return torch.stack(coords, dim=-1)


class KeypointDetector(nn.Module):
    """Image ``(B, in_channels, D, H, W)`` -> keypoints ``(B, num_keypoints, 3)`` in input voxel indices.

    Args:
        in_channels: image channels (1 for MRI).
        num_keypoints: K, the number of heatmaps and points.
        channels: widths of the stem and of the three downsampling levels.
    """

    def __init__(self, in_channels: int = 1, num_keypoints: int = 128, channels: tuple = (24, 48, 128, 256)):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.num_keypoints = num_keypoints
        self.stem = _conv(in_channels, c0, strides=2)  # 1/2
        self.level1 = nn.Sequential(_conv(c0, c1, strides=2), _conv(c1, c1))  # 1/4
        self.level2 = nn.Sequential(_conv(c1, c2, strides=2), _conv(c2, c2))  # 1/8
        self.level3 = nn.Sequential(_conv(c2, c3, strides=2), _conv(c3, c3))  # 1/16
        self.decoder = _conv(c3 + c2, c2)  # back at 1/8 with the skip connection
        self.heatmaps = nn.Conv3d(c2, num_keypoints, kernel_size=1)
        self.center_of_mass = CenterOfMass(stride=8)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The K heatmaps ``(B, K, D/8, H/8, W/8)`` before the centre of mass."""
        skip = self.level2(self.level1(self.stem(image)))
        deep = self.level3(skip)
        deep = F.interpolate(deep, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.heatmaps(self.decoder(torch.cat([deep, skip], dim=1)))

    def forward(self, image: torch.Tensor, with_power: bool = False):
        """Keypoints ``(B, K, 3)`` in input voxel indices; with ``with_power`` also each heatmap's power ``(B, K)``:
        its total mass after the ReLU (KeyMorph 2.0's keypoint confidence), which
        :func:`scripts.registration.power_weights` turns into the weights of the fit. (An argument of ``forward``,
        not a method of its own, so that DistributedDataParallel sees the pass.)"""
        heatmaps = self.features(image)
        points = self.center_of_mass(heatmaps)
        if torch.jit.is_scripting():  # the exported TorchScript model gives the keypoints alone
            return points
        else:
            return (points, F.relu(heatmaps).sum(dim=(2, 3, 4))) if with_power else points

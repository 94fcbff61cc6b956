"""The one coordinate convention of this bundle. Every other module follows it; tests enforce it.

Spaces
------
* **World**: RAS+ millimetres, the NIfTI/nibabel convention (x grows to the subject's Right, y to Anterior,
  z to Superior). Every image carries its 4x4 voxel-to-world matrix as ``MetaTensor.affine`` (MONAI's
  ``LoadImage`` converts ITK's LPS to RAS on reading, so this holds for every loaded image).
* **Voxel index**: ``(i, j, k)`` indexes the three spatial array axes of a ``(C, D, H, W)`` tensor in that order;
  voxel centres sit on integers, so voxel ``(0, 0, 0)`` is the centre of the first voxel. ``world = affine @ [i, j,
  k, 1]``.
* **Normalized grid**: the coordinates of :func:`torch.nn.functional.grid_sample` with ``align_corners=True``:
  ``n = 2 i / (S - 1) - 1``, so -1 and +1 are the centres of the first and last voxels. PyTorch orders the last
  dimension of a grid as ``(x, y, z) = (k, j, i)``, the reverse of the array axes; only the functions here deal
  with that reversal.

Points are ``(B, N, 3)`` tensors of world millimetres unless a name says ``voxel``.

Transforms
----------
A registration result is a 4x4 **fixed-to-moving** world matrix ``T``: it maps a point of the fixed image's
physical space to the corresponding point of the moving image's physical space (the pull-back direction used to
resample, the same direction as an ITK transform given to ``SimpleITK.Resample(moving, fixed, transform)``).
Keypoints are fitted in that direction directly (fixed points as source, moving points as target), so no matrix
is ever inverted to warp an image. Users also get the inverse, the moving-to-fixed RAS matrix, in
``affine_ras.txt``.

ITK stores physical points in LPS: ``T_itk = F T F`` with ``F = diag(-1, -1, 1, 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Flips x and y: RAS <-> LPS (its own inverse).
RAS_LPS_FLIP = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


def affine_of(image) -> torch.Tensor:
    """The ``(4, 4)`` float64 voxel-to-world matrix of an image (a MetaTensor, or anything with an ``affine``:
    a nibabel image); the identity for a plain tensor. For a batched MetaTensor, MONAI's ``(B, 4, 4)``."""
    return torch.as_tensor(image.affine if hasattr(image, "affine") else torch.eye(4), dtype=torch.float64)


def batched_affine(image) -> torch.Tensor:
    """``(B, 4, 4)`` float64 voxel-to-world matrices of a batched ``(B, C, D, H, W)`` MetaTensor (MONAI keeps one
    ``(4, 4)`` or ``(B, 4, 4)``)."""
    affine = affine_of(image)
    return affine.expand(image.shape[0], 4, 4) if affine.ndim == 2 else affine


def apply_affine(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply ``(B, 4, 4)`` (or ``(4, 4)``) homogeneous matrices to ``(B, N, 3)`` points; returns ``(B, N, 3)``."""
    return points @ matrix[..., :3, :3].transpose(-1, -2) + matrix[..., None, :3, 3]


def voxel_to_normalized(spatial_shape: tuple[int, ...] | torch.Size, dtype=torch.float64) -> torch.Tensor:
    """4x4 matrix mapping voxel indices ``(i, j, k)`` of a grid of ``spatial_shape`` to normalized ``(i, j, k)``.

    Normalized coordinates follow ``align_corners=True`` (voxel centres at -1 and +1) and keep the array order;
    :func:`sampling_grid` reverses them for PyTorch.
    """
    sizes = torch.tensor([float(s) for s in spatial_shape], dtype=dtype)
    matrix = torch.eye(4, dtype=dtype)
    matrix[:3, :3] = torch.diag(2.0 / (sizes - 1).clamp(min=1))
    # A single-voxel axis sits at 0, where ``affine_grid`` puts it (align_corners=True), not at -1.
    matrix[:3, 3] = torch.where(sizes > 1, -1.0, 0.0).to(dtype)
    return matrix


def _reverse_xyz(matrix: torch.Tensor) -> torch.Tensor:
    """Reorder a ``(..., 4, 4)`` matrix acting on ``(i, j, k)`` to act on PyTorch's ``(k, j, i)``."""
    perm = [2, 1, 0, 3]
    return matrix[..., perm, :][..., :, perm]


def world_to_voxel_normalized(
    fixed_to_moving: torch.Tensor, fixed_affine: torch.Tensor, moving_affine: torch.Tensor, fixed_shape, moving_shape
) -> torch.Tensor:
    """Compose a world transform with both grids: fixed normalized ``(i, j, k)`` -> moving normalized ``(i, j, k)``.

    Args:
        fixed_to_moving: ``(B, 4, 4)`` world (RAS mm) matrix, fixed points to moving points.
        fixed_affine, moving_affine: ``(B, 4, 4)`` voxel-to-world matrices of the two grids.
        fixed_shape, moving_shape: spatial shapes ``(D, H, W)`` of the two grids.
    """
    dtype = torch.float64
    n_fixed = voxel_to_normalized(fixed_shape, dtype).to(fixed_to_moving.device)
    n_moving = voxel_to_normalized(moving_shape, dtype).to(fixed_to_moving.device)
    return (
        n_moving
        @ torch.linalg.inv(moving_affine.to(dtype))
        @ fixed_to_moving.to(dtype)
        @ fixed_affine.to(dtype)
        @ torch.linalg.inv(n_fixed)
    )


def sampling_grid(
    fixed_to_moving: torch.Tensor, fixed_affine: torch.Tensor, moving_affine: torch.Tensor, fixed_shape, moving_shape
) -> torch.Tensor:
    """Sampling grid ``(B, D, H, W, 3)`` that pulls moving intensities onto the fixed grid.

    Use with ``grid_sample(moving, grid, align_corners=True)``. Arguments as in :func:`world_to_voxel_normalized`;
    the grid has the fixed ``spatial_shape`` and the dtype of ``fixed_to_moving`` (float32 if it is float64, as
    ``grid_sample`` wants the image's dtype).
    """
    theta = _reverse_xyz(
        world_to_voxel_normalized(fixed_to_moving, fixed_affine, moving_affine, fixed_shape, moving_shape)
    )
    batch = fixed_to_moving.shape[0]
    out_dtype = torch.float32 if fixed_to_moving.dtype == torch.float64 else fixed_to_moving.dtype
    size = [batch, 1, *[int(s) for s in fixed_shape]]
    return F.affine_grid(theta[:, :3, :].to(out_dtype), size, align_corners=True)


def world_to_voxel(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """World points ``(B, N, 3)`` (or ``(N, 3)``) to voxel indices of the grid of voxel-to-world ``affine``."""
    return apply_affine(torch.linalg.inv(affine), points)


def voxel_grid_world(affine: torch.Tensor, spatial_shape) -> torch.Tensor:
    """World coordinates ``(B, D*H*W, 3)`` of every voxel centre of a grid, in array (C) order."""
    axes = [torch.arange(int(s), dtype=affine.dtype, device=affine.device) for s in spatial_shape]
    voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)
    return apply_affine(affine, voxels.expand(affine.shape[0], -1, -1))


def world_to_grid_matrix(moving_affine: torch.Tensor, moving_shape) -> torch.Tensor:
    """The ``(..., 4, 4)`` matrix taking moving-world points (mm) to PyTorch grid coordinates (reversed, normalized) of
    the grid of voxel-to-world ``moving_affine`` ``(..., 4, 4)`` and spatial shape ``moving_shape``; composed with a
    world transform first, it moves many points onto the grid in one product."""
    to_normalized = voxel_to_normalized(moving_shape, moving_affine.dtype).to(moving_affine.device)
    return (to_normalized @ torch.linalg.inv(moving_affine))[..., [2, 1, 0, 3], :]


def world_points_to_grid(points: torch.Tensor, moving_affine: torch.Tensor, moving_shape) -> torch.Tensor:
    """Moving-world points ``(B, N, 3)`` to PyTorch grid coordinates ``(B, N, 3)`` (reversed, normalized)."""
    return apply_affine(world_to_grid_matrix(moving_affine, moving_shape).to(points.dtype), points)


def warp(moving: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Resample ``moving`` ``(B, C, D, H, W)`` at ``grid`` ``(B, D', H', W', 3)``; ``mode`` "bilinear" or "nearest"."""
    return F.grid_sample(moving, grid.to(moving.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def ras_to_lps(matrix: torch.Tensor) -> torch.Tensor:
    """Express a 4x4 RAS world matrix in ITK's LPS world (the same map, other axes); also LPS -> RAS."""
    flip = RAS_LPS_FLIP.to(matrix.device, matrix.dtype)
    return flip @ matrix @ flip


#: Fixed-grid voxels :func:`resample_onto` samples per ``grid_sample`` call: one slab's sampling grid (float64, then
#: float32) takes a few MB however large the output, where a whole grid of a 512^3 output would take 1.5 GB.
SLAB_VOXELS = 2**18


def resample_onto(
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    fixed_affine: torch.Tensor,
    fixed_shape,
    fixed_to_moving: torch.Tensor,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample a moving image ``(C, D, H, W)`` onto a fixed grid through a world transform; returns ``(C, *fixed_shape)``.

    Works on native grids of any orientation and spacing (4x4 voxel-to-world ``moving_affine`` and
    ``fixed_affine``, ``fixed_to_moving`` as in :func:`sampling_grid`); outside the moving field of view is 0.
    ``mode`` is "bilinear" for intensities and "nearest" for label maps (whose dtype is kept).

    Only the box of the fixed grid that reaches the moving image's content (its non-zero voxels, one voxel wider:
    what a trilinear weight can touch) is sampled; the rest is 0, as every sample there would be. A brain-extracted
    image fills a fraction of its field of view, and the fixed grid is usually larger than the moving brain. The box
    is sampled in slabs of about :data:`SLAB_VOXELS` voxels whose sampling grid is computed in float64 from the
    voxel indices (``grid_sample``'s coordinates, ``align_corners=True``): float64 matrices, float32 steps.
    """
    fixed_shape = [int(s) for s in fixed_shape]
    moving_shape = [int(s) for s in moving.shape[1:]]
    dtype = torch.float64
    # fixed voxel indices (i, j, k) -> moving voxel indices, and -> grid_sample's (x, y, z) = normalized (k, j, i)
    fixed_voxels_to_world = fixed_to_moving.to(dtype) @ fixed_affine.to(dtype)
    fixed_to_moving_voxels = (torch.linalg.inv(moving_affine.to(dtype)) @ fixed_voxels_to_world).cpu()
    to_grid = (world_to_grid_matrix(moving_affine.to(dtype), moving_shape) @ fixed_voxels_to_world).to(moving.device)
    out_dtype = moving.dtype if mode == "nearest" else torch.float32
    out = torch.zeros(moving.shape[0], *fixed_shape, dtype=out_dtype, device=moving.device)
    box = _fixed_box_reaching_content(moving, fixed_to_moving_voxels, fixed_shape)
    if box is None:
        return out
    (i_low, i_high), (j_low, j_high), (k_low, k_high) = box
    # the grid channel first, (3, rows, J, K), so each step runs along whole contiguous planes; grid_sample reads it
    # through a permuted view
    j = torch.arange(j_low, j_high, dtype=dtype, device=moving.device)
    k = torch.arange(k_low, k_high, dtype=dtype, device=moving.device)
    plane = to_grid[:3, 1, None, None] * j[:, None] + to_grid[:3, 2, None, None] * k + to_grid[:3, 3, None, None]
    plane, step = plane.to(torch.float32), to_grid[:3, 0].to(torch.float32)
    source = moving[None].to(torch.float32)
    slab = max(1, SLAB_VOXELS // max(plane.shape[1] * plane.shape[2], 1))
    for start in range(i_low, i_high, slab):
        rows = torch.arange(start, min(start + slab, i_high), dtype=torch.float32, device=moving.device)
        grid = plane[:, None] + (step[:, None] * rows)[:, :, None, None]
        warped = warp(source, grid.permute(1, 2, 3, 0)[None], mode=mode)[0]
        out[:, start : start + len(rows), j_low:j_high, k_low:k_high] = warped.to(out.dtype)
    return out


def _fixed_box_reaching_content(
    moving: torch.Tensor, fixed_to_moving_voxels: torch.Tensor, fixed_shape
) -> list[tuple[int, int]] | None:
    """Index ranges ``[(low, high)] * 3`` (high exclusive) of the fixed-grid box whose voxels may sample a non-zero
    (or NaN) voxel of ``moving`` ``(C, D, H, W)`` through ``fixed_to_moving_voxels`` ``(4, 4)`` (fixed voxel indices to
    moving ones), with a voxel to spare; None when no voxel does. The whole grid when the matrix is not invertible."""
    content = ((moving != 0).any(0) if len(moving) > 1 else moving[0] != 0).cpu()
    # reductions over the contiguous trailing axes and over whole planes: fast, where reducing a middle axis is not
    planes = content.any(0)
    spans = [content.flatten(1).any(1), planes.any(1), planes.any(0)]
    if not bool(spans[0].any()):
        return None
    whole = [(0, size) for size in fixed_shape]
    # a trilinear sample at p reads voxels floor(p) and floor(p) + 1: content in [low, high] is seen from (low - 1,
    # high + 1)
    ranges = [(float(s.nonzero()[0]) - 1, float(s.nonzero()[-1]) + 1) for s in spans]
    corners = torch.tensor(
        [[i, j, k, 1.0] for i in ranges[0] for j in ranges[1] for k in ranges[2]], dtype=torch.float64
    )
    try:
        to_fixed = torch.linalg.inv(fixed_to_moving_voxels)
    except RuntimeError:  # a singular transform: no box to bound
        return whole
    fixed_corners = corners @ to_fixed.T
    if not bool(torch.isfinite(fixed_corners).all()):
        return whole
    low, high = fixed_corners[:, :3].min(0).values, fixed_corners[:, :3].max(0).values
    box = []
    for axis, size in enumerate(fixed_shape):
        first, last = max(0, math.floor(float(low[axis])) - 1), min(size - 1, math.ceil(float(high[axis])) + 1)
        if first > last:
            return None
        box.append((first, last + 1))
    return box


def rotation_angle_deg(matrix: torch.Tensor) -> float:
    """Net rotation angle in degrees (0..180) of a ``(4, 4)`` or ``(3, 3)`` matrix: the angle of the rotation factor
    of the polar decomposition of its linear part (``L = Q P``, ``Q = U V^T`` from the SVD ``L = U S V^T``)."""
    linear = torch.as_tensor(matrix, dtype=torch.float64)[:3, :3]
    u, _, vh = torch.linalg.svd(linear)
    rotation = u @ vh
    cosine = ((torch.trace(rotation) - 1) / 2).clamp(-1.0, 1.0)
    return math.degrees(math.acos(float(cosine)))


def grid_around(
    points: torch.Tensor, spacing, frame: torch.Tensor | None = None, margin_mm=0.0
) -> tuple[torch.Tensor, list[int]]:
    """The grid whose axes run along the columns of ``frame`` (a ``(3, 3)`` rotation; None or identity:
    world-aligned) with ``spacing`` mm (one value or three) that holds the world points ``(N, 3)`` and
    ``margin_mm`` (one value or three, along the grid's axes) beyond them.

    Returns:
        The grid's ``(4, 4)`` float64 voxel-to-world matrix and its spatial shape.
    """
    frame = torch.eye(3, dtype=torch.float64) if frame is None else torch.as_tensor(frame, dtype=torch.float64)
    along = torch.as_tensor(points, dtype=torch.float64) @ frame
    margin = torch.as_tensor(margin_mm, dtype=torch.float64)
    low, high = along.min(0).values - margin, along.max(0).values + margin
    step = torch.as_tensor(spacing, dtype=torch.float64).expand(3)
    shape = [int(n) for n in torch.ceil((high - low) / step - 1e-6).long() + 1]
    grid = torch.eye(4, dtype=torch.float64)
    grid[:3, :3] = frame * step
    grid[:3, 3] = frame @ low
    return grid, shape


def covering_grid_along(
    frame: torch.Tensor, affine: torch.Tensor, spatial_shape, spacing
) -> tuple[torch.Tensor, list[int]]:
    """The grid whose axes run along the columns of ``frame`` (a ``(3, 3)`` rotation; identity: world-aligned) with
    ``spacing`` mm (one value or three) that holds the whole field of view of an image (its voxel centres):
    :func:`grid_around` its corners.

    Args:
        frame: ``(3, 3)`` unit world directions of the grid's axes i, j, k.
        affine: ``(4, 4)`` voxel-to-world matrix of the image; ``spatial_shape``: its spatial shape.

    Returns:
        The grid's ``(4, 4)`` float64 voxel-to-world matrix and its spatial shape.
    """
    corners = torch.tensor(
        [
            [i, j, k]
            for i in (0, spatial_shape[0] - 1)
            for j in (0, spatial_shape[1] - 1)
            for k in (0, spatial_shape[2] - 1)
        ],
        dtype=torch.float64,
    )
    return grid_around(apply_affine(torch.as_tensor(affine, dtype=torch.float64), corners), spacing, frame)


def centred_grid(axes: torch.Tensor, spacing: float, spatial_size: int, center: torch.Tensor) -> torch.Tensor:
    """``(4, 4)`` float64 voxel-to-world matrix of a cubic grid of ``spatial_size`` voxels of ``spacing`` mm whose
    axes run along the columns of the rotation ``axes`` ``(3, 3)`` and whose centre lies at ``center`` ``(3,)``."""
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = axes * spacing
    affine[:3, 3] = center - affine[:3, :3] @ torch.full((3,), (spatial_size - 1) / 2, dtype=torch.float64)
    return affine


def coarser_grid(affine: torch.Tensor, factor: int) -> torch.Tensor:
    """The ``(..., 4, 4)`` voxel-to-world matrix of a grid ``factor`` times coarser than ``affine``'s, as
    ``avg_pool3d(.., factor)`` makes it: a coarse cell's centre is the mean of its fine voxel centres (index ``j`` ->
    fine index ``factor * j + (factor - 1) / 2``)."""
    cells = torch.eye(4, dtype=affine.dtype, device=affine.device)
    cells[:3, :3] *= factor
    cells[:3, 3] = (factor - 1) / 2
    return affine @ cells


def turned(image: torch.Tensor, affine: torch.Tensor, axes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same image ``(B, C, D, H, W)`` on its grid turned by 180 degrees (``axes`` flipped), and that grid's
    ``(B, 4, 4)`` affine: exact (voxel ``i`` becomes ``S - 1 - i``), so the world content is unchanged."""
    if not axes:
        return image, affine
    flip = torch.eye(4, dtype=affine.dtype, device=affine.device)
    for axis in axes:
        flip[axis, axis] = -1.0
        flip[axis, 3] = image.shape[2 + axis] - 1
    return image.flip([2 + axis for axis in axes]), affine @ flip

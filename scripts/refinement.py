"""Optional intensity-based refinement of the keypoint solution: mutual-information affine optimisation from coarse
to fine, at sampled points, kept only when an independent check says it improved.

The keypoint fit is robust (any starting orientation) but its precision is limited by the 2 mm grid and by how
exactly each keypoint lands on its anatomy. Starting from it, intensity-based optimisation only has to correct a
small residual, where mutual information (valid across T1, T2 and PD) is reliable. The transform is updated as
``T = T0 @ U`` with ``U(p) = c + (I + L)(p - c) + t`` about the fixed brain's centre ``c``, so ``L`` and ``t`` start
at zero; the cost is Parzen-window mutual information (MONAI's :class:`GlobalMutualInformationLoss`) between the
fixed image at sampled points and the moving image at their transformed positions.

* **Where**: the points are drawn in the fixed brain mask dilated by ``margin_mm``: the brain's edge against the
  background is the strongest mutual-information signal, and half of it lies outside the mask. Each point is a
  mask voxel of the network grid moved by a uniform random fraction of a voxel, so that at a finer level it reads
  the finer image between the network grid's voxels instead of at them.
* **Levels**: the network grids (2 mm) first, then, when given, the images at their own resolution (``fine``, e.g.
  1 mm): the coarse level covers the keypoint solution's few millimetres, the fine one reaches the optimum of the
  images themselves. Only the sampled points are read at the fine level, never whole volumes.
* **Steps**: Adam, its step decaying from ``learning_rate`` (the fine level: ``fine_learning_rate``) to a tenth of
  it along a cosine; a level stops early when its cost has not improved by ``tolerance`` for ``patience`` steps.
  Each level keeps the parameters of the lowest cost it met on its sample.
* **Check**: the cost optimised is measured on one sample of points, and its lowest value may be that sample's
  noise; a second, independent sample (``check_samples`` points) scores the keypoint solution and the refined one at
  the finest level, and the refined one is returned only when it scores better there.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss
from monai.utils import convert_to_tensor

from scripts.coordinates import apply_affine, warp, world_points_to_grid, world_to_grid_matrix

#: parameters' scale: 1 means 10 % of linear change (``L``) or 10 mm of translation (``t``)
LINEAR_SCALE, SHIFT_SCALE = 0.1, 10.0


def region_voxels(mask: torch.Tensor, affine: torch.Tensor, margin_mm: float) -> torch.Tensor:
    """Voxel indices ``(N, 3)`` (float64) of a ``(1, D, H, W)`` mask dilated by ``margin_mm`` (a cube of that
    half-width: three 1-D maximum filters, the cube being separable)."""
    region = mask[None].to(torch.float32)
    spacing = affine[:3, :3].norm(dim=0)
    for axis in range(3):
        radius = int(round(margin_mm / float(spacing[axis]))) if margin_mm > 0 else 0
        if radius:
            kernel = [1, 1, 1]
            kernel[axis] = 2 * radius + 1
            padding = [0, 0, 0]
            padding[axis] = radius
            region = F.max_pool3d(region, kernel, stride=1, padding=padding)
    return torch.nonzero(region[0, 0] > 0.5).to(torch.float64)


def sample_points(voxels: torch.Tensor, affine: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random world points ``(count, 3)`` (float64, mm) among ``voxels`` ``(N, 3)``: voxels drawn without
    replacement (with, when fewer than ``count``), each moved by a uniform random offset within its voxel."""
    if len(voxels) >= count:
        chosen = voxels[torch.randperm(len(voxels), generator=generator)[:count]]
    else:
        chosen = voxels[torch.randint(len(voxels), (count,), generator=generator)]
    jitter = torch.rand(chosen.shape, generator=generator, dtype=torch.float64) - 0.5
    return apply_affine(affine.to(torch.float64), chosen + jitter)


def _values(image: torch.Tensor, affine: torch.Tensor, world: torch.Tensor) -> torch.Tensor:
    """Trilinear values ``(1, 1, N, 1, 1)`` of a ``(1, D, H, W)`` image at world points ``(N, 3)`` (0 outside)."""
    grid = world_points_to_grid(world[None], affine[None].to(torch.float64), image.shape[1:])
    return warp(image[None].to(torch.float32), grid.view(1, -1, 1, 1, 3).to(torch.float32))


class _FixedTargetMutualInformation(GlobalMutualInformationLoss):
    """MONAI's :class:`GlobalMutualInformationLoss`, step for step (the same result, bit for bit), for a target that
    stays the same tensor from call to call (the fixed image's values at the level's points): its Parzen windows are
    computed once instead of at every step of the descent."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._target, self._target_windows = None, None

    def parzen_windowing(self, pred: torch.Tensor, target: torch.Tensor):
        if self.kernel_type != "gaussian":
            return super().parzen_windowing(pred, target)
        if target is not self._target:
            self._target, self._target_windows = target, self.parzen_windowing_gaussian(target)
        return (*self.parzen_windowing_gaussian(pred), *self._target_windows)


class _Cost:
    """Mutual-information cost (lower is better) of fixed-to-moving matrices at fixed points on one level.

    ``cost(matrix)`` reads the moving image at the points moved by the ``(4, 4)`` float64 fixed-to-moving world
    matrix: the matrix is composed with the moving grid's world-to-sampling-grid matrix first, so each step moves the
    points by one matrix product (the same points as moving them through world coordinates, up to float64 rounding).
    """

    def __init__(self, fixed, fixed_affine, moving, moving_affine, points: torch.Tensor, loss: torch.nn.Module):
        self.fixed_values = _values(convert_to_tensor(fixed, track_meta=False), torch.as_tensor(fixed_affine), points)
        self.moving = convert_to_tensor(moving, track_meta=False)
        moving_affine = torch.as_tensor(moving_affine).to(device=points.device, dtype=points.dtype)
        self.world_to_grid = world_to_grid_matrix(moving_affine, self.moving.shape[1:])
        self.points, self.loss = points, loss

    def __call__(self, fixed_to_moving: torch.Tensor) -> torch.Tensor:
        grid = apply_affine(self.world_to_grid @ fixed_to_moving, self.points)
        values = warp(self.moving[None].to(torch.float32), grid.view(1, -1, 1, 1, 3).to(torch.float32))
        return self.loss(values, self.fixed_values)


def refine_affine(
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    fixed_mask: torch.Tensor,
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    initial: torch.Tensor,
    iterations: int = 40,
    samples: int = 8000,
    learning_rate: float = 0.1,
    seed: int = 0,
    fine: Sequence | None = None,
    fine_iterations: int = 20,
    fine_learning_rate: float = 0.03,
    margin_mm: float = 6.0,
    num_bins: int = 32,
    tolerance: float = 1e-4,
    patience: int = 10,
    check_samples: int = 8000,
) -> torch.Tensor:
    """Refine a fixed-to-moving world matrix by maximising mutual information (module docstring).

    Args:
        fixed, moving: network-grid images ``(1, D, H, W)``, intensities in [0, 1].
        fixed_affine, moving_affine: their voxel-to-world matrices ``(4, 4)``.
        fixed_mask: ``(1, D, H, W)`` brain mask of the fixed image on its grid; the points are drawn in it, dilated.
        initial: ``(4, 4)`` float64 fixed-to-moving world matrix (the keypoint solution).
        iterations: most Adam steps on the network grids (0 returns ``initial``).
        samples: points of the optimised cost.
        learning_rate: first Adam step of the parameters on the network grids (1 means 10 % of linear change or
            10 mm of translation); it decays to a tenth along a cosine over ``iterations``.
        seed: seed of the points (refinement is deterministic).
        fine: ``(fixed, fixed_affine, moving, moving_affine)`` of the images at their own resolution (intensities
            as the network grids'), or None: the network grids are the finest level.
        fine_iterations, fine_learning_rate: the same for the fine level.
        margin_mm: the mask's dilation (mm).
        num_bins: histogram bins of the mutual information.
        tolerance, patience: a level stops when its lowest cost has not dropped by ``tolerance`` for ``patience``
            steps.
        check_samples: points of the independent check (0: no check, the refined matrix is returned).

    Returns:
        ``(4, 4)`` float64 refined fixed-to-moving world matrix, or ``initial`` itself when the check finds no gain.
    """
    if iterations <= 0:
        return initial
    fixed_mask = convert_to_tensor(fixed_mask, track_meta=False).cpu()
    if int((fixed_mask > 0.5).sum()) < 100:
        return initial
    device = initial.device
    fixed_affine = torch.as_tensor(fixed_affine).to(torch.float64)
    on_cpu = fixed_affine.cpu()
    generator = torch.Generator().manual_seed(seed)
    voxels = region_voxels(fixed_mask, on_cpu, margin_mm)
    points = sample_points(voxels, on_cpu, samples, generator).to(device)
    check_points = sample_points(voxels, on_cpu, check_samples, generator).to(device)
    center = apply_affine(on_cpu, torch.nonzero(fixed_mask[0] > 0.5).to(torch.float64)).mean(0).to(device)
    loss = _FixedTargetMutualInformation(num_bins=num_bins, sigma_ratio=0.5)
    levels = [((fixed, fixed_affine, moving, moving_affine), iterations, learning_rate)]
    if fine is not None and fine_iterations > 0:
        levels.append((tuple(fine), fine_iterations, fine_learning_rate))
    initial = initial.to(torch.float64)
    zero = (torch.zeros(3, 3, dtype=torch.float64, device=device), torch.zeros(3, dtype=torch.float64, device=device))
    linear, shift = zero

    def transform(linear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``T0 @ U``: ``U(p) = c + (I + L)(p - c) + t`` with the parameters' scales (module docstring)."""
        update = torch.eye(4, dtype=torch.float64, device=device)
        update[:3, :3] = torch.eye(3, dtype=torch.float64, device=device) + LINEAR_SCALE * linear
        update[:3, 3] = center + SHIFT_SCALE * shift - update[:3, :3] @ center
        return initial @ update

    # callers register under no_grad; only these 12 parameters get gradients
    with torch.enable_grad(), one_thread():
        for images, steps, rate in levels:
            cost = _Cost(*images, points, loss)
            linear, shift = _descend(cost, transform, linear, shift, steps, rate, tolerance, patience)
    if check_samples > 0:
        check = _Cost(*levels[-1][0], check_points, loss)
        with torch.no_grad(), one_thread():
            if float(check(transform(linear, shift))) >= float(check(transform(*zero))):
                return initial
    return transform(linear, shift)


@contextmanager
def one_thread():
    """torch's intra-op threads set to one for the block, then restored. The descent runs a few thousand operations
    on a few thousand points (``(8000, 32)`` Parzen windows, 3-D samples at 8000 points): too small for several
    threads, whose synchronisation costs more than it saves; on a busy CPU each parallel operation also waits for
    every thread to be scheduled (one refinement on a loaded 2-core machine: 72 s with 2 threads, 3 s with one).
    The results are the same (each operation's arithmetic does not depend on the thread count here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _descend(cost: _Cost, transform, linear, shift, steps: int, rate: float, tolerance: float, patience: int):
    """Adam on one level from ``(linear, shift)``; returns the parameters of the lowest cost met (the start
    included)."""
    linear, shift = linear.clone().requires_grad_(True), shift.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([linear, shift], lr=rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=rate / 10)
    best_cost, best, best_step = float("inf"), (linear.detach().clone(), shift.detach().clone()), 0
    for step in range(steps + 1):  # the last pass only scores the last step
        optimizer.zero_grad()
        value = cost(transform(linear, shift))
        current = float(value.detach())
        if current < best_cost - tolerance:
            best_step = step
        if current < best_cost:
            best_cost, best = current, (linear.detach().clone(), shift.detach().clone())
        if step == steps or step - best_step >= patience:
            break
        value.backward()
        optimizer.step()
        schedule.step()
    return best

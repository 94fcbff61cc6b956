"""Optional intensity-based refinement of the keypoint solution: a few dozen steps of mutual-information affine
optimisation on the network grids.

The keypoint fit is robust (any starting orientation) but its precision is limited by the 2 mm grid and by how
exactly each keypoint lands on its anatomy. Starting from it, intensity-based optimisation only has to correct a
small residual, where mutual information (valid across T1, T2 and PD) is reliable. The transform is updated as
``T = T0 @ U`` with ``U(p) = c + (I + L)(p - c) + t`` about the fixed brain's centre ``c``, so ``L`` and ``t`` start
at zero; the cost is Parzen-window mutual information (MONAI's :class:`GlobalMutualInformationLoss`) between the
fixed image at ``samples`` random fixed-brain voxels and the moving image at their transformed positions. Adam's step
decays from ``learning_rate`` to a tenth of it along a cosine: large steps first to cover the keypoint solution's
few millimetres and percent quickly, small ones last so that the result settles instead of jittering around the
optimum. The result is the parameters of the lowest cost met on the way, the keypoint solution included: the
refinement never ends worse, by its own criterion, than where it started or than any step it took.
"""

from __future__ import annotations

import torch
from monai.losses import GlobalMutualInformationLoss

from scripts.coordinates import apply_affine, warp, world_points_to_grid


def refine_affine(
    fixed: torch.Tensor,
    fixed_affine: torch.Tensor,
    fixed_mask: torch.Tensor,
    moving: torch.Tensor,
    moving_affine: torch.Tensor,
    initial: torch.Tensor,
    iterations: int = 60,
    samples: int = 8000,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """Refine a fixed-to-moving world matrix by maximising mutual information.

    Args:
        fixed, moving: network-grid images ``(1, D, H, W)``.
        fixed_affine, moving_affine: their voxel-to-world matrices ``(4, 4)``.
        fixed_mask: ``(1, D, H, W)`` brain mask of the fixed image; the cost is measured inside it.
        initial: ``(4, 4)`` float64 fixed-to-moving world matrix (the keypoint solution).
        iterations: Adam steps (0 returns ``initial``).
        samples: fixed-brain voxels sampled (once) for the cost.
        learning_rate: first Adam step for the parameters, which are scaled so that 1 means 10 % of linear change
            (``L``) or 10 mm of translation (``t``); it decays to a tenth along a cosine over ``iterations``.
        seed: seed of the voxel sample (refinement is deterministic).

    Returns:
        ``(4, 4)`` float64 refined fixed-to-moving world matrix.
    """
    if iterations <= 0:
        return initial
    fixed, fixed_mask, moving = (
        torch.as_tensor(getattr(t, "as_tensor", lambda: t)()) for t in (fixed, fixed_mask, moving)
    )
    fixed_affine, moving_affine = torch.as_tensor(fixed_affine), torch.as_tensor(moving_affine)
    voxels = torch.nonzero(fixed_mask[0] > 0.5)
    if len(voxels) < 100:
        return initial
    generator = torch.Generator().manual_seed(seed)
    chosen = voxels[torch.randperm(len(voxels), generator=generator)[:samples]]
    fixed_values = fixed[0][tuple(chosen.T)].to(torch.float32).view(1, 1, -1, 1, 1)
    points = apply_affine(fixed_affine.to(torch.float64), chosen.to(torch.float64))
    center = points.mean(0)
    centred = points - center
    moving_image = moving[None].to(torch.float32)
    moving_shape = moving.shape[1:]
    linear = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    shift = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([linear, shift], lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations, eta_min=learning_rate / 10)
    loss_fn = GlobalMutualInformationLoss(num_bins=32, sigma_ratio=0.5)
    initial = initial.to(torch.float64)

    def transformed() -> torch.Tensor:
        updated = center + centred @ (torch.eye(3, dtype=torch.float64) + 0.1 * linear).T + 10.0 * shift
        return apply_affine(initial, updated)

    def cost() -> torch.Tensor:
        grid = world_points_to_grid(transformed()[None], moving_affine[None].to(torch.float64), moving_shape)
        return loss_fn(warp(moving_image, grid.view(1, -1, 1, 1, 3).to(torch.float32)), fixed_values)

    best_cost, best = float("inf"), (linear.detach().clone(), shift.detach().clone())
    with torch.enable_grad():  # callers register under no_grad; only these 12 parameters get gradients
        for step in range(iterations + 1):  # the last pass only scores the last step
            optimizer.zero_grad()
            loss = cost()
            if float(loss) < best_cost:
                best_cost, best = float(loss), (linear.detach().clone(), shift.detach().clone())
            if step == iterations:
                break
            loss.backward()
            optimizer.step()
            schedule.step()
    linear, shift = best
    update = torch.eye(4, dtype=torch.float64)
    update[:3, :3] = torch.eye(3, dtype=torch.float64) + 0.1 * linear
    update[:3, 3] = center + 10.0 * shift - update[:3, :3] @ center
    return initial @ update

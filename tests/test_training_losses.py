"""The training loss terms: what they reward and what they must not."""

import torch

from scripts.coordinates import apply_affine
from scripts.training import relative_keypoint_error


def _pair(scale: float):
    torch.manual_seed(0)
    fixed = torch.randn(1, 64, 3, dtype=torch.float64) * 30 * scale
    truth = torch.eye(4, dtype=torch.float64)[None]
    truth[0, :3, 3] = torch.tensor([5.0, -3.0, 2.0])
    noise = torch.randn(1, 64, 3, dtype=torch.float64) * 2 * scale
    return fixed, apply_affine(truth, fixed) + noise, truth


def test_keypoint_consistency_is_zero_for_consistent_keypoints():
    fixed, _, truth = _pair(1.0)
    assert relative_keypoint_error(fixed, apply_affine(truth, fixed), truth).item() < 1e-20


def test_collapsing_the_keypoints_does_not_lower_the_keypoint_term():
    """In millimetres, shrinking the keypoint cloud (and its errors) 10x would lower the term 100x: training then
    collapsed every keypoint onto one point. Relative to the spread, the term stays the same."""
    spread, collapsed = _pair(1.0), _pair(0.1)
    full = relative_keypoint_error(*spread).item()
    assert full > 0
    assert abs(relative_keypoint_error(*collapsed).item() - full) < 1e-9 * full


def test_keypoint_term_grows_with_the_error():
    fixed, moving, truth = _pair(1.0)
    worse = moving + torch.randn_like(moving) * 5
    assert relative_keypoint_error(fixed, worse, truth).item() > relative_keypoint_error(fixed, moving, truth).item()


def test_coarse_dice_samples_the_moving_labels_at_the_coarse_cell_centres():
    """With identical label maps and the identity, the moving one-hot maps sampled at the coarse cells' centres must
    equal the fixed maps averaged over those cells (trilinear at a cell centre = the mean of its 8 voxels): the
    Dice loss is then exactly that of the averaged maps with themselves."""
    from monai.losses import DiceLoss

    from scripts.registration import Registration
    from scripts.training import RegistrationLoss, one_hot_labels

    torch.manual_seed(0)
    labels = torch.randint(0, 4, (1, 1, 16, 16, 16)) * 2 + 2  # FreeSurfer-like values 2, 4, 6, 8
    one_hot = one_hot_labels(labels, label_values=(2, 4, 6, 8))
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))[None]
    identity = Registration(torch.eye(4, dtype=torch.float64)[None], None, None, torch.zeros(1))
    loss = RegistrationLoss(dice_downsample=2)
    pooled = torch.nn.functional.avg_pool3d(one_hot, 2)
    expected = DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(pooled, pooled)
    assert torch.allclose(loss.label_dice(identity, one_hot, affine, one_hot, affine), expected, atol=1e-6)
    # without the half-cell offset the samples would fall on fine voxels instead, and the loss would differ
    shifted = affine.clone()
    shifted[0, :3, 3] = 1.0
    assert not torch.allclose(loss.label_dice(identity, one_hot, affine, one_hot, shifted), expected, atol=1e-3)

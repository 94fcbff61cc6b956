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

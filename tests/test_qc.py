"""The QC score ``brain_overlap`` (scripts/qc.py): the moving brain mask carried onto the fixed network grid by the
registration against the fixed brain mask, its flag, and its setting from the configs to the writers.

The brains are ellipsoids on small 2 mm grids; the moving one is the fixed one moved by a known fixed-to-moving
world matrix (the bundle's convention, :mod:`scripts.coordinates`) and lies on a grid of its own, turned and shifted,
as a network grid placed on a brain is."""

import math
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from scripts.case_outputs import SUMMARY_COLUMNS
from scripts.qc import QC_THRESHOLDS, brain_overlap, normalized_mutual_information, qc_flags, qc_scores
from scripts.registration import Registration

ROOT = Path(__file__).resolve().parents[1]
SIZE, SPACING = 32, 2.0
SEMI_AXES_MM = torch.tensor([22.0, 15.0, 12.0], dtype=torch.float64)  # longest front to back, as a brain


def turn(axis: int, degrees: float, shift_mm=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """``(4, 4)`` float64: a turn about a world axis through the origin, then a shift."""
    matrix = torch.eye(4, dtype=torch.float64)
    first, second = [a for a in range(3) if a != axis]
    cosine, sine = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix[first, first], matrix[first, second], matrix[second, first], matrix[second, second] = (
        cosine,
        -sine,
        sine,
        cosine,
    )
    matrix[:3, 3] = torch.tensor(shift_mm, dtype=torch.float64)
    return matrix


def grid_affine(placement: torch.Tensor) -> torch.Tensor:
    """A SIZE^3 grid of SPACING mm centred on the world origin, then placed by ``placement`` ``(4, 4)``."""
    affine = torch.diag(torch.tensor([SPACING, SPACING, SPACING, 1.0], dtype=torch.float64))
    affine[:3, 3] = -SPACING * (SIZE - 1) / 2
    return placement @ affine


def item(affine: torch.Tensor, world_to_fixed_brain: torch.Tensor) -> dict:
    """A network-grid item: ``image`` and ``mask`` ``(1, SIZE, SIZE, SIZE)`` MetaTensors on ``affine``, the brain
    being the voxels whose world point, mapped by ``world_to_fixed_brain``, is inside the fixed ellipsoid."""
    voxels = torch.stack(torch.meshgrid(*[torch.arange(SIZE, dtype=torch.float64)] * 3, indexing="ij"), -1)
    world = voxels @ affine[:3, :3].T + affine[:3, 3]
    brain_points = world @ world_to_fixed_brain[:3, :3].T + world_to_fixed_brain[:3, 3]
    mask = (((brain_points / SEMI_AXES_MM) ** 2).sum(-1) < 1).float()[None]
    image = mask * (0.6 + 0.3 * torch.cos(brain_points[..., 0] / 6.0)).float()[None]
    return {"image": MetaTensor(image, affine=affine), "mask": MetaTensor(mask, affine=affine)}


def registration_of(fixed_to_moving: torch.Tensor) -> Registration:
    points = torch.zeros(1, 4, 3, dtype=torch.float64)
    return Registration(fixed_to_moving[None], points, points, torch.tensor([2.0]))


#: The truth: the moving brain is the fixed brain turned by 60 degrees about the vertical axis and shifted.
TRUTH = turn(2, 60.0, (6.0, -4.0, 3.0))
FIXED = item(grid_affine(torch.eye(4, dtype=torch.float64)), torch.eye(4, dtype=torch.float64))
# the moving network grid: on the moving brain's centre, turned otherwise than the brain (20 degrees about x)
MOVING = item(grid_affine(TRUTH @ turn(0, 20.0)), torch.linalg.inv(TRUTH))


def test_identical_masks_with_the_identity_overlap_fully():
    identity = torch.eye(4, dtype=torch.float64)
    assert brain_overlap(registration_of(identity), FIXED, FIXED) == 1.0


def test_the_right_registration_overlaps_and_passes():
    """The moving mask lies on another grid (turned, shifted): only the fixed-to-moving matrix of the truth brings
    it back onto the fixed brain; 2 mm voxels on both sides cost a few percent."""
    scores = qc_scores(registration_of(TRUTH), FIXED, MOVING)
    assert scores["brain_overlap"] > 0.93
    assert qc_flags(scores) == []


@pytest.mark.parametrize(
    "fixed_to_moving",
    [
        torch.linalg.inv(TRUTH),  # the transform in the other direction: the brain turned by 120 degrees
        TRUTH @ turn(2, 90.0),  # turned by 90 degrees about the vertical axis
        TRUTH @ turn(0, 0.0, (10.0, 0.0, 0.0)),  # the right pose, 10 mm off along the long axis
    ],
    ids=["inverse", "turned", "shifted"],
)
def test_a_wrong_registration_overlaps_poorly_and_is_flagged(fixed_to_moving):
    scores = qc_scores(registration_of(fixed_to_moving), FIXED, MOVING)
    assert scores["brain_overlap"] < 0.8
    assert qc_flags(scores) == [
        f"brain mask overlaps the fixed brain only {scores['brain_overlap']:.2f} after registration"
        " (wrong pose, or a poor brain mask?)"
    ]


def shifted_by_voxels(volume: torch.Tensor, voxels: int) -> torch.Tensor:
    """``volume`` ``(SIZE, SIZE, SIZE)`` sampled ``voxels`` further along the first axis (zeros past the edge)."""
    moved = torch.zeros_like(volume)
    moved[: SIZE - voxels] = volume[voxels:]
    return moved


@pytest.mark.parametrize("voxels_off", [0, 2], ids=["right", "two_voxels_off"])
def test_image_and_mask_are_carried_by_the_same_transform(voxels_off):
    """A moving brain that is the fixed brain shifted by whole voxels, on a grid shifted alike (the same voxels):
    the registration, right or off by whole voxels along x, samples voxel centres, so the carried image and mask are
    the fixed ones shifted, and both scores are pinned. The image differs from its mask (its intensities vary, a quarter
    of them below 0.5), so a mask carried by another transform than the image (or the image taken for the mask)
    changes ``brain_overlap``."""
    shift_mm = (3 * SPACING, -2 * SPACING, 1 * SPACING)
    moving = item(grid_affine(turn(0, 0.0, shift_mm)), turn(0, 0.0, [-s for s in shift_mm]))
    assert torch.equal(moving["image"], FIXED["image"]) and torch.equal(moving["mask"], FIXED["mask"])
    off_mm = (shift_mm[0] + voxels_off * SPACING, *shift_mm[1:])
    scores = qc_scores(registration_of(turn(0, 0.0, off_mm)), FIXED, moving)

    fixed_image, fixed_brain = FIXED["image"][0].as_tensor(), FIXED["mask"][0].as_tensor() > 0.5
    carried_image = shifted_by_voxels(fixed_image, voxels_off)
    carried_brain = shifted_by_voxels(fixed_brain, voxels_off)
    dice = 2 * int((carried_brain & fixed_brain).sum()) / int(carried_brain.sum() + fixed_brain.sum())
    similarity = normalized_mutual_information(fixed_image[fixed_brain].numpy(), carried_image[fixed_brain].numpy())
    assert scores["brain_overlap"] == pytest.approx(dice, abs=1e-9)
    assert scores["similarity"] == pytest.approx(similarity, abs=1e-6)
    assert (dice == 1.0) == (voxels_off == 0) and dice > 0.8


def test_the_threshold_is_respected_and_an_unknown_overlap_flags_nothing():
    assert QC_THRESHOLDS["min_brain_overlap"] == 0.85
    assert qc_flags({"brain_overlap": 0.86}) == []
    assert qc_flags({"brain_overlap": 0.84}) == [
        "brain mask overlaps the fixed brain only 0.84 after registration (wrong pose, or a poor brain mask?)"
    ]
    assert qc_flags({"brain_overlap": 0.84}, {"min_brain_overlap": 0.8}) == []
    assert len(qc_flags({"brain_overlap": 0.9}, {"min_brain_overlap": 0.95})) == 1
    assert qc_flags({"brain_overlap": float("nan")}) == [] and qc_flags({"residual": 2.0}) == []


def test_no_brain_on_either_side_is_nan():
    empty = {key: MetaTensor(torch.zeros(value.shape), affine=value.affine) for key, value in FIXED.items()}
    assert math.isnan(brain_overlap(registration_of(torch.eye(4, dtype=torch.float64)), empty, empty))


def test_summary_has_the_column():
    assert SUMMARY_COLUMNS[-1] == "brain_overlap"


@pytest.mark.parametrize("groupwise", [False, True], ids=["folder", "groupwise"])
def test_the_setting_reaches_the_writer(tmp_path, groupwise):
    """``qc_min_brain_overlap`` of the config (here set to 0.7) is the writer's threshold, in a folder run and in a
    groupwise run (whose last pass scores the overlap with the template's brain), and is checked with the others."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / name) for name in ["inference.yaml", "groupwise.yaml"][: 1 + groupwise]])
    assert parser["qc_min_brain_overlap"] == QC_THRESHOLDS["min_brain_overlap"]
    assert parser["checked_settings"]["qc_thresholds"]["qc_min_brain_overlap"] == "@qc_min_brain_overlap"
    parser.update({"qc_min_brain_overlap": 0.7, "output_dir": str(tmp_path), "device": "cpu"})
    if groupwise:
        writers = [parser.get_parsed_content("groupwise_writer")]
    else:
        writers = [h for h in parser.get_parsed_content("handlers") if type(h).__name__ == "RegistrationWriter"]
    assert [w.thresholds["min_brain_overlap"] for w in writers] == [0.7]

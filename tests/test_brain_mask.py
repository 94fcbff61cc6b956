"""The brain-mask network's grid, pre- and post-processing (scripts/brain_mask.py), its training draws
(scripts/brain_mask_data.py) and its training workflow (configs/train_brain_mask.yaml).

The round trip image -> network grid -> image grid is checked with a stand-in network that thresholds its input, so
a wrong coordinate convention shows as a mask in the wrong place; the trained weights are tested on a head at
several poses in tests/test_any_pose.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_heads import head_label_map, write_label_maps_dir

from scripts.brain_mask import (
    DISTANCE_CLIP_MM,
    HEAD_MARGIN_MM,
    NETWORK_SPACING_MM,
    SHAPE_MULTIPLE,
    brain_distance,
    head_grid,
    kept_distance,
    largest_component,
    largest_component_filled,
    network_grid,
    predict_brain_mask,
    signed_distance,
    unit_range,
)
from scripts.brain_mask_data import BrainMaskDataset
from scripts.coordinates import apply_affine
from scripts.random_motions import misalignment
from scripts.synthesis import SynthesizeImaged

ROOT = Path(__file__).resolve().parents[1]


class Threshold(torch.nn.Module):
    """Stand-in for the U-Net: a "distance" negative where the image is brighter than 0.5, so the predicted brain is
    the bright ball."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(40.0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        assert all(size % SHAPE_MULTIPLE == 0 for size in image.shape[2:]), image.shape
        return self.scale * (0.5 - image)


def ball_image(affine: torch.Tensor, shape, centre, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An image ``shape`` on ``affine``: 1 in a world ball, 0.2 around it; and the ball as a boolean mask."""
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    world = apply_affine(affine, index.reshape(-1, 3)).reshape(*shape, 3)
    ball = (world - torch.as_tensor(centre, dtype=torch.float64)).norm(dim=-1) <= radius
    return torch.where(ball, 1.0, 0.2).to(torch.float32), ball


def test_network_grid_is_world_aligned_covers_the_image_and_is_a_multiple_of_16():
    affine = misalignment(40, [0.3, 0.5, 0.8], np.ones(3), np.array([5.0, -7.0, 3.0]), np.zeros(3))
    affine = affine @ torch.diag(torch.tensor([1.0, 1.2, 3.0, 1.0], dtype=torch.float64))
    shape = (70, 50, 20)
    grid, grid_shape = network_grid(affine, shape)
    assert torch.allclose(grid[:3, :3], NETWORK_SPACING_MM * torch.eye(3, dtype=torch.float64))
    assert all(size % SHAPE_MULTIPLE == 0 for size in grid_shape)
    corners = torch.tensor([[i, j, k] for i in (0, 69) for j in (0, 49) for k in (0, 19)], dtype=torch.float64)
    inside = apply_affine(torch.linalg.inv(grid), apply_affine(affine, corners))
    assert bool((inside >= -1e-6).all()) and bool((inside <= torch.tensor(grid_shape) - 1 + 1e-6).all())
    # padded evenly: the image's centre is the grid's centre (to half a voxel)
    centre = apply_affine(affine, torch.tensor([[34.5, 24.5, 9.5]], dtype=torch.float64))
    grid_centre = apply_affine(grid, (torch.tensor(grid_shape, dtype=torch.float64) - 1)[None] / 2)
    assert float((centre - grid_centre).abs().max()) <= NETWORK_SPACING_MM / 2 + 1e-6


def test_head_grid_holds_the_head_and_its_margin_not_the_empty_field_of_view():
    """A 40 mm ball in a 200 mm field of view turned 45 degrees: the grid spans the ball and the margin."""
    affine = misalignment(45, [0.0, 0.6, 0.8], np.ones(3), np.zeros(3), np.zeros(3))
    affine = affine @ torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] -= affine[:3, :3] @ torch.tensor([49.5, 49.5, 49.5], dtype=torch.float64)
    image, _ = ball_image(affine, (100, 100, 100), centre=[30.0, -20.0, 10.0], radius=20.0)
    image[image < 1] = 0.0
    grid, shape = head_grid(image, affine)
    assert all(size % SHAPE_MULTIPLE == 0 for size in shape)
    low = apply_affine(grid, torch.zeros(1, 3, dtype=torch.float64))[0]
    high = apply_affine(grid, torch.tensor(shape, dtype=torch.float64)[None] - 1)[0]
    ball_low, ball_high = torch.tensor([10.0, -40.0, -10.0]), torch.tensor([50.0, 0.0, 30.0])
    assert bool((low <= ball_low - HEAD_MARGIN_MM + 2).all()) and bool((high >= ball_high + HEAD_MARGIN_MM - 2).all())
    assert max(shape) * NETWORK_SPACING_MM <= 40 + 2 * HEAD_MARGIN_MM + 2 * SHAPE_MULTIPLE * NETWORK_SPACING_MM
    empty_grid, empty_shape = head_grid(torch.zeros(100, 100, 100), affine)
    assert empty_shape == network_grid(affine, (100, 100, 100))[1]


def test_head_grid_of_a_hollow_head_is_that_of_the_solid_head():
    """The grid needs only the head's extent: a head whose inside is as dark as the background (a hole of its
    foreground, here on a grid turned 30 degrees) gets the grid of the same head filled."""
    affine = misalignment(30, [0.6, 0.0, 0.8], np.ones(3), np.zeros(3), np.zeros(3))
    affine = affine @ torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] -= affine[:3, :3] @ torch.tensor([39.5, 39.5, 39.5], dtype=torch.float64)
    solid, head = ball_image(affine, (80, 80, 80), centre=[10.0, -5.0, 0.0], radius=40.0)
    _, inside = ball_image(affine, (80, 80, 80), centre=[12.0, -5.0, 3.0], radius=30.0)
    solid[~head] = 0.0
    hollow = solid.clone()
    hollow[inside] = 0.0
    assert bool(head.any()) and int(inside.sum()) > 0.3 * int(head.sum())
    grid, shape = head_grid(hollow, affine)
    assert shape == head_grid(solid, affine)[1] and torch.equal(grid, head_grid(solid, affine)[0])


def test_signed_distance_is_negative_inside_in_mm_and_clipped():
    index = torch.stack(torch.meshgrid(*[torch.arange(40.0)] * 3, indexing="ij"), -1)
    ball = (index - 19.5).norm(dim=-1) <= 8.0  # radius 8 voxels = 16 mm
    distance = signed_distance(ball)
    assert distance.dtype == torch.float32 and distance.shape == ball.shape
    assert bool((distance[ball] < 0).all()) and bool((distance[~ball] > 0).all())
    # a voxel on either side of the surface is half a voxel from it; the centre is 16 mm deep, clipped to 10
    assert float(distance[ball].max()) == pytest.approx(-NETWORK_SPACING_MM / 2, abs=0.3)
    assert float(distance[~ball].min()) == pytest.approx(NETWORK_SPACING_MM / 2, abs=0.3)
    assert float(distance[20, 20, 20]) == -DISTANCE_CLIP_MM and float(distance[0, 0, 0]) == DISTANCE_CLIP_MM
    # a voxel 11.5 voxels from the centre is 3.5 voxels (7 mm) beyond the surface
    assert float(distance[19, 19, 31]) == pytest.approx(3.5 * NETWORK_SPACING_MM, abs=0.6)
    assert bool((signed_distance(torch.zeros(4, 4, 4, dtype=torch.bool)) == DISTANCE_CLIP_MM).all())


def test_kept_distance_keeps_the_largest_blob_fills_its_holes_and_keeps_its_edge():
    distance = torch.full((20, 20, 20), 5.0)
    distance[2:12, 2:12, 2:12] = -5.0
    distance[2, 2:12, 2:12] = -1.0  # the edge of the kept blob keeps its value
    distance[6, 6, 6] = 2.0  # a hole
    distance[15:18, 15:18, 15:18] = -3.0  # a smaller island
    kept = kept_distance(distance)
    assert float(kept[6, 6, 6]) < 0 and float(kept[16, 16, 16]) >= 0 and int((kept < 0).sum()) == 1000
    assert float(kept[2, 5, 5]) == pytest.approx(-1.0) and float(kept[0, 0, 0]) == pytest.approx(5.0)


def test_unit_range_maps_the_percentiles_to_0_and_1_and_ignores_nan():
    image = torch.linspace(-100, 900, 100_001)
    image[0] = float("nan")
    mapped = unit_range(image)
    assert float(mapped.min()) == 0.0 and float(mapped.max()) == 1.0
    assert abs(float(mapped[50_000]) - 0.5) < 0.01
    assert not bool(torch.isnan(mapped).any())


def test_largest_component_keeps_one_blob_with_its_holes_filled():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[2:12, 2:12, 2:12] = True
    mask[6, 6, 6] = False  # a hole
    mask[15:18, 15:18, 15:18] = True  # a smaller island
    kept = largest_component_filled(mask)
    assert kept[6, 6, 6] and not kept[16, 16, 16] and int(kept.sum()) == 1000
    assert not largest_component_filled(np.zeros((4, 4, 4), dtype=bool)).any()
    unfilled = largest_component(mask)
    assert not unfilled[6, 6, 6] and not unfilled[16, 16, 16] and int(unfilled.sum()) == 999
    assert not largest_component(np.zeros((4, 4, 4), dtype=bool)).any()


@pytest.mark.parametrize("angle", [0, 35, 120])
def test_mask_comes_back_onto_an_oblique_anisotropic_grid_through_world_coordinates(angle):
    """A 1 x 1.5 x 3 mm grid turned in its header: the predicted ball is the ball, in world mm."""
    affine = misalignment(angle, [0.6, -0.5, 0.6], np.ones(3), np.array([10.0, -4.0, 7.0]), np.zeros(3))
    affine = affine @ torch.diag(torch.tensor([1.0, 1.5, 3.0, 1.0], dtype=torch.float64))
    affine[:3, 3] -= affine[:3, :3] @ torch.tensor([40.0, 27.0, 13.0], dtype=torch.float64)
    image, ball = ball_image(affine, (81, 55, 27), centre=[12.0, -2.0, 5.0], radius=22.0)
    mask = predict_brain_mask(Threshold(), image * 300.0, affine)
    dice = float(2 * (mask & ball).sum() / (mask.sum() + ball.sum()))
    assert mask.shape == ball.shape and dice > 0.95, dice
    distance, grid = brain_distance(Threshold(), image, affine)
    assert torch.allclose(grid[:3, :3], NETWORK_SPACING_MM * torch.eye(3, dtype=torch.float64))
    assert all(size % SHAPE_MULTIPLE == 0 for size in distance.shape) and bool(torch.isfinite(distance).all())


@pytest.fixture(scope="module")
def label_maps(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("label_maps")
    write_label_maps_dir(str(folder), subjects=(1, 2))
    return sorted(str(p) for p in folder.glob("*.nii.gz"))


def test_training_draws_pair_an_image_with_its_brain_on_the_inference_grid(label_maps):
    dataset = BrainMaskDataset(
        label_maps, length=6, synthesis=SynthesizeImaged(skull_probability=1.0), max_size=48, cut_probability=0.0
    )
    dataset.set_random_state(3)
    labels, affine = head_label_map(1)
    brain_ml = float(((labels > 0) & (labels < 500)).sum()) * 8e-3
    for index in range(len(dataset)):
        item = dataset[index]
        image, distance = item["image"], item["label"]
        assert image.shape == distance.shape and all(s % SHAPE_MULTIPLE == 0 and s <= 48 for s in image.shape[1:])
        assert torch.allclose(
            image.affine[:3, :3].abs().sum(0), torch.full((3,), NETWORK_SPACING_MM, dtype=torch.float64)
        )
        assert float(distance.min()) == -1.0 and float(distance.max()) == 1.0  # in units of DISTANCE_CLIP_MM
        brain = distance < 0
        # the whole brain (scaled by at most 1.15^3 and 0.85^3) is on the grid: the window follows it
        assert 0.55 * brain_ml < float(brain.sum()) * 8e-3 < 1.6 * brain_ml
        # the head is drawn around the brain: the image is brighter than its background there
        assert float(image[brain].mean()) > float(image[distance > 0.5].mean()) * 0.5


def test_training_draws_cut_the_field_of_view_through_the_brain(label_maps):
    whole = BrainMaskDataset(label_maps, 1, SynthesizeImaged(skull_probability=1.0), max_size=48, cut_probability=0.0)
    cut = BrainMaskDataset(label_maps, 1, SynthesizeImaged(skull_probability=1.0), max_size=48, cut_probability=1.0)
    lost = []
    for seed in range(4):  # the same draw but for the cut
        full_brain = float((whole.set_random_state(seed)[0]["label"] < 0).sum())
        lost.append((full_brain - float((cut.set_random_state(seed)[0]["label"] < 0).sum())) / full_brain)
    assert all(0.0 <= share < 0.45 for share in lost) and max(lost) > 0.05, lost


def test_brain_mask_training_runs_validates_and_keeps_the_best_model(label_maps, tmp_path):
    folder = Path(label_maps[0]).parent
    command = [sys.executable, "-m", "monai.bundle", "run", "training"]
    command += ["--config_file", "configs/train_brain_mask.yaml", "--dataset_dir", str(folder)]
    command += ["--output_dir", str(tmp_path), "--max_epochs", "2", "--epoch_length", "2", "--val_interval", "1"]
    command += ["--val_draws", "1", "--num_workers", "0", "--validation_subjects", "['training_seg_02']"]
    command += ["--test_subjects", "[]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, (process.stdout + process.stderr)[-3000:]
    saved = {p.name for p in (tmp_path / "checkpoints").glob("*.pt")}
    assert "model_best.pt" in saved and "checkpoint_final_iteration=4.pt" in saved, saved
    assert "val_mean_dice" in process.stdout + process.stderr


def test_brain_mask_training_config_has_the_zoo_properties(label_maps, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train_brain_mask.yaml"),
        workflow_type="train",
        logging_file=False,
        dataset_dir=str(Path(label_maps[0]).parent),
        output_dir=str(tmp_path),
        validation_subjects=["training_seg_02"],
        test_subjects=[],
        num_workers=0,
        val_draws=1,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.finalize()

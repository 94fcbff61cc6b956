"""The head pose of :mod:`scripts.head_pose`: parts -> upright frame, the grids, and the parts of a label map."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from synthetic_heads import write_label_maps_dir

from scripts.coordinates import apply_affine, covering_grid_along, rotation_angle_deg
from scripts.head_pose import (
    HEAD_GRID_SIZE,
    HEAD_GRID_SPACING,
    PARTS,
    BrainPartsNet,
    head_grid,
    parts_from_labels,
    pose_from_parts,
    to_head_grid,
)


def brain_parts(rotation: np.ndarray, centre: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Ellipsoid parts of an upright brain (hemispheres longest front to back, the posterior fossa behind and
    below), turned by ``rotation`` about ``centre``, on the coarse head grid centred there."""
    grid = head_grid(torch.as_tensor(centre))
    index = torch.stack(torch.meshgrid(*[torch.arange(HEAD_GRID_SIZE)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world = apply_affine(grid, index.to(torch.float64)).numpy()
    upright = (world - centre) @ rotation  # the point in the brain's own upright frame
    parts = np.zeros(len(world), dtype=np.int64)

    def inside(c, radii):
        return (((upright - np.asarray(c)) / np.asarray(radii)) ** 2).sum(-1) <= 1

    parts[inside((-30, 5, 10), (28, 75, 50)) | inside((30, 5, 10), (28, 75, 50))] = PARTS.index("cerebrum")
    parts[inside((0, -45, -35), (45, 25, 20))] = PARTS.index("posterior_fossa")
    return torch.from_numpy(parts.reshape((HEAD_GRID_SIZE,) * 3)), grid


@pytest.mark.parametrize("seed", range(6))
def test_pose_from_parts_recovers_any_rotation(seed):
    rotation = Rotation.random(random_state=seed).as_matrix()
    centre = np.array([3.0, -12.0, 20.0])
    parts, grid = brain_parts(rotation, centre)
    frame = pose_from_parts(parts, grid)
    assert torch.allclose(frame.T @ frame, torch.eye(3, dtype=torch.float64), atol=1e-9)
    assert float(torch.det(frame)) == pytest.approx(1.0)
    assert rotation_angle_deg(frame.T @ torch.as_tensor(rotation)) < 8.0  # 4 mm voxels; deepbet tolerates 10


def test_pose_from_parts_needs_the_posterior_fossa():
    parts, grid = brain_parts(np.eye(3), np.zeros(3))
    parts[parts == PARTS.index("posterior_fossa")] = 0
    with pytest.raises(ValueError, match="posterior fossa"):
        pose_from_parts(parts, grid)


def test_parts_of_freesurfer_labels():
    labels = torch.tensor([0, 3, 42, 8, 16, 24, 14, 511, 17, 53])
    expected = ["background", "cerebrum", "cerebrum", "posterior_fossa", "posterior_fossa", "other_brain",
                "other_brain", "background", "cerebrum", "cerebrum"]  # fmt: skip
    assert parts_from_labels(labels).tolist() == [PARTS.index(name) for name in expected]


def test_covering_grid_holds_the_field_of_view_along_the_frame():
    frame = torch.as_tensor(Rotation.from_euler("xyz", [30, -50, 120], degrees=True).as_matrix())
    affine = torch.tensor([[0.0, 0, 1.2, -40], [-1.0, 0, 0, 60], [0, 0.9, 0, -30], [0, 0, 0, 1]], dtype=torch.float64)
    shape = (50, 60, 40)
    grid, size = covering_grid_along(frame, affine, shape, spacing=1.5)
    assert torch.allclose(grid[:3, :3], frame * 1.5)
    corners = torch.tensor([[i, j, k] for i in (0, 49) for j in (0, 59) for k in (0, 39)], dtype=torch.float64)
    voxels = apply_affine(torch.linalg.inv(grid), apply_affine(affine, corners))
    assert float(voxels.min()) > -1e-6
    assert (voxels.max(0).values <= torch.tensor(size, dtype=torch.float64) - 1 + 1e-6).all()


def test_head_grid_is_centred_on_the_head():
    # a bright ball at (20, -10, 35) mm in a 1 mm oblique image, on a dark background
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.as_tensor(Rotation.from_euler("z", 25, degrees=True).as_matrix())
    affine[:3, 3] = torch.tensor([-60.0, -80.0, -50.0])
    index = torch.stack(torch.meshgrid(*[torch.arange(150)] * 3, indexing="ij"), -1).to(torch.float64)
    world = apply_affine(affine, index.reshape(-1, 3)).reshape(150, 150, 150, 3)
    image = ((world - torch.tensor([20.0, -10.0, 35.0], dtype=torch.float64)).norm(dim=-1) < 30).to(torch.float32) * 700
    coarse, grid = to_head_grid(image, affine)
    assert coarse.shape == (HEAD_GRID_SIZE,) * 3 and float(coarse.max()) == pytest.approx(1.0)
    assert torch.allclose(grid[:3, :3], torch.eye(3, dtype=torch.float64) * HEAD_GRID_SPACING)
    voxels = torch.nonzero(coarse > 0.5).to(torch.float64).mean(0)
    assert torch.allclose(
        apply_affine(grid, voxels[None])[0], torch.tensor([20.0, -10.0, 35.0], dtype=torch.float64), atol=2.0
    )


# --- the training workflow ---------------------------------------------------------------------------------------


def test_head_pose_training_runs_from_start_weights_and_keeps_checkpoints(tmp_path):
    """configs/train_head_pose.yaml through the runner on generated label maps: start weights loaded, finite losses,
    interval, best and final checkpoints."""
    root = Path(__file__).resolve().parents[1]
    label_maps = write_label_maps_dir(str(tmp_path / "maps"), subjects=(1, 2, 12))
    start = BrainPartsNet()
    torch.save(start.state_dict(), tmp_path / "start.pt")
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train_head_pose.yaml"]
    command += ["--dataset_dir", label_maps, "--output_dir", str(tmp_path / "run"), "--test_subjects", "[]"]
    command += ["--max_epochs", "2", "--epoch_length", "2", "--val_items", "1", "--val_interval", "1"]
    command += ["--save_every", "2", "--num_workers", "0", "--pretrained_ckpt", str(tmp_path / "start.pt")]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == 0, process.stderr[-2000:]
    log = process.stdout + process.stderr
    assert "Restored all variables from" in log and str(tmp_path / "start.pt") in log
    losses = [float(line.rsplit("train_loss:", 1)[1].split()[0]) for line in log.splitlines() if "train_loss:" in line]
    assert len(losses) == 4 and all(np.isfinite(losses))
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "model_best.pt" in names and "checkpoint_final_iteration=4.pt" in names

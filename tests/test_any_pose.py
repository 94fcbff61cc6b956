"""Whole heads at any pose: brain extraction (the bundle's brain-mask network; deepbet with the brain's pose and a
second pass on the upright view) and registration with the DEFAULT settings.

The phantom is nilearn's MNI152 brain (a real T1, shipped with nilearn) wrapped in a synthetic skull and scalp,
turned about an oblique axis and RESAMPLED into a world-aligned voxel array (a head tilted in the scanner):
brain extraction must find the same brain at every angle, and inference with the default settings must register
the head turned by 150 degrees to the default atlas (the untouched MNI152 brain).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from scripts.coordinates import resample_onto
from scripts.image_io import resample_world_aligned
from scripts.metrics import brain_tre
from scripts.random_motions import misalignment
from scripts.skull_strip import BRAIN_MASK_WEIGHTS, SkullStripd
from scripts.transform_io import read_ras_matrix

ROOT = Path(__file__).resolve().parents[1]
AXIS = np.array([0.6, -0.5, 0.62])


@pytest.fixture(scope="module")
def head():
    """The MNI152 brain in a skull: dark CSF gap, bright skull, dark layer, noisy scalp (1 mm, RAS, float32)."""
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=1)
    brain_image = np.pad(template.get_fdata(dtype=np.float32), 20)  # room for the head
    affine = template.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, 20.0)
    brain = brain_image > 0
    distance = ndimage.distance_transform_edt(~brain)
    image = brain_image.copy()
    for (inner, outer), value in zip([(0, 3), (3, 7), (7, 9), (9, 13)], [0.05, 0.9, 0.2, 0.7]):
        image[(distance > inner) & (distance <= outer)] = value * brain_image.max()
    image += 0.02 * brain_image.max() * np.random.default_rng(0).standard_normal(image.shape).astype(np.float32)
    image = np.clip(image, 0, None) * (distance <= 13)
    return image, brain, torch.as_tensor(affine, dtype=torch.float64)


def turned(head, angle: float) -> tuple[MetaTensor, torch.Tensor, torch.Tensor]:
    """The head turned by ``angle`` degrees about AXIS through its brain centre, resampled world-aligned; returns the
    image, its true brain mask and the move (world, 4x4)."""
    image, brain, affine = head
    centre = (affine[:3, :3] @ torch.from_numpy(np.argwhere(brain).mean(0)) + affine[:3, 3]).numpy()
    move = misalignment(angle, AXIS, np.ones(3), np.zeros(3), centre)
    moved = MetaTensor(torch.from_numpy(image)[None], affine=move @ affine)
    moved_brain = MetaTensor(torch.from_numpy(brain.astype(np.float32))[None], affine=move @ affine)
    resampled = resample_world_aligned(moved, [1.0, 1.0, 1.0])
    truth = resample_world_aligned(moved_brain, [1.0, 1.0, 1.0]) > 0.5
    resampled.meta["filename_or_obj"] = f"head_turned_{angle:g}.nii.gz"
    return resampled, truth[0], move


@pytest.fixture(scope="module", params=["bundle", "deepbet"])
def stripper(request):
    """Each brain extractor as inference configures it: the bundle's network; deepbet with the brain's pose."""
    if request.param == "bundle" and not os.path.isfile(BRAIN_MASK_WEIGHTS):
        pytest.skip("models/brain_mask.pt is not trained yet (configs/train_brain_mask.yaml)")
    return SkullStripd(keys="image", backend=request.param)


@pytest.mark.parametrize("angle", [0, 60, 120, 180])
def test_brain_mask_does_not_depend_on_the_pose(head, stripper, angle):
    image, truth, _ = turned(head, angle)
    mask = stripper({"image": image})["mask"][0] > 0.5
    dice = float(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    assert dice > 0.9, f"mask Dice {dice:.3f} at {angle} degrees"


def test_default_inference_registers_a_head_turned_150_degrees(head, tmp_path):
    """The regression test of the failure: default settings, a whole head turned 150 degrees in the voxels."""
    image, _, move = turned(head, 150)
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(image[0].numpy(), np.asarray(image.affine)), str(inputs / "head.nii.gz"))
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml"]
    command += ["--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert process.returncode == 0, process.stderr[-2000:]
    moving_to_fixed = torch.as_tensor(read_ras_matrix(str(tmp_path / "out" / "head" / "affine_ras.txt")))
    # the atlas is the untouched MNI152 brain: the truth maps atlas points to their turned place
    atlas = nib.load(str(tmp_path / "out" / "head" / "registered.nii.gz"))
    brain = MetaTensor(torch.from_numpy(np.asarray(head[1], dtype=np.float32))[None], affine=head[2])
    atlas_brain = resample_onto(
        brain.as_tensor(), head[2], torch.as_tensor(atlas.affine), atlas.shape, torch.eye(4, dtype=torch.float64)
    )
    atlas_mask = MetaTensor(atlas_brain, affine=torch.as_tensor(atlas.affine, dtype=torch.float64))
    error = brain_tre(torch.linalg.inv(moving_to_fixed)[None], move[None], [atlas_mask])[0]
    assert float(error) < 2.0, f"mean error {float(error):.2f} mm"

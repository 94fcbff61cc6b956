"""Groupwise registration (``scripts/groupwise.py``, ``configs/groupwise.yaml``).

The Procrustes maths is tested on keypoint sets that are known affine / similarity / rigid images of one
configuration (a random network's keypoints mean nothing): the recovered transforms agree with the truth up to one
global transform, the mean neither drifts nor shrinks, outliers and QC-flagged images stay out of the mean, and the
turn search picks the consistent keypoint set. One run through the bundle runner on three tiny phantoms and a bad
file checks the outputs: case folders, the template on a grid around the group, ``summary.csv`` rows and exit code 1.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from test_inference import (
    OUTPUT_FILES,
    ROOT,
    SMALL_NETWORK,
    rigid,
    rotation,
    write_checkpoint,
    write_moving,
    write_nifti,
)

from scripts.coordinates import apply_affine
from scripts.errors import KeyMorphWorkflowError
from scripts.groupwise import (
    brain_outline,
    centroid_and_size,
    check_groupwise_settings,
    fit_group,
    fit_to_mean,
    generalised_procrustes,
    pairwise_consistency_mm,
    rotation_factor,
)
from scripts.transform_io import read_itk_transform

ALIGNERS = ("affine", "similarity", "rigid")


def random_rotation(generator: torch.Generator) -> torch.Tensor:
    """A proper ``(3, 3)`` rotation, uniformly drawn (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q


def random_transform(kind: str, generator: torch.Generator) -> torch.Tensor:
    """A ``(4, 4)`` transform of the aligner's class: rotation and shift, times a scale 0.8-1.2 (similarity), times
    a random stretch and shear (affine)."""
    linear = random_rotation(generator)
    if kind in ("similarity", "affine"):
        linear = linear * (0.8 + 0.4 * torch.rand(1, generator=generator, dtype=torch.float64))
    if kind == "affine":
        linear = linear @ (torch.eye(3, dtype=torch.float64) + 0.15 * torch.randn(3, 3, generator=generator))
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] = linear
    matrix[:3, 3] = 20 * torch.randn(3, generator=generator, dtype=torch.float64)
    return matrix


def group_of(kind: str, count: int = 5, keypoints: int = 40, noise_mm: float = 0.0, seed: int = 0):
    """``(configuration (K, 3), truth (N, 4, 4) group-to-image, keypoints (N, K, 3))``: each image's keypoints are
    its true transform of one configuration (spread about 30 mm), plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    configuration = 30 * torch.randn(keypoints, 3, generator=generator, dtype=torch.float64)
    truth = torch.stack([random_transform(kind, generator) for _ in range(count)])
    points = apply_affine(truth, configuration.expand(count, -1, -1))
    points = points + noise_mm * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    return configuration, truth, points


@pytest.mark.parametrize("aligner", ALIGNERS)
def test_exact_groups_are_recovered_up_to_one_global_transform(aligner):
    configuration, truth, points = group_of(aligner)
    group = fit_group(points[:, None], aligner)
    assert (
        pairwise_consistency_mm(group.fixed_to_moving, truth, configuration) < 1e-4
    )  # mm; the affine fit's ridge leaves 1e-6
    assert float(group.residual.max()) < 1e-4
    assert bool(group.included.all())
    # the same statement per image: T_i = G_i H with one H for all
    global_transforms = torch.linalg.inv(truth) @ group.fixed_to_moving
    assert torch.allclose(global_transforms, global_transforms[0].expand_as(global_transforms), atol=1e-5)


def test_the_consistency_error_sees_one_wrong_transform():
    configuration, truth, points = group_of("rigid")
    group = fit_group(points[:, None], "rigid")
    wrong = group.fixed_to_moving.clone()
    wrong[1, :3, 3] += torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    # pairs with image 1 are 3 mm off, in either direction: 2 (N - 1) of the N (N - 1) pairs
    expected = 3.0 * 2 * 4 / (5 * 4)
    assert pairwise_consistency_mm(wrong, truth, configuration) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("aligner", ALIGNERS)
def test_noisy_groups_stay_consistent_and_the_mean_keeps_the_group_size(aligner):
    configuration, truth, points = group_of(aligner, count=8, noise_mm=1.0, seed=1)
    mean, iterations = generalised_procrustes(points, aligner)
    assert iterations < 20  # converged below 0.01 mm
    centroids, sizes = centroid_and_size(points)
    mean_centroid, mean_size = centroid_and_size(mean)
    assert float(mean_size) == pytest.approx(float(sizes.mean()), rel=1e-9)
    assert torch.allclose(mean_centroid, centroids.mean(0), atol=1e-9)
    # no axis of the mean collapses: its spread along its thinnest direction is as the images' (within 10%)
    thinnest = torch.linalg.svdvals(mean - mean_centroid).min()
    image_thinnest = torch.stack([torch.linalg.svdvals(p - p.mean(0)).min() for p in points])
    assert float(thinnest) > 0.9 * float(image_thinnest.min())
    group = fit_group(points[:, None], aligner)
    assert pairwise_consistency_mm(group.fixed_to_moving, truth, configuration) < 1.0


@pytest.mark.parametrize("aligner", ALIGNERS)
def test_the_group_space_takes_the_images_average_orientation(aligner):
    """Whatever pose the first image has, the group-to-image maps turn by no rotation on average."""
    configuration, truth, points = group_of(aligner, count=6, noise_mm=0.5, seed=7)
    mean, _ = generalised_procrustes(points, aligner)
    rotations = rotation_factor(fit_to_mean(mean, points, aligner)[:, :3, :3])
    assert torch.allclose(rotation_factor(rotations.sum(0)), torch.eye(3, dtype=torch.float64), atol=1e-6)
    # and not by accident: the first image alone is turned far from the group's orientation
    assert float((rotations[0] - torch.eye(3, dtype=torch.float64)).abs().max()) > 0.3


def test_an_outlier_is_left_out_of_the_mean():
    configuration, truth, points = group_of("similarity", count=7, noise_mm=0.3, seed=2)
    generator = torch.Generator().manual_seed(3)
    points[0] = points[0, torch.randperm(len(configuration), generator=generator)]  # keypoints that match nothing
    group = fit_group(points[:, None], "similarity", max_residual_mm=8.0)
    assert group.included.tolist() == [False] + [True] * 6
    assert float(group.residual[0]) > 8.0 and float(group.residual[1:].max()) < 2.0
    # the mean is that of the six others alone (the first included image sets its orientation)
    alone, _ = generalised_procrustes(points[1:], "similarity")
    assert torch.allclose(group.mean, alone, atol=1e-9)
    assert pairwise_consistency_mm(group.fixed_to_moving[1:], truth[1:], configuration) < 0.5
    # the outlier still has its transform to the group space
    assert group.fixed_to_moving.shape == (7, 4, 4) and bool(torch.isfinite(group.fixed_to_moving[0]).all())


def test_images_flagged_by_their_own_qc_are_left_out_of_the_mean():
    configuration, truth, points = group_of("rigid", count=4, noise_mm=0.5, seed=4)
    flagged = torch.tensor([False, False, True, False])
    group = fit_group(points[:, None], "rigid", excluded=flagged)
    assert group.included.tolist() == [True, True, False, True]
    alone, _ = generalised_procrustes(points[[0, 1, 3]], "rigid")
    assert torch.allclose(group.mean, alone, atol=1e-9)


def test_the_turn_search_picks_the_keypoint_set_that_fits_the_group():
    configuration, truth, points = group_of("affine", count=4, seed=5)
    generator = torch.Generator().manual_seed(6)
    candidates = torch.stack([points[:, torch.randperm(len(configuration), generator=generator)] for _ in range(4)], 1)
    candidates[:, 0] = points  # every image's grid as it is is right ...
    candidates[2, 0], candidates[2, 3] = candidates[2, 3].clone(), points[2]  # ... but image 2's right one is turned
    group = fit_group(candidates, "affine", turn_search_above_mm=8.0)
    assert group.turns.tolist() == [0, 0, 3, 0]
    assert bool(group.included.all()) and float(group.residual.max()) < 1e-4


def test_the_brain_outline_bounds_the_mapped_brain_within_a_few_mm():
    """The template grid holds the brains mapped into the group space: the bounding box of the mapped outline is
    that of the mapped brain voxels within the pooled cell size, where a turned bounding box's corners overshoot."""
    world = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(60.0)] * 3, indexing="ij"), -1)) - 29.5
    brain = (world / torch.tensor([25.0, 18.0, 12.0], dtype=torch.float64)).pow(2).sum(-1) <= 1  # an ellipsoid
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, 3] = -29.5  # 1 mm voxels, centred on the origin like `world`
    mask = MetaTensor(brain[None].float(), affine=affine)
    move = torch.eye(4, dtype=torch.float64)
    move[:3, :3] = torch.from_numpy(rotation([1.0, 2.0, 0.5], 50.0)) * 1.1
    voxels = apply_affine(move, world[brain])
    outline = apply_affine(move, brain_outline(mask, max_voxels=30**3))  # pooled by 2: 2 mm cells
    for low, high, side in zip(outline.min(0).values, outline.max(0).values, range(3)):
        assert float(low) == pytest.approx(float(voxels[:, side].min()), abs=3.5)
        assert float(high) == pytest.approx(float(voxels[:, side].max()), abs=3.5)
    # the corners of the turned box around the same brain reach much further out
    corners = torch.tensor([[x, y, z] for x in (-25, 25) for y in (-18, 18) for z in (-12, 12)], dtype=torch.float64)
    corners = apply_affine(move, corners)
    assert float((corners.max(0).values - voxels.max(0).values).max()) > 10


# --- through the bundle runner ----------------------------------------------------------------------------------


def run_groupwise(*arguments: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run groupwise`` with the inference config and the groupwise overlay."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "groupwise",
        "--config_file",
        "['configs/inference.yaml','configs/groupwise.yaml']",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*command, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )


@pytest.fixture(scope="module")
def groupwise_run(tmp_path_factory):
    """Three phantoms moved rigidly, an image of noise and a file that is not an image, registered groupwise with a
    small random network (no residual threshold: the random keypoints' residuals mean nothing)."""
    root = tmp_path_factory.mktemp("groupwise")
    (root / "in").mkdir()
    moves = {
        "a": rigid([0.0, 0.0, 1.0], 0.0, [0.0, 0.0, 0.0]),
        "b": rigid([0.2, 0.3, 1.0], 20.0, [5.0, -4.0, 2.0]),
        "c": rigid([1.0, 0.0, 0.2], -15.0, [-3.0, 6.0, 0.0]),
    }
    for name, move in moves.items():
        write_moving(root / "in" / f"{name}.nii.gz", move)
    (root / "in" / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    # positive white noise: QC flags it on its own (no brain: the "mask" fills the image, no smoothness)
    noise = np.random.RandomState(0).uniform(0.1, 1.0, (30, 30, 30)).astype(np.float32)
    write_nifti(root / "in" / "noise.nii.gz", noise, np.diag([2.0, 2.0, 2.0, 1.0]))
    output = root / "out"
    process = run_groupwise(
        "--dataset_dir",
        str(root / "in"),
        "--output_dir",
        str(output),
        "--skull_strip",
        "none",
        "--ckpt_path",
        write_checkpoint(root / "model.pt"),
        "--aligner",
        "similarity",
        "--qc_max_residual_mm",
        "1000",
        "--template_spacing",
        "2.0",
        # the keypoint solutions, with which the template is made: registered.nii.gz then averages to it
        "--refine_iterations",
        "0",
        *SMALL_NETWORK,
    )
    return {"process": process, "output": output, "root": root}


def test_a_groupwise_run_refuses_a_pairs_csv():
    with pytest.raises(KeyMorphWorkflowError, match="--pairs_csv pairs.csv: a groupwise run registers a folder"):
        check_groupwise_settings("pairs.csv", 1.0, 10.0, 0.01, 20)
    with pytest.raises(KeyMorphWorkflowError, match="--template_spacing 0: must be positive"):
        check_groupwise_settings(None, 0, 10.0, 0.01, 20)
    check_groupwise_settings("null", 1.5, 0, 0.01, 1)  # passes


def test_a_bad_file_fails_alone_and_the_run_exits_1(groupwise_run):
    process = groupwise_run["process"]
    assert process.returncode == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    assert "1 of 5 input(s) failed" in process.stderr


def test_every_case_gets_the_inference_outputs(groupwise_run):
    for name in ("a", "b", "c", "noise"):
        folder = groupwise_run["output"] / name
        assert sorted(os.listdir(folder)) == sorted(OUTPUT_FILES)
    assert not (groupwise_run["output"] / "broken").exists()


def test_the_template_covers_the_group_on_its_own_grid(groupwise_run):
    output = groupwise_run["output"]
    template, mask = nib.load(str(output / "template.nii.gz")), nib.load(str(output / "template_mask.nii.gz"))
    assert template.shape == mask.shape and np.allclose(template.affine, mask.affine)
    assert np.allclose(template.affine[:3, :3], 2.0 * np.eye(3))  # world-aligned, --template_spacing 2
    assert all(20 <= s <= 120 for s in template.shape)  # a 60 mm phantom and 10 mm margins at 2 mm
    values, brains = np.asarray(template.dataobj), np.asarray(mask.dataobj)
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.5  # means of [0, 1]-scaled images
    assert brains.max() == pytest.approx(1.0) and (brains > 0.5).mean() > 0.02  # every brain overlaps somewhere
    # the registered images are on the template grid, and the template is their mean (each scaled to [0, 1])
    registered = [nib.load(str(output / n / "registered.nii.gz")) for n in "abc"]
    assert all(np.allclose(r.affine, template.affine) and r.shape == template.shape for r in registered)
    scaled = []
    for name, image in zip("abc", registered):
        original = np.asarray(nib.load(str(groupwise_run["root"] / "in" / f"{name}.nii.gz")).dataobj)
        low, high = np.percentile(original, [0.5, 99.5])
        scaled.append(np.clip((np.asarray(image.dataobj) - low) / (high - low), 0, 1))
    # the noise image is not in it; clipping before or after resampling differs a little at the brightest voxels
    assert np.abs(np.mean(scaled, axis=0) - values).mean() < 0.01


def test_the_summary_has_one_row_per_input_and_says_who_is_in_the_template(groupwise_run):
    with open(groupwise_run["output"] / "summary.csv", newline="") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"a", "b", "c", "noise", "broken"}
    assert rows["broken"]["status"] == "error" and rows["broken"]["in_template"] == "no"
    assert "broken.nii.gz" in rows["broken"]["message"]
    for name in "abc":
        assert rows[name]["status"] in ("ok", "suspect") and rows[name]["in_template"] == "yes"
        assert math.isfinite(float(rows[name]["keypoint_residual_mm"]))
    # suspect on its own QC: registered to the group space, but not part of the mean, and its row says so
    assert rows["noise"]["status"] == "suspect" and rows["noise"]["in_template"] == "no"
    assert "not in the template" in rows["noise"]["message"] and "brain mask fills" in rows["noise"]["message"]


def test_the_transforms_map_the_template_grid_into_each_image(groupwise_run):
    """transform.tfm maps the template's physical points to the image's: the template's centre lands inside each
    image."""
    output, root = groupwise_run["output"], groupwise_run["root"]
    template = nib.load(str(output / "template.nii.gz"))
    centre = template.affine @ np.array([*(np.array(template.shape) - 1) / 2, 1.0])
    for name in "abc":
        in_image = read_itk_transform(str(output / name / "transform.tfm")) @ centre
        image = nib.load(str(root / "in" / f"{name}.nii.gz"))
        index = np.linalg.inv(image.affine) @ in_image
        assert np.all(index[:3] > 0) and np.all(index[:3] < np.array(image.shape) - 1)

"""Groupwise registration (``scripts/groupwise.py``, ``configs/groupwise.yaml``).

The Procrustes maths is tested on keypoint sets that are known affine / similarity / rigid images of one
configuration (a random network's keypoints mean nothing): the recovered transforms agree with the truth up to one
global transform, the mean neither drifts nor shrinks, outliers and QC-flagged images stay out of the mean, and the
turn search picks the consistent keypoint set. The template rounds are tested on phantoms with known transforms
(refinement against the rebuilt template brings the transforms to the truth and sharpens the template; the
re-pinning keeps the group space where it was). One run through the bundle runner on three tiny phantoms and a bad
file checks the outputs: case folders, the template on a grid around the group and made of the written transforms,
``summary.csv`` rows and exit code 1.
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
from monai.transforms import Orientationd
from test_inference import (
    NUM_KEYPOINTS,
    OUTPUT_FILES,
    ROOT,
    SMALL_NETWORK,
    phantom_volume,
    rigid,
    rotation,
    write_checkpoint,
    write_moving,
    write_nifti,
)

from scripts.coordinates import apply_affine
from scripts.errors import KeyMorphWorkflowError
from scripts.groupwise import (
    BRAIN_MASK_CACHE,
    CachedSkullStripd,
    brain_outline,
    centroid_and_size,
    check_groupwise_settings,
    fit_group,
    fit_to_mean,
    generalised_procrustes,
    in_contrast_of,
    pairwise_consistency_mm,
    repinned,
    rotation_factor,
)
from scripts.image_io import LoadVolumed
from scripts.skull_strip import SkullStripd
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


def small_moves(count: int, seed: int, degrees: float = 3.0, shift_mm: float = 3.0) -> torch.Tensor:
    """``(count, 4, 4)`` random rigid moves of about ``degrees`` and ``shift_mm``, not averaging to the identity."""
    generator = torch.Generator().manual_seed(seed)
    moves = []
    for _ in range(count):
        axis = torch.randn(3, generator=generator, dtype=torch.float64).numpy()
        shift = shift_mm * torch.randn(3, generator=generator, dtype=torch.float64).numpy()
        moves.append(torch.from_numpy(rigid(axis, degrees, shift)))
    return torch.stack(moves)


def test_repinning_removes_a_drift_of_the_whole_group_and_keeps_each_image_against_the_others():
    configuration, truth, solution = group_of("affine", count=5, seed=8)
    solution = fit_group(solution[:, None], "affine").fixed_to_moving
    included = torch.ones(5, dtype=torch.bool)
    # a round that only shrank and shifted the group space: re-pinning undoes it exactly
    drift = torch.diag(torch.tensor([0.9, 0.9, 0.9, 1.0], dtype=torch.float64))
    drift[:3, 3] = torch.tensor([4.0, -2.0, 1.0], dtype=torch.float64)
    assert torch.allclose(repinned(solution @ drift, solution, included), solution, atol=1e-9)
    # each image corrected on its own, plus the drift: the corrections average to the identity and the images'
    # maps to one another (what the refinement found) are kept
    refined = solution @ small_moves(5, seed=9) @ drift
    pinned = repinned(refined, solution, included)
    corrections = torch.linalg.inv(pinned) @ solution
    assert torch.allclose(corrections.mean(0), torch.eye(4, dtype=torch.float64), atol=1e-9)
    assert pairwise_consistency_mm(pinned, refined, configuration) < 1e-9
    # rounds after rounds: the group space stays where the keypoint solutions put it (mean keypoint positions)
    current = solution
    for seed in range(10, 15):
        current = repinned(current @ small_moves(5, seed=seed) @ drift, solution, included)
    placed = apply_affine(torch.linalg.inv(current), apply_affine(solution, configuration.expand(5, -1, -1))).mean(0)
    assert float((placed - configuration).norm(dim=-1).max()) < 1e-6
    # an image out of the mean does not move the group space
    wild = refined.clone()
    wild[0] = refined[0] @ torch.from_numpy(rigid([0.0, 0.0, 1.0], 40.0, [30.0, 0.0, 0.0]))
    out_of_mean = torch.tensor([False, True, True, True, True])
    assert torch.allclose(repinned(wild, solution, out_of_mean)[1:], repinned(refined, solution, out_of_mean)[1:])


def test_an_image_of_another_contrast_takes_the_references_contrast():
    """Three tissues whose order a T2-like image turns around: mapped, it shows the reference's intensities; an
    image of the reference's contrast stays as it is (within the bins)."""
    generator = torch.Generator().manual_seed(11)
    tissue = torch.randint(0, 3, (40, 40, 40), generator=generator)
    reference = torch.tensor([0.3, 0.6, 0.9])[tissue] + 0.02 * torch.randn(tissue.shape, generator=generator)
    other = torch.tensor([0.85, 0.55, 0.35])[tissue] + 0.02 * torch.randn(tissue.shape, generator=generator)
    brain = torch.ones_like(tissue, dtype=torch.bool)
    brain[:5] = False  # only the overlap of the brains is measured
    mapped = in_contrast_of(other, reference, brain)
    for label, level in enumerate((0.3, 0.6, 0.9)):
        assert float(mapped[tissue == label].mean()) == pytest.approx(level, abs=0.02)
    assert float((other - reference).abs().mean()) > 0.2  # and it was far from it
    assert float((in_contrast_of(reference, reference, brain) - reference).abs().mean()) < 0.01
    # no overlap: nothing to map with, the image as it is
    assert torch.equal(in_contrast_of(other, reference, torch.zeros_like(brain)), other)


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


def write_phantoms(folder) -> dict:
    """Three phantoms moved rigidly, ``a``-``c``, written into ``folder``; their moves by name."""
    moves = {
        "a": rigid([0.0, 0.0, 1.0], 0.0, [0.0, 0.0, 0.0]),
        "b": rigid([0.2, 0.3, 1.0], 20.0, [5.0, -4.0, 2.0]),
        "c": rigid([1.0, 0.0, 0.2], -15.0, [-3.0, 6.0, 0.0]),
    }
    for name, move in moves.items():
        write_moving(folder / f"{name}.nii.gz", move)
    return moves


@pytest.fixture(scope="module")
def groupwise_run(tmp_path_factory):
    """Three phantoms moved rigidly, an image of noise and a file that is not an image, registered groupwise with a
    small random network (no residual threshold: the random keypoints' residuals mean nothing)."""
    root = tmp_path_factory.mktemp("groupwise")
    (root / "in").mkdir()
    write_phantoms(root / "in")
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
        # one template round of a few refinement steps: the template is then made with the refined transforms, the
        # ones written, and registered.nii.gz averages to it
        "--refine_iterations",
        "5",
        "--template_iterations",
        "1",
        *SMALL_NETWORK,
    )
    return {"process": process, "output": output, "root": root}


def test_a_groupwise_run_refuses_a_pairs_csv():
    with pytest.raises(KeyMorphWorkflowError, match="--pairs_csv pairs.csv: a groupwise run registers a folder"):
        check_groupwise_settings("pairs.csv", 1.0, 10.0, 0.01, 20)
    with pytest.raises(KeyMorphWorkflowError, match="--template_spacing 0: must be positive"):
        check_groupwise_settings(None, 0, 10.0, 0.01, 20)
    with pytest.raises(KeyMorphWorkflowError, match="--template_iterations -1: must be at least 0"):
        check_groupwise_settings(None, 1.0, 10.0, 0.01, 20, -1)
    with pytest.raises(KeyMorphWorkflowError, match="--template_iterations 1.5: not an integer"):
        check_groupwise_settings(None, 1.0, 10.0, 0.01, 20, 1.5)
    check_groupwise_settings("null", 1.5, 0, 0.01, 1, 0)  # passes


def test_a_bad_file_fails_alone_and_the_run_exits_1(groupwise_run):
    process = groupwise_run["process"]
    assert process.returncode == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    assert "1 of 5 input(s) failed" in process.stderr
    # keypoints, template, one round (refinement, template), the case outputs
    assert "groupwise pass 5 of 5: each case written" in process.stdout + process.stderr


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
    # the registered images are on the template grid, and the template is made with the transforms written: its
    # brains cover exactly the registered phantoms (--skull_strip none: brain = image > 0; the noise image is not in
    # it), and it is 0 outside them
    registered = [nib.load(str(output / n / "registered.nii.gz")) for n in "abc"]
    assert all(np.allclose(r.affine, template.affine) and r.shape == template.shape for r in registered)
    covered = np.any([np.asarray(r.dataobj) > 0 for r in registered], axis=0)
    assert np.mean(covered != (brains > 0)) < 1e-3
    assert np.all(values[brains == 0] == 0) and values[brains > 0.99].std() > 0.05


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


# --- template rounds on phantoms with known transforms -----------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_group(tmp_path_factory):
    """A groupwise registration built from the configs (small random network: the keypoints are not used) over four
    phantoms moved rigidly by known transforms, two of them in the reverse contrast (a T2 to a T1: their plain mean
    would be flat), and its members; the group space starts from the truth spoiled by a few degrees and millimetres
    per image, as a keypoint solution would be."""
    from monai.bundle import ConfigParser

    root = tmp_path_factory.mktemp("rounds")
    (root / "in").mkdir()
    truth = [
        rigid([0.0, 0.0, 1.0], 0.0, [0.0, 0.0, 0.0]),
        rigid([0.2, 0.3, 1.0], 15.0, [5.0, -4.0, 2.0]),
        rigid([1.0, 0.0, 0.2], -12.0, [-3.0, 6.0, 0.0]),
        rigid([0.3, 1.0, 0.0], 10.0, [2.0, 3.0, -5.0]),
    ]
    for number, move in enumerate(truth):
        path = write_moving(root / "in" / f"p{number}.nii.gz", move)
        if number % 2:
            image = nib.load(path)
            phantom = np.asarray(image.dataobj)
            write_nifti(path, np.where(phantom > 0, 1.1 - phantom, 0.0).astype(np.float32), image.affine)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.yaml"), str(ROOT / "configs" / "groupwise.yaml")])
    parser.update(
        {
            "dataset_dir": str(root / "in"),
            "output_dir": str(root / "out"),
            "skull_strip": "none",
            "num_workers": 0,
            "device": "cpu",
            "template_spacing": 2.0,
            "num_keypoints": NUM_KEYPOINTS,
            "network_channels": [8, 8, 16, 16],
            "spatial_size": 48,
        }
    )
    (root / "out").mkdir()
    registration = parser.get_parsed_content("groupwise_registration")
    members = registration.collect()
    names = [m.name for m in members]
    truth = torch.stack([torch.from_numpy(truth[int(n[1:])]) for n in names])
    start = truth @ small_moves(len(truth), seed=20, degrees=2.0, shift_mm=2.0)
    return {"registration": registration, "members": members, "truth": truth, "start": start}


def phantom_points() -> torch.Tensor:
    """``(M, 3)`` world mm inside the phantom (its brain, in the group space of the truth)."""
    axes = torch.linspace(-24.0, 24.0, 9, dtype=torch.float64)
    points = torch.cartesian_prod(axes, axes, axes)
    return points[((points / torch.tensor([15.0, 27.0, 20.0], dtype=torch.float64)) ** 2).sum(1) < 1]


def template_likeness(path, transforms: torch.Tensor, truth: torch.Tensor) -> float:
    """How much a template looks like the phantom in the template's group space (the phantom mapped through the true
    transform of the group's first image and back through the recovered one): the absolute correlation inside the
    phantom (either contrast), 1 for a perfectly sharp template."""
    image = nib.load(str(path))
    values = np.asarray(image.dataobj)
    to_phantom = (torch.linalg.inv(truth[0]) @ transforms[0]).numpy()
    expected = phantom_volume(image.affine, image.shape, np.linalg.inv(to_phantom))
    inside = expected > 0
    return abs(float(np.corrcoef(values[inside], expected[inside])[0, 1]))


def test_template_rounds_bring_the_transforms_to_the_truth_and_sharpen_the_template(phantom_group):
    registration, members = phantom_group["registration"], phantom_group["members"]
    truth, start = phantom_group["truth"], phantom_group["start"]
    group = fit_group(torch.stack([m.keypoints for m in members]), "rigid")
    group.fixed_to_moving, group.included = start.clone(), torch.ones(len(members), dtype=torch.bool)
    points = phantom_points()
    registration.build_template(members, group)
    errors = [pairwise_consistency_mm(group.fixed_to_moving, truth, points)]
    likeness = [template_likeness(registration.template_path, group.fixed_to_moving, truth)]
    for _ in range(2):
        group.fixed_to_moving = repinned(registration.refine_round(members, group), start, group.included)
        registration.build_template(members, group)
        errors.append(pairwise_consistency_mm(group.fixed_to_moving, truth, points))
        likeness.append(template_likeness(registration.template_path, group.fixed_to_moving, truth))
    # each round brings the images closer to one another; the template takes one contrast and gets sharp
    # measured: 4.8, 0.70, 0.61 mm and template likeness 0.52, 0.85, 0.83; with the plain mean of the two contrasts
    # as the template, 4.8, 1.7, 0.76 mm and likeness 0.30, 0.36, 0.32
    assert errors[0] > 4.0 and errors[1] < 0.25 * errors[0] and errors[2] < 0.7, errors
    assert min(likeness[1:]) > 0.75 and likeness[0] < 0.6, likeness
    # the group space stayed where the spoiled solutions put it: their corrections average to the identity
    corrections = torch.linalg.inv(group.fixed_to_moving) @ start
    assert torch.allclose(corrections.mean(0), torch.eye(4, dtype=torch.float64), atol=1e-9)


# --- each brain extracted once per run -----------------------------------------------------------------------------


@pytest.fixture
def counted_extraction(monkeypatch):
    """deepbet replaced by a cheap, deterministic extractor that counts its calls, by image file: the brain is the
    phantom's voxels above 0.5 in the image's left half (an uneven mask, so a flipped or shifted one would differ)."""
    calls = []

    def extract(self, image, name):
        calls.append(os.path.basename(name))
        values = image.as_tensor()[0]
        left = torch.zeros_like(values, dtype=torch.bool)
        left[: values.shape[0] // 2 + 3] = True
        return (values > 0.5) & left

    monkeypatch.setattr(SkullStripd, "_deepbet_mask", extract)
    return calls


def loaded_in_ras(path: str, name: str) -> dict:
    image = Orientationd(keys="image", axcodes="RAS", labels=None)(LoadVolumed(keys="image")({"image": path}))
    return {**image, "name": name}


def test_a_cached_brain_mask_gives_the_image_and_mask_the_extractor_gave(tmp_path, counted_extraction):
    """On an oblique image stored with a flipped axis: the first call extracts the brain and writes its mask on the
    image file's grid; the second reads it back and gives the same image and mask, voxel for voxel."""
    path = write_moving(tmp_path / "a.nii.gz", rigid([0.2, 0.3, 1.0], 20.0, [5.0, -4.0, 2.0]))
    cached = CachedSkullStripd(SkullStripd(keys="image", backend="deepbet"), tmp_path / "cache")
    first = cached(loaded_in_ras(path, "a"))
    mask_file = nib.load(str(tmp_path / "cache" / "a.nii.gz"))
    assert mask_file.get_data_dtype() == np.uint8 and np.array_equal(mask_file.affine, nib.load(path).affine)
    assert set(np.unique(np.asarray(mask_file.dataobj))) == {0, 1}
    second = cached(loaded_in_ras(path, "a"))
    assert counted_extraction == ["a.nii.gz"]
    assert set(second) == set(first)  # no trace of the cached mask's path in the item
    for key in ("image", "mask"):
        assert torch.equal(second[key].as_tensor(), first[key].as_tensor())
        assert torch.equal(second[key].affine, first[key].affine)
    phantom = int((loaded_in_ras(path, "a")["image"] > 0).sum())
    assert 0.2 * phantom < int(first["mask"].sum()) < 0.8 * phantom  # the extractor's uneven mask


def test_backends_that_extract_nothing_are_not_cached(tmp_path):
    path = write_moving(tmp_path / "a.nii.gz", rigid([0.0, 0.0, 1.0], 0.0, [0.0, 0.0, 0.0]))
    cached = CachedSkullStripd(SkullStripd(keys="image", backend="none"), tmp_path / "cache")
    expected = SkullStripd(keys="image", backend="none")(loaded_in_ras(path, "a"))
    assert torch.equal(cached(loaded_in_ras(path, "a"))["mask"].as_tensor(), expected["mask"].as_tensor())
    assert not (tmp_path / "cache").exists()


def groupwise_in_process(input_dir, output_dir, checkpoint: str, **settings) -> None:
    """A groupwise run of the configs in this process (its ``initialize`` and ``groupwise`` steps): deepbet, no
    workers (the counting extractor lives in this process), a small network, no template round (three passes)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.yaml"), str(ROOT / "configs" / "groupwise.yaml")])
    parser.update(
        {
            "dataset_dir": str(input_dir),
            "output_dir": str(output_dir),
            "skull_strip": "deepbet",
            "head_pose": False,
            "num_workers": 0,
            "device": "cpu",
            "show_progress": False,
            "ckpt_path": checkpoint,
            "num_keypoints": NUM_KEYPOINTS,
            "network_channels": [8, 8, 16, 16],
            "spatial_size": 32,
            "aligner": "similarity",
            "qc_max_residual_mm": 1000,
            "template_spacing": 2.0,
            "refine_iterations": 0,
            **settings,
        }
    )
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("groupwise")


def test_a_groupwise_run_extracts_each_brain_once_and_registers_as_before(tmp_path, counted_extraction):
    """The same transforms, keypoints, masks and template as extracting every brain in every pass (the
    preprocessing's plain extractor, ``strip_skull: "@extract_brain"``), with one extraction per image; a mask left
    in the cache folder by a killed run is not trusted, and the folder is gone at the end."""
    (tmp_path / "in").mkdir()
    moves = write_phantoms(tmp_path / "in")
    checkpoint = write_checkpoint(tmp_path / "model.pt")
    groupwise_in_process(tmp_path / "in", tmp_path / "every_pass", checkpoint, strip_skull="@extract_brain")
    extractions_every_pass = len(counted_extraction)
    counted_extraction.clear()
    cached = tmp_path / "cached"
    # a wrong mask that a killed earlier run might have left (an empty one: it would stop case a)
    (cached / BRAIN_MASK_CACHE).mkdir(parents=True)
    image = nib.load(str(tmp_path / "in" / "a.nii.gz"))
    nib.save(
        nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(cached / BRAIN_MASK_CACHE / "a.nii.gz")
    )
    groupwise_in_process(tmp_path / "in", cached, checkpoint)
    assert sorted(counted_extraction) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    # keypoints, template (the reference image, then each image), case outputs
    assert extractions_every_pass == 3 + 4 + 3
    assert not (cached / BRAIN_MASK_CACHE).exists()
    for name in moves:
        for file in ("affine_ras.txt", "keypoints_moving.csv", "keypoints_fixed.csv", "transform.tfm"):
            assert (cached / name / file).read_text() == (tmp_path / "every_pass" / name / file).read_text()
        for file in ("moving_mask.nii.gz", "registered.nii.gz"):
            expected = np.asarray(nib.load(str(tmp_path / "every_pass" / name / file)).dataobj)
            assert np.array_equal(np.asarray(nib.load(str(cached / name / file)).dataobj), expected)
    for file in ("template.nii.gz", "template_mask.nii.gz"):
        expected = np.asarray(nib.load(str(tmp_path / "every_pass" / file)).dataobj)
        assert np.array_equal(np.asarray(nib.load(str(cached / file)).dataobj), expected)
    rows = []
    for output in (cached, tmp_path / "every_pass"):
        with open(output / "summary.csv", newline="") as handle:
            rows.append({row.pop("name"): {**row, "seconds": ""} for row in csv.DictReader(handle)})
    assert rows[0] == rows[1] and all(row["status"] != "error" for row in rows[0].values())

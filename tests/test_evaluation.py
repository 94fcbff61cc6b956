"""Tests of the robustness sweep (configs/evaluate.yaml, scripts/evaluation.py) on small generated label maps.

The workflow runs through the bundle runner's command line, as users run it: once with a randomly initialised small
network (outputs and their shape) and once with the ``truth`` method, which returns the applied transform, so its
TRE must be 0 and its same-subject Dice 1: that checks the scoring code itself.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from synthetic_heads import write_label_maps_dir

from scripts.brain_frame import BrainFramed
from scripts.coordinates import rotation_angle_deg
from scripts.keypoint_net import KeypointDetector
from scripts.random_motions import misalignment, random_axis
from scripts.reports import CASE_COLUMNS, OUTPUT_FILES
from scripts.robustness_cases import SyntheticRobustnessDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECTS = ["training_seg_13", "training_seg_14"]
SMALL_NETWORK = [
    "--num_keypoints",
    "16",
    "--network_channels",
    "[8,8,16,16]",
    "--spatial_size",
    "32",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Two small heads named like the default test subjects and a random small network's weights."""
    folder = tmp_path_factory.mktemp("evaluation")
    label_maps = write_label_maps_dir(str(folder / "label_maps"), subjects=(13, 14))
    torch.manual_seed(0)
    ckpt = str(folder / "model.pt")
    torch.save(KeypointDetector(1, 16, (8, 8, 16, 16)).state_dict(), ckpt)
    return {"folder": folder, "label_maps": label_maps, "ckpt": ckpt}


def run_sweep(data: dict, output_dir: str, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "evaluating",
        "--config_file",
        "configs/evaluate.yaml",
        "--dataset_dir",
        data["label_maps"],
        "--output_dir",
        output_dir,
        "--ckpt_path",
        data["ckpt"],
        "--test_subjects",
        str(SUBJECTS),
        "--rotations",
        "[0,90]",
        *SMALL_NETWORK,
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_rows(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "cases.csv"), newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CASE_COLUMNS
        return list(reader)


def test_sweep_writes_every_output(data):
    output_dir = str(data["folder"] / "keymorph")
    run_sweep(data, output_dir, "--pairs_per_cell", "1")
    for name in OUTPUT_FILES:
        assert os.path.getsize(os.path.join(output_dir, name)) > 0
    for name in ("dice_vs_rotation.png", "tre_vs_rotation.png"):
        with open(os.path.join(output_dir, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    rows = read_rows(output_dir)
    assert len(rows) == 6 * 2  # six modality pairs x two rotations x one pair
    cells = {(row["modality_pair"], float(row["rotation_deg"])) for row in rows}
    assert cells == {(p, r) for p in ("T1-T1", "T2-T2", "PD-PD", "T1-T2", "T1-PD", "T2-PD") for r in (0.0, 90.0)}
    for row in rows:
        assert row["method"] == "keymorph" and row["status"] == "ok"
        assert row["same_subject"] == "True" and row["fixed_subject"] == row["moving_subject"] in SUBJECTS
        assert row["modality_pair"] == f"{row['fixed_modality']}-{row['moving_modality']}"
        assert 0.0 <= float(row["dice"]) <= 1.0 and float(row["tre_mm"]) >= 0.0 and float(row["seconds"]) > 0.0

    with open(os.path.join(output_dir, "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["method"] == "keymorph" and summary["overall"]["n"] == 12
    assert math.isclose(summary["mean_dice"], np.mean([float(r["dice"]) for r in rows]), abs_tol=1e-5)
    assert set(summary["by_rotation"]) == {"0", "90"}
    assert len(summary["by_modality_pair"]) == 6
    for group in summary["by_modality_pair"].values():
        assert set(group["by_rotation"]) == {"0", "90"}
        for cell in group["by_rotation"].values():
            assert cell["n"] == cell["n_tre"] == 1
            for key in ("dice_mean", "dice_std", "tre_mean_mm", "tre_median_mm"):
                assert key in cell


def test_truth_method_scores_perfectly(data):
    """The applied transform as the estimate: TRE 0 and Dice 1 on same-subject pairs (the scoring is right), no TRE
    on different-subject pairs, whose Dice is the same at every angle (the paired design)."""
    output_dir = str(data["folder"] / "truth")
    run_sweep(data, output_dir, "--method", "truth", "--pairs_per_cell", "2", "--modality_pairs", "['T1-T2','PD-PD']")
    rows = read_rows(output_dir)
    assert len(rows) == 2 * 2 * 2
    same = [row for row in rows if row["same_subject"] == "True"]
    different = [row for row in rows if row["same_subject"] == "False"]
    assert len(same) == len(different) == 4
    for row in same:
        assert float(row["tre_mm"]) < 1e-6
        assert float(row["dice"]) > 0.999
    for row in different:
        assert row["tre_mm"] == "" and row["fixed_subject"] != row["moving_subject"]
        assert 0.2 < float(row["dice"]) < 0.999
    for pair in ("T1-T2", "PD-PD"):
        dice = {row["dice"] for row in different if row["modality_pair"] == pair}
        assert len(dice) == 1
    with open(os.path.join(output_dir, "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["overall"]["tre_mean_mm"] < 1e-6 and summary["overall"]["n_tre"] == 4


def test_check_properties(data):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=os.path.join(ROOT, "configs", "evaluate.yaml"),
        workflow_type="train",
        dataset_dir=data["label_maps"],
        output_dir=str(data["folder"] / "properties"),
        ckpt_path=data["ckpt"],
        test_subjects=SUBJECTS,
        num_keypoints=16,
        network_channels=[8, 8, 16, 16],
        spatial_size=32,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_misalignment_has_the_stated_net_rotation(seed):
    rng = np.random.RandomState(seed)
    for angle in (0.0, 45.0, 90.0, 135.0, 180.0):
        matrix = misalignment(
            angle, random_axis(rng), rng.uniform(0.9, 1.1, 3), rng.uniform(-10, 10, 3), rng.uniform(-20, 20, 3)
        )
        assert abs(rotation_angle_deg(matrix) - angle) < 1e-6


def test_cases_follow_the_convention(data):
    """Truth = applied move with the stated net angle, rotation about the brain centre, world-aligned moving grid,
    deterministic and independent of the order of access."""
    label_maps = {name: os.path.join(data["label_maps"], f"{name}.nii.gz") for name in SUBJECTS}
    frame = BrainFramed(keys="image", mask_key="mask", spatial_size=32, spacing=2.0)

    def dataset():
        return SyntheticRobustnessDataset(
            label_maps, frame, modality_pairs=["T1-T2"], rotations=[0, 135], pairs_per_cell=2, seed=3
        )

    first, second = dataset(), dataset()
    cases = [first[i] for i in range(len(first))]
    assert [c["rotation_deg"] for c in cases] == [0.0, 135.0, 0.0, 135.0]
    assert [c["same_subject"] for c in cases] == [True, True, False, False]
    for case in cases:
        move = case["applied_transform"]
        assert abs(rotation_angle_deg(move) - case["rotation_deg"]) < 1e-6
        moving = case["moving"]
        # the moved image sits on a world-aligned grid; the labels are only moved (exact), for scoring
        assert torch.allclose(moving["image"].affine[:3, :3], torch.eye(3, dtype=torch.float64) * 2.0)
        assert moving["net_image"].shape == (1, 32, 32, 32)
        brain_labels = first.label_map(moving["subject"]).as_tensor()
        brain_labels = torch.where(brain_labels >= 500, torch.zeros_like(brain_labels), brain_labels)  # skull-stripped
        assert torch.equal(moving["label"].as_tensor(), brain_labels)
        truth = case["true_fixed_to_moving"]
        assert (truth is not None) == case["same_subject"]
    # the two angles of one pair share images, axis, scale and translation: the brain centre is a fixed point of
    # their relative move
    relative = cases[1]["applied_transform"] @ torch.linalg.inv(cases[0]["applied_transform"])
    centre = cases[0]["applied_transform"][:3, :3] @ torch.as_tensor(first._base("T1-T2", 0)["center"])
    centre = centre + cases[0]["applied_transform"][:3, 3]
    assert torch.allclose(relative[:3, :3] @ centre + relative[:3, 3], centre, atol=1e-6)
    # same draws in another order
    again = second[3]
    assert torch.equal(again["applied_transform"], cases[3]["applied_transform"])
    assert torch.equal(again["moving"]["image"].as_tensor(), cases[3]["moving"]["image"].as_tensor())
    assert torch.equal(again["fixed"]["image"].as_tensor(), cases[3]["fixed"]["image"].as_tensor())


def test_real_image_layout_keeps_the_convention(data):
    """An IXI-layout folder whose images each have their own pose (transforms.csv): same-subject cases are first put
    into the fixed pose, so the truth still has the stated angle and aligns the labels; scored in-process."""
    from scripts.evaluation import IdentityTransform, TrueTransform, score_case
    from scripts.make_test_set import make_test_set
    from scripts.robustness_cases import make_robustness_dataset

    ixi = str(data["folder"] / "ixi")
    make_test_set(data["label_maps"], ixi, subjects=SUBJECTS, spacing=2.0, rotation_range=40.0)
    frame = BrainFramed(keys="image", mask_key="mask", spatial_size=32, spacing=2.0)
    dataset = make_robustness_dataset(
        ixi, ["IXI013", "IXI014"], frame, skull_strip="none", modality_pairs=["T1-T2"], rotations=[135], seed=1
    )
    same, different = dataset[0], dataset[1]
    assert same["same_subject"] and not different["same_subject"]
    assert same["fixed"]["subject"] == same["moving"]["subject"] != "" and same["moving"]["modality"] == "T2"
    assert different["fixed"]["subject"] != different["moving"]["subject"]
    assert abs(rotation_angle_deg(same["true_fixed_to_moving"]) - 135.0) < 1e-6
    aligned, tre = score_case(same, TrueTransform()(same))
    unaligned, _ = score_case(same, IdentityTransform()(same))
    # each image of the set was resampled on its own grid (labels by nearest neighbour): not exactly 1
    assert tre == 0.0 and aligned > 0.8 and unaligned < 0.5
    assert math.isnan(score_case(different, TrueTransform()(different))[1])


def test_a_failing_method_fails_its_case_only(data):
    from scripts.evaluation import RobustnessEvaluator

    def crashing(case):
        raise RuntimeError("external tool crashed\nsecond line")

    label_maps = {name: os.path.join(data["label_maps"], f"{name}.nii.gz") for name in SUBJECTS}
    frame = BrainFramed(keys="image", mask_key="mask", spatial_size=32, spacing=2.0)
    case = SyntheticRobustnessDataset(label_maps, frame, modality_pairs=["T1-T1"], rotations=[45], pairs_per_cell=1)[0]
    evaluator = RobustnessEvaluator(device="cpu", val_data_loader=[], network=torch.nn.Identity(), method=crashing)
    row = evaluator.evaluate_case(case)
    assert row["status"] == "failed: RuntimeError: external tool crashed" and row["method"] == "crashing"
    assert row["dice"] == 0.0 and math.isnan(row["tre_mm"])
    evaluator.method = lambda case: torch.full((4, 4), float("nan"))
    assert evaluator.evaluate_case(case)["status"].startswith("failed")

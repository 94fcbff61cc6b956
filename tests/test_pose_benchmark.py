"""benchmarks/pose_robustness.py without a run: the conditions it cuts, and its report from its own csv files."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import pose_robustness  # noqa: E402


def _case(angle, kind, pair, failed, value, condition="full", status="ok"):
    return {
        "name": f"c_{angle}_{kind}_{pair}",
        "condition": condition,
        "pair": pair,
        "kind": kind,
        "angle": float(angle),
        "contrast": "T2",
        "status": status,
        "seconds": 1.0,
        "dice": value if pair == "other" else float("nan"),
        "error_mm": value if pair == "same" else float("nan"),
        "failed": failed,
    }


def test_report_from_its_csv_files_counts_failures_per_angle(tmp_path):
    rows = [
        _case(0, "voxel", "same", False, 1.0),
        _case(0, "voxel", "same", True, 40.0),
        _case(90, "voxel", "same", False, 2.0),
        _case(0, "voxel", "other", False, 0.6),
        _case(90, "voxel", "other", True, 0.1),
        _case(90, "voxel", "same", True, 30.0, condition="lesion", status="suspect"),
    ]
    masks = [
        {"image": "a", "method": "deepbet", "kind": "voxel", "angle": 0.0, "contrast": "T1", "dice": 0.9, "seconds": 3},
        {
            "image": "a",
            "method": "deepbet",
            "kind": "voxel",
            "angle": 90.0,
            "contrast": "T2",
            "dice": 0.5,
            "seconds": 5,
        },
    ]
    pose_robustness._write_csv(str(tmp_path / "cases.csv"), rows)
    pose_robustness._write_csv(str(tmp_path / "mask_dice.csv"), masks)
    assert pose_robustness.main(["--report_only", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    same_voxel = next(line for line in text.splitlines() if line.startswith("| voxel | same"))
    assert "1/2 fail, 20.500 mm" in same_voxel and "0/1 fail, 2.000 mm" in same_voxel
    other_voxel = next(line for line in text.splitlines() if line.startswith("| voxel | other"))
    assert "0/1 fail, 0.600" in other_voxel and "1/1 fail, 0.100" in other_voxel
    lesion = next(line for line in text.splitlines() if line.startswith("| lesion"))
    assert "| 1 (0 not flagged) | 1 |" in lesion
    per_contrast = text.strip().splitlines()[-1]
    assert per_contrast.startswith("| deepbet |") and "0.900" in per_contrast and "0.500" in per_contrast


def test_cut_top_removes_the_top_20_mm_of_the_brain():
    labels = np.zeros((10, 10, 60), dtype=np.int32)
    labels[2:8, 2:8, 10:50] = 2  # brain from z = 10 to 49 (1 mm voxels)
    cut = pose_robustness.with_condition(labels, "cut_top", 1.0, np.random.RandomState(0))
    assert np.nonzero(cut.any((0, 1)))[0].max() == 49 - 20 - 1

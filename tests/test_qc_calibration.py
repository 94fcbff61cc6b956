"""benchmarks/qc_calibration.py: right vs wrong registrations counted against the QC thresholds."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import qc_calibration  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "qc_calibration.py")


def rows_of_one_pair(right_turn: int, residuals, similarities) -> list[dict]:
    return [
        {
            "case": "label_maps_T1-T2_p1/r90",
            "turn": turn,
            "right": turn == right_turn,
            "residual_mm": residuals[turn],
            "similarity": similarities[turn],
            "dice": 0.6 if turn == right_turn else 0.1,
            "tre_mm": float("nan"),
        }
        for turn in range(4)
    ]


def test_summary_counts_flags_of_right_and_wrong_registrations():
    rows = rows_of_one_pair(0, [3.0, 20.0, 9.0, 30.0], [0.05, 0.01, 0.03, 0.004])
    rows += rows_of_one_pair(2, [12.0, 25.0, 4.0, 18.0], [0.02, 0.005, 0.06, 0.01])
    thresholds = {"max_residual_mm": 10.0, "min_similarity": 0.015}
    text = qc_calibration.summary_markdown(rows, thresholds, os.path.join(ROOT, "models", "model.pt"))
    # right: (3.0, 0.05) and (4.0, 0.06) pass; wrong: (9.0, 0.03) passes, the other five are flagged
    assert "flag 0 of 2 right and 5 of 6 wrong registrations" in text
    assert "is the right one for 1 of 2 pairs" in text
    assert "| right | 2 | 3.000 / 3.500 / 4.000 |" in text


def test_from_csv_rewrites_the_summary(tmp_path):
    rows = rows_of_one_pair(1, [15.0, 2.0, 11.0, 40.0], [0.01, 0.08, 0.02, 0.0])
    with open(tmp_path / "qc_calibration.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, qc_calibration.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    assert qc_calibration.main(["--from_csv", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "qc_calibration.md").read_text()
    assert "| wrong | 3 | 11.000 / 15.000 / 40.000 |" in text
    assert "is the right one for 0 of 1 pairs" in text


@pytest.mark.parametrize("arguments", [["--cases_dir", "EMPTY"], ["--from_csv", "--output_dir", "EMPTY"]])
def test_nothing_to_read_is_one_line(tmp_path, arguments):
    arguments = [str(tmp_path) if a == "EMPTY" else a for a in arguments]
    result = subprocess.run([sys.executable, SCRIPT, *arguments], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("keymorph: error:") and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def write_case_folder(base, with_labels: bool, truth) -> str:
    import nibabel as nib
    import numpy as np

    rotation = base / "r90"
    rotation.mkdir(parents=True)
    volume = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    names = [base / "fixed_mask.nii.gz", base / "fixed.nii.gz", rotation / "moving.nii.gz"]
    if with_labels:
        names += [base / "fixed_labels.nii.gz", rotation / "moving_labels.nii.gz"]
    for name in names:
        nib.save(volume, str(name))
    (rotation / "case.json").write_text(json.dumps({"true_fixed_to_moving": truth}))
    return str(rotation)


def test_cases_without_labels_are_scored_by_their_truth_only(tmp_path):
    """The MNI152 cases have no label maps: the case holds the mask and the truth, nothing to read fails."""
    truth = [[1.0, 0, 0, 2.0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    case = qc_calibration.load_case(write_case_folder(tmp_path / "mni152_T1-PD_p0", False, truth))
    assert sorted(case["fixed"]) == ["mask"] and case["moving"] == {} and case["true_fixed_to_moving"] == truth
    case = qc_calibration.load_case(write_case_folder(tmp_path / "label_maps_T1-T2_p1", True, None))
    assert sorted(case["fixed"]) == ["label", "mask"] and list(case["moving"]) == ["label"]
    assert "true_fixed_to_moving" not in case

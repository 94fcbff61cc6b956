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


def rows_of_one_pair(right_turn: int, residuals, similarities, overlaps=None) -> list[dict]:
    """The four turns of one pair; without ``overlaps``, rows as qc_calibration.csv had them before brain_overlap."""
    rows = [
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
    for row, overlap in zip(rows, overlaps or []):
        row["brain_overlap"] = overlap
    return rows


def write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, [c for c in qc_calibration.COLUMNS if c in rows[0]])
        writer.writeheader()
        writer.writerows(rows)


def test_summary_counts_flags_of_right_and_wrong_registrations():
    rows = rows_of_one_pair(0, [3.0, 20.0, 9.0, 30.0], [0.05, 0.01, 0.03, 0.004])
    rows += rows_of_one_pair(2, [12.0, 25.0, 4.0, 18.0], [0.02, 0.005, 0.06, 0.01])
    thresholds = {"max_residual_mm": 10.0, "min_similarity": 0.015}
    text = qc_calibration.summary_markdown(rows, thresholds, os.path.join(ROOT, "models", "model.pt"))
    # right: (3.0, 0.05) and (4.0, 0.06) pass; wrong: (9.0, 0.03) passes, the other five are flagged
    assert "flag 0 of 2 right and 5 of 6 wrong registrations" in text
    assert "is the right one for 1 of 2 pairs" in text
    assert "| right | 2 | 3.000 / 3.500 / 4.000 |" in text
    assert "brain overlap (Dice)" not in text and "brain overlap <" not in text  # rows without it: no column, no rule


def test_summary_counts_the_brain_overlap_with_the_others():
    rows = rows_of_one_pair(0, [3.0, 20.0, 7.0, 30.0], [0.05, 0.01, 0.03, 0.004], [0.93, 0.5, 0.7, 0.4])
    rows += rows_of_one_pair(2, [4.0, 25.0, 5.0, 18.0], [0.02, 0.005, 0.06, 0.01], [0.6, 0.9, 0.8, 0.95])
    thresholds = {"max_residual_mm": 10.0, "min_similarity": 0.015, "min_brain_overlap": 0.85}
    text = qc_calibration.summary_markdown(rows, thresholds, os.path.join(ROOT, "models", "model.pt"))
    assert "| registrations | n | residual (mm) | similarity (NMI) | brain overlap (Dice) |" in text
    assert "| right | 2 | 3.000 / 4.000 / 5.000 | 0.050 / 0.055 / 0.060 | 0.800 / 0.865 / 0.930 |" in text
    assert "similarity < 0.015 or brain overlap < 0.85)" in text
    # right: (3.0, 0.05, 0.93) passes, (5.0, 0.06, 0.8) is flagged by its overlap alone; wrong: (7.0, 0.03, 0.7) and
    # (4.0, 0.02, 0.6) by their overlap alone, the other four by residual or similarity
    assert "flag 1 of 2 right and 6 of 6 wrong registrations" in text
    assert "No brain overlap" not in text


@pytest.mark.parametrize("with_overlap", [True, False], ids=["new", "before_brain_overlap"])
def test_from_csv_rewrites_the_summary(tmp_path, with_overlap):
    overlaps = [0.5, 0.9, 0.6, 0.3] if with_overlap else None
    write_csv(
        tmp_path / "qc_calibration.csv", rows_of_one_pair(1, [15.0, 2.0, 11.0, 40.0], [0.01, 0.08, 0.02, 0.0], overlaps)
    )
    assert qc_calibration.main(["--from_csv", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "qc_calibration.md").read_text()
    assert "| wrong | 3 | 11.000 / 15.000 / 40.000 | 0.000 / 0.010 / 0.020 |" in text
    assert "is the right one for 0 of 1 pairs" in text
    assert ("| 0.300 / 0.500 / 0.600 |" in text) == with_overlap
    assert ("No brain overlap: this qc_calibration.csv was written before the score was recorded" in text) != (
        with_overlap
    )


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

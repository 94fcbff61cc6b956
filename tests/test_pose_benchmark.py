"""benchmarks/pose_robustness.py without a run: the conditions it cuts, what it keeps of the run's summary.csv, and
its report from its own csv files (also those of a run before cases.csv had ``brain_overlap``)."""

from __future__ import annotations

import csv
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import pose_robustness  # noqa: E402


def _case(angle, kind, pair, failed, value, condition="full", status="ok", brain_overlap=0.9):
    return {
        "name": f"c_{angle}_{kind}_{pair}",
        "condition": condition,
        "pair": pair,
        "kind": kind,
        "angle": float(angle),
        "contrast": "T2",
        "status": status,
        "seconds": 1.0,
        "brain_overlap": brain_overlap,
        "dice": value if pair == "other" else float("nan"),
        "error_mm": value if pair == "same" else float("nan"),
        "failed": failed,
    }


ROWS = [
    _case(0, "voxel", "same", False, 1.0, brain_overlap=0.95),
    _case(0, "voxel", "same", True, 40.0, status="suspect", brain_overlap=0.7),
    _case(0, "voxel", "same", True, 35.0, brain_overlap=0.82),  # a failure QC left ok
    _case(90, "voxel", "same", False, 2.0, brain_overlap=0.88),
    _case(0, "voxel", "other", False, 0.6, brain_overlap=0.9),
    _case(90, "voxel", "other", True, 0.1, brain_overlap=float("nan")),  # the run gave it no overlap
    _case(90, "voxel", "same", True, 30.0, condition="lesion", status="suspect", brain_overlap=0.75),
]


def _lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


def test_report_from_its_csv_files_counts_failures_and_flagged_failures_per_angle(tmp_path):
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
    pose_robustness._write_csv(str(tmp_path / "cases.csv"), ROWS)
    pose_robustness._write_csv(str(tmp_path / "mask_dice.csv"), masks)
    assert pose_robustness.main(["--report_only", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    (same_voxel,) = _lines(text, "| voxel | same")
    assert "| 2/3 fail (1 flagged), 25.333 mm |" in same_voxel and "| 0/1 fail, 2.000 mm |" in same_voxel
    (other_voxel,) = _lines(text, "| voxel | other")
    assert "| 0/1 fail, 0.600 |" in other_voxel and "| 1/1 fail (0 flagged), 0.100 |" in other_voxel
    (lesion,) = _lines(text, "| lesion")
    assert "| 1 (0 not flagged) | 1 |" in lesion
    # the overlap of every case, conditions included; the case without one is counted as unknown
    assert _lines(text, "- failures") == ["- failures: 0.700-0.820 (3 cases; unknown for 1)"]
    assert _lines(text, "- right registrations") == ["- right registrations: 0.880-0.950 (3 cases)"]
    per_contrast = text.strip().splitlines()[-1]
    assert per_contrast.startswith("| deepbet |") and "0.900" in per_contrast and "0.500" in per_contrast


def test_report_of_a_run_before_cases_csv_had_brain_overlap(tmp_path):
    """An old output folder: cases.csv without the column. The failures and the flagged ones (from the status) are
    counted as before; the overlap is unknown for every case."""
    old = [{key: value for key, value in row.items() if key != "brain_overlap"} for row in ROWS]
    pose_robustness._write_csv(str(tmp_path / "cases.csv"), old)
    assert "brain_overlap" not in (tmp_path / "cases.csv").read_text()
    # the settings and machine of the run that made the csv files, not those of the rewriting process
    run = ["Settings: defaults of configs/inference.yaml with skull_strip=bundle.", "Machine: x86_64, 64 cores."]
    (tmp_path / "summary.md").write_text("# old report\n\n" + "\n".join(run) + "\n\nold tables\n")
    assert pose_robustness.main(["--report_only", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert text.splitlines()[2:4] == run and "old tables" not in text
    assert "| 2/3 fail (1 flagged), 25.333 mm |" in _lines(text, "| voxel | same")[0]
    assert _lines(text, "- failures") == ["- failures: unknown (4 cases)"]
    assert _lines(text, "- right registrations") == ["- right registrations: unknown (3 cases)"]


def test_cases_keep_the_status_and_brain_overlap_of_the_runs_summary(tmp_path):
    """score() takes each case's status, seconds and brain_overlap from the inference run's summary.csv (empty for a
    case without a row); a case without a transform file is a failure."""
    (tmp_path / "registered").mkdir()
    with open(tmp_path / "registered" / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "status", "message", "seconds", "brain_overlap"])
        writer.writeheader()
        writer.writerow({"name": "a", "status": "suspect", "message": "", "seconds": "3.5", "brain_overlap": "0.7312"})
        writer.writerow({"name": "b", "status": "error", "message": "bad", "seconds": "0.1", "brain_overlap": ""})
    cases = [
        {"name": name, "condition": "full", "pair": "same", "kind": "voxel", "angle": 0.0, "contrast": "T1"}
        for name in ("a", "b", "c")
    ]
    rows = pose_robustness.score([{**case, "truth": None} for case in cases], str(tmp_path))
    assert [(r["status"], r["seconds"], r["brain_overlap"]) for r in rows] == [
        ("suspect", "3.5", "0.7312"),
        ("error", "0.1", ""),
        ("missing", "", ""),
    ]
    assert all(r["failed"] for r in rows)
    pose_robustness._write_csv(str(tmp_path / "cases.csv"), rows)
    read = pose_robustness._read_csv(str(tmp_path / "cases.csv"))
    assert read[0]["brain_overlap"] == 0.7312 and all(np.isnan(r["brain_overlap"]) for r in read[1:])


def test_cut_top_removes_the_top_20_mm_of_the_brain():
    labels = np.zeros((10, 10, 60), dtype=np.int32)
    labels[2:8, 2:8, 10:50] = 2  # brain from z = 10 to 49 (1 mm voxels)
    cut = pose_robustness.with_condition(labels, "cut_top", 1.0, np.random.RandomState(0))
    assert np.nonzero(cut.any((0, 1)))[0].max() == 49 - 20 - 1


def test_bundle_masks_without_weights_stop_before_the_run(tmp_path, capsys):
    """--mask_methods bundle with no weights: one line and exit code 2 before any case is made or registered (the
    brain-mask table comes after an hour of registrations)."""
    missing = str(tmp_path / "brain_mask.pt")
    arguments = ["--mask_methods", "bundle", "--brain_mask_weights", missing, "--output_dir", str(tmp_path / "out")]
    assert pose_robustness.main([*arguments, "--work_dir", str(tmp_path / "work")]) == 2
    assert capsys.readouterr().err.strip() == f"pose_robustness: error: --mask_methods bundle: no weights at {missing}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()

"""Tests of the method comparison benchmark (benchmarks/compare_methods.py).

* The conversions of ANTs' and elastix's transforms to the bundle's convention (fixed-to-moving, RAS mm): each
  baseline registers a small synthetic brain to a copy of itself moved by a known small affine, and the matrix it
  returns must be that affine (and clearly not its inverse, nor its LPS form). The fixed image is stored LIA and
  lies off the world origin, so orientation and centre-of-rotation slips show too. Skipped where antspyx or
  itk-elastix is not installed (CI installs requirements-dev.txt only; requirements-bench.txt brings them).
* A ``--quick`` run of KeyMorph alone on generated label maps with a random small network: the output files, the
  columns of cases.csv, and that a second run resumes (registers nothing again).
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from synthetic_heads import write_head_label_map, write_label_maps_dir

from scripts.brain_frame import brain_moments
from scripts.image_io import moved_by, resample_world_aligned
from scripts.keypoint_net import KeypointDetector
from scripts.metrics import brain_tre
from scripts.random_motions import misalignment
from scripts.synthesis import load_label_map, synthesize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "compare_methods.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare_methods  # noqa: E402
import method_runners  # noqa: E402
from benchmark_report import OUTPUT_FILES  # noqa: E402
from benchmark_summary import COLUMNS  # noqa: E402


def installed(distribution: str, module: str) -> bool:
    """Whether a distribution is installed, without importing it (importing itk takes many seconds)."""
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec(module) is not None


HAS_ANTS = installed("antspyx", "ants")
HAS_ELASTIX = installed("itk-elastix", "itk")
FLIP = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


@pytest.fixture(scope="module")
def moved_pair(tmp_path_factory) -> dict:
    """A synthetic T1 brain (2 mm, stored LIA, 30 mm off the origin) and a copy moved by a known small affine (a
    7-degree turn about a tilted axis, scales of 0.97..1.04 and a shift of a few mm), resampled onto a
    world-aligned grid; ``truth`` is the fixed-to-moving RAS matrix."""
    folder = tmp_path_factory.mktemp("conventions")
    labels = load_label_map(write_head_label_map(str(folder / "labels.nii.gz"), subject=13))
    labels.affine[:3, 3] += torch.tensor([30.0, -20.0, 15.0], dtype=torch.float64)
    synthetic = synthesize(labels, "T1", seed=3, skull=False, deform_std=0.0, resolution_probability=0.0)
    image, mask = synthetic["image"], synthetic["mask"]
    truth = misalignment(7.0, [0.3, -0.5, 0.8], [1.04, 0.97, 1.02], [4.0, -3.0, 2.5], brain_moments(mask)[0])
    moving = resample_world_aligned(moved_by(image, truth), [2.0, 2.0, 2.0])
    moving_path = str(folder / "moving.nii.gz")
    nib.save(nib.Nifti1Image(moving[0].numpy(), moving.affine.numpy()), moving_path)
    fixed = nib.Nifti1Image(image[0].numpy(), np.asarray(image.affine, dtype=np.float64))
    turn = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LIA"))
    fixed_path = str(folder / "fixed.nii.gz")
    nib.save(fixed.as_reoriented(turn), fixed_path)
    assert nib.aff2axcodes(nib.load(fixed_path).affine) == ("L", "I", "A")
    return {"fixed": fixed_path, "moving": moving_path, "mask": mask, "truth": truth, "folder": folder}


def check_recovered(pair: dict, runner, name: str) -> None:
    output = str(pair["folder"] / name)
    os.makedirs(output, exist_ok=True)
    result = runner.run(pair["fixed"], pair["moving"], output)
    matrix = torch.as_tensor(np.asarray(result["matrix"]), dtype=torch.float64)

    def error(candidate: torch.Tensor) -> float:
        return float(brain_tre(candidate[None], pair["truth"][None], [pair["mask"]])[0])

    assert os.path.getsize(os.path.join(output, "registered.nii.gz")) > 0
    assert result["seconds_end_to_end"] >= result["seconds_compute"] > 0
    # the start is 6 mm off; a convention slip lands 10+ mm off, the right reading within a voxel's half
    assert error(torch.eye(4, dtype=torch.float64)) > 5.0
    assert error(matrix) < 1.0, f"{name}: {error(matrix):.2f} mm from the truth\n{matrix}\n{pair['truth']}"
    assert error(torch.linalg.inv(matrix)) > 5.0 and error(FLIP @ matrix @ FLIP) > 5.0


@pytest.mark.skipif(not HAS_ANTS, reason="antspyx is not installed (pip install -r requirements-bench.txt)")
def test_ants_transform_is_read_as_fixed_to_moving_ras(moved_pair):
    check_recovered(moved_pair, method_runners.AntsRunner(), "ants")


@pytest.mark.filterwarnings("ignore:builtin type")  # itk's SWIG wrappers
@pytest.mark.skipif(not HAS_ELASTIX, reason="itk-elastix is not installed (pip install -r requirements-bench.txt)")
def test_elastix_transform_is_read_as_fixed_to_moving_ras(moved_pair):
    check_recovered(moved_pair, method_runners.ElastixRunner(), "elastix")


def test_elastix_parameters_fold_in_the_centre():
    """``A (p - c) + c + t`` in LPS, flipped to RAS: checked on a point without elastix."""
    matrix = np.array([[1.1, 0.1, 0.0], [-0.05, 0.9, 0.2], [0.0, 0.1, 1.0]])
    center, shift = np.array([10.0, -20.0, 30.0]), np.array([1.0, 2.0, -3.0])
    parameters = {
        "Transform": ("AffineTransform",),
        "TransformParameters": tuple(str(v) for v in [*matrix.ravel(), *shift]),
        "CenterOfRotationPoint": tuple(str(v) for v in center),
    }
    ras = method_runners.ras_from_elastix(parameters)
    point_ras = np.array([5.0, 7.0, -9.0])
    point_lps = point_ras * [-1, -1, 1]
    expected_lps = matrix @ (point_lps - center) + center + shift
    assert np.allclose(ras[:3, :3] @ point_ras + ras[:3, 3], expected_lps * [-1, -1, 1])
    with pytest.raises(ValueError):
        method_runners.ras_from_elastix({**parameters, "Transform": ("BSplineTransform",)})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("benchmark")
    label_maps = write_label_maps_dir(str(folder / "label_maps"), subjects=(13, 14))
    torch.manual_seed(0)
    ckpt = str(folder / "model.pt")
    torch.save(KeypointDetector(1, 16, (8, 8, 16, 16)).state_dict(), ckpt)
    command = [
        sys.executable,
        SCRIPT,
        "--label_maps_dir",
        label_maps,
        "--subjects",
        "training_seg_13",
        "--output_dir",
        str(folder / "out"),
        "--work_dir",
        str(folder / "work"),
        "--methods",
        "keymorph",
        "--quick",
        "--ckpt_path",
        ckpt,
        "--num_keypoints",
        "16",
        "--network_channels",
        "8",
        "8",
        "16",
        "16",
        "--spatial_size",
        "32",
    ]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    return {"folder": folder, "command": command, "output_dir": str(folder / "out"), "stderr": first.stderr}


def read_cases(output_dir: str) -> tuple[list[str], list[dict]]:
    with open(os.path.join(output_dir, "cases.csv"), newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_quick_run_writes_tables_and_plots(quick_run):
    output_dir = quick_run["output_dir"]
    for name in OUTPUT_FILES:
        assert os.path.getsize(os.path.join(output_dir, name)) > 0, name
    for name in ("dice_vs_rotation.png", "tre_vs_rotation.png", "seconds_per_pair.png"):
        with open(os.path.join(output_dir, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    columns, rows = read_cases(output_dir)
    assert columns == COLUMNS
    assert [(r["method"], r["modality_pair"], float(r["rotation_deg"])) for r in rows] == [
        ("keymorph", "T1-T2", 0.0),
        ("keymorph", "T1-T2", 90.0),
    ]
    for row in rows:
        assert row["status"] == "ok" and row["dataset"] == "label_maps" and row["same_subject"] == "True"
        assert row["fixed_subject"] == row["moving_subject"] == "training_seg_13"
        assert 0.0 <= float(row["dice"]) <= 1.0 and float(row["tre_mm"]) >= 0.0
        assert float(row["seconds_end_to_end"]) > float(row["seconds_compute"]) > 0.0
        assert float(row["peak_rss_mb"]) > 50.0
        assert float(row["qc_residual_mm"]) >= 0.0 and -0.01 <= float(row["qc_similarity"]) <= 1.0
    with open(os.path.join(output_dir, "summary.json")) as handle:
        summary = json.load(handle)
    overall = summary["results"]["methods"]["keymorph"]["overall"]
    assert overall["n"] == 2 and overall["n_failed"] == 0
    assert set(summary["results"]["methods"]["keymorph"]["tre_by_rotation"]) == {"0", "90"}
    assert summary["settings"]["cases"]["spacing"] == 2.0 and summary["machine"]["threads per method"] == 2
    markdown = open(os.path.join(output_dir, "summary.md")).read()
    assert "## Machine" in markdown and "| keymorph |" in markdown and "--quick" in markdown
    # the case images are removed once registered (no --keep_cases); the warm-up pair stays for the next run
    assert not os.listdir(quick_run["folder"] / "work" / "cases")


def test_quick_run_resumes(quick_run, caplog):
    """A second run (here in-process) finds every case in cases.csv: it registers nothing and keeps the rows."""
    _, before = read_cases(quick_run["output_dir"])
    with caplog.at_level(logging.INFO, logger="compare_methods"):
        assert compare_methods.main(quick_run["command"][2:]) == 0
    assert "0 registrations to run (2 done earlier)" in caplog.text
    _, after = read_cases(quick_run["output_dir"])
    assert after == before


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--subjects", "nobody"], "nobody"),
        (["--rotations", "0", "270"], "--rotations"),
        (["--modality_pairs", "T1-CT"], "T1-CT"),
        (["--methods", "keymorph", "--ckpt_path", "missing.pt"], "missing.pt"),
    ],
)
def test_settings_errors_are_one_line(tmp_path, capsys, arguments, expected):
    label_maps = write_label_maps_dir(str(tmp_path / "label_maps"), subjects=(13, 14))
    common = ["--label_maps_dir", label_maps, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        compare_methods.main([*common, "--subjects", "training_seg_13", "training_seg_14", *arguments])
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("keymorph: error:") and expected in message and len(message.splitlines()) == 1

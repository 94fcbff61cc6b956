"""Folder inference through the bundle runner (``python -m monai.bundle run inference``) on small synthetic brains.

A small random keypoint network (``--num_keypoints 16 --network_channels "[8,8,16,16]" --spatial_size 32``) makes
the run fast; its registrations are arbitrary, so the tests check what must hold for ANY fitted transform: every
output file, the fixed header on ``registered.nii.gz``, SimpleITK reproducing it from ``transform.tfm``,
``affine_ras.txt`` being the inverse, keypoints consistent with the transform, label maps kept as labels, summary
rows, pairs mode, reruns and ``--overwrite``. The helpers here (the phantom, the writers, the runner) are shared with
``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from scripts.errors import KeyMorphWorkflowError
from scripts.keypoint_net import KeypointDetector
from scripts.provenance import read_provenance
from scripts.transform_io import read_itk_transform, read_keypoints_csv, read_ras_matrix

ROOT = Path(__file__).resolve().parents[1]
NUM_KEYPOINTS = 16
SMALL_NETWORK = ["--num_keypoints", str(NUM_KEYPOINTS), "--network_channels", "[8,8,16,16]", "--spatial_size", "32"]
OUTPUT_FILES = (
    "registered.nii.gz",
    "transform.tfm",
    "transform_inverse.tfm",
    "affine_ras.txt",
    "transform_flirt.mat",
    "transform.lta",
    "moving_mask.nii.gz",
    "keypoints_moving.csv",
    "keypoints_fixed.csv",
    "qc.png",
    "qc_keypoints.png",
    "provenance.json",
)


# --- synthetic brains -------------------------------------------------------------------------------------------


def phantom_at(points: np.ndarray) -> np.ndarray:
    """Intensity of a small synthetic brain at world points ``(..., 3)`` (mm, brain centred near the origin).

    An egg-shaped "brain" (semi-axes 15 mm left-right, 23/31 mm back/front, 16/23 mm down/up, so its principal axes
    and their directions are well defined) whose front and back ends droop below its centre as a brain's do (the
    cue :func:`scripts.brain_frame.principal_axes` reads "up" from), with a brighter rim, smooth texture and two dark
    "ventricles"; 0 outside.
    """
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    z = z + 0.012 * y**2  # the ends lie lower: 8 mm at the back, 11 mm at the front
    radius_y = np.where(y > 0, 31.0, 23.0)
    radius_z = np.where(z > 0, 23.0, 16.0)
    r = np.sqrt((x / 15.0) ** 2 + (y / radius_y) ** 2 + (z / radius_z) ** 2)
    value = 0.55 + 0.25 * (r > 0.75) + 0.15 * np.cos(y / 6.0) * np.cos(x / 5.0) + 0.1 * np.sin(z / 4.0)
    ventricles = ((np.abs(x) - 5.0) / 3.0) ** 2 + ((y + 2.0) / 10.0) ** 2 + ((z - 3.0) / 4.0) ** 2 < 1.0
    value = np.where(ventricles, 0.15, value)
    return np.where(r < 1.0, value, 0.0).astype(np.float32)


def grid_affine(spacing=(2.0, 2.0, 2.0), shape=(40, 40, 40), rotation=None, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel-to-RAS matrix of a grid of ``shape`` voxels of ``spacing`` mm (signed: negative flips an axis), turned
    by ``rotation`` (3x3), whose field of view is centred on ``center`` (mm)."""
    linear = (np.eye(3) if rotation is None else np.asarray(rotation)) @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(center, dtype=np.float64) - linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def voxel_world(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates ``(*shape, 3)`` of a grid's voxel centres."""
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def phantom_volume(affine: np.ndarray, shape, fixed_to_moving: np.ndarray | None = None) -> np.ndarray:
    """The phantom sampled on a grid; with ``fixed_to_moving`` T, the phantom moved by T (what a moving image shows
    at ``p`` is what the fixed one shows at ``T^-1 p``)."""
    points = voxel_world(affine, shape)
    if fixed_to_moving is not None:
        inverse = np.linalg.inv(fixed_to_moving)
        points = points @ inverse[:3, :3].T + inverse[:3, 3]
    return phantom_at(points)


def rotation(axis, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = math.radians(degrees)
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * skew + (1 - math.cos(angle)) * skew @ skew


def rigid(axis, degrees: float, shift) -> np.ndarray:
    """4x4 rotation about the origin then translation (mm)."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(axis, degrees)
    matrix[:3, 3] = shift
    return matrix


def write_nifti(path, data: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1, units="mm"):
    """Write a NIfTI-1 file with these codes and spatial units; returns the path as a string."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, qform_code)
    image.set_sform(affine, sform_code)
    image.header.set_xyzt_units(units)
    nib.save(image, str(path))
    return str(path)


FIXED_AFFINE = grid_affine((2.0, 2.0, 2.2), (42, 40, 36), rotation([1, 0, 0], 8.0), (1.0, 2.0, -1.0))
FIXED_SHAPE = (42, 40, 36)


def write_fixed(path) -> str:
    """The fixed image: the phantom on an oblique 2 x 2 x 2.2 mm grid, qform code 1 (scanner), sform code 4 (MNI)."""
    return write_nifti(path, phantom_volume(FIXED_AFFINE, FIXED_SHAPE), FIXED_AFFINE, qform_code=1, sform_code=4)


def write_moving(path, fixed_to_moving: np.ndarray, spacing=(1.8, -2.2, 2.5), shape=(44, 40, 36), dtype=np.float32):
    """A moving image: the phantom moved by ``fixed_to_moving`` on a grid of its own (x flipped, anisotropic)."""
    affine = grid_affine(spacing, shape, rotation([0, 0, 1], -12.0), fixed_to_moving[:3, 3])
    data = phantom_volume(affine, shape, fixed_to_moving)
    if np.issubdtype(dtype, np.integer):
        data = np.round(data * 1000)
    return write_nifti(path, data.astype(dtype), affine)


def write_checkpoint(path, seed: int = 0) -> str:
    """State dict of a small random :class:`KeypointDetector` (the ``SMALL_NETWORK`` settings)."""
    torch.manual_seed(seed)
    network = KeypointDetector(1, NUM_KEYPOINTS, (8, 8, 16, 16))
    torch.save(network.state_dict(), str(path))
    return str(path)


# --- the runner -------------------------------------------------------------------------------------------------


def run_bundle(
    *arguments: str,
    cwd: Path = ROOT,
    python_path=(),
    env=None,
    config_file: str = "configs/inference.yaml",
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run inference --config_file configs/inference.yaml ARGUMENTS`` in the bundle root
    (or ``cwd``); ``python_path`` folders go before the bundle root on PYTHONPATH, ``env`` adds environment
    variables; ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", config_file]
    path = os.pathsep.join([*map(str, python_path), str(ROOT)])
    env = {**os.environ, **(env or {}), "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [*command, *arguments], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def inference_arguments(dataset_dir, output_dir, fixed_image, ckpt_path, *extra: str) -> list[str]:
    return [
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
        "--fixed_image",
        str(fixed_image),
        "--skull_strip",
        "none",
        "--ckpt_path",
        str(ckpt_path),
        *SMALL_NETWORK,
        *extra,
    ]


def read_summary(output_dir) -> dict[str, dict]:
    with open(os.path.join(output_dir, "summary.csv"), newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def has_traceback(process: subprocess.CompletedProcess) -> bool:
    return "Traceback" in process.stderr or "Traceback" in process.stdout


# --- one folder run, checked from every side ------------------------------------------------------------------------

TRUTH = {
    "moving_a": rigid([0.2, 0.3, 1.0], 25.0, [4.0, -6.0, 3.0]),
    "moving_b": rigid([1.0, 0.0, 0.2], -40.0, [0, 5, 0]),
}


def label_map(image: nib.Nifti1Image) -> np.ndarray:
    """Integer labels of a phantom image: 0 outside, 1 brain, 2 bright rim, 3 dark ventricles."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    labels = np.where(data > 0, 1, 0) + (data > 0.75) + 2 * ((data > 0) & (data < 0.2))
    return labels.astype(np.int16)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Register two moving images (float32, and int16 data) to an oblique fixed image, with a label map applied."""
    root = tmp_path_factory.mktemp("inference")
    (root / "in" / "labels").mkdir(parents=True)
    moving_a = write_moving(root / "in" / "moving_a.nii.gz", TRUTH["moving_a"])
    write_moving(root / "in" / "moving_b.nii.gz", TRUTH["moving_b"], spacing=(2.4, 2.0, -2.0), dtype=np.int16)
    image = nib.load(moving_a)
    write_nifti(root / "in" / "labels" / "moving_a_seg.nii.gz", label_map(image), image.affine)
    fixed = write_fixed(root / "fixed.nii.gz")
    ckpt = write_checkpoint(root / "model.pt")
    output = root / "out"
    arguments = inference_arguments(root / "in", output, fixed, ckpt, "--apply_to", "labels/{name}_seg.nii.gz")
    process = run_bundle(*arguments)
    return {"process": process, "root": root, "output": output, "fixed": fixed, "ckpt": ckpt, "arguments": arguments}


def interior_of_moving(name: str, root: Path, fixed_to_moving: np.ndarray, margin: float = 1.5) -> np.ndarray:
    """Fixed voxels whose transformed position lies at least ``margin`` voxels inside the moving grid."""
    moving = nib.load(str(root / "in" / f"{name}.nii.gz"))
    points = voxel_world(FIXED_AFFINE, FIXED_SHAPE)
    points = points @ fixed_to_moving[:3, :3].T + fixed_to_moving[:3, 3]
    inverse = np.linalg.inv(moving.affine)
    index = points @ inverse[:3, :3].T + inverse[:3, 3]
    return np.all((index >= margin) & (index <= np.array(moving.shape) - 1 - margin), axis=-1)


def sitk_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK's (z, y, x) array in nibabel's (i, j, k) order."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def test_the_run_succeeds_and_writes_every_file(folder_run):
    process, output = folder_run["process"], folder_run["output"]
    assert process.returncode == 0, process.stderr[-3000:]
    for name in TRUTH:
        assert sorted(os.listdir(output / name)) == sorted(
            [*OUTPUT_FILES, *(["registered_moving_a_seg.nii.gz"] if name == "moving_a" else [])]
        )
    assert sorted(os.listdir(output)) == ["index.html", "moving_a", "moving_b", "summary.csv"]  # no staging leftovers


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_registered_image_has_the_fixed_header(folder_run, name):
    fixed = nib.load(folder_run["fixed"])
    registered = nib.load(str(folder_run["output"] / name / "registered.nii.gz"))
    assert registered.shape == fixed.shape
    np.testing.assert_array_equal(registered.affine, fixed.affine)
    for code in ("qform_code", "sform_code"):
        assert int(registered.header[code]) == int(fixed.header[code])
    np.testing.assert_allclose(registered.get_qform(), fixed.get_qform(), atol=1e-6)
    np.testing.assert_array_equal(registered.get_sform(), fixed.get_sform())
    assert registered.header.get_xyzt_units() == fixed.header.get_xyzt_units()
    assert registered.get_data_dtype() == np.float32


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_simpleitk_resample_with_the_tfm_reproduces_the_registered_image(folder_run, name):
    root, output = folder_run["root"], folder_run["output"]
    moving = sitk.ReadImage(str(root / "in" / f"{name}.nii.gz"), sitk.sitkFloat32)
    fixed = sitk.ReadImage(folder_run["fixed"], sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(output / name / "transform.tfm"))
    expected = sitk_array(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    registered = np.asarray(nib.load(str(output / name / "registered.nii.gz")).dataobj)
    inside = interior_of_moving(name, root, read_itk_transform(str(output / name / "transform.tfm")))
    assert inside.sum() > 2000 and np.abs(registered[inside]).max() > 0.1  # not a vacuous comparison
    np.testing.assert_allclose(registered[inside], expected[inside], atol=2e-3 * np.abs(expected).max())


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_affine_ras_is_the_inverse_of_the_tfm(folder_run, name):
    folder = folder_run["output"] / name
    fixed_to_moving = read_itk_transform(str(folder / "transform.tfm"))
    moving_to_fixed = read_ras_matrix(str(folder / "affine_ras.txt"))
    np.testing.assert_allclose(moving_to_fixed @ fixed_to_moving, np.eye(4), atol=1e-6)


@pytest.mark.parametrize("name", sorted(TRUTH))
def test_keypoints_are_ras_mm_and_consistent_with_the_transform(folder_run, name):
    folder = folder_run["output"] / name
    fixed_points, fixed_weights = read_keypoints_csv(str(folder / "keypoints_fixed.csv"))
    moving_points, _ = read_keypoints_csv(str(folder / "keypoints_moving.csv"))
    assert fixed_points.shape == moving_points.shape == (NUM_KEYPOINTS, 3)
    assert np.all(fixed_weights == 1)
    # world millimetres: near the brain (centred on the origin in the fixed world, on T(0) in the moving world),
    # within the 32-voxel, 2 mm network grid around it
    assert np.linalg.norm(fixed_points, axis=1).max() < 60
    assert np.linalg.norm(moving_points - TRUTH[name][:3, 3], axis=1).max() < 60
    # the residual is the keypoint fit's own: the least-squares affine of the written keypoints leaves it
    homogeneous = np.hstack([fixed_points, np.ones((len(fixed_points), 1))])
    least_squares = np.linalg.lstsq(homogeneous, moving_points, rcond=None)[0]
    rms = np.sqrt(((homogeneous @ least_squares - moving_points) ** 2).sum(1).mean())
    residual = float(read_summary(folder_run["output"])[name]["keypoint_residual_mm"])
    assert rms == pytest.approx(residual, abs=0.02)
    # the written transform is that fit refined by a few millimetres at most (refinement is on by default)
    matrix = read_itk_transform(str(folder / "transform.tfm"))
    mapped = fixed_points @ matrix[:3, :3].T + matrix[:3, 3]
    assert np.linalg.norm(mapped - homogeneous @ least_squares, axis=1).mean() < 5.0


def test_summary_rows_and_columns(folder_run):
    from scripts.case_outputs import SUMMARY_COLUMNS

    with open(folder_run["output"] / "summary.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == SUMMARY_COLUMNS
    assert sorted(row["name"] for row in rows) == sorted(TRUTH)
    for row in rows:
        assert row["status"] in ("ok", "suspect"), row
        for column in ("seconds", "keypoint_residual_mm", "similarity", "brain_fill", "smoothness", "brain_overlap"):
            assert math.isfinite(float(row[column])), row
        assert 0 < float(row["brain_fill"]) < 0.5 and float(row["smoothness"]) > 0.5  # a "brain", not noise
        assert 0.0 <= float(row["brain_overlap"]) <= 1.0, row  # a Dice (the random network need not register)
    log = folder_run["process"].stdout + folder_run["process"].stderr
    assert "2 input(s): " in log


def test_label_map_is_resampled_by_nearest_neighbour_and_keeps_its_type(folder_run):
    root, output = folder_run["root"], folder_run["output"]
    source = nib.load(str(root / "in" / "labels" / "moving_a_seg.nii.gz"))
    warped = nib.load(str(output / "moving_a" / "registered_moving_a_seg.nii.gz"))
    fixed = nib.load(folder_run["fixed"])
    assert warped.get_data_dtype() == np.int16 and warped.shape == fixed.shape
    np.testing.assert_array_equal(warped.affine, fixed.affine)
    values = np.asarray(warped.dataobj)
    assert set(np.unique(values)) <= set(np.unique(np.asarray(source.dataobj)))
    transform = sitk.ReadTransform(str(output / "moving_a" / "transform.tfm"))
    moving = sitk.ReadImage(str(root / "in" / "labels" / "moving_a_seg.nii.gz"))
    expected = sitk_array(
        sitk.Resample(moving, sitk.ReadImage(folder_run["fixed"]), transform, sitk.sitkNearestNeighbor)
    )
    inside = interior_of_moving("moving_a", root, read_itk_transform(str(output / "moving_a" / "transform.tfm")))
    assert (values[inside] == expected[inside]).mean() > 0.99  # ties between two voxels may go either way


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_rerun_skips_finished_cases_and_overwrite_redoes_them(folder_run, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(folder_run["output"], output)
    arguments = [*folder_run["arguments"]]
    arguments[arguments.index("--output_dir") + 1] = str(output)
    before = _snapshot(output)
    rows = read_summary(output)
    process = run_bundle(*arguments)
    assert process.returncode == 0, process.stderr[-3000:]
    after = _snapshot(output)
    folder_files = ("summary.csv", "index.html")  # rewritten on every run, with the same rows
    assert {k: v for k, v in after.items() if k not in folder_files} == {
        k: v for k, v in before.items() if k not in folder_files
    }
    assert read_summary(output) == rows  # the skipped cases keep their rows
    assert "2 input(s): 2 skipped" in process.stdout + process.stderr

    process = run_bundle(*arguments, "--overwrite", "true")
    assert process.returncode == 0, process.stderr[-3000:]
    redone = _snapshot(output)
    assert set(redone) == set(before)
    assert all(redone[key][0] != before[key][0] for key in before if key not in folder_files)  # all replaced
    assert sorted(p for p in os.listdir(output) if p.startswith(".")) == []


def test_pairs_csv_mode(tmp_path):
    (tmp_path / "images").mkdir()
    write_moving(tmp_path / "images" / "m.nii.gz", TRUTH["moving_a"])
    write_fixed(tmp_path / "images" / "f1.nii.gz")
    other = grid_affine((2.5, 2.5, 2.5), (32, 32, 32))
    write_nifti(tmp_path / "images" / "f2.nii", phantom_volume(other, (32, 32, 32)), other)
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        handle.write("moving,fixed,name\nimages/m.nii.gz,images/f1.nii.gz,m_to_f1\nimages/m.nii.gz,images/f2.nii,\n")
        handle.write("images/m.nii.gz,images/no_fixed.nii.gz,to_nowhere\n")  # a bad fixed image fails its row only
    ckpt = write_checkpoint(tmp_path / "model.pt")
    output = tmp_path / "out"
    arguments = inference_arguments(tmp_path / "unused", output, tmp_path / "unused.nii.gz", ckpt)
    process = run_bundle(*arguments, "--pairs_csv", str(tmp_path / "pairs.csv"))
    assert process.returncode == 1 and not has_traceback(process), process.stderr[-3000:]
    assert process.stderr.strip().splitlines()[-1].startswith("keymorph: error: 1 of 3 input(s) failed")
    rows = read_summary(output)
    assert sorted(rows) == ["m", "m_to_f1", "to_nowhere"]
    message = rows["to_nowhere"]["message"]
    assert (
        rows["to_nowhere"]["status"] == "error"
        and "m.nii.gz" in message
        and "no_fixed.nii.gz: file not found" in message
    )
    for name, fixed in (("m_to_f1", "f1.nii.gz"), ("m", "f2.nii")):
        assert rows[name]["status"] in ("ok", "suspect")
        registered = nib.load(str(output / name / "registered.nii.gz"))
        reference = nib.load(str(tmp_path / "images" / fixed))
        assert registered.shape == reference.shape
        np.testing.assert_array_equal(registered.affine, reference.affine)


# --- settings checked before any work -------------------------------------------------------------------------------

CONFIG = ROOT / "configs" / "inference.yaml"


def runner_argv(*arguments: str) -> list[str]:
    """``sys.argv`` of ``python -m monai.bundle run inference --config_file configs/inference.yaml ARGUMENTS``."""
    import monai

    main = os.path.join(os.path.dirname(monai.__file__), "bundle", "__main__.py")
    return [main, "run", "inference", "--config_file", str(CONFIG), *arguments]


@pytest.fixture
def settings(tmp_path):
    """Valid arguments of :func:`scripts.settings_checks.check_inference_settings` on small files."""
    (tmp_path / "in").mkdir()
    write_moving(tmp_path / "in" / "a.nii.gz", TRUTH["moving_a"])
    return {
        "dataset_dir": str(tmp_path / "in"),
        "output_dir": str(tmp_path / "out"),
        "fixed_image": write_fixed(tmp_path / "fixed.nii.gz"),
        "skull_strip": "none",
        "ckpt_path": write_checkpoint(tmp_path / "model.pt"),
        "network": KeypointDetector(1, NUM_KEYPOINTS, (8, 8, 16, 16)),
        "spatial_size": 32,
        "num_keypoints": NUM_KEYPOINTS,
        "network_channels": [8, 8, 16, 16],
        "argv": [],
    }


def check_fails(capsys, **kwargs) -> str:
    """Run the check as a workflow created from Python does (pytest is not the bundle runner): expect a
    KeyMorphWorkflowError with exit code 2 and a one-line message, nothing printed; returns the line the command
    line prints (``keymorph: error: ...``; ``test_a_config_error_through_the_runner_is_one_line_without_traceback``
    runs the runner itself)."""
    from scripts.settings_checks import check_inference_settings

    with pytest.raises(KeyMorphWorkflowError) as error:
        check_inference_settings(**kwargs)
    assert error.value.exit_code == 2
    assert "\n" not in str(error.value) and not capsys.readouterr().err
    return f"keymorph: error: {error.value}"


def test_valid_settings_pass_and_create_the_output_folder(settings):
    from scripts.settings_checks import check_inference_settings

    check_inference_settings(**settings)
    assert os.path.isdir(settings["output_dir"])
    assert not os.listdir(settings["output_dir"])  # the write probe is gone


@pytest.mark.parametrize(
    "change, words",
    [
        ({"skull_strip": "foo"}, ["--skull_strip 'foo'", "deepbet, mask, none"]),
        ({"fixed_skull_strip": "bet"}, ["--fixed_skull_strip 'bet'"]),
        ({"aligner": "tps"}, ["--aligner 'tps'", "affine, rigid, similarity"]),
        ({"overwrite": "maybe"}, ["--overwrite 'maybe'"]),
        ({"spatial_size": 40}, ["--spatial_size 40", "multiple of 16"]),
        ({"spacing": -1.0}, ["--spacing"]),
        ({"num_keypoints": 0}, ["--num_keypoints 0"]),
        ({"num_workers": -1}, ["--num_workers -1", "at least 0"]),
        ({"refine_options": {"margin_mm": "wide"}}, ["--refine_margin_mm 'wide'", "not a number"]),
        ({"refine_options": {"check_samples": -5}}, ["--refine_check_samples -5", "at least 0"]),
        ({"num_threads": "many"}, ["--num_threads 'many'", "not an integer"]),
        ({"network_channels": [8, 8]}, ["--network_channels [8, 8]", "four positive integers"]),
        ({"device": "gpu"}, ["--device 'gpu'"]),
        ({"qc_thresholds": {"qc_max_brain_fill": "high"}}, ["--qc_max_brain_fill"]),
        ({"skull_strip": "mask"}, ["--mask_dir"]),
        ({"dataset_dir": "/no/such/folder"}, ["/no/such/folder", "not found"]),
        ({"fixed_image": "/no/such/fixed.nii.gz"}, ["/no/such/fixed.nii.gz", "not found"]),
        ({"pairs_csv": "/no/such/pairs.csv"}, ["/no/such/pairs.csv"]),
        ({"ckpt_path": "/no/such/model.pt"}, ["/no/such/model.pt: model weights not found", "the model zoo"]),
        (
            {"skull_strip": "bundle", "brain_mask_weights": "/no/such/brain_mask.pt"},
            [
                "/no/such/brain_mask.pt: model weights not found",
                "configs/train_brain_mask.yaml",
                "--skull_strip deepbet",
            ],
        ),
        (
            {"fixed_skull_strip": "bundle", "brain_mask_weights": "/no/such/brain_mask.pt"},
            [
                "/no/such/brain_mask.pt: model weights not found",
                "configs/train_brain_mask.yaml",
                "--fixed_skull_strip deepbet",
            ],
        ),
    ],
)
def test_bad_setting_is_one_line(settings, capsys, change, words):
    line = check_fails(capsys, **{**settings, **change})
    for word in words:
        assert word in line, line


def test_unreadable_fixed_image_names_it(settings, capsys, tmp_path):
    fixed = tmp_path / "fixed image.nii.gz"
    fixed.write_text("not an image")
    line = check_fails(capsys, **{**settings, "fixed_image": str(fixed)})
    assert str(fixed) in line and "fixed image" in line


def test_output_folder_that_cannot_be_created(settings, capsys, tmp_path):
    (tmp_path / "a_file").write_text("")
    line = check_fails(capsys, **{**settings, "output_dir": str(tmp_path / "a_file" / "out")})
    assert str(tmp_path / "a_file" / "out") in line and "cannot create" in line


def test_output_folder_that_is_not_writable(settings, capsys, tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)  # root may write anywhere: simulate a read-only disk
    line = check_fails(capsys, **settings)
    assert settings["output_dir"] in line and "not writable" in line


def test_weights_that_do_not_fit_the_network(settings, capsys):
    from scripts.settings_checks import check_network_weights

    line = check_fails(capsys, **{**settings, "network": KeypointDetector(1, 8, (8, 8, 16, 16))})
    assert settings["ckpt_path"] in line and "do not fit" in line and "size mismatch" in line
    with pytest.raises(KeyMorphWorkflowError, match="do not fit"):
        check_network_weights(settings["ckpt_path"], KeypointDetector(1, 8, (8, 8, 16, 16)))
    check_network_weights(settings["ckpt_path"], KeypointDetector(1, NUM_KEYPOINTS, (8, 8, 16, 16)))


def test_weights_that_are_not_a_checkpoint(settings, capsys, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x00" * 100)
    line = check_fails(capsys, **{**settings, "ckpt_path": str(tmp_path / "broken.pt")})
    assert str(tmp_path / "broken.pt") in line and "checkpoint" in line


@pytest.mark.parametrize("recorded", ["matching", "other", "unset"])
def test_weights_hash_from_large_files_yml(settings, capsys, tmp_path, recorded):
    from scripts.hashes import file_hash
    from scripts.settings_checks import check_inference_settings

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    weights = shutil.copy(settings["ckpt_path"], bundle / "models" / "model.pt")
    hash_val = {"matching": file_hash(str(weights)), "other": "0" * 64, "unset": ""}[recorded]
    (bundle / "large_files.yml").write_text(
        f'large_files:\n  - path: "models/model.pt"\n    url: ""\n    hash_val: "{hash_val}"\n    hash_type: "sha256"\n'
    )
    arguments = {**settings, "ckpt_path": str(weights), "bundle_root": str(bundle)}
    if recorded == "other":
        line = check_fails(capsys, **arguments)
        assert str(weights) in line and "does not match large_files.yml" in line
    else:
        check_inference_settings(**arguments)
    # other weights than the bundle's own file are never compared with the bundle's hash
    check_inference_settings(**{**arguments, "ckpt_path": settings["ckpt_path"]})


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["--skul_strip", "none"], ["unknown setting --skul_strip", "did you mean --skull_strip?"]),
        (["--outptu_dir=x"], ["unknown setting --outptu_dir", "--output_dir"]),
        (["--network_def#chanels", "[8,8,16,16]"], ["--network_def#chanels", "did you mean --network_def#channels?"]),
        (["--qqq", "1"], ["unknown setting --qqq; the settings are: ", "skull_strip"]),
        (["--help"], ["the settings are commented at the top of the config", "python -m scripts.register --help"]),
    ],
)
def test_unknown_command_line_key_is_one_line(settings, capsys, arguments, words):
    line = check_fails(capsys, **{**settings, "argv": runner_argv(*arguments)})
    assert str(CONFIG) in line
    for word in words:
        assert word in line, line


def test_known_command_line_keys_pass(settings):
    from scripts.settings_checks import check_inference_settings

    argv = runner_argv("--skull_strip", "none", "--network_def#channels", "[8,8,16,16]", "--meta_file", "x.json")
    check_inference_settings(**{**settings, "argv": argv})
    # outside the bundle runner (a test, a notebook) sys.argv is not inspected
    check_inference_settings(**{**settings, "argv": ["pytest", "--skul_strip", "none"]})


def test_command_line_settings_read_like_python_fire():
    from scripts.cli import command_line_settings

    settings = command_line_settings(["inference", "--a", "1", "--b=2", "--flag", "--c-d", "x", "--e", "-3"])
    assert settings == {"a": "1", "b": "2", "flag": True, "c_d": "x", "e": "-3"}


def test_a_config_error_through_the_runner_is_one_line_without_traceback(tmp_path):
    process = run_bundle("--dataset_dir", str(tmp_path), "--skul_strip", "none", "--output_dir", str(tmp_path / "o"))
    assert process.returncode == 2
    assert not has_traceback(process), process.stderr[-3000:]
    assert process.stderr.strip().splitlines()[-1] == (
        "keymorph: error: configs/inference.yaml: unknown setting --skul_strip; did you mean --skull_strip?"
    )
    assert not (tmp_path / "o").exists()  # nothing was done


@pytest.mark.parametrize(
    "output_dir, words",
    [
        ("['out']", ["--output_dir ['out']: not a path but a list"]),
        ("123", ["--output_dir 123: read as a number, not a path", "write it as ./123"]),
    ],
)
def test_a_setting_of_the_wrong_type_is_one_line_through_the_runner(tmp_path, output_dir, words):
    process = run_bundle(
        *inference_arguments(tmp_path / "in", output_dir, tmp_path / "fixed.nii.gz", tmp_path / "model.pt"),
        cwd=tmp_path,  # where a wrong folder would be made
        config_file=str(CONFIG),
    )
    assert process.returncode == 2 and not has_traceback(process), process.stderr[-3000:]
    line = process.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in line, line
    assert os.listdir(tmp_path) == []  # nothing was made


def test_bundle_properties(settings):
    from monai.bundle import ConfigWorkflow

    overrides = {k: v for k, v in settings.items() if k not in ("network", "argv")}
    workflow = ConfigWorkflow(config_file=str(CONFIG), workflow_type="infer", logging_file=False, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []


# --- the writer, the dataset and the exit code, in process -----------------------------------------------------------


@pytest.fixture
def writer_output(tmp_path):
    """What the evaluator hands the writer for one case (the true registration, from keypoints moved by it: QC
    passes), built with the config's own preprocessing."""
    from monai.bundle import ConfigParser

    from scripts.registration import fit

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update({"skull_strip": "none", "spatial_size": 32})
    moving = write_moving(tmp_path / "case.nii.gz", TRUTH["moving_a"])
    fixed = write_fixed(tmp_path / "fixed.nii.gz")
    points = torch.rand(1, NUM_KEYPOINTS, 3, dtype=torch.float64) * 40
    truth = torch.from_numpy(TRUTH["moving_a"])
    return {
        "name": "case",
        "status": "ok",
        "message": "",
        "seconds": 0.0,
        "start": 0.0,
        "registration": fit(points, points @ truth[:3, :3].T + truth[:3, 3]),
        "fixed": parser.get_parsed_content("fixed_preprocessing")({"image": fixed}),
        "moving": {**parser.get_parsed_content("preprocessing")({"image": moving}), "extra": []},
    }


def test_writer_replaces_a_case_folder_as_a_whole(writer_output, tmp_path, monkeypatch):
    import scripts.case_outputs as case_outputs

    output = tmp_path / "out"
    writer = case_outputs.RegistrationWriter(str(output))
    output.mkdir()
    row = writer._write_case(writer_output)
    assert row["status"] == "ok" and sorted(os.listdir(output / "case")) == sorted(OUTPUT_FILES)
    (output / "case" / "stale.txt").write_text("from an older run")
    writer._write_case(writer_output)
    assert sorted(os.listdir(output / "case")) == sorted(OUTPUT_FILES)  # no stale file survives an overwrite

    before = _snapshot(output / "case")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(case_outputs, "qc_figure", crash)  # fails after registered.nii.gz etc. were written
    with pytest.raises(OSError):
        writer._write_case(writer_output)
    assert _snapshot(output / "case") == before  # the complete earlier result, untouched
    assert sorted(os.listdir(output)) == ["case"]  # no staging folder left

    engine = type("Engine", (), {})()
    engine.state = type("State", (), {"output": writer_output})()
    writer(engine)
    row = read_summary(output)["case"]
    assert row["status"] == "error" and "case.nii.gz" in row["message"] and "No space left" in row["message"]


def test_a_kill_between_the_two_renames_leaves_the_case_absent_not_mixed(writer_output, tmp_path, monkeypatch):
    from scripts.case_outputs import RegistrationWriter, case_done

    output = tmp_path / "out"
    output.mkdir()
    writer = RegistrationWriter(str(output))
    writer._write_case(writer_output)
    rename, calls = os.rename, []

    def rename_then_die(source, target):
        calls.append(target)
        if len(calls) == 2:  # old result moved away, new one not yet in place
            raise KeyboardInterrupt
        rename(source, target)

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        writer._write_case(writer_output)
    monkeypatch.setattr(os, "rename", rename)
    assert not (output / "case").exists() and not case_done(str(output), "case")  # redone by the next run
    next_run = RegistrationWriter(str(output))
    next_run._load_summary(None)  # the next run starts by removing the leftovers
    assert os.listdir(output) == [".keymorph.lock"]  # and holds the folder until it ends
    next_run.lock.release()
    assert os.listdir(output) == []


def test_a_kill_after_the_folder_is_in_place_and_before_its_row_costs_the_case_no_row(
    writer_output, tmp_path, monkeypatch
):
    """A run killed the moment a case's folder is in place (renamed from staging), before its row reached
    summary.csv: the rerun skips the finished case and gives it its real row (from the folder), not a ``skipped``
    row nor the row of an earlier failure. The rerun reads the folder's record once, in the dataset, and the row
    travels with the skipped case through the evaluator to the writer."""
    import scripts.case_outputs as case_outputs
    import scripts.inference as inference

    engine = type("Engine", (), {})()
    engine.state = type("State", (), {"output": writer_output})()
    uninterrupted = case_outputs.RegistrationWriter(str(tmp_path / "uninterrupted"))
    uninterrupted._load_summary(engine)
    uninterrupted(engine)
    uninterrupted._report(engine)
    expected = read_summary(tmp_path / "uninterrupted")["case"]

    output = tmp_path / "out"
    output.mkdir()
    (output / "summary.csv").write_text("name,status,message\ncase,error,an earlier run failed\n")
    replace_folder = case_outputs.replace_folder

    def replace_then_die(staging, final):
        replace_folder(staging, final)
        raise KeyboardInterrupt  # as a kill: nothing after the rename runs

    monkeypatch.setattr(case_outputs, "replace_folder", replace_then_die)
    killed = case_outputs.RegistrationWriter(str(output))
    killed._load_summary(engine)
    with pytest.raises(KeyboardInterrupt):
        killed(engine)
    killed.lock.release()  # what the kernel does when a process dies
    monkeypatch.setattr(case_outputs, "replace_folder", replace_folder)
    assert case_outputs.case_done(str(output), "case")  # the window: the folder in place, its row not written
    assert read_summary(output)["case"]["status"] == "error"

    (tmp_path / "pairs.csv").write_text("moving,fixed\ncase.nii.gz,fixed.nii.gz\n")
    reads = []
    monkeypatch.setattr(inference, "read_provenance", lambda folder: reads.append(folder) or read_provenance(folder))
    dataset = inference.RegistrationDataset("", "", pairs_csv=str(tmp_path / "pairs.csv"), output_dir=str(output))
    skipped = dataset[0]
    assert skipped["skipped"] and reads == [str(output / "case")]
    # the evaluator's hand-on of a skipped case (it needs neither the evaluator nor the engine)
    engine.state.output = inference.RegistrationEvaluator._iteration(None, None, [skipped])
    assert engine.state.output["status"] == "skipped"
    rerun = case_outputs.RegistrationWriter(str(output))
    rerun._load_summary(engine)
    rerun(engine)
    rerun._report(engine)
    assert engine.state.registration_counts == {"skipped": 1}  # not redone
    row = read_summary(output)["case"]
    assert row["status"] in ("ok", "suspect") and float(row["keypoint_residual_mm"]) >= 0, row
    assert {k: v for k, v in row.items() if k != "seconds"} == {k: v for k, v in expected.items() if k != "seconds"}
    assert float(row["seconds"]) > 0


def test_writer_removes_the_staging_folders_of_a_killed_run(tmp_path):
    from scripts.case_outputs import RegistrationWriter

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".keymorph-tmp-{int(dead.stdout)}-case"
    leftover.mkdir(parents=True)
    (leftover / "registered.nii.gz").write_bytes(b"half")
    half_summary = tmp_path / f".tmp-{int(dead.stdout)}-summary.csv"
    half_summary.write_text("name,sta")
    alive = tmp_path / ".keymorph-tmp-1-other"  # pid 1 is alive: another run still writing
    alive.mkdir()
    RegistrationWriter(str(tmp_path))._load_summary(None)
    assert not leftover.exists() and not half_summary.exists() and alive.exists()


def test_dataset_skips_done_cases_without_reading_them(tmp_path):
    from scripts.inference import RegistrationDataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "done.nii.gz").write_bytes(b"garbage: never read")
    write_moving(tmp_path / "in" / "todo.nii.gz", TRUTH["moving_a"])
    (tmp_path / "out" / "done").mkdir(parents=True)
    for name in OUTPUT_FILES:
        (tmp_path / "out" / "done" / name).write_text("")
    dataset = RegistrationDataset(str(tmp_path / "in"), "fixed.nii.gz", output_dir=str(tmp_path / "out"))
    assert dataset[0]["skipped"] and "error" not in dataset[0]
    assert not dataset[1].get("skipped")
    redo = RegistrationDataset(str(tmp_path / "in"), "f.nii.gz", output_dir=str(tmp_path / "out"), overwrite="true")
    assert not redo[0].get("skipped")


def test_dataset_refuses_two_inputs_with_one_case_name(tmp_path):
    from scripts.image_io import LoadVolumed
    from scripts.inference import RegistrationDataset

    for name in ("a.nii", "a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    dataset = RegistrationDataset(str(tmp_path), "fixed.nii.gz", transform=LoadVolumed("image"))
    items = [dataset[i] for i in range(3)]
    assert [item["name"] for item in items] == ["a", "a", "b"]
    assert "already used" in items[1]["error"] and str(tmp_path / "a.nii.gz") in items[1]["error"]
    assert items[0]["error"] == f"{tmp_path / 'a.nii'}: file is empty"  # the first one is read as usual


@pytest.mark.parametrize(
    "counts, code", [({"ok": 3}, None), ({"ok": 2, "suspect": 1, "skipped": 4}, None), ({"ok": 3, "error": 2}, 1)]
)
def test_exit_code_counts_failed_inputs(capsys, monkeypatch, counts, code):
    from scripts.inference import run_registration

    monkeypatch.setattr(sys, "argv", runner_argv())  # as under `python -m monai.bundle run`

    class Evaluator:
        output_dir = "OUT"
        state = type("State", (), {"registration_counts": counts})()

        def run(self):
            pass

    if code is None:
        run_registration(Evaluator())
        return
    with pytest.raises(SystemExit) as exit_info:
        run_registration(Evaluator())
    assert exit_info.value.code == code
    line = capsys.readouterr().err.strip()
    assert line == f"keymorph: error: 2 of 5 input(s) failed; see {os.path.join('OUT', 'summary.csv')} for each message"

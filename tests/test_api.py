"""The Python API (:func:`scripts.api.register`): the bundle workflow for one pair, its result read from the files
the workflow wrote, and the README's example run as it is written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from test_inference import NUM_KEYPOINTS, TRUTH, write_checkpoint, write_fixed, write_moving

from scripts.api import register
from scripts.errors import KeyMorphInputError, KeyMorphWorkflowError
from scripts.transform_io import read_itk_transform, read_ras_matrix

ROOT = Path(__file__).resolve().parents[1]


def small_network(ckpt_path) -> dict:
    """Settings of the small random network of tests/test_inference.py, and no refinement (a fast, exact keypoint
    fit)."""
    return {
        "ckpt_path": str(ckpt_path),
        "num_keypoints": NUM_KEYPOINTS,
        "network_channels": [8, 8, 16, 16],
        "spatial_size": 32,
        "skull_strip": "none",
        "refine_iterations": 0,
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    moving = write_moving(root / "moving_a.nii.gz", TRUTH["moving_a"])
    fixed = write_fixed(root / "fixed.nii.gz")
    settings = small_network(write_checkpoint(root / "model.pt"))
    result = register(moving, fixed, output_dir=root / "out", header_only=True, **settings)
    return {"root": root, "moving": moving, "fixed": fixed, "settings": settings, "result": result}


def test_matrices_are_those_of_the_written_files(pair):
    result, case = pair["result"], Path(pair["result"].case_dir)
    assert case == pair["root"] / "out" / "moving_a"
    np.testing.assert_allclose(result.fixed_to_moving, read_itk_transform(str(case / "transform.tfm")), atol=1e-10)
    np.testing.assert_allclose(result.moving_to_fixed, read_ras_matrix(str(case / "affine_ras.txt")), atol=1e-8)
    np.testing.assert_allclose(result.moving_to_fixed @ result.fixed_to_moving, np.eye(4), atol=1e-10)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(result.fixed_to_moving_itk, flip @ result.fixed_to_moving @ flip, atol=1e-12)
    itk = sitk.ReadTransform(str(case / "transform.tfm"))
    np.testing.assert_allclose(result.fixed_to_moving_itk[:3, :3].ravel(), np.array(itk.GetMatrix()), atol=1e-10)
    np.testing.assert_allclose(result.fixed_to_moving_itk[:3, 3], np.array(itk.GetTranslation()), atol=1e-10)
    np.testing.assert_allclose(result.moving_to_fixed_itk, np.linalg.inv(result.fixed_to_moving_itk), atol=1e-10)


def test_registered_image_is_registered_nii_gz_in_memory(pair):
    result, case = pair["result"], Path(pair["result"].case_dir)
    written, fixed = nib.load(str(case / "registered.nii.gz")), nib.load(pair["fixed"])
    assert isinstance(result.registered, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asarray(result.registered.dataobj), np.asarray(written.dataobj))
    np.testing.assert_allclose(result.registered.affine, fixed.affine, atol=1e-6)
    assert result.registered.shape == fixed.shape


def test_keypoints_and_qc_scores(pair):
    result = pair["result"]
    assert result.moving_keypoints.shape == result.fixed_keypoints.shape == (NUM_KEYPOINTS, 3)
    assert result.status in ("ok", "suspect")
    assert set(result.qc) == {"keypoint_residual_mm", "similarity", "brain_fill", "smoothness", "brain_overlap"}
    # without refinement the matrix is the keypoint fit: its residual is the RMS distance of the keypoint pairs
    moved = result.fixed_keypoints @ result.fixed_to_moving[:3, :3].T + result.fixed_to_moving[:3, 3]
    rms = float(np.sqrt(((moved - result.moving_keypoints) ** 2).sum(axis=1).mean()))
    assert rms == pytest.approx(result.qc["keypoint_residual_mm"], abs=2e-3)


def test_moving_mask_is_on_the_moving_grid(pair):
    mask = nib.load(str(Path(pair["result"].case_dir) / "moving_mask.nii.gz"))
    moving = nib.load(pair["moving"])
    assert mask.shape == moving.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, moving.affine, atol=1e-6)
    # skull_strip none: the brain is where the (brain-extracted) image is positive, voxel for voxel
    np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, np.asarray(moving.dataobj) > 0)


def test_folder_files_and_header_only_output(pair):
    out = pair["root"] / "out"
    assert {"summary.csv", "index.html", "moving_a"} <= set(os.listdir(out))
    assert 'href="moving_a/qc.png"' in (out / "index.html").read_text()
    assert (out / "moving_a" / "registered_header_only.nii.gz").is_file()


def test_nibabel_images_give_the_same_registration(pair):
    result = register(nib.load(pair["moving"]), nib.load(pair["fixed"]), **pair["settings"])
    assert result.case_dir is None  # a temporary folder, removed
    np.testing.assert_allclose(result.fixed_to_moving, pair["result"].fixed_to_moving, atol=1e-6)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"aligner": "tps"}, ["--aligner 'tps'", "affine, rigid, similarity"]),
        ({"skul_strip": "none"}, ["unknown setting --skul_strip", "did you mean --skull_strip?"]),
        ({"ckpt_path": "/no/such/model.pt"}, ["/no/such/model.pt", "not found"]),
    ],
)
def test_a_wrong_setting_raises_one_line(pair, change, words):
    with pytest.raises(KeyMorphWorkflowError) as error:
        register(pair["moving"], pair["fixed"], **{**pair["settings"], **change})
    assert error.value.exit_code == 2 and "\n" not in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_an_image_that_cannot_be_registered_raises_one_line_naming_it(pair, tmp_path):
    constant = nib.Nifti1Image(np.ones((40, 40, 40), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    path = tmp_path / "flat.nii.gz"
    nib.save(constant, str(path))
    with pytest.raises(KeyMorphInputError) as error:
        register(str(path), pair["fixed"], **pair["settings"])
    assert not isinstance(error.value, KeyMorphWorkflowError)
    assert str(error.value).startswith(f"{path}: ") and "constant" in str(error.value)
    with pytest.raises(KeyMorphInputError, match=r"^moving image \(in memory\): the image is constant"):
        register(constant, pair["fixed"], **pair["settings"])


def readme_example() -> str:
    """The Python block after the README's ``README example`` marker."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- README example: tests/test_api.py runs this block -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its Python API example"
    return match.group(1)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README block, with the bundle's own weights, on a phantom pair named as in the README."""
    write_moving(tmp_path / "moving.nii.gz", TRUTH["moving_b"])
    write_fixed(tmp_path / "fixed.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.moving_keypoints.shape == (128, 3)
    written = nib.load(str(tmp_path / "moving_on_fixed.nii.gz"))
    assert written.shape == nib.load(str(tmp_path / "fixed.nii.gz")).shape

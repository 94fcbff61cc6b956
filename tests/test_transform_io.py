"""Behaviour of :mod:`scripts.transform_io`: file round trips, the LPS convention, clear errors, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from scripts.transform_io import (
    itk_affine_from_ras,
    ras_from_itk_affine,
    read_itk_transform,
    read_keypoints_csv,
    read_ras_matrix,
    write_atomically,
    write_itk_transform,
    write_keypoints_csv,
    write_ras_matrix,
)


def random_affine(seed: int) -> np.ndarray:
    """A general 4x4 affine matrix (rotation-ish, scale, shear, translation in mm)."""
    rng = np.random.default_rng(seed)
    matrix = np.eye(4)
    matrix[:3, :3] = np.eye(3) + 0.3 * rng.standard_normal((3, 3))
    matrix[:3, 3] = 20.0 * rng.standard_normal(3)
    return matrix


# --- ITK transforms -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".mat"])
def test_itk_transform_round_trip(tmp_path, suffix):
    matrix = random_affine(0)
    path = str(tmp_path / f"transform{suffix}")
    write_itk_transform(path, matrix)
    np.testing.assert_allclose(read_itk_transform(path), matrix, atol=1e-12, rtol=0)


def test_itk_transform_accepts_torch_and_maps_lps_points():
    """The ITK transform maps LPS(p) to LPS(T p): the same physical map in ITK's axes."""
    matrix = random_affine(1)
    transform = itk_affine_from_ras(torch.from_numpy(matrix))
    point = np.array([12.0, -7.0, 33.0])
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(
        transform.TransformPoint((point * flip).tolist()), (matrix[:3, :3] @ point + matrix[:3, 3]) * flip
    )


def test_known_translation_in_file(tmp_path):
    """RAS translation (1, 2, 3) is LPS (-1, -2, 3)."""
    matrix = np.eye(4)
    matrix[:3, 3] = [1.0, 2.0, 3.0]
    path = str(tmp_path / "transform.tfm")
    write_itk_transform(path, matrix)
    text = open(path).read()
    assert "AffineTransform_double_3_3" in text
    parameters = [line for line in text.splitlines() if line.startswith("Parameters:")][0].split()[1:]
    np.testing.assert_allclose(np.array(parameters, dtype=np.float64), [1, 0, 0, 0, 1, 0, 0, 0, 1, -1, -2, 3])


def test_ras_from_itk_affine_folds_in_the_centre():
    matrix = random_affine(2)
    reference = itk_affine_from_ras(matrix)
    centred = sitk.AffineTransform(3)
    centre = np.array([5.0, -40.0, 18.0])
    linear = np.array(reference.GetMatrix()).reshape(3, 3)
    centred.SetCenter(centre.tolist())
    centred.SetMatrix(linear.ravel().tolist())
    centred.SetTranslation((np.array(reference.GetTranslation()) - centre + linear @ centre).tolist())
    np.testing.assert_allclose(ras_from_itk_affine(centred), matrix, atol=1e-10, rtol=0)


def test_read_single_entry_composite(tmp_path):
    matrix = random_affine(3)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(itk_affine_from_ras(matrix))
    path = str(tmp_path / "composite.h5")
    sitk.WriteTransform(composite, path)
    np.testing.assert_allclose(read_itk_transform(path), matrix, atol=1e-12, rtol=0)


# --- affine_ras.txt -------------------------------------------------------------------------------------------------


def test_ras_matrix_round_trip(tmp_path):
    matrix = random_affine(4)
    path = str(tmp_path / "affine_ras.txt")
    write_ras_matrix(path, torch.from_numpy(matrix))
    assert len(open(path).read().strip().splitlines()) == 4  # one row per line
    np.testing.assert_allclose(read_ras_matrix(path), matrix, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "content",
    ["1 0 0 0\n0 1 0 0\n0 0 1 0\n", "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1\n", "1 0 0\n0 1 0\n0 0 1\n", "5\n"],
    ids=["3x4", "one-line", "3x3", "scalar"],
)
def test_ras_matrix_rejects_non_4x4(tmp_path, content):
    path = tmp_path / "affine_ras.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="4x4"):
        read_ras_matrix(str(path))


# --- keypoints ------------------------------------------------------------------------------------------------------


def test_keypoints_csv_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    points = 80.0 * rng.standard_normal((17, 3))
    weights = rng.uniform(0.0, 1.0, 17)
    path = str(tmp_path / "keypoints_fixed.csv")
    write_keypoints_csv(path, torch.from_numpy(points), torch.from_numpy(weights))
    assert open(path).readline().strip() == "x,y,z,weight"
    read_points, read_weights = read_keypoints_csv(path)
    assert read_points.shape == (17, 3) and read_weights.shape == (17,)
    np.testing.assert_allclose(read_points, points, atol=5.1e-5, rtol=0)  # 4 decimals of a millimetre
    np.testing.assert_allclose(read_weights, weights, rtol=1e-5, atol=0)


def test_keypoints_csv_default_weights_and_single_point(tmp_path):
    path = str(tmp_path / "keypoints.csv")
    write_keypoints_csv(path, np.array([1.5, -2.25, 3.0]))
    points, weights = read_keypoints_csv(path)
    np.testing.assert_allclose(points, [[1.5, -2.25, 3.0]])
    np.testing.assert_allclose(weights, [1.0])


# --- write_atomically -----------------------------------------------------------------------------------------------


def test_write_atomically_success_leaves_only_the_target(tmp_path):
    target = tmp_path / "transform.tfm"
    seen = []

    def writer(temporary):
        seen.append(temporary)
        assert os.path.dirname(temporary) == str(tmp_path)  # same folder: the rename is atomic
        assert temporary.endswith(".tfm")  # the extension chooses the format
        write_itk_transform(temporary, np.eye(4))

    write_atomically(str(target), writer)
    assert os.listdir(tmp_path) == ["transform.tfm"]
    assert not os.path.exists(seen[0])
    np.testing.assert_allclose(read_itk_transform(str(target)), np.eye(4))


def test_write_atomically_replaces_existing(tmp_path):
    target = tmp_path / "affine_ras.txt"
    target.write_text("old")
    write_atomically(str(target), lambda temporary: write_ras_matrix(temporary, 2.0 * np.eye(4)))
    np.testing.assert_allclose(read_ras_matrix(str(target)), 2.0 * np.eye(4))
    assert os.listdir(tmp_path) == ["affine_ras.txt"]


def test_write_atomically_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.nii.gz"

    def failing(temporary):
        with open(temporary, "w") as handle:
            handle.write("half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(str(target), failing)
    assert os.listdir(tmp_path) == []
    assert not target.exists()


def test_write_atomically_failure_keeps_previous_target(tmp_path):
    target = tmp_path / "affine_ras.txt"
    target.write_text("previous result")

    def failing(temporary):
        open(temporary, "w").close()
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        write_atomically(str(target), failing)
    assert os.listdir(tmp_path) == ["affine_ras.txt"]
    assert target.read_text() == "previous result"


def test_write_atomically_failure_before_creating_temporary(tmp_path):
    def failing(temporary):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        write_atomically(str(tmp_path / "x.csv"), failing)
    assert os.listdir(tmp_path) == []

"""Behaviour of :mod:`scripts.image_io`: what load_volume accepts and how it says no, and headers save_volume keeps.

Each refusal is one line that starts with the file's path; accepted images come back as ``(1, D, H, W)`` float32
MetaTensors whose affine is nibabel's RAS matrix of the file.
"""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from test_inference import grid_affine, phantom_volume, rotation, write_nifti

from scripts.errors import KeyMorphInputError
from scripts.image_io import LoadVolumed, default_atlas_path, is_label_map, load_volume, save_volume

SHAPE = (24, 26, 22)
AFFINE = grid_affine((2.0, 2.5, 3.0), SHAPE, rotation([1, 2, 3], 25.0), (4.0, -3.0, 2.0))


def brain() -> np.ndarray:
    return phantom_volume(AFFINE, SHAPE)


def refusal(path) -> str:
    with pytest.raises(KeyMorphInputError) as error:
        load_volume(str(path))
    message = str(error.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    return message


# --- accepted -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, np.int32])
def test_volume_is_float32_with_the_ras_affine(tmp_path, dtype):
    data = (brain() * 100).astype(dtype)
    path = write_nifti(tmp_path / "brain.nii.gz", data, AFFINE)
    volume = load_volume(path)
    assert isinstance(volume, MetaTensor) and volume.shape == (1, *SHAPE) and volume.dtype == torch.float32
    np.testing.assert_allclose(volume[0].numpy(), data.astype(np.float32))
    np.testing.assert_allclose(np.asarray(volume.affine), nib.load(path).affine)
    assert volume.meta["filename_or_obj"] == path and volume.meta["nonfinite_fraction"] == 0


def test_scaled_integers_are_read_with_their_scaling(tmp_path):
    image = nib.Nifti1Image((brain() * 100).astype(np.int16), AFFINE)
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, str(tmp_path / "scaled.nii"))
    volume = load_volume(str(tmp_path / "scaled.nii"))
    np.testing.assert_allclose(volume[0].numpy(), (brain() * 100).astype(np.int16) * 0.5 + 10.0)
    assert not is_label_map(str(tmp_path / "scaled.nii"))


def test_some_non_finite_voxels_become_zero_and_are_counted(tmp_path):
    data = brain()
    data[:2] = np.nan
    data[-1, 0, 0] = -np.inf
    volume = load_volume(write_nifti(tmp_path / "holes.nii.gz", data, AFFINE))
    assert np.isfinite(volume.numpy()).all() and float(volume[0, :2].abs().sum()) == 0
    assert volume.meta["nonfinite_fraction"] == pytest.approx((2 * SHAPE[1] * SHAPE[2] + 1) / np.prod(SHAPE))


@pytest.mark.parametrize("extra_shape", [(1,), (1, 1)])
def test_single_volume_4d_and_5d_files_are_accepted(tmp_path, extra_shape):
    data = brain().reshape(*SHAPE, *extra_shape)
    assert load_volume(write_nifti(tmp_path / "one.nii.gz", data, AFFINE)).shape == (1, *SHAPE)


@pytest.mark.parametrize("name", ["with space.nii.gz", "ünïcode_脑.nii", "link.nii.gz"])
def test_odd_paths_and_symbolic_links(tmp_path, name):
    target = write_nifti(tmp_path / "target.nii.gz", brain(), AFFINE)
    path = tmp_path / name
    if name.startswith("link"):
        os.symlink(target, path)
    else:
        write_nifti(path, brain(), AFFINE)
    assert load_volume(str(path)).shape == (1, *SHAPE)


@pytest.mark.parametrize("spacing, shape", [((1.0, 1.0, 10.0), (48, 48, 6)), ((12.0, 12.0, 12.0), (5, 5, 5))])
def test_anisotropic_and_huge_voxels_are_accepted(tmp_path, spacing, shape):
    affine = grid_affine(spacing, shape)
    volume = load_volume(write_nifti(tmp_path / "coarse.nii.gz", phantom_volume(affine, shape), affine))
    assert volume.shape == (1, *shape)


def test_unknown_units_count_as_mm(tmp_path):
    assert load_volume(write_nifti(tmp_path / "u.nii.gz", brain(), AFFINE, units="unknown")).shape == (1, *SHAPE)


def test_constant_image_is_accepted_when_contrast_is_not_required(tmp_path):
    path = write_nifti(tmp_path / "empty_lesion_mask.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)
    assert "constant" in refusal(path)
    assert float(load_volume(path, to_register=False).abs().sum()) == 0


def test_load_volumed_replaces_paths(tmp_path):
    path = write_nifti(tmp_path / "b.nii.gz", brain(), AFFINE)
    out = LoadVolumed(keys=["image"])({"image": path, "other": 1})
    assert isinstance(out["image"], MetaTensor) and out["other"] == 1


# --- refused, one line naming the file ----------------------------------------------------------------------------


def test_missing_empty_and_folder(tmp_path):
    assert "file not found" in refusal(tmp_path / "nope.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert "empty" in refusal(tmp_path / "empty.nii.gz")
    (tmp_path / "folder.nii").mkdir()
    assert "folder" in refusal(tmp_path / "folder.nii")
    os.symlink(tmp_path / "gone.nii", tmp_path / "dangling.nii")
    assert "broken symbolic link" in refusal(tmp_path / "dangling.nii")


def test_gzip_problems(tmp_path):
    path = write_nifti(tmp_path / "whole.nii.gz", brain(), AFFINE)
    content = open(path, "rb").read()
    (tmp_path / "truncated.nii.gz").write_bytes(content[: len(content) // 2])
    assert "truncated gzip" in refusal(tmp_path / "truncated.nii.gz")
    (tmp_path / "random.nii.gz").write_bytes(gzip.compress(os.urandom(4000)))
    assert "not a readable NIfTI image" in refusal(tmp_path / "random.nii.gz")
    plain = write_nifti(tmp_path / "plain.nii", brain(), AFFINE)
    (tmp_path / "renamed.nii.gz").write_bytes(open(plain, "rb").read())
    assert "not gzip-compressed" in refusal(tmp_path / "renamed.nii.gz")


def test_truncated_uncompressed_file(tmp_path):
    path = write_nifti(tmp_path / "whole.nii", brain(), AFFINE)
    content = open(path, "rb").read()
    (tmp_path / "cut.nii").write_bytes(content[: len(content) - 1000])
    assert "not a readable NIfTI image" in refusal(tmp_path / "cut.nii")


def test_not_nifti(tmp_path):
    (tmp_path / "table.nii").write_text("a,b\n1,2\n" * 100)
    assert "not a readable NIfTI image" in refusal(tmp_path / "table.nii")


@pytest.mark.parametrize(
    "data, words",
    [
        (np.zeros((30, 30), np.float32), ["2-D"]),
        (np.zeros((30, 30, 30, 2), np.float32), ["4-D", "2 volumes", "extract one"]),
        (np.zeros((30, 30, 30, 2, 3), np.float32), ["5-D"]),
        (np.zeros(SHAPE, np.float32), ["constant (0 everywhere)"]),
        (np.full(SHAPE, np.nan, np.float32), ["NaN or infinite"]),
        (np.full(SHAPE, -np.inf, np.float32), ["NaN or infinite"]),
        (np.zeros(SHAPE, np.complex64), ["complex"]),
    ],
)
def test_not_one_volume(tmp_path, data, words):
    message = refusal(write_nifti(tmp_path / "bad.nii.gz", data, AFFINE))
    for word in words:
        assert word in message, message


def test_rgb(tmp_path):
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    assert "RGB (colour) voxels" in refusal(write_nifti(tmp_path / "rgb.nii.gz", rgb, AFFINE))


@pytest.mark.parametrize("spacing, shape", [((1.0, 1.0, 1.0), (30, 30, 30)), ((20.0, 20.0, 20.0), (30, 30, 3))])
def test_too_small_to_hold_a_brain(tmp_path, spacing, shape):
    affine = grid_affine(spacing, shape)
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    assert "too small" in refusal(write_nifti(tmp_path / "small.nii.gz", data, affine))


def _raw_header_file(path, affine: np.ndarray, units: int = 2) -> str:
    """A NIfTI file whose sform is ``affine`` as is (a normal nibabel save would tidy it)."""
    image = nib.Nifti1Image(brain(), np.eye(4))
    header = image.header
    header["qform_code"], header["sform_code"], header["xyzt_units"] = 0, 2, units
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = affine[row]
    with open(path, "wb") as handle:
        header.write_to(handle)
        handle.write(b"\x00" * (352 - handle.tell()))
        handle.write(brain().tobytes(order="F"))
    return str(path)


def _with(change) -> np.ndarray:
    affine = AFFINE.copy()
    change(affine)
    return affine


@pytest.mark.parametrize(
    "affine, units, words",
    [
        (_with(lambda a: a.__setitem__((slice(0, 3), 1), 0.0)), 2, ["singular"]),
        (_with(lambda a: a.__setitem__((0, 0), np.nan)), 2, ["non-finite"]),
        (_with(lambda a: a.__setitem__((2, 3), np.inf)), 2, ["non-finite"]),
        (_with(lambda a: a.__setitem__((0, 1), a[0, 1] + 0.5)), 2, ["sheared"]),
        (AFFINE, 1, ["'meter'", "not mm"]),
        (AFFINE, 3, ["'micron'"]),
        (AFFINE, 5, ["invalid spatial units code"]),
    ],
)
def test_header_problems(tmp_path, affine, units, words):
    message = refusal(_raw_header_file(tmp_path / "header.nii", affine, units))
    for word in words:
        assert word in message, message


# --- saving -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes", [(1, 4), (0, 2), (2, 0), (0, 0)])
def test_save_volume_copies_the_reference_header(tmp_path, codes):
    reference_path = write_nifti(tmp_path / "ref.nii.gz", (brain() * 100).astype(np.int16), AFFINE, *codes)
    reference = nib.load(reference_path)
    reference.header.set_slope_inter(2.0, 1.0)
    reference.header["cal_max"] = 55.0
    out = str(tmp_path / "out.nii.gz")
    save_volume(out, brain() * 3.0, reference, np.float32)
    saved, original = nib.load(out), nib.load(reference_path)
    assert saved.shape == original.shape and saved.get_data_dtype() == np.float32
    np.testing.assert_array_equal(saved.affine, original.affine)
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "srow_x", "pixdim"):
        np.testing.assert_array_equal(saved.header[field], original.header[field])
    assert saved.header.get_slope_inter() == (None, None) and float(saved.header["cal_max"]) == 0
    np.testing.assert_allclose(np.asarray(saved.dataobj), brain() * 3.0, rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz", "ref.nii.gz"]  # no temporary file left


def test_save_volume_label_map_keeps_its_type_and_nifti2_stays_nifti2(tmp_path):
    reference = nib.Nifti2Image(brain(), AFFINE)
    out = str(tmp_path / "labels.nii")
    save_volume(out, (brain() > 0).astype(np.int16) * 7, reference, np.int16)
    saved = nib.load(out)
    assert isinstance(saved, nib.Nifti2Image) and saved.get_data_dtype() == np.int16
    assert set(np.unique(np.asarray(saved.dataobj))) == {0, 7}
    assert is_label_map(out)


def test_default_atlas_is_written_once(tmp_path):
    path = default_atlas_path(str(tmp_path))
    volume = load_volume(path)
    assert volume.shape[1:] == nib.load(path).shape and nib.load(path).header.get_xyzt_units()[0] == "mm"
    modified = os.stat(path).st_mtime_ns
    assert default_atlas_path(str(tmp_path)) == path and os.stat(path).st_mtime_ns == modified

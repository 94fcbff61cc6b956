"""Issue 6, inference side: bad and partly bad inputs in one folder next to good images.

One run of the bundle runner registers a folder holding every kind of broken file the issue lists; each must come
back as an ``error`` row whose one-line message names the file and the problem, while every good image (odd paths,
symbolic links, other data types, huge or very anisotropic voxels) is still registered, partly bad images are
registered (flagged ``suspect`` when doubtful) and pure noise is never ``ok``. A hypothesis property test then feeds
random malformed headers and arrays to :func:`scripts.image_io.load_volume`: it returns a MetaTensor or raises
:class:`KeyMorphInputError`, never anything else.
"""

from __future__ import annotations

import gzip
import io
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from test_inference import (
    OUTPUT_FILES,
    grid_affine,
    has_traceback,
    inference_arguments,
    interior_of_moving,
    phantom_volume,
    read_summary,
    rigid,
    run_bundle,
    sitk_array,
    write_checkpoint,
    write_fixed,
    write_moving,
    write_nifti,
)

from scripts.errors import KeyMorphInputError
from scripts.image_io import load_volume
from scripts.output_folder import printable
from scripts.qc import brain_fill, neighbour_correlation, qc_flags
from scripts.transform_io import read_itk_transform

SHIFT = rigid([0.3, 0.2, 1.0], 15.0, [3.0, -4.0, 2.0])
GOOD_AFFINE = grid_affine((2.0, 2.0, 2.0), (40, 40, 40))


def good_data(affine=GOOD_AFFINE, shape=(40, 40, 40)) -> np.ndarray:
    return phantom_volume(affine, shape, SHIFT)


def write_gzip_bytes(path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(gzip.compress(payload))


# name: (builder(folder, path), expected status, words the message must contain). Statuses: "error", "registered"
# (ok or suspect), "flagged" (suspect or error, never ok).
def _truncated(folder, path):
    write_nifti(path, good_data(), GOOD_AFFINE)
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])


def _not_nifti(folder, path):
    open(path, "w").write("patient,age\nA,42\n" * 40)


def _empty(folder, path):
    open(path, "wb").close()


def _random_gzip(folder, path):
    write_gzip_bytes(path, np.random.default_rng(0).bytes(6000))


def _two_d(folder, path):
    write_nifti(path, good_data()[:, :, 20], GOOD_AFFINE)


def _four_d(folder, path):
    write_nifti(path, np.stack([good_data()] * 3, axis=-1), GOOD_AFFINE)


def _constant(value):
    def build(folder, path):
        write_nifti(path, np.full((40, 40, 40), value, np.float32), GOOD_AFFINE)

    return build


def _too_small(folder, path):
    affine = grid_affine((1.0, 1.0, 1.0), (12, 12, 12))
    write_nifti(path, np.random.default_rng(1).random((12, 12, 12)).astype(np.float32), affine)


def _affine_with(change):
    def build(folder, path):
        affine = GOOD_AFFINE.copy()
        change(affine)
        image = nib.Nifti1Image(good_data(), np.eye(4))
        image.header.set_xyzt_units("mm")
        image.header["qform_code"], image.header["sform_code"] = 0, 2
        for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
            image.header[name] = affine[row]
        bio = io.BytesIO()
        image.header.write_to(bio)  # header as is: nibabel would fix the matrix on a normal save
        bio.write(b"\x00" * (352 - bio.tell()))
        bio.write(good_data().astype(np.float32).tobytes(order="F"))
        write_gzip_bytes(path, bio.getvalue())

    return build


def _zero_column(affine):
    affine[:3, 2] = 0.0


def _nan_entry(affine):
    affine[1, 3] = np.nan


def _shear(affine):
    affine[0, 1] = 0.8


def _units(folder, path):
    write_nifti(path, good_data(), GOOD_AFFINE, units="meter")


def _rgb(folder, path):
    grey = (good_data() * 200).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = grey, grey, grey
    write_nifti(path, rgb, GOOD_AFFINE)


def _good(folder, path):
    write_moving(path, SHIFT)


def _header_forms(qform_code: int, sform_code: int, qform_offset_mm=(0.0, 0.0, 0.0), mirror_qform: bool = False):
    """A good moving image whose header sets the qform and sform with these codes; the qform may be shifted or
    mirrored left-right within the same field of view (what ITK reads when the codes make it prefer the qform)."""

    def build(folder, path):
        image = nib.load(write_moving(path, SHIFT))
        affine, qform = image.affine, image.affine.copy()
        qform[:3, 3] += qform_offset_mm
        if mirror_qform:
            last = np.array([image.shape[0] - 1, 0, 0, 0])
            qform = qform @ np.diag([-1.0, 1.0, 1.0, 1.0])
            qform[:3, 3] = (affine @ last)[:3]
        data = np.asarray(image.dataobj)
        write_nifti(path, data, affine, qform_code=qform_code, sform_code=sform_code)
        edited = nib.load(path)
        edited.set_qform(qform, qform_code)
        nib.save(nib.Nifti1Image(data, None, edited.header), path)

    return build


def _symlink(folder, path):
    target = os.path.join(os.path.dirname(folder), "elsewhere", "target image.nii.gz")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    write_moving(target, SHIFT)
    os.symlink(target, path)


def _broken_symlink(folder, path):
    os.symlink(os.path.join(folder, "no_such_file.nii.gz"), path)


def _dtype(dtype):
    def build(folder, path):
        write_moving(path, SHIFT, dtype=dtype)

    return build


def _huge_voxels(folder, path):
    affine = grid_affine((8.0, 8.0, 8.0), (14, 14, 14))
    write_nifti(path, phantom_volume(affine, (14, 14, 14), SHIFT), affine)


def _anisotropic(folder, path):
    affine = grid_affine((1.0, 1.0, 10.0), (72, 72, 8))
    write_nifti(path, phantom_volume(affine, (72, 72, 8), SHIFT), affine)


def _some_nan(folder, path):
    data = good_data()
    rng = np.random.default_rng(2)
    data[rng.random(data.shape) < 0.03] = np.nan
    write_nifti(path, data, GOOD_AFFINE)


def _cropped(folder, path):
    data = good_data()[:, :, :24]  # the top of the brain is outside the field of view
    write_nifti(path, data, GOOD_AFFINE)


def _lesion(folder, path):
    data = good_data()
    world = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1) @ GOOD_AFFINE[:3, :3].T + GOOD_AFFINE[:3, 3]
    data[np.linalg.norm(world - [6.0, 8.0, 4.0], axis=-1) < 7.0] = 2.0
    write_nifti(path, data, GOOD_AFFINE)


def _heavy_noise(folder, path):
    data = good_data() + np.random.default_rng(3).normal(0, 0.3, (40, 40, 40)).astype(np.float32)
    write_nifti(path, data, GOOD_AFFINE)


def _freesurfer(folder, path):
    nib.save(nib.MGHImage(good_data(), GOOD_AFFINE), path)


def _analyze_pair(folder, path):
    nib.save(nib.Nifti1Pair(good_data(), GOOD_AFFINE), path)  # path.hdr and path.img


def _pure_noise(signed: bool):
    def build(folder, path):
        noise = np.random.default_rng(4).normal(0, 1, (40, 40, 40)).astype(np.float32)
        write_nifti(path, noise if signed else np.abs(noise), GOOD_AFFINE)

    return build


CASES = {
    # files that cannot be read
    "truncated.nii.gz": (_truncated, "error", ["truncated"]),
    "not_nifti.nii": (_not_nifti, "error", ["not a readable NIfTI"]),
    "empty.nii.gz": (_empty, "error", ["empty"]),
    "random_bytes.nii.gz": (_random_gzip, "error", ["not a readable NIfTI"]),
    "broken_link.nii.gz": (_broken_symlink, "error", ["broken symbolic link"]),
    # files that are not one brain volume
    "flat_2d.nii.gz": (_two_d, "error", ["2-D"]),
    "series_4d.nii.gz": (_four_d, "error", ["4-D", "3 volumes", "extract one"]),
    "all_zero.nii.gz": (_constant(0.0), "error", ["constant"]),
    "constant.nii.gz": (_constant(7.5), "error", ["constant"]),
    "all_nan.nii.gz": (_constant(np.nan), "error", ["NaN"]),
    "all_inf.nii.gz": (_constant(np.inf), "error", ["infinite"]),
    "tiny_fov.nii.gz": (_too_small, "error", ["too small"]),
    "rgb.nii.gz": (_rgb, "error", ["RGB"]),
    # headers that do not say where the voxels are
    "singular_affine.nii.gz": (_affine_with(_zero_column), "error", ["singular"]),
    "nan_affine.nii.gz": (_affine_with(_nan_entry), "error", ["non-finite"]),
    "sheared.nii.gz": (_affine_with(_shear), "error", ["sheared"]),
    "units_meter.nii.gz": (_units, "error", ["units", "mm"]),
    "qform_mirrors_sform.nii.gz": (
        _header_forms(1, 2, mirror_qform=True),
        "error",
        ["nibabel (sform: RPS) and ITK (LPS)", "qform and sform disagree"],
    ),
    "qform_shifted_5mm.nii.gz": (_header_forms(1, 2, (5.0, 0.0, 0.0)), "error", ["5 mm apart"]),
    "qform_shifted_half_mm.nii.gz": (_header_forms(1, 2, (0.0, 0.5, 0.0)), "error", ["0.5 mm apart"]),
    "no_orientation.nii.gz": (_header_forms(0, 0), "error", ["sets no orientation", "both 0"]),
    # names that cannot be a case folder of the output folder
    "summary.csv.nii.gz": (_good, "error", ["case name 'summary.csv'", "file of the run"]),
    "new\nline.nii.gz": (_good, "error", ["case name", "line break"]),
    "back\\slash.nii.gz": (_good, "error", ["case name", "path separator"]),
    # files listed, not registered
    ".hidden.nii.gz": (_good, "skipped", ["hidden file", "rename it"]),
    "._apple_double.nii.gz": (_not_nifti, "skipped", ["hidden file"]),
    "freesurfer.mgz": (_freesurfer, "skipped", ["MGH/MGZ", "mri_convert"]),
    "analyze_pair.hdr": (_analyze_pair, "skipped", ["Analyze", ".nii.gz"]),
    # good images in odd clothes: must work
    "n" * 243 + ".nii.gz": (_good, "registered", []),  # 250 characters: the longest names still fit
    "good.nii.gz": (_good, "registered", []),
    "with space.nii.gz": (_good, "registered", []),
    "non_ascii_é_脑.nii.gz": (_good, "registered", []),
    "symlink.nii.gz": (_symlink, "registered", []),
    "int16.nii.gz": (_dtype(np.int16), "registered", []),
    "float64.nii.gz": (_dtype(np.float64), "registered", []),
    "huge_voxels.nii.gz": (_huge_voxels, "registered", []),
    "aniso_1x1x10.nii.gz": (_anisotropic, "registered", []),
    "sform_only.nii.gz": (_header_forms(0, 2), "registered", []),
    "qform_only.nii.gz": (_header_forms(1, 0), "registered", []),
    "forms_agree_scanner.nii.gz": (_header_forms(1, 1, mirror_qform=True), "registered", []),
    "forms_within_tolerance.nii.gz": (_header_forms(1, 2, (0.002, 0.0, 0.0)), "registered", []),
    # partly bad: registered, flagged when doubtful
    "some_nan.nii.gz": (_some_nan, "registered", ["NaN"]),
    "cropped.nii.gz": (_cropped, "registered", []),
    "lesion.nii.gz": (_lesion, "registered", []),
    "heavy_noise.nii.gz": (_heavy_noise, "registered", []),
    # pure noise: never ok
    "noise_magnitude.nii.gz": (_pure_noise(signed=False), "flagged", []),
    "noise_signed.nii.gz": (_pure_noise(signed=True), "flagged", []),
}


def row_name(file_name: str) -> str:
    """The summary row of a case: its case name (line breaks written as \\n), the file name for files not read."""
    if CASES[file_name][1] == "skipped":
        return file_name
    return printable(file_name[: -len(".nii.gz")] if file_name.endswith(".nii.gz") else file_name[: -len(".nii")])


@pytest.fixture(scope="module")
def bad_folder_run(tmp_path_factory):
    """Build the folder of every case and register it once; returns (process, output folder, input folder)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    folder = root / "in"
    folder.mkdir()
    for file_name, (build, _, _) in CASES.items():
        build(str(folder), str(folder / file_name))
    fixed = write_fixed(root / "fixed.nii.gz")
    ckpt = write_checkpoint(root / "model.pt")
    output = root / "out"
    process = run_bundle(*inference_arguments(folder, output, fixed, ckpt))
    return process, output, folder


def test_the_run_fails_with_a_count_and_no_traceback(bad_folder_run):
    process, output, _ = bad_folder_run
    errors = sum(1 for _, status, _ in CASES.values() if status == "error")
    assert process.returncode == 1, process.stderr[-3000:]
    assert not has_traceback(process), process.stderr[-3000:]
    last = process.stderr.strip().splitlines()[-1]
    assert last.startswith("keymorph: error: ") and f"{errors} of {len(CASES)} input(s) failed" in last, last


@pytest.mark.parametrize("file_name", sorted(CASES))
def test_each_input_gets_its_status_and_message(bad_folder_run, file_name):
    _, output, folder = bad_folder_run
    _, expected, words = CASES[file_name]
    row = read_summary(output)[row_name(file_name)]
    message = row["message"]
    assert "\n" not in message
    if expected == "error":
        assert row["status"] == "error", row
        assert printable(file_name) in message, message
        assert not os.path.isdir(output / file_name.split(".nii")[0])  # no case folder (summary.csv is a file)
    elif expected == "skipped":
        assert row["status"] == "skipped", row
    elif expected == "registered":
        assert row["status"] in ("ok", "suspect"), row
        for name in OUTPUT_FILES:
            assert (output / row_name(file_name) / name).is_file()
        if row["status"] == "suspect":
            assert "QC flagged" in message
    else:
        assert row["status"] in ("suspect", "error"), row
    for word in words:
        assert word in message, message


HEADER_VARIANTS = ["sform_only", "qform_only", "forms_agree_scanner", "forms_within_tolerance"]


@pytest.mark.parametrize("name", HEADER_VARIANTS)
def test_simpleitk_reproduces_registered_images_of_accepted_header_variants(bad_folder_run, name):
    """The README's recipe, SimpleITK.Resample(moving, fixed, transform.tfm), gives registered.nii.gz for every
    accepted qform/sform combination (ITK reads them as nibabel does)."""
    _, output, folder = bad_folder_run
    root = folder.parent
    moving = sitk.ReadImage(str(folder / f"{name}.nii.gz"), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(root / "fixed.nii.gz"), sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(output / name / "transform.tfm"))
    expected = sitk_array(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    registered = np.asarray(nib.load(str(output / name / "registered.nii.gz")).dataobj)
    inside = interior_of_moving(name, root, read_itk_transform(str(output / name / "transform.tfm")))
    assert inside.sum() > 2000 and np.abs(registered[inside]).max() > 0.1
    np.testing.assert_allclose(registered[inside], expected[inside], atol=2e-3 * np.abs(expected).max())


def test_no_staging_leftovers(bad_folder_run):
    _, output, _ = bad_folder_run
    assert not [name for name in os.listdir(output) if name.startswith(".")]


# --- the QC decision on its own -------------------------------------------------------------------------------------


def test_qc_scores_tell_a_brain_from_noise():
    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"), -1) - 15.5
    ball = ((grid / torch.tensor([9.0, 13.0, 10.0])) ** 2).sum(-1) < 1
    anatomy = torch.cos(grid[..., 0] / 3.0) + torch.sin(grid[..., 1] / 4.0)  # varies slowly from voxel to voxel
    noise = torch.randn(32, 32, 32, generator=torch.Generator().manual_seed(0))
    assert neighbour_correlation(anatomy, ball) > 0.8
    assert abs(neighbour_correlation(noise, ball)) < 0.05
    assert abs(neighbour_correlation(noise, noise > 0)) < 0.05  # a speckled mask drawn on the noise itself
    assert neighbour_correlation(torch.ones(32, 32, 32), ball) == 1.0  # no variation is not noise
    assert neighbour_correlation(anatomy, torch.zeros(32, 32, 32)) == 0.0
    assert brain_fill(ball[None].float()) < 0.2 and brain_fill(torch.ones(1, 8, 8, 8)) == 1.0


def test_qc_flags_each_score_beyond_its_threshold():
    brain = {"residual": 2.0, "similarity": 0.3, "brain_fill": 0.15, "smoothness": 0.8}
    assert qc_flags(brain) == []
    assert [r.split(" (")[0] for r in qc_flags({**brain, "brain_fill": 1.0, "smoothness": 0.01})] == [
        "brain mask fills 100% of the image",
        "neighbouring voxels are unrelated, like noise",
    ]
    strict = {"min_similarity": 0.5, "max_residual_mm": 1.0}
    assert len(qc_flags(brain, strict)) == 2
    assert qc_flags({"residual": float("nan"), "similarity": float("nan")}) == []  # unknown scores flag nothing


# --- load_volume never fails in an unforeseen way -----------------------------------------------------------------

RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64]
DTYPES += [np.complex64, np.complex128, RGB]
UNIT_CODES = [0, 1, 2, 3, 5, 7]  # unknown, meter, mm, micron and two invalid codes


def _affines():
    special = st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e-12, 1e30])
    entry = st.one_of(st.floats(-5, 5, allow_nan=False), special)
    return st.one_of(
        st.just(np.eye(4)),
        st.floats(4.0, 12.0).map(lambda s: np.diag([s, -s, s, 1.0])),  # a valid header: the volume may load
        st.lists(entry, min_size=12, max_size=12).map(lambda v: np.vstack([np.reshape(v, (3, 4)), [0, 0, 0, 1]])),
        st.tuples(st.floats(0.5, 12), st.floats(-0.9, 0.9)).map(
            lambda s: np.array([[s[0], s[1], 0, 0], [0, s[0], 0, 0], [0, 0, s[0], 0], [0, 0, 0, 1.0]])
        ),
    )


@st.composite
def nifti_files(draw):
    plausible = draw(st.integers(0, 3)) == 0  # a quarter close to a real volume, so both outcomes are exercised
    ndim = 3 if plausible else draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4, 5]))
    sizes = st.integers(4, 12) if plausible else st.integers(0, 12)
    shape = tuple(draw(st.lists(sizes, min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES[:10] if plausible else DTYPES)))
    kind = draw(st.sampled_from(["random", "constant", "nan", "inf", "mixed"]))
    size = int(np.prod(shape)) if shape else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(0, 100, size)
    if kind == "constant":
        values[:] = 3.0
    elif kind in ("nan", "inf", "mixed") and dtype.kind in "fc":
        values[:] = np.nan if kind == "nan" else np.inf
        if kind == "mixed":
            values[rng.random(size) < 0.5] = 1.0
    with np.errstate(all="ignore"):
        if dtype == RGB:
            data = np.zeros(size, RGB)
            data["R"] = np.clip(values, 0, 255)
        else:
            data = values.astype(dtype)
    data = data.reshape(shape)
    affine = np.diag([draw(st.floats(8.0, 14.0)), 10.0, -10.0, 1.0]) if plausible else draw(_affines())
    return (
        data,
        affine,
        draw(st.sampled_from([0, 2] if plausible else UNIT_CODES)),
        draw(st.sampled_from([(0, 0), (1, 0), (0, 2), (1, 4)])),
        draw(st.booleans()),
    )


def write_raw_nifti(path: str, data: np.ndarray, affine: np.ndarray, units: int, codes, compress: bool) -> None:
    """A NIfTI-1 file written byte by byte from a header set field by field: nothing is validated or fixed."""
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    header["dim"][:] = 1
    header["dim"][0] = data.ndim
    header["dim"][1 : data.ndim + 1] = data.shape
    header["pixdim"][1:4] = np.nan_to_num(np.linalg.norm(np.nan_to_num(affine[:3, :3]), axis=0), posinf=1.0)
    header["xyzt_units"] = units
    header["qform_code"], header["sform_code"] = codes
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = affine[row]
    header["vox_offset"] = 352
    bio = io.BytesIO()
    header.write_to(bio)
    bio.write(b"\x00" * (352 - bio.tell()))
    bio.write(np.asarray(data).tobytes(order="F"))
    payload = bio.getvalue()
    with open(path, "wb") as handle:
        handle.write(gzip.compress(payload) if compress else payload)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=nifti_files())
def test_load_volume_returns_a_volume_or_an_input_error(tmp_path, case):
    data, affine, units, codes, compress = case
    path = str(tmp_path / ("case.nii.gz" if compress else "case.nii"))
    write_raw_nifti(path, data, affine, units, codes, compress)
    try:
        volume = load_volume(path)
    except KeyMorphInputError as error:
        message = str(error)
        assert message.startswith(path) and "\n" not in message
        event("input error")
        return
    event("volume")
    assert isinstance(volume, MetaTensor) and volume.dtype == torch.float32
    assert volume.ndim == 4 and volume.shape[0] == 1
    assert np.isfinite(volume.numpy()).all()
    assert np.isfinite(np.asarray(volume.affine)).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=0, max_size=700), compress=st.booleans(), name=st.sampled_from(["a.nii", "a.nii.gz"]))
def test_load_volume_on_arbitrary_bytes(tmp_path, payload, compress, name):
    path = str(tmp_path / name)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(payload) if compress else payload)
    with pytest.raises(KeyMorphInputError) as error:
        load_volume(path)
    assert str(error.value).startswith(path)

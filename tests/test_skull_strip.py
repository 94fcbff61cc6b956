"""Behaviour of :class:`scripts.skull_strip.SkullStripd`.

Synthetic spheres have a known brain; the deepbet backend runs on nilearn's brain-extracted MNI152 template (ships
with nilearn, no download), once as it is and once wrapped in a synthetic skull.
"""

from __future__ import annotations

import pickle
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd
from scipy import ndimage

from scripts.errors import KeyMorphInputError
from scripts.skull_strip import SkullStripd

IMAGE_NAME = "/data/sub-01_T1w.nii.gz"
# Image grid of the synthetic tests: 1 mm RAS, origin at (-20, -22, -18) mm.
SHAPE = (40, 44, 36)
ORIGIN = np.array([-20.0, -22.0, -18.0])
CENTRE = np.array([1.5, -2.0, 0.5])  # sphere centre, mm
RADIUS = 13.0  # mm


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def grid_world(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates ``(*shape, 3)`` of the voxel centres of a grid."""
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def sphere(affine: np.ndarray, shape) -> np.ndarray:
    return np.linalg.norm(grid_world(affine, shape) - CENTRE, axis=-1) <= RADIUS


def image_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = ORIGIN
    return affine


def meta_image(array: np.ndarray, affine: np.ndarray, name: str = IMAGE_NAME) -> MetaTensor:
    return MetaTensor(
        torch.as_tensor(array, dtype=torch.float32)[None],
        affine=torch.as_tensor(affine),
        meta={"filename_or_obj": name},
    )


def sphere_image() -> tuple[MetaTensor, np.ndarray]:
    """A bright textured sphere in zeros, and the sphere."""
    brain = sphere(image_affine(), SHAPE)
    texture = 1.0 + np.random.default_rng(0).random(SHAPE)
    return meta_image(brain * texture, image_affine()), brain


def test_none_backend_masks_the_positive_voxels_and_keeps_the_image():
    image, brain = sphere_image()
    image[0, 0, 0, 0] = float("nan")  # NaN outside the brain is not brain and ends up 0
    out = SkullStripd(keys="image", backend="none")({"image": image})
    mask = out["mask"]
    assert isinstance(mask, MetaTensor) and mask.dtype == torch.float32 and mask.shape == (1, *SHAPE)
    np.testing.assert_array_equal(mask[0].numpy(), brain.astype(np.float32))
    torch.testing.assert_close(mask.affine, image.affine)
    assert mask.meta["filename_or_obj"] == IMAGE_NAME
    stripped = out["image"]
    assert isinstance(stripped, MetaTensor)
    torch.testing.assert_close(stripped.affine, image.affine)
    np.testing.assert_array_equal(stripped[0].numpy()[brain], image[0].numpy()[brain])
    assert (stripped[0].numpy()[~brain] == 0).all()


def write_mask(path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.Nifti1Image(array.astype(np.uint8), affine).to_filename(str(path))
    return str(path)


def test_mask_backend_resamples_a_mask_on_another_grid(tmp_path):
    # Mask grid: 0.7 mm voxels, x and y flipped (LPS-like storage), turned 10 degrees about z, another origin.
    angle = np.deg2rad(10.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.7, -0.7, 0.7])
    affine[:3, 3] = [25.0, 27.0, -22.0]
    shape = (72, 76, 64)
    path = write_mask(tmp_path / "mask.nii.gz", sphere(affine, shape), affine)
    image, brain = sphere_image()
    out = SkullStripd(keys="image", backend="mask")({"image": image, "mask_path": path})
    assert out["mask"].shape == (1, *SHAPE)
    assert dice(out["mask"][0].numpy(), brain) > 0.95
    assert (out["image"][0].numpy()[out["mask"][0].numpy() == 0] == 0).all()


def test_mask_backend_is_exact_for_the_image_grid_stored_in_another_orientation(tmp_path):
    image, brain = sphere_image()
    # The image grid stored with the x axis reversed: after reorientation to RAS it is the image grid again.
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, SHAPE[0] - 1
    path = write_mask(tmp_path / "mask.nii", brain[::-1], image_affine() @ flip)
    out = SkullStripd(keys="image", backend="mask")({"image": image, "mask_path": path})
    np.testing.assert_array_equal(out["mask"][0].numpy(), brain.astype(np.float32))


def test_missing_mask_file_names_the_file(tmp_path):
    image, _ = sphere_image()
    path = str(tmp_path / "no_such_mask.nii.gz")
    with pytest.raises(KeyMorphInputError, match="no_such_mask.nii.gz") as error:
        SkullStripd(keys="image", backend="mask")({"image": image, "mask_path": path})
    assert "\n" not in str(error.value)


def test_unreadable_mask_file_names_the_file(tmp_path):
    image, _ = sphere_image()
    path = tmp_path / "broken_mask.nii.gz"
    path.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(KeyMorphInputError, match="broken_mask.nii.gz") as error:
        SkullStripd(keys="image", backend="mask")({"image": image, "mask_path": str(path)})
    assert "\n" not in str(error.value)


def test_empty_mask_file_names_the_image(tmp_path):
    image, _ = sphere_image()
    path = write_mask(tmp_path / "empty.nii.gz", np.zeros(SHAPE), image_affine())
    with pytest.raises(KeyMorphInputError, match="sub-01_T1w.nii.gz.*empty"):
        SkullStripd(keys="image", backend="mask")({"image": image, "mask_path": path})


@pytest.mark.parametrize("backend", ["none", "deepbet", "bundle"])
def test_empty_image_names_the_image(backend):
    image = meta_image(np.zeros(SHAPE), image_affine())
    with pytest.raises(KeyMorphInputError, match="sub-01_T1w.nii.gz"):
        SkullStripd(keys="image", backend=backend)({"image": image})


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(KeyMorphInputError, match="'bet2'.*deepbet, mask, none"):
        SkullStripd(keys="image", backend="bet2")


def test_multichannel_image_is_an_input_error():
    image = MetaTensor(torch.ones(2, *SHAPE), meta={"filename_or_obj": IMAGE_NAME})
    with pytest.raises(KeyMorphInputError, match="sub-01_T1w.nii.gz"):
        SkullStripd(keys="image", backend="none")({"image": image})


# --- deepbet on the MNI152 template ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mni_path(tmp_path_factory):
    from nilearn.datasets import load_mni152_template

    path = tmp_path_factory.mktemp("mni") / "mni152_t1_1mm.nii.gz"
    template = load_mni152_template(resolution=1)
    nib.Nifti1Image(template.get_fdata(dtype=np.float32), template.affine).to_filename(str(path))
    return str(path)


@pytest.fixture(scope="module")
def deepbet():
    """One transform for all deepbet tests, so the model is loaded once."""
    return SkullStripd(keys="image", backend="deepbet")


def load(path: str, orient: bool = True) -> dict:
    transforms = [LoadImaged("image", image_only=True), EnsureChannelFirstd("image")]
    return Compose(transforms + ([Orientationd("image", axcodes="RAS")] if orient else []))({"image": path})


@pytest.fixture(scope="module")
def mni_result(deepbet, mni_path):
    data = load(mni_path)
    start = time.perf_counter()
    out = deepbet(dict(data))
    seconds = time.perf_counter() - start
    print(f"\ndeepbet on MNI152 1 mm {tuple(data['image'].shape[1:])}, first call (model load + run): {seconds:.1f} s")
    return data, out


def test_deepbet_finds_the_mni_brain(mni_result, deepbet, capfd):
    data, out = mni_result
    brain = data["image"][0].numpy() > 0
    mask = out["mask"][0].numpy()
    assert out["mask"].dtype == torch.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert dice(mask, brain) > 0.9
    # The model is cached, and deepbet prints nothing and shows no progress bar.
    extractor = deepbet._extractor
    capfd.readouterr()
    start = time.perf_counter()
    deepbet(dict(data))
    seconds = time.perf_counter() - start
    captured = capfd.readouterr()
    assert deepbet._extractor is extractor
    assert captured.out == "" and captured.err == ""
    print(f"\ndeepbet on MNI152 1 mm, cached model: {seconds:.1f} s")


def test_deepbet_on_a_non_ras_image_gives_the_same_mask(mni_result, deepbet, tmp_path):
    """An image stored LAS and not reoriented: deepbet still sees RAS and the mask comes back on the LAS grid."""
    data, out = mni_result
    ras = nib.load(data["image"].meta["filename_or_obj"])
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, ras.shape[0] - 1
    nib.Nifti1Image(ras.get_fdata(dtype=np.float32)[::-1], ras.affine @ flip).to_filename(str(tmp_path / "las.nii.gz"))
    flipped = deepbet(load(str(tmp_path / "las.nii.gz"), orient=False))["mask"][0].numpy()
    np.testing.assert_array_equal(flipped[::-1], out["mask"][0].numpy())


def test_deepbet_removes_a_synthetic_skull(mni_result, deepbet):
    """MNI brain + dark CSF gap (0-3 mm), bright skull (3-7 mm), dark layer (7-9 mm), scalp (9-13 mm) with noise."""
    data, _ = mni_result
    image = data["image"]
    x = image[0].numpy()
    brain = x > 0
    distance = ndimage.distance_transform_edt(~brain)  # mm, the template is 1 mm isotropic
    head = x.copy()
    for (inner, outer), value in zip([(0, 3), (3, 7), (7, 9), (9, 13)], [0.05, 0.9, 0.2, 0.7]):
        head[(distance > inner) & (distance <= outer)] = value
    head += 0.02 * np.random.default_rng(0).standard_normal(head.shape).astype(np.float32) * (distance > 0)
    head = np.clip(head, 0, None)
    head_image = MetaTensor(torch.from_numpy(head)[None], meta=dict(image.meta))
    mask = deepbet({"image": head_image})["mask"][0].numpy()
    assert dice(mask, brain) > 0.85
    assert mask[distance > 3].mean() < 0.01  # skull and scalp gone


def test_transform_pickles_without_its_model(mni_result, deepbet):
    clone = pickle.loads(pickle.dumps(deepbet))
    assert clone._extractor is None and clone.backend == "deepbet"

"""Tests of the SynthSeg-style image synthesis on small generated label maps (no external data)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.synthesis import (
    CONTRAST_PRESETS,
    SynthesizeImaged,
    _fold_free,
    _smooth_field,
    load_label_map,
    synthesize,
    tissue_class,
)

SIZE = 48
WM, GM, CSF = (2, 41), (3, 42), (4, 24)
SKULL, SCALP = 507, 509
AFFINE = np.array([[1.0, 0, 0, -24], [0, 1.2, 0, -30], [0, 0, 1.0, -20], [0, 0, 0, 1]])


def phantom() -> np.ndarray:
    """``(48, 48, 48)`` head: nested ellipsoids of scalp, skull, CSF, cortex, white matter and deep structures,
    split into left (low first index) and right hemispheres."""
    i, j, k = np.meshgrid(*[np.arange(SIZE) - (SIZE - 1) / 2] * 3, indexing="ij")
    r = np.sqrt(i**2 + (j / 1.15) ** 2 + (k / 0.9) ** 2)
    left = i < 0
    labels = np.zeros((SIZE,) * 3, dtype=np.int32)
    labels[r < 23] = SCALP
    labels[r < 20.5] = SKULL
    labels[r < 17.5] = 24
    labels[r < 14] = np.where(left, 3, 42)[r < 14]
    labels[r < 10] = np.where(left, 2, 41)[r < 10]
    for label, centre in ((10, (-4, 0, 0)), (49, (4, 0, 0)), (17, (-6, -5, -3)), (53, (6, -5, -3))):
        labels[(i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 < 2.5**2] = label
    labels[r < 2] = 4
    return labels


@pytest.fixture
def label_map() -> MetaTensor:
    return MetaTensor(torch.from_numpy(phantom())[None], affine=torch.from_numpy(AFFINE), meta={"name": "phantom"})


def region_mean(out: dict, labels: tuple[int, ...]) -> float:
    return float(out["image"][torch.isin(out["label"], torch.tensor(labels))].mean())


@pytest.mark.parametrize("skull", [False, True])
def test_outputs_keep_grid_affine_and_range(label_map, skull):
    out = synthesize(label_map, "random", seed=0, skull=skull, resolution_probability=1.0)
    for key in ("image", "label", "mask"):
        assert isinstance(out[key], MetaTensor) and out[key].shape == label_map.shape
        assert torch.equal(out[key].affine, label_map.affine) and out[key].meta["name"] == "phantom"
    assert out["image"].dtype == out["mask"].dtype == torch.float32 and out["label"].dtype == label_map.dtype
    assert out["image"].min() >= 0 and out["image"].max() <= 1 and out["image"].max() > 0.5


def test_plain_tensor_is_taken_as_1mm(label_map):
    out = synthesize(label_map.as_tensor(), "T1", seed=0)
    assert out["image"].shape == label_map.shape and out["image"].dtype == torch.float32


@pytest.mark.parametrize("seed", range(3))
def test_preset_contrasts_order_tissues(label_map, seed):
    t1 = synthesize(label_map, "T1", seed=seed)
    assert region_mean(t1, WM) > region_mean(t1, GM) > region_mean(t1, CSF)
    t2 = synthesize(label_map, "T2", seed=seed)
    # CSF against GM is not asserted: the phantom's thin CSF shell is blurred with the black background around it
    assert region_mean(t2, CSF) > region_mean(t2, WM) and region_mean(t2, GM) > region_mean(t2, WM)


def test_brain_only_is_zero_outside_brain(label_map):
    out = synthesize(label_map, "random", seed=1, skull=False)
    outside = out["mask"] == 0
    assert torch.all(out["image"][outside] == 0)
    assert not torch.isin(out["label"], torch.tensor([SKULL, SCALP])).any()
    assert (out["image"][~outside] > 0).float().mean() > 0.9


def test_skull_mode_shows_the_skull(label_map):
    out = synthesize(label_map, "T1", seed=2, skull=True)
    skull = out["label"] == SKULL
    assert skull.any() and out["image"][skull].mean() > 0.05


@pytest.mark.parametrize("contrast", ["T2", "random"])
def test_extra_cerebral_tissue_can_look_like_the_outer_csf(label_map, contrast):
    exact = dict(label_std_range=(0.0, 0.0), preset_jitter=0.0, blur_sigma_range=(0.0, 0.0), bias_std=0.0)
    exact.update(resolution_probability=0.0, noise_std_range=(0.0, 0.0))
    merged = synthesize(label_map, contrast, seed=4, skull=True, extra_cerebral_csf_probability=1.0, **exact)
    apart = synthesize(label_map, contrast, seed=4, skull=True, **exact)
    for out, same in ((merged, True), (apart, False)):
        outer_csf, extra = (out["image"][out["label"] == label] for label in (24, SKULL))
        assert torch.allclose(outer_csf, extra.mean()) == same


@pytest.mark.parametrize("skull", [False, True])
def test_mask_is_brain_labels(label_map, skull):
    out = synthesize(label_map, "PD", seed=3, skull=skull)
    expected = ((out["label"] >= 1) & (out["label"] <= 499)).float()
    assert torch.equal(out["mask"].as_tensor(), expected.as_tensor())


def test_same_seed_same_image_other_seed_differs(label_map):
    first = synthesize(label_map, ["T1", "random"], seed=7, skull=True, resolution_probability=0.5)
    again = synthesize(label_map, ["T1", "random"], seed=7, skull=True, resolution_probability=0.5)
    other = synthesize(label_map, ["T1", "random"], seed=8, skull=True, resolution_probability=0.5)
    for key in ("image", "label", "mask"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other["image"])
    assert not torch.equal(first["label"], other["label"])


def test_transform_draws_anew_at_each_call(label_map):
    transform = SynthesizeImaged(skull_probability=1.0)
    transform.set_random_state(0)
    first, second = transform({"label": label_map}), transform({"label": label_map})
    assert not torch.equal(first["image"], second["image"])


@pytest.mark.parametrize("seed", range(3))
def test_deformation_keeps_labels_and_brain_volume(label_map, seed):
    out = synthesize(label_map, "random", seed=seed, skull=True, deform_std=4.0, deform_grid=(4, 4))
    assert set(out["label"].unique().tolist()) == set(label_map.unique().tolist())
    volume = ((label_map >= 1) & (label_map <= 499)).sum()
    assert abs(float(out["mask"].sum() / volume) - 1) < 0.15


def test_deformation_does_not_fold():
    generator = torch.Generator().manual_seed(0)
    shape = (40, 32, 24)
    # far too strong on purpose: the control values alone would fold the field many times over
    field = _smooth_field(_fold_free(20 * torch.randn(3, 6, 6, 6, generator=generator), shape), shape)
    jacobian = torch.stack([torch.stack(torch.gradient(field[c]), dim=-1) for c in range(3)], dim=-2)
    assert torch.linalg.det(jacobian + torch.eye(3)).min() > 0


def test_contrast_choice_and_validation(label_map):
    assert set(CONTRAST_PRESETS) == {"T1", "T2", "PD"}
    with pytest.raises(ValueError):
        SynthesizeImaged(contrast="FLAIR")
    out = synthesize(label_map, ["T2", "PD"], seed=0)
    assert out["image"].max() > 0


def test_tissue_classes():
    assert tissue_class(2) == tissue_class(7) == "wm"
    assert tissue_class(24) == tissue_class(4) == "csf"
    assert tissue_class(42) == "cortex" and tissue_class(163) == "cortex"
    assert tissue_class(507) == tissue_class(530) == "extra_cerebral"


def test_load_label_map_reorients_and_resamples(tmp_path):
    labels = np.zeros((20, 16, 12), dtype=np.float32)
    labels[2:6, 4:8, 3:5] = 17
    # an LIA-like header: array axes run left, inferior, anterior
    affine = np.array([[-1.0, 0, 0, 10], [0, 0, 1, -6], [0, -1, 0, 8], [0, 0, 0, 1]])
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), path)

    def world_centre(label_map):
        index = torch.nonzero(label_map[0] == 17).double().mean(0)
        return label_map.affine[:3, :3] @ index + label_map.affine[:3, 3]

    native = load_label_map(str(path))
    assert native.shape == (1, 20, 12, 16) and native.dtype == torch.int32
    assert nib.aff2axcodes(native.affine.numpy()) == ("R", "A", "S")
    expected = torch.from_numpy(affine[:3, :3] @ np.array([3.5, 5.5, 3.5]) + affine[:3, 3])
    assert torch.allclose(world_centre(native), expected)

    coarse = load_label_map(str(path), spacing=2.0)
    assert torch.allclose(coarse.pixdim, torch.full((3,), 2.0, dtype=torch.float64))
    assert set(coarse.unique().tolist()) == {0, 17}
    assert torch.allclose(world_centre(coarse), expected, atol=1.0)

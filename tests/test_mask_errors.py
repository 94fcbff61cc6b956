"""Skull stripping with a brain extractor's errors (scripts/mask_errors.py): where the moved surface lies, what the
image keeps, and that the draws are reproducible."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from scripts.mask_errors import RandBrainMaskErrord

SPACING_MM = 2.0


def ball_head(radius_vox: float = 12.0, size: int = 40):
    """A whole 'head' ``(1, S, S, S)`` at 2 mm: brain (intensity 0.5) inside a ball of radius_vox, 'skull' (0.9)
    everywhere else, and the exact brain mask."""
    axes = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    radius = torch.sqrt(sum(g**2 for g in torch.meshgrid(axes, axes, axes, indexing="ij")))
    brain = (radius <= radius_vox).float()[None]
    affine = torch.diag(torch.tensor([SPACING_MM, SPACING_MM, SPACING_MM, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.where(brain > 0, 0.5, 0.9), affine=affine)
    return {"image": image, "mask": MetaTensor(brain, affine=affine)}, radius


def extracted(offset_mm: float, variation_mm: float = 0.0, seed: int = 0):
    data, radius = ball_head()
    transform = RandBrainMaskErrord(
        keys="image", prob=1.0, offset_range_mm=(offset_mm, offset_mm), variation_mm=variation_mm
    )
    transform.set_random_state(seed)
    return data, transform(data), radius


@pytest.mark.parametrize("offset_mm", [-4.0, 0.0, 6.0])
def test_a_constant_offset_moves_the_brain_surface_by_that_many_millimetres(offset_mm):
    data, out, radius = extracted(offset_mm)
    mask = out["mask"][0] > 0.5
    # the new surface: the ball's radius (12 voxels, half a voxel beyond the last brain voxel centre) plus the offset
    surface_vox = 12.5 + offset_mm / SPACING_MM
    assert bool(mask[radius < surface_vox - 1].all())
    assert not bool(mask[radius > surface_vox + 1].any())


def test_the_image_is_cut_to_the_new_mask_and_a_loose_mask_brings_skull_back():
    data, out, radius = extracted(6.0)
    mask = out["mask"][0] > 0.5
    image = out["image"][0]
    assert bool((image[~mask] == 0).all())
    assert torch.equal(image[mask], data["image"][0][mask])
    # the loose mask keeps a shell of skull (0.9) around the brain
    assert int((image == 0.9).sum()) > 0.1 * int((data["mask"][0] > 0.5).sum())
    assert isinstance(out["mask"], MetaTensor) and torch.equal(out["mask"].affine, data["mask"].affine)


def test_a_tight_mask_cuts_brain_off():
    data, out, _ = extracted(-4.0)
    kept = float(out["mask"].sum() / data["mask"].sum())
    # a ball of 12.5 voxels shrunk by 2 voxels keeps about (10.5 / 12.5)^3 = 0.59 of its volume (less on the lattice)
    assert 0.45 < kept < 0.65
    assert bool((out["image"][0][out["mask"][0] > 0.5] == 0.5).all())


def test_the_variation_makes_the_error_uneven_and_a_seed_repeats_it():
    _, exact, radius = extracted(0.0)
    _, first, _ = extracted(0.0, variation_mm=4.0, seed=4)
    _, again, _ = extracted(0.0, variation_mm=4.0, seed=4)
    _, other, _ = extracted(0.0, variation_mm=4.0, seed=2)
    assert torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["mask"], other["mask"])
    mask = first["mask"][0] > 0.5
    # the surface is no longer a sphere: in places it lies a voxel beyond the exact one, elsewhere a voxel inside it
    assert float(radius[mask].max()) > 13.0 and float(radius[~mask].min()) < 11.0
    assert float((first["mask"] != exact["mask"]).sum() / exact["mask"].sum()) > 0.05


def test_without_the_draw_nothing_changes():
    data, _ = ball_head()
    transform = RandBrainMaskErrord(keys="image", prob=0.0)
    out = transform(data)
    assert out["image"] is data["image"] and out["mask"] is data["mask"]


@pytest.mark.parametrize("settings", [{"offset_range_mm": (-12.0, 2.0)}, {"variation_mm": -1.0}])
def test_settings_beyond_the_signed_distance_are_refused(settings):
    with pytest.raises(ValueError):
        RandBrainMaskErrord(keys="image", **settings)


def test_the_training_pairs_carry_the_extracted_masks():
    """SyntheticPairDataset applies the errors before framing: a head stripped with a loose mask keeps image outside
    the brain label, and the framed mask is the extracted one."""
    from scripts.brain_frame import BrainFramed
    from scripts.random_motions import RandWorldAffined
    from scripts.synthesis import SynthesizeImaged
    from scripts.training_data import SyntheticPairDataset

    labels = np.zeros((48, 48, 48), dtype=np.int32)
    grid = np.indices(labels.shape) - 23.5
    radius = np.sqrt((grid**2).sum(0))
    labels[radius < 22] = 500  # scalp
    labels[radius < 16] = 3  # cortex
    labels[radius < 10] = 2  # white matter
    path_labels = MetaTensor(torch.from_numpy(labels)[None], affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    dataset = SyntheticPairDataset(
        ["unused"],
        length=2,
        synthesis=SynthesizeImaged(contrast="T1", skull_probability=1.0, deform_std=0.0),
        augmentation=RandWorldAffined(keys=["image", "label", "mask"], rotate_range=0.0),
        frame=BrainFramed(keys="image", mask_key="mask", label_keys="label", spatial_size=48, spacing=2.0),
        mask_errors=RandBrainMaskErrord(keys="image", prob=1.0, offset_range_mm=(6.0, 6.0), variation_mm=0.0),
    )
    dataset._cache[0] = path_labels
    dataset.set_random_state(0)
    item = dataset[0]["fixed"]
    brain_label = (item["label"][0] > 0) & (item["label"][0] < 500)
    mask = item["mask"][0] > 0.5
    # the extracted mask reaches about 3 voxels (6 mm) beyond the brain label, and the image is cut to it
    assert int(mask.sum()) > 1.3 * int(brain_label.sum())
    # beyond the framing's interpolation reach (2 voxels) of the extracted mask the image is cut
    reach = torch.from_numpy(ndimage.binary_dilation(mask.numpy(), iterations=2))
    assert bool((item["image"][0][~reach] < 0.01).all())
    assert float(item["image"][0][mask & ~brain_label].mean()) > 0.05

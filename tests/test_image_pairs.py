"""Pairs of real images (:class:`scripts.image_pairs.ImagePairDataset`) on an IXI-layout set written by
:mod:`scripts.make_test_set` from small generated heads: the pair format, the true transform of same-subject pairs,
the drawing, the cache and the sources of :func:`scripts.training_data.make_pair_dataset`."""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from synthetic_heads import label_agreement, make_ixi_test_set

import scripts.image_io
from scripts.brain_frame import BrainFramed
from scripts.datalists import ixi_datalist
from scripts.errors import KeyMorphInputError
from scripts.image_pairs import CROP_MARGIN, ImagePairDataset, load_label_on_grid
from scripts.random_motions import RandWorldAffined
from scripts.synthesis import SynthesizeImaged
from scripts.training_data import SyntheticPairDataset, make_pair_dataset, true_fixed_to_moving

SIZE = 48  # network grid of the tests: 48^3 voxels of 2 mm, room for the 2 mm phantom brains turned any way


def augmentation() -> RandWorldAffined:
    return RandWorldAffined(keys=["image", "label", "mask"])


def frame() -> BrainFramed:
    return BrainFramed(keys="image", mask_key="mask", label_keys="label", spatial_size=SIZE, spacing=2.0)


@pytest.fixture(scope="module")
def ixi_set(tmp_path_factory) -> str:
    return make_ixi_test_set(str(tmp_path_factory.mktemp("ixi_pairs")))


@pytest.fixture(scope="module")
def dataset(ixi_set) -> ImagePairDataset:
    return ImagePairDataset(ixi_datalist(ixi_set), 4, augmentation(), frame(), same_subject_probability=1.0)


def structure(value):
    """What the pair format fixes about a value: its type and, for tensors, dtype and shape (recursively)."""
    if isinstance(value, dict):
        return {key: structure(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return type(value).__name__, value.dtype, tuple(value.shape)
    return type(value).__name__


def test_pairs_have_the_synthetic_format(dataset, ixi_set):
    synthetic = SyntheticPairDataset(
        [os.path.join(os.path.dirname(ixi_set), "label_maps", "training_seg_01.nii.gz")],
        1,
        SynthesizeImaged(contrast="T1"),
        augmentation(),
        frame(),
    )
    synthetic.set_random_state(0)
    dataset.set_random_state(0)
    expected, pair = synthetic[0], dataset[0]
    assert structure(pair) == structure(expected)
    for item in (pair["fixed"], pair["moving"]):
        for key in ("image", "mask", "label"):
            # every image of an item lies on the item's one network grid
            assert torch.equal(item[key].affine, item["image"].affine)
        assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
        assert item["modality"] in ("T1", "T2", "PD")
    assert pair["fixed"]["modality"] != pair["moving"]["modality"]


def test_same_subject_pairs_know_their_true_transform(dataset):
    """The true fixed-to-moving matrix maps the fixed brain onto the same labels in the moving image.

    Both images were resampled by nearest neighbour three times (written file, network grid, look-up), which moves
    every label boundary by up to half a 2 mm voxel each time, so the voxels next to a boundary may legitimately
    disagree (about 1 in 6 for these small heads); the ones away from boundaries must agree. Leaving out the
    datalist's transforms (only the augmentations') must fail.
    """
    dataset.set_random_state(1)
    for _ in range(3):
        fixed, moving, same = dataset.draw_indices()
        pair = {"fixed": dataset.make_item(fixed), "moving": dataset.make_item(moving), "same_subject": same}
        assert same and dataset.datalist[fixed]["subject"] == dataset.datalist[moving]["subject"]
        grids = [(pair[key]["label"][0].numpy(), pair[key]["image"].affine.numpy()) for key in ("fixed", "moving")]
        truth = true_fixed_to_moving(pair)
        overall, interior = label_agreement(*grids[0], *grids[1], truth.numpy())
        assert interior >= 0.95 and overall >= 0.75, (overall, interior)
        augmentations_only = [
            pair[key]["world_transform"] @ torch.linalg.inv(dataset.world[index])
            for key, index in (("moving", moving), ("fixed", fixed))
        ]
        wrong = augmentations_only[0] @ torch.linalg.inv(augmentations_only[1])
        assert label_agreement(*grids[0], *grids[1], wrong.numpy())[1] < 0.5


def test_drawing_subjects_and_modalities(dataset):
    datalist = dataset.datalist
    dataset.set_random_state(0)
    for probability, expected in ((1.0, True), (0.0, False)):
        dataset.same_subject_probability = probability
        draws = [dataset.draw_indices() for _ in range(200)]
        assert all(same == expected for _, _, same in draws)
        assert all((datalist[f]["subject"] == datalist[m]["subject"]) == expected for f, m, _ in draws)
        if expected:  # two modalities of one subject
            assert all(datalist[f]["modality"] != datalist[m]["modality"] for f, m, _ in draws)
        pairs = {(datalist[f]["modality"], datalist[m]["modality"]) for f, m, _ in draws}
        assert len(pairs) == (6 if expected else 9)  # every ordered modality pair occurs
    dataset.same_subject_probability = 1.0
    dataset.set_random_state(5)
    first = [dataset.draw_indices() for _ in range(20)]
    dataset.set_random_state(5)
    assert [dataset.draw_indices() for _ in range(20)] == first


def test_cache_reads_each_file_once_and_keeps_a_small_brain_grid(ixi_set, monkeypatch):
    reads, load_volume = [], scripts.image_io.load_volume

    def counting(path, *args, **kwargs):
        reads.append(os.path.basename(os.path.dirname(path)))
        return load_volume(path, *args, **kwargs)

    monkeypatch.setattr(scripts.image_io, "load_volume", counting)  # images, label maps and masks all read through it
    datalist = [item for item in ixi_datalist(ixi_set) if item["subject"] == "IXI002"]
    dataset = ImagePairDataset(datalist, 3, augmentation(), frame(), spacing=3.0)
    files = sorted(f"IXI-{m}{part}" for m in ("T1", "T2", "PD") for part in ("", "-labels", "-masks"))
    assert sorted(reads) == files
    for index in range(len(dataset)):
        dataset[index]
    assert len(reads) == len(files)  # the draws used the cache
    for kept in dataset.cache:
        assert set(kept) == {"image", "mask", "label"}
        assert kept["image"].dtype == torch.float32 and kept["mask"].dtype == torch.uint8
        assert kept["label"].dtype == torch.int32
        np.testing.assert_allclose(kept["image"].pixdim.numpy(), 3.0)
        # cropped to the brain, with at most CROP_MARGIN voxels of air on each side
        brain = kept["mask"][0].nonzero()
        extent = brain.max(0).values - brain.min(0).values + 1
        assert all(size <= brain_size + 2 * CROP_MARGIN for size, brain_size in zip(kept["mask"].shape[1:], extent))


def test_images_without_labels_or_masks(ixi_set, tmp_path):
    """A CSV of brain-extracted images only: items have no label, the brain is where the image is not 0."""
    rows = [["image", "modality", "subject"]]
    rows += [[os.path.join(ixi_set, f"IXI-{m}", f"IXI003-Synth-0003-{m}.nii.gz"), m, "three"] for m in ("T1", "PD")]
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    dataset = make_pair_dataset(
        str(tmp_path / "list.csv"), "train", 1, None, augmentation(), frame(), spacing=None, skull_strip="none"
    )
    assert isinstance(dataset, ImagePairDataset) and "label" not in dataset.cache[0]
    mask_file = nib.load(os.path.join(ixi_set, "IXI-T1-masks", "IXI003-Synth-0003-T1.nii.gz"))
    assert dataset.cache[0]["mask"].sum() == np.asarray(mask_file.dataobj).sum()  # native grid, same brain
    pair = dataset[0]
    assert set(pair["fixed"]) == {"image", "mask", "world_transform", "modality"} and pair["same_subject"]


def test_label_on_another_grid_is_brought_onto_the_image_grid(ixi_set, tmp_path):
    label_path = os.path.join(ixi_set, "IXI-T2-labels", "IXI001-Synth-0001-T2.nii.gz")
    original = nib.load(label_path)
    image = MetaTensor(torch.zeros((1, *original.shape)), affine=torch.as_tensor(original.affine))
    turned = original.as_reoriented(nib.orientations.axcodes2ornt(("L", "I", "A")))
    nib.save(turned, tmp_path / "turned.nii.gz")
    label = load_label_on_grid(str(tmp_path / "turned.nii.gz"), image)
    assert label.dtype == torch.int32 and torch.equal(label.affine, image.affine)
    assert np.array_equal(label[0].numpy(), np.asarray(original.dataobj))
    with pytest.raises(KeyMorphInputError, match="missing.nii.gz: file not found"):
        load_label_on_grid(str(tmp_path / "missing.nii.gz"), image)


def test_make_pair_dataset_sources_and_splits(ixi_set, tmp_path):
    arguments = dict(length=2, synthesis=SynthesizeImaged(), augmentation=augmentation(), frame=frame())
    train = make_pair_dataset(ixi_set, "train", exclude=["IXI001", "IXI002"], **arguments)
    assert {item["subject"] for item in train.datalist} == {"IXI003"}
    validation = make_pair_dataset(ixi_set, "validation", include=["IXI002"], **arguments)
    assert {item["subject"] for item in validation.datalist} == {"IXI002"}
    with pytest.raises(KeyMorphInputError, match="no images of the validation subjects"):
        make_pair_dataset(ixi_set, "validation", include=["training_seg_12"], **arguments)
    rows = [["image", "modality", "subject", "split"]]
    for subject, split in ((1, "test"), (3, "validation")):
        rows += [
            [
                os.path.join(ixi_set, f"IXI-{m}", f"IXI{subject:03d}-Synth-{subject:04d}-{m}.nii.gz"),
                m,
                str(subject),
                split,
            ]
            for m in ("T1", "T2")
        ]
    with open(tmp_path / "split.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    # the split column decides, whatever the held-out names say
    chosen = make_pair_dataset(
        str(tmp_path / "split.csv"), "validation", include=["1"], skull_strip="none", **arguments
    )
    assert [item["subject"] for item in chosen.datalist] == ["3", "3"]
    label_maps = make_pair_dataset(os.path.join(os.path.dirname(ixi_set), "label_maps"), "train", **arguments)
    assert isinstance(label_maps, SyntheticPairDataset)
    with pytest.raises(KeyMorphInputError, match="holds nothing usable"):
        make_pair_dataset(str(tmp_path), "train", **arguments)

"""The IXI-layout synthetic test set (:mod:`scripts.make_test_set`) and the datalists of real images
(:mod:`scripts.datalists`), on small generated heads (:mod:`tests.synthetic_heads`, 2 mm)."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from synthetic_heads import BRAIN, HEAD, label_agreement, make_ixi_test_set, write_label_maps_dir

from scripts.datalists import (
    TRANSFORM_COLUMNS,
    csv_datalist,
    detect_source,
    ixi_datalist,
    read_transforms_csv,
    select_subjects,
)
from scripts.errors import KeyMorphInputError
from scripts.make_test_set import main, make_test_set, subject_numbers

MODALITIES = ("T1", "T2", "PD")


@pytest.fixture(scope="module")
def ixi_set(tmp_path_factory) -> str:
    return make_ixi_test_set(str(tmp_path_factory.mktemp("ixi_set")))


def name(subject: int, modality: str) -> str:
    return f"IXI{subject:03d}-Synth-{subject:04d}-{modality}.nii.gz"


def read(path: str) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def test_test_set_layout_headers_and_contents(ixi_set):
    for subject in (1, 2, 3):
        for modality in MODALITIES:
            image, affine = read(os.path.join(ixi_set, f"IXI-{modality}", name(subject, modality)))
            labels, label_affine = read(os.path.join(ixi_set, f"IXI-{modality}-labels", name(subject, modality)))
            mask, mask_affine = read(os.path.join(ixi_set, f"IXI-{modality}-masks", name(subject, modality)))
            # a plain axis-aligned RAS header at the requested spacing, shared by the three files
            np.testing.assert_allclose(affine[:3, :3], 2.0 * np.eye(3))
            assert np.array_equal(affine, label_affine) and np.array_equal(affine, mask_affine)
            assert image.shape == labels.shape == mask.shape and max(image.shape) <= 64
            assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
            assert np.issubdtype(labels.dtype, np.integer) and set(np.unique(labels)) <= {0, *BRAIN}
            assert np.array_equal(mask, (labels > 0) & (labels < 500))
            # brain-only by default: the image is dark outside the brain and bright inside
            assert image[mask == 0].max() == 0 and image[mask > 0].mean() > 0.2
    with open(os.path.join(ixi_set, "transforms.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == TRANSFORM_COLUMNS and len(rows) == 10
    assert {row[0] for row in rows[1:]} == {f"IXI-{m}/{name(s, m)}" for s in (1, 2, 3) for m in MODALITIES}


def test_test_set_transforms_are_the_truth(ixi_set):
    """Two label files of one subject, related by ``T_b inv(T_a)``, show the same anatomy."""
    matrices = read_transforms_csv(os.path.join(ixi_set, "transforms.csv"))
    for subject in (1, 2, 3):
        for a, b in (("T1", "T2"), ("T1", "PD"), ("PD", "T2")):
            fixed, fixed_affine = read(os.path.join(ixi_set, f"IXI-{a}-labels", name(subject, a)))
            moving, moving_affine = read(os.path.join(ixi_set, f"IXI-{b}-labels", name(subject, b)))
            truth = matrices[f"IXI-{b}/{name(subject, b)}"] @ torch.linalg.inv(matrices[f"IXI-{a}/{name(subject, a)}"])
            overall, interior = label_agreement(fixed, fixed_affine, moving, moving_affine, truth.numpy())
            assert interior >= 0.95 and overall >= 0.8, (subject, a, b, overall, interior)
            # and the images really are turned against each other, not merely re-headed
            angle = math.degrees(math.acos(np.clip((np.trace(truth[:3, :3].numpy()) - 1) / 2, -1, 1)))
            assert angle > 5


def test_a_subject_does_not_depend_on_the_others(ixi_set, tmp_path):
    alone = str(tmp_path / "alone")
    transforms = make_test_set(os.path.join(os.path.dirname(ixi_set), "label_maps"), alone, ["seg_02"], spacing=2.0)
    assert set(transforms) == {f"IXI-{m}/{name(2, m)}" for m in MODALITIES}
    everything = read_transforms_csv(os.path.join(ixi_set, "transforms.csv"))
    for modality in MODALITIES:
        assert torch.equal(
            transforms[f"IXI-{modality}/{name(2, modality)}"], everything[f"IXI-{modality}/{name(2, modality)}"]
        )
        first, _ = read(os.path.join(alone, f"IXI-{modality}", name(2, modality)))
        again, _ = read(os.path.join(ixi_set, f"IXI-{modality}", name(2, modality)))
        assert np.array_equal(first, again)
    # a second run into the same folder adds its subject to transforms.csv
    make_test_set(os.path.join(os.path.dirname(ixi_set), "label_maps"), alone, ["seg_03"], spacing=2.0)
    assert set(read_transforms_csv(os.path.join(alone, "transforms.csv"))) == {
        f"IXI-{m}/{name(s, m)}" for s in (2, 3) for m in MODALITIES
    }


def test_command_line_with_skull_and_errors(tmp_path, capsys):
    label_maps = write_label_maps_dir(str(tmp_path / "label_maps"), (5,))
    output_dir = str(tmp_path / "out")
    main(["--label_maps_dir", label_maps, "--output_dir", output_dir, "--spacing", "2", "--skull", "true"])
    labels, _ = read(os.path.join(output_dir, "IXI-T2-labels", name(5, "T2")))
    mask, _ = read(os.path.join(output_dir, "IXI-T2-masks", name(5, "T2")))
    image, _ = read(os.path.join(output_dir, "IXI-T2", name(5, "T2")))
    assert set(HEAD) <= set(np.unique(labels)) and np.array_equal(mask, (labels > 0) & (labels < 500))
    assert image[labels >= 500].mean() > 0.05  # the head shows
    assert capsys.readouterr().out.strip() == output_dir
    for argv, message in (
        (["--subjects", "seg_99"], "no label map named like subject 'seg_99'"),
        (["--spacing", "1", "2"], "--spacing needs one or three positive values"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--label_maps_dir", label_maps, "--output_dir", output_dir, *argv])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1
    with pytest.raises(KeyMorphInputError, match="inside the label maps folder"):
        make_test_set(label_maps, os.path.join(label_maps, "ixi"))


def test_subject_numbers():
    assert subject_numbers(["a/training_seg_13.nii.gz", "a/training_seg_02.nii.gz"]) == [13, 2]
    # digits that are missing, repeated or too large for IXI's three: numbered in order instead
    assert subject_numbers(["a/left.nii.gz", "a/right.nii.gz"]) == [1, 2]
    assert subject_numbers(["a/s1_v2.nii", "b/t2_v2.nii"]) == [1, 2]
    assert subject_numbers(["a/sub1234.nii"]) == [1]


def test_ixi_datalist_contents(ixi_set):
    datalist = ixi_datalist(ixi_set)
    assert [(item["subject"], item["modality"]) for item in datalist] == [
        (f"IXI{s:03d}", m) for s in (1, 2, 3) for m in MODALITIES
    ]
    matrices = read_transforms_csv(os.path.join(ixi_set, "transforms.csv"))
    for item in datalist:
        file_name = os.path.basename(item["image"])
        assert set(item) == {"image", "modality", "subject", "label", "mask", "world_transform"}
        assert item["image"] == os.path.join(ixi_set, f"IXI-{item['modality']}", file_name)
        assert item["label"] == os.path.join(ixi_set, f"IXI-{item['modality']}-labels", file_name)
        assert item["mask"] == os.path.join(ixi_set, f"IXI-{item['modality']}-masks", file_name)
        assert item["world_transform"].dtype == torch.float64 and item["world_transform"].shape == (4, 4)
        assert torch.equal(item["world_transform"], matrices[f"IXI-{item['modality']}/{file_name}"])


def test_ixi_datalist_optional_parts_and_real_names(ixi_set, tmp_path):
    """Real IXI names (other sites, .nii) without labels, masks or transforms; other folders are ignored."""
    for folder in ("IXI-T1", "IXI-PD", "IXI-MRA"):
        os.makedirs(tmp_path / folder)
    shutil.copy(os.path.join(ixi_set, "IXI-T1", name(1, "T1")), tmp_path / "IXI-T1" / "IXI002-Guys-0828-T1.nii.gz")
    shutil.copy(os.path.join(ixi_set, "IXI-PD", name(1, "PD")), tmp_path / "IXI-PD" / "IXI012-HH-1211-PD.nii.gz")
    (tmp_path / "IXI-T1" / "IXI013-IOP-0001-T1.nii").write_bytes(b"")
    (tmp_path / "IXI-T1" / "notes.txt").write_text("not an image")
    (tmp_path / "IXI-MRA" / "IXI002-Guys-0828-MRA.nii.gz").write_bytes(b"")
    datalist = ixi_datalist(str(tmp_path))
    assert [(item["subject"], item["modality"]) for item in datalist] == [
        ("IXI002", "T1"),
        ("IXI012", "PD"),
        ("IXI013", "T1"),
    ]
    assert all(set(item) == {"image", "modality", "subject"} for item in datalist)


@pytest.mark.parametrize(
    "folder, file_name",
    [("IXI-T1", "IXI002-Guys-T1.nii.gz"), ("IXI-T1", "sub-01_T1w.nii.gz"), ("IXI-T2", "IXI002-Guys-0828-PD.nii.gz")],
)
def test_ixi_datalist_rejects_malformed_names(tmp_path, folder, file_name):
    os.makedirs(tmp_path / folder)
    (tmp_path / folder / file_name).write_bytes(b"")
    with pytest.raises(KeyMorphInputError, match=f"{file_name}: not an IXI file name") as error:
        ixi_datalist(str(tmp_path))
    assert "\n" not in str(error.value)


def test_ixi_datalist_errors(tmp_path, ixi_set):
    os.makedirs(tmp_path / "IXI-T2")
    with pytest.raises(KeyMorphInputError, match="no IXI images"):
        ixi_datalist(str(tmp_path))
    shutil.copy(os.path.join(ixi_set, "IXI-T2", name(1, "T2")), tmp_path / "IXI-T2")
    path = tmp_path / "transforms.csv"
    good = ",".join(["1", "0", "0", "0"] + ["0", "1", "0", "0"] + ["0", "0", "1", "0"] + ["0", "0", "0", "1"])
    for rows, message in (
        ("image,m00\nIXI-T2/x.nii.gz,1\n", "missing columns m01"),
        (f"image,{','.join(TRANSFORM_COLUMNS[1:])}\nIXI-T2/x.nii.gz,{good.replace('1', 'one', 1)}\n", "line 2"),
        (f"image,{','.join(TRANSFORM_COLUMNS[1:])}\nIXI-T2/x.nii.gz,{good}\nIXI-T2/y.nii.gz,{'0,' * 15}1\n", "line 3"),
    ):
        path.write_text(rows)
        with pytest.raises(KeyMorphInputError, match=message):
            ixi_datalist(str(tmp_path))


def write_csv(path, rows: list[list[str]]) -> str:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return str(path)


@pytest.fixture
def csv_files(tmp_path) -> dict[str, str]:
    """Empty stand-ins for the files a CSV names (the datalist only checks that they exist)."""
    os.makedirs(tmp_path / "images")
    files = {}
    for file_name in ("a_t1.nii.gz", "a_t2.nii.gz", "b_t1.nii.gz", "a_t1_seg.nii.gz", "a_t1_mask.nii.gz"):
        (tmp_path / "images" / file_name).write_bytes(b"")
        files[file_name] = str(tmp_path / "images" / file_name)
    return files


def test_csv_datalist(tmp_path, csv_files):
    path = write_csv(
        tmp_path / "list.csv",
        [
            ["image", "modality", "subject", "label", "mask", "split"],
            ["images/a_t1.nii.gz", "T1", "a", "images/a_t1_seg.nii.gz", "images/a_t1_mask.nii.gz", "train"],
            ["images/a_t2.nii.gz", "FLAIR", "a", "", "", "validation"],
            [csv_files["b_t1.nii.gz"], "T1", "b", "", "", "test"],
        ],
    )
    assert csv_datalist(path) == [
        {
            "image": csv_files["a_t1.nii.gz"],
            "modality": "T1",
            "subject": "a",
            "label": csv_files["a_t1_seg.nii.gz"],
            "mask": csv_files["a_t1_mask.nii.gz"],
            "split": "train",
        },
        {"image": csv_files["a_t2.nii.gz"], "modality": "FLAIR", "subject": "a", "split": "validation"},
        {"image": csv_files["b_t1.nii.gz"], "modality": "T1", "subject": "b", "split": "test"},
    ]
    minimal = write_csv(tmp_path / "minimal.csv", [["subject", "image", "modality"], ["b", "images/b_t1.nii.gz", "T1"]])
    assert csv_datalist(minimal) == [{"image": csv_files["b_t1.nii.gz"], "modality": "T1", "subject": "b"}]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["image", "subject"], ["images/a_t1.nii.gz", "a"]], "missing columns modality"),
        ([["image", "modality", "subject"], ["images/a_t1.nii.gz", "", "a"]], "line 2: empty modality"),
        ([["image", "modality", "subject"], ["images/gone.nii.gz", "T1", "a"]], "line 2: image file .*gone.nii.gz"),
        (
            [["image", "modality", "subject", "mask"], ["images/a_t1.nii.gz", "T1", "a", "nope.nii.gz"]],
            "line 2: mask file .*nope.nii.gz not found",
        ),
        (
            [["image", "modality", "subject", "split"], ["images/a_t1.nii.gz", "T1", "a", "training"]],
            "line 2: split 'training' is not one of train, validation, test",
        ),
        (
            [
                ["image", "modality", "subject", "split"],
                ["images/a_t1.nii.gz", "T1", "a", "train"],
                ["images/a_t2.nii.gz", "T2", "a", ""],
            ],
            "line 3: split ''",
        ),
        ([["image", "modality", "subject"]], "has no rows"),
    ],
)
def test_csv_datalist_errors(tmp_path, csv_files, rows, message):
    path = write_csv(tmp_path / "list.csv", rows)
    with pytest.raises(KeyMorphInputError, match=message) as error:
        csv_datalist(path)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)
    with pytest.raises(KeyMorphInputError, match="datalist CSV not found"):
        csv_datalist(str(tmp_path / "missing.csv"))


def test_detect_source(tmp_path, ixi_set):
    assert detect_source(ixi_set) == "ixi"
    assert detect_source(os.path.join(os.path.dirname(ixi_set), "label_maps")) == "label_maps"
    listing = write_csv(tmp_path / "List.CSV", [["image", "modality", "subject"]])
    assert detect_source(listing) == "csv"
    (tmp_path / "notes.txt").write_text("x")
    for path in (str(tmp_path), str(tmp_path / "notes.txt")):
        with pytest.raises(KeyMorphInputError) as error:
            detect_source(path)
        assert str(error.value).startswith(f"{path}: holds nothing usable: expected a CSV datalist")
        assert "\n" not in str(error.value)
    with pytest.raises(KeyMorphInputError, match="not found"):
        detect_source(str(tmp_path / "missing"))


def test_select_subjects(caplog):
    datalist = [
        {"image": f"{s}-{m}", "modality": m, "subject": s} for s in ("IXI002", "IXI012", "IXI013") for m in ("T1", "T2")
    ]
    subjects = lambda items: sorted({item["subject"] for item in items})  # noqa: E731
    assert subjects(select_subjects(datalist, "train", exclude=["IXI012", "IXI013"])) == ["IXI002"]
    assert subjects(select_subjects(datalist, "validation", include=["IXI012"])) == ["IXI012"]
    with pytest.raises(KeyMorphInputError, match="data.csv: no images of the validation subjects"):
        select_subjects(datalist, "validation", include=["training_seg_12"], source="data.csv")
    with caplog.at_level(logging.WARNING, logger="scripts.datalists"):
        assert len(select_subjects(datalist, "train", exclude=["training_seg_13"])) == 6
    assert "training_seg_13" in caplog.text
    split = [dict(item, split="train" if item["subject"] != "IXI013" else "test") for item in datalist]
    # a split column wins over the held-out names
    assert subjects(select_subjects(split, "train", exclude=["IXI002"])) == ["IXI002", "IXI012"]
    assert subjects(select_subjects(split, "test")) == ["IXI013"]
    with pytest.raises(KeyMorphInputError, match="no image has split 'validation'"):
        select_subjects(split, "validation")

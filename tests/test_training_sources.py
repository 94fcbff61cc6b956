"""The three data sources of the training workflows (a folder of label maps, an IXI-layout folder, a CSV datalist):
pretraining and training through the bundle runner's command line on each, the one-line errors when
``dataset_dir`` holds nothing usable, and the reference points of pretraining on real images.

The command-line runs are ``python -m monai.bundle run <section> --config_file ...`` in subprocesses (as in
tests/test_training_workflows.py: ``PYTHONPATH=<bundle root>``, ``OMP_NUM_THREADS=1``, a 32^3 grid, a small
network, two iterations each) on two tiny generated subjects (tests/synthetic_heads.py): their label maps, the
IXI-layout set :mod:`scripts.make_test_set` makes from them (with label and mask files, so no deepbet) and a CSV
datalist of those files.
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_commands import ROOT, bundle_command, run, tail
from synthetic_heads import make_ixi_test_set

from scripts.brain_frame import BrainFramed
from scripts.coordinates import apply_affine
from scripts.errors import KeyMorphWorkflowError
from scripts.random_motions import RandWorldAffined
from scripts.settings_checks import check_training_settings
from scripts.synthesis import SynthesizeImaged
from scripts.training_data import ImagePretrainingDataset, PretrainingDataset, make_pretraining_dataset

TRAIN = str(ROOT / "configs" / "train.yaml")
PRETRAIN = str(ROOT / "configs" / "pretrain.yaml")

MODEL = ["--spatial_size", "32", "--network_channels", "[8,8,16,16]", "--num_keypoints", "16"]
SHORT = ["--epoch_length", "2", "--max_epochs", "1"]
MODALITIES = ("T1", "T2", "PD")
LOSS = re.compile(r"Epoch: \d+/\d+, Iter: \d+/\d+ -- train_loss: (\S+)")


def ixi_name(subject: int, modality: str) -> str:
    return f"IXI{subject:03d}-Synth-{subject:04d}-{modality}.nii.gz"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Two subjects as label maps (training_seg_01, 02), as an IXI-layout set (IXI001, IXI002: T1, T2, PD with
    labels, masks and transforms.csv) and as a CSV datalist of those files (paths relative to the CSV; IXI001
    train, IXI002 validation)."""
    root = tmp_path_factory.mktemp("sources")
    ixi = make_ixi_test_set(str(root), subjects=(1, 2))
    rows = [["image", "modality", "subject", "label", "mask", "split"]]
    for subject, split in ((1, "train"), (2, "validation")):
        for modality in MODALITIES:
            name = ixi_name(subject, modality)
            rows.append(
                [
                    f"ixi/IXI-{modality}/{name}",
                    modality,
                    f"IXI{subject:03d}",
                    f"ixi/IXI-{modality}-labels/{name}",
                    f"ixi/IXI-{modality}-masks/{name}",
                    split,
                ]
            )
    datalist = root / "datalist.csv"
    with open(datalist, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return {"label_maps": str(root / "label_maps"), "ixi": ixi, "csv": str(datalist)}


def assert_final_checkpoint(output_dir: Path, process: subprocess.CompletedProcess, iterations: int = 2) -> None:
    assert process.returncode == 0, tail(process)
    final = output_dir / "checkpoints" / f"checkpoint_final_iteration={iterations}.pt"
    assert final.is_file(), sorted(p.name for p in (output_dir / "checkpoints").glob("*"))
    checkpoint = torch.load(final, map_location="cpu", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == iterations
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    losses = [float(v) for v in LOSS.findall(process.stdout)]
    assert len(losses) == iterations and all(math.isfinite(v) for v in losses), losses


# ------------------------------------------------------------------------------------------ the command line


# the reference subject is the first not held out: training_seg_01, or IXI001 (IXI; the CSV's train rows)
HELD_OUT = {"label_maps": "['training_seg_02']", "ixi": "['IXI002']", "csv": "[]"}


@pytest.mark.parametrize("source", ["label_maps", "ixi", "csv"])
def test_pretraining_from_each_source(sources, source, tmp_path):
    output_dir = tmp_path / "pretrain"
    process = run(
        bundle_command(
            "pretraining",
            PRETRAIN,
            *MODEL,
            *SHORT,
            "--dataset_dir",
            sources[source],
            "--output_dir",
            str(output_dir),
            "--validation_subjects",
            HELD_OUT[source],
            "--test_subjects",
            "[]",
        )
    )
    assert_final_checkpoint(output_dir, process)
    if source != "label_maps":  # the reference subject's three images, nobody else's
        assert re.search(r"preparing images: 100%.*\b3/3\b", process.stderr), tail(process)


@pytest.mark.parametrize("source", ["ixi", "csv"])
def test_training_on_real_images(sources, source, tmp_path):
    """One epoch of two iterations, validated at its end (IXI: IXI002 held out by name; CSV: by its split)."""
    output_dir = tmp_path / "train"
    process = run(
        bundle_command(
            "training",
            TRAIN,
            *MODEL,
            *SHORT,
            "--dataset_dir",
            sources[source],
            "--output_dir",
            str(output_dir),
            "--num_workers",
            "0",
            "--val_pairs",
            "1",
            "--val_interval",
            "1",
            "--validation_subjects",
            "['IXI002']",
            "--test_subjects",
            "[]",
        )
    )
    assert_final_checkpoint(output_dir, process)
    dice = [float(v) for v in re.findall(r"Metrics -- val_dice: (\S+)", process.stdout)]
    assert len(dice) == 1 and 0.0 <= dice[0] <= 1.0, tail(process)


@pytest.mark.parametrize("section", ["pretraining", "training"])
@pytest.mark.parametrize("problem", ["empty", "missing"])
def test_unusable_dataset_dir_is_one_line(section, problem, tmp_path):
    dataset_dir = tmp_path / "data"
    if problem == "empty":
        dataset_dir.mkdir()
        (dataset_dir / "notes.txt").write_text("no images here")
    config = PRETRAIN if section == "pretraining" else TRAIN
    process = run(
        bundle_command(
            section, config, *MODEL, "--dataset_dir", str(dataset_dir), "--output_dir", str(tmp_path / "out")
        )
    )
    assert process.returncode == 2, tail(process)
    errors = [line for line in process.stderr.splitlines() if "keymorph: error:" in line]
    assert len(errors) == 1, process.stderr
    assert errors[0].startswith(f"keymorph: error: {dataset_dir}: "), errors
    assert ("holds nothing usable" if problem == "empty" else "not found") in errors[0]
    assert "Traceback" not in process.stdout + process.stderr
    assert not (tmp_path / "out").exists()  # stopped before anything was written


# ------------------------------------------------------------------------------------------ the settings check


def check_message(capsys, **settings) -> str:
    """The check's one-line message; in-process (not the bundle runner) it is raised, not printed and exited."""
    with pytest.raises(KeyMorphWorkflowError) as stop:
        check_training_settings(argv=[], **settings)
    assert stop.value.exit_code == 2 and "\n" not in str(stop.value) and not capsys.readouterr().err
    return str(stop.value)


def test_check_training_settings(sources, tmp_path, capsys):
    output_dir = str(tmp_path / "out")
    for source in ("label_maps", "ixi", "csv"):
        check_training_settings(sources[source], output_dir, argv=[])
    check_training_settings(sources["ixi"], output_dir, exclude=["IXI002"], validation_subjects=["IXI002"], argv=[])
    assert check_message(capsys, dataset_dir=sources["ixi"], output_dir=output_dir, exclude=["IXI001", "IXI002"]) == (
        f"{sources['ixi']}: no images of the train subjects (include [], exclude ['IXI001', 'IXI002'])"
    )
    message = check_message(
        capsys, dataset_dir=sources["label_maps"], output_dir=output_dir, validation_subjects=["training_seg_09"]
    )
    assert message == f"{sources['label_maps']}: no label maps of the validation subjects ['training_seg_09']"
    with open(sources["csv"], newline="") as handle:
        rows = [row[:-1] + ["test" if row[-1] == "train" else row[-1]] for row in csv.reader(handle)]
    test_rows_only = Path(sources["csv"]).parent / "test_rows.csv"  # beside it: the paths are relative
    with open(test_rows_only, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    message = check_message(capsys, dataset_dir=str(test_rows_only), output_dir=output_dir)
    assert message == f"{test_rows_only}: no image has split 'train'"
    # start weights: checked unless a checkpoint in checkpoint_dir is resumed from instead
    missing = str(tmp_path / "pretrain.pt")
    checkpoints = tmp_path / "run" / "checkpoints"
    settings = dict(dataset_dir=sources["ixi"], output_dir=output_dir, pretrained_ckpt=missing)
    message = check_message(capsys, **settings, checkpoint_dir=str(checkpoints))
    assert message == f"{missing}: start weights not found (--pretrained_ckpt)"
    checkpoints.mkdir(parents=True)
    torch.save({"model": {}}, checkpoints / "checkpoint_iteration=2.pt")
    check_training_settings(**settings, checkpoint_dir=str(checkpoints), argv=[])
    Path(missing).write_bytes(b"not a checkpoint")
    assert check_message(capsys, **settings).startswith(f"{missing}: unreadable checkpoint")
    # pretraining settings
    message = check_message(capsys, dataset_dir=sources["ixi"], output_dir=output_dir, skull_strip="bet")
    assert message.startswith("--skull_strip 'bet': not one of deepbet, none")
    reference = os.path.join(sources["label_maps"], "training_seg_01.nii.gz")
    check_training_settings(str(tmp_path / "nowhere"), output_dir, reference_label_map=reference, argv=[])
    absent = str(tmp_path / "seg.nii.gz")
    message = check_message(capsys, dataset_dir=sources["ixi"], output_dir=output_dir, reference_label_map=absent)
    assert message == f"{absent}: label map not found (--reference_label_map)"
    # the output folder
    blocked = tmp_path / "file"
    blocked.write_text("")
    message = check_message(capsys, dataset_dir=sources["ixi"], output_dir=str(blocked / "out"))
    assert message.startswith(f"{blocked / 'out'}: cannot create the output folder")


# ------------------------------------------------------------------------------- pretraining on real images


def augmentation() -> RandWorldAffined:
    return RandWorldAffined(keys=["image", "label", "mask"], point_keys="points")


def frame() -> BrainFramed:
    # 48^3 voxels of 2 mm: the phantom brains fit turned any way; training's random turns of the grid included
    return BrainFramed(
        keys="image", mask_key="mask", label_keys="label", spatial_size=48, spacing=2.0, rotation_jitter=0.35
    )


def labels_at_points(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """The label under each of an item's points (nearest voxel; -1 outside the grid) and whether the point is away
    from label boundaries there (its voxel's six face neighbours have its label)."""
    labels = item["label"][0].numpy()
    to_voxels = np.linalg.inv(np.asarray(item["label"].affine, dtype=np.float64))
    voxels = np.rint(item["points"].numpy() @ to_voxels[:3, :3].T + to_voxels[:3, 3]).astype(int)
    inside = np.all((voxels >= 1) & (voxels < np.array(labels.shape) - 1), axis=1)
    voxels = np.clip(voxels, 1, np.array(labels.shape) - 2)
    found = labels[tuple(voxels.T)]
    interior = inside.copy()
    for axis in range(3):
        for step in (-1, 1):
            neighbour = voxels.copy()
            neighbour[:, axis] += step
            interior &= labels[tuple(neighbour.T)] == found
    return np.where(inside, found, -1), interior


def label_agreement_of_points(items: list[dict]) -> tuple[int, float]:
    """Over the points away from label boundaries in every item: how many, and the fraction of them that lie on
    one label in all items."""
    found, interior = zip(*(labels_at_points(item) for item in items))
    found, interior = np.stack(found), np.all(np.stack(interior), axis=0)
    same = np.all(found == found[0], axis=0)
    return int(interior.sum()), float(same[interior].mean())


@pytest.fixture(scope="module")
def reference(sources) -> ImagePretrainingDataset:
    dataset = make_pretraining_dataset(
        sources["ixi"], 1000, 6, None, augmentation(), frame(), exclude=["IXI002"], spacing=2.0, seed=3
    )
    return dataset.set_random_state(0)


def test_reference_points_mark_one_anatomy_in_every_modality(reference):
    """IXI001's three images lie in three worlds (transforms.csv): composed with the datalist's world_transform,
    the K reference points land on the same label in each, however each item was moved and framed."""
    assert isinstance(reference, ImagePretrainingDataset)
    assert [entry["modality"] for entry in reference.datalist] == list(MODALITIES)
    assert {entry["subject"] for entry in reference.datalist} == {"IXI001"}
    items = [reference.make_item(index) for index in range(3)]
    assert [item["modality"] for item in items] == list(MODALITIES)
    for item in items:
        assert item["points"].shape == (1000, 3) and item["points"].dtype == torch.float64
        assert item["image"].shape == (1, 48, 48, 48)
    count, agreement = label_agreement_of_points(items)
    assert count >= 100 and agreement >= 0.9, (count, agreement)
    # the points follow the item's own world_transform (augmentation @ W): one common-world point set
    first = items[0]
    for item in items[1:]:
        to_item = item["world_transform"] @ torch.linalg.inv(first["world_transform"])
        torch.testing.assert_close(apply_affine(to_item, first["points"]), item["points"], atol=1e-6, rtol=0)
    # taking the three worlds for one (what ignoring world_transform would do) puts them on other anatomy
    worlds = reference.world
    try:
        reference.world = [torch.eye(4, dtype=torch.float64)] * 3
        count, agreement = label_agreement_of_points([reference.make_item(index) for index in range(3)])
    finally:
        reference.world = worlds
    assert agreement < 0.8, (count, agreement)


def test_pretraining_items_draw_every_modality_in_the_label_map_format(reference, sources):
    items = [reference[index] for index in range(len(reference))]
    assert {item["modality"] for item in items} == set(MODALITIES)
    synthetic = make_pretraining_dataset(
        sources["label_maps"], 16, 1, SynthesizeImaged(contrast="T1", deform_std=0.0), augmentation(), frame()
    )
    assert isinstance(synthetic, PretrainingDataset)
    assert set(synthetic[0]) <= set(items[0]) == {"image", "mask", "label", "points", "world_transform", "modality"}
    # real images without label files: the (shared) augmentation is told to tolerate them
    shared = augmentation()
    no_labels = [{k: v for k, v in entry.items() if k != "label"} for entry in reference.datalist]
    dataset = ImagePretrainingDataset(no_labels, 16, 1, shared, frame())
    assert dataset.augmentation is shared and shared.allow_missing_keys
    assert set(dataset[0]) == {"image", "mask", "points", "world_transform", "modality"}

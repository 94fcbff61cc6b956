"""Training and evaluating on one's own scans: the workflows' defaults on an IXI-layout folder.

Through the bundle runner (``python -m monai.bundle run ...``, ``torchrun`` for two processes; as in
tests/test_training_workflows.py: ``PYTHONPATH=<bundle root>``, ``OMP_NUM_THREADS=1``, a 32^3 grid, a small network)
on a generated IXI-layout folder of five subjects (tests/synthetic_heads.py, with brain masks so no skull
stripping runs), once with label files and once without. Nothing names the subjects: the split is automatic.
Also in-process: the split itself, a CSV datalist's world transforms, and the refusal of loss weights that leave a
pair without a loss.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from bundle_commands import ROOT, bundle_command, run, tail
from synthetic_heads import make_ixi_test_set
from torchrun_commands import torchrun_command

from scripts.datalists import csv_datalist, subject_split
from scripts.errors import KeyMorphInputError

TRAIN = str(ROOT / "configs" / "train.yaml")
PRETRAIN = str(ROOT / "configs" / "pretrain.yaml")
EVALUATE = str(ROOT / "configs" / "evaluate.yaml")
MULTI = str(ROOT / "configs" / "multi_gpu_train.yaml")
NET = ["--spatial_size", "32", "--network_channels", "[8,8,16,16]", "--num_keypoints", "16"]
MODEL = [*NET, "--num_workers", "0"]
LOSS = re.compile(r"Epoch: \d+/\d+, Iter: \d+/\d+ -- train_loss: (\S+)")
SUBJECTS = ["IXI001", "IXI002", "IXI003", "IXI004", "IXI005"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Five subjects in IXI layout (T1, T2, PD, masks, transforms.csv): with label files, and a copy without."""
    root = tmp_path_factory.mktemp("own")
    labeled = make_ixi_test_set(str(root), subjects=tuple(range(1, 6)))
    unlabeled = str(root / "unlabeled")
    shutil.copytree(labeled, unlabeled, ignore=shutil.ignore_patterns("*-labels"))
    return {"labeled": labeled, "unlabeled": unlabeled}


# ------------------------------------------------------------------------------------------------------ split


def test_the_automatic_split_is_seeded_recorded_and_read_back(folders, tmp_path):
    split = subject_split(folders["labeled"], ["training_seg_12"], ["training_seg_13"], str(tmp_path / "a"))
    assert len(split["test"]) == 2 and len(split["validation"]) == 1
    assert not set(split["test"]) & set(split["validation"]) and set(split["test"]) <= set(SUBJECTS)
    # the same data and seed give the same split in any workflow; another seed another one
    assert subject_split(folders["labeled"], [], [], str(tmp_path / "b")) == split
    assert any(subject_split(folders["labeled"], [], [], None, seed) != split for seed in range(1, 5))
    record = json.loads((tmp_path / "a" / "split.json").read_text())
    assert (record["validation"], record["test"], record["seed"]) == (split["validation"], split["test"], 0)
    # a rerun in the same folder reads the record, whatever the seed now
    assert subject_split(folders["labeled"], [], [], str(tmp_path / "a"), seed=3) == split


def test_configured_names_that_match_are_kept(folders):
    assert subject_split(folders["labeled"], ["IXI002"], []) == {"validation": ["IXI002"], "test": []}


def test_too_few_subjects_train_without_validation(tmp_path, caplog):
    ixi = make_ixi_test_set(str(tmp_path), subjects=(1, 2, 3))
    with caplog.at_level(logging.WARNING):
        split = subject_split(ixi, ["training_seg_12"], ["training_seg_13"])
    assert len(split["test"]) == 1 and split["validation"] == []
    assert "3 subjects are too few to hold out validation subjects; training without validation" in caplog.text


def _write_datalist(path: Path, ixi: str, world: dict[str, str], split: bool = False) -> None:
    rows = [["image", "modality", "subject", "mask", "world_transform"] + (["split"] if split else [])]
    for number, subject in enumerate(SUBJECTS[:2], start=1):
        for modality in ("T1", "T2"):
            name = f"IXI-{modality}/{subject}-Synth-{number:04d}-{modality}.nii.gz"
            mask = f"IXI-{modality}-masks/{subject}-Synth-{number:04d}-{modality}.nii.gz"
            rows.append(
                [os.path.join(ixi, name), modality, subject, os.path.join(ixi, mask), world.get(name, "")]
                + (["train" if number == 1 else "test"] if split else [])
            )
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def test_a_csv_datalist_carries_each_images_world_transform(folders, tmp_path):
    from scripts.datalists import read_transforms_csv

    transforms = read_transforms_csv(os.path.join(folders["labeled"], "transforms.csv"))
    world = {name: " ".join(f"{v:.17g}" for v in matrix.flatten().tolist()) for name, matrix in transforms.items()}
    _write_datalist(tmp_path / "list.csv", folders["labeled"], world)
    items = csv_datalist(str(tmp_path / "list.csv"))
    for item in items:
        name = os.path.relpath(item["image"], folders["labeled"])
        assert torch.equal(item["world_transform"], transforms[name]), name
    _write_datalist(tmp_path / "empty.csv", folders["labeled"], {})
    assert all("world_transform" not in item for item in csv_datalist(str(tmp_path / "empty.csv")))
    first = sorted(name for name in transforms if name.startswith("IXI-T1"))[0]
    for bad in ("1 0 0", "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 x", " ".join(["0"] * 16)):
        _write_datalist(tmp_path / "bad.csv", folders["labeled"], {first: bad})
        with pytest.raises(KeyMorphInputError, match=r"bad\.csv: line \d+: (the world transform needs 16|not an inv)"):
            csv_datalist(str(tmp_path / "bad.csv"))


def test_a_csv_split_column_gives_the_split(folders, tmp_path):
    _write_datalist(tmp_path / "list.csv", folders["labeled"], {}, split=True)
    assert subject_split(str(tmp_path / "list.csv"), ["x"], ["y"]) == {"validation": [], "test": ["IXI002"]}


# ------------------------------------------------------------------------------------------ every pair a loss


def test_weights_that_leave_unlabeled_pairs_without_a_loss_are_refused_in_one_line(folders, tmp_path):
    process = run(
        bundle_command(
            "training",
            [TRAIN],
            *MODEL,
            "--dataset_dir",
            folders["unlabeled"],
            "--output_dir",
            str(tmp_path / "run"),
            "--unlabeled_image_weight",
            "0",
        )
    )
    assert process.returncode == 2, tail(process)
    message = [line for line in process.stderr.splitlines() if line.startswith("keymorph: error:")]
    assert message == [
        f"keymorph: error: {folders['unlabeled']}: images without labels, and --unlabeled_image_weight is 0: their"
        " pairs would have no loss term; set --unlabeled_image_weight (image similarity) above 0"
    ], tail(process)
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_pair_without_a_loss_term_stops_the_run_with_an_error(folders, tmp_path, caplog):
    """Past the settings check (in-process, where the check is not run), a pair without a term stops the run:
    its reason is recorded, and the workflow's finalize step exits 1 with one line."""
    from monai.bundle import ConfigParser

    from scripts.training import exit_if_stopped

    parser = ConfigParser()
    parser.read_config(TRAIN)
    tiny = {"spatial_size": 32, "network_channels": [8, 8, 16, 16], "num_keypoints": 16, "num_workers": 0}
    parser.update({**tiny, "epoch_length": 3, "max_epochs": 1, "dataset_dir": folders["unlabeled"]})
    parser.update({"output_dir": str(tmp_path), "unlabeled_image_weight": 0.0, "same_subject_probability": 0.0})
    parser.update({"train#handlers": []})
    trainer = parser.get_parsed_content("train#trainer")
    with caplog.at_level("ERROR"):
        trainer.run()
    assert trainer.state.iteration == 1
    assert "iteration 1: no loss term applies to this pair; stopping" in caplog.text
    with pytest.raises(SystemExit) as stopped:
        exit_if_stopped(trainer)
    assert stopped.value.code == 1


# --------------------------------------------------------------------------------- the workflows, by default


def test_pretraining_training_and_evaluating_an_ixi_folder_with_the_defaults(folders, tmp_path):
    pretrain = tmp_path / "pretrain"
    process = run(
        bundle_command(
            "pretraining",
            [PRETRAIN],
            *NET,
            "--epoch_length",
            "4",
            "--max_epochs",
            "1",
            "--dataset_dir",
            folders["labeled"],
            "--output_dir",
            str(pretrain),
        )
    )
    assert process.returncode == 0, tail(process)
    split = json.loads((pretrain / "split.json").read_text())
    train = tmp_path / "train"
    process = run(
        bundle_command(
            "training",
            [TRAIN],
            *MODEL,
            "--epoch_length",
            "12",
            "--max_epochs",
            "2",
            "--val_interval",
            "1",
            "--val_pairs",
            "2",
            "--dataset_dir",
            folders["labeled"],
            "--output_dir",
            str(train),
            "--pretrained_ckpt",
            str(pretrain / "checkpoints" / "checkpoint_final_iteration=4.pt"),
        )
    )
    assert process.returncode == 0, tail(process)
    recorded = json.loads((train / "split.json").read_text())
    assert (recorded["validation"], recorded["test"]) == (split["validation"], split["test"])
    losses = [float(v) for v in LOSS.findall(process.stdout)]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[12:]) < sum(losses[:12]), losses  # decreasing on average
    dice = [float(v) for v in re.findall(r"Metrics -- val_dice: (\S+)", process.stdout)]
    assert len(dice) == 2 and all(0 <= d <= 1 for d in dice), tail(process)
    evaluation = tmp_path / "eval"
    process = run(
        bundle_command(
            "evaluating",
            [EVALUATE],
            *NET,
            "--modality_pairs",
            "['T1-T2']",
            "--rotations",
            "[0]",
            "--refine_iterations",
            "0",
            "--dataset_dir",
            folders["labeled"],
            "--output_dir",
            str(evaluation),
            "--ckpt_path",
            str(train / "checkpoints" / "model_best.pt"),
        )
    )
    assert process.returncode == 0, tail(process)
    assert json.loads((evaluation / "split.json").read_text())["test"] == split["test"]
    cases = list(csv.DictReader(open(evaluation / "cases.csv")))
    assert len(cases) == 2 and all(row["fixed_subject"] in split["test"] for row in cases), cases


def test_training_on_unlabeled_images_trains_on_image_similarity(folders, tmp_path):
    process = run(
        bundle_command(
            "training",
            [TRAIN],
            *MODEL,
            "--epoch_length",
            "3",
            "--max_epochs",
            "1",
            "--dataset_dir",
            folders["unlabeled"],
            "--output_dir",
            str(tmp_path),
        )
    )
    assert process.returncode == 0, tail(process)
    assert "a validation image without labels (no Dice); training without validation" in process.stderr + process.stdout
    losses = [float(v) for v in LOSS.findall(process.stdout)]
    assert len(losses) == 3 and all(math.isfinite(v) and v != 0 for v in losses), losses


def test_two_process_training_on_an_ixi_folder_runs_to_completion(folders, tmp_path):
    process = run(
        torchrun_command(
            bundle_command(
                "training",
                [TRAIN, MULTI],
                *MODEL,
                "--epoch_length",
                "3",
                "--max_epochs",
                "1",
                "--val_pairs",
                "2",
                "--dataset_dir",
                folders["unlabeled"],
                "--output_dir",
                str(tmp_path),
            )
        )
    )
    assert process.returncode == 0, tail(process, 80)
    assert (tmp_path / "checkpoints" / "checkpoint_final_iteration=3.pt").is_file()


def test_a_stop_on_one_rank_stops_every_rank_with_an_error(folders, tmp_path):
    """Rank 1's loss is NaN from its first iteration: both ranks stop there (no hang), the run exits non-zero and
    says why, and the one checkpoint holds the start weights."""
    process = run(
        torchrun_command(
            bundle_command(
                "training",
                [TRAIN, MULTI],
                *MODEL,
                "--epoch_length",
                "3",
                "--max_epochs",
                "1",
                "--dataset_dir",
                folders["labeled"],
                "--output_dir",
                str(tmp_path),
                "--dice_weight",
                "$float('nan') if os.environ['RANK'] == '1' else 1.0",
            )
        ),
        timeout=300,
    )
    assert process.returncode != 0, tail(process, 80)
    assert "keymorph: error: training stopped at iteration 1: another process stopped" in process.stderr, tail(process)
    assert "keymorph: error: training stopped at iteration 1: loss is nan (not finite)" in process.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert checkpoints == ["checkpoint_final_iteration=1.pt"], checkpoints

"""The training workflows run through the bundle runner's command line, on tiny generated label maps.

Every run is ``python -m monai.bundle run <section> --config_file ...`` in a subprocess with
``PYTHONPATH=<bundle root>`` (or ``torchrun`` for the multi-process config), at a 32^3 network grid with a small
network, a few iterations each; the tests read what the runs wrote: checkpoints, TensorBoard files and logs. The
properties check, the per-rank seeding and the non-finite loss run in-process.

The subprocesses run with ``OMP_NUM_THREADS=1``: on a busy 2-core machine two intra-op threads per process make
the tiny iterations ten times slower.
"""

from __future__ import annotations

import glob
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_commands import ENV, ROOT, bundle_command, run, tail
from synthetic_heads import head_label_map, write_label_maps_dir
from torchrun_commands import torchrun_command

from scripts.checkpoints import latest_checkpoint
from scripts.errors import KeyMorphInputError

TRAIN = str(ROOT / "configs" / "train.yaml")
PRETRAIN = str(ROOT / "configs" / "pretrain.yaml")
MULTI = str(ROOT / "configs" / "multi_gpu_train.yaml")
INFERENCE = str(ROOT / "configs" / "inference.yaml")

MODEL = ["--spatial_size", "32", "--network_channels", "[8,8,16,16]", "--num_keypoints", "16"]
SHORT = ["--epoch_length", "2", "--max_epochs", "2"]
TRAIN_DATA = ["--num_workers", "0", "--val_pairs", "1", "--validation_subjects", "['training_seg_03']"]
TINY = {"spatial_size": 32, "network_channels": [8, 8, 16, 16], "num_keypoints": 16, "epoch_length": 2, "max_epochs": 2}
TINY_TRAIN = {**TINY, "num_workers": 0, "val_pairs": 1, "validation_subjects": ["training_seg_03"]}

LOSS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- train_loss: (\S+)")


# ---------------------------------------------------------------------------------------------------- helpers


def logged_losses(text: str) -> dict[int, float]:
    """``{global iteration: train_loss}`` of the StatsHandler lines of a training log."""
    return {(int(e) - 1) * int(n) + int(i): float(v) for e, i, n, v in LOSS.findall(text)}


def scalars(event_file: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(event_file, size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def all_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for path in sorted(glob.glob(str(log_dir / "events.out.tfevents.*"))):
        values.update(scalars(path, tag))
    return values


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_names(output_dir: Path) -> set[str]:
    return {p.name for p in (output_dir / "checkpoints").glob("*.pt")}


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    """training_seg_01..03 (tests/synthetic_heads.py): 01 and 02 train, 03 validates."""
    directory = tmp_path_factory.mktemp("label_maps")
    write_label_maps_dir(str(directory), subjects=(1, 2, 3))
    return directory


@pytest.fixture(scope="module")
def pretrained(heads, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Pretraining, 2 epochs of 2 iterations. Seed 1: its network starts from other weights than training's (seed
    0), so weights that come from this checkpoint are told from a fresh start."""
    output_dir = tmp_path_factory.mktemp("pretrain")
    process = run(
        bundle_command(
            "pretraining",
            [PRETRAIN],
            *MODEL,
            *SHORT,
            "--dataset_dir",
            str(heads),
            "--output_dir",
            str(output_dir),
            "--validation_subjects",
            "['training_seg_03']",
            "--test_subjects",
            "[]",
            "--save_every",
            "2",
            "--seed",
            "1",
        )
    )
    assert process.returncode == 0, tail(process)
    return output_dir, process


@pytest.fixture(scope="module")
def trained(heads, pretrained, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Training from the pretraining's final checkpoint, validating every epoch."""
    output_dir = tmp_path_factory.mktemp("train")
    process = run(
        bundle_command(
            "training",
            [TRAIN],
            *MODEL,
            *SHORT,
            *TRAIN_DATA,
            "--dataset_dir",
            str(heads),
            "--output_dir",
            str(output_dir),
            "--val_interval",
            "1",
            "--save_every",
            "2",
            "--pretrained_ckpt",
            str(pretrained[0] / "checkpoints" / "checkpoint_final_iteration=4.pt"),
        )
    )
    assert process.returncode == 0, tail(process)
    return output_dir, process


# ------------------------------------------------------------------------------------------ pretraining, training


def test_pretraining_writes_final_checkpoint_and_finite_losses(pretrained):
    output_dir, process = pretrained
    final = output_dir / "checkpoints" / "checkpoint_final_iteration=4.pt"
    assert final.is_file(), checkpoint_names(output_dir)
    checkpoint = load(final)
    assert {"model", "optimizer", "trainer"} <= checkpoint.keys()
    assert checkpoint["trainer"]["iteration"] == 4
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    losses = logged_losses(process.stdout)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    assert all_scalars(output_dir, "train_loss").keys() == {1, 2, 3, 4}
    assert all(math.isfinite(v) for v in all_scalars(output_dir, "train_loss").values())


def test_training_starts_from_the_pretrained_weights(pretrained, trained):
    pretrained_path = pretrained[0] / "checkpoints" / "checkpoint_final_iteration=4.pt"
    output_dir, process = trained
    assert f"Restored all variables from {pretrained_path}" in process.stdout
    start = load(pretrained_path)["model"]
    end = load(output_dir / "checkpoints" / "checkpoint_final_iteration=4.pt")["model"]
    assert start.keys() == end.keys()
    change = max((end[k].float() - start[k].float()).abs().max().item() for k in start)
    # 4 Adam steps of lr 1e-4 move a weight by at most about 4e-4; a network that did not start from the pretrained
    # weights (other seed) would differ from them by the scale of its random initialization (~0.1)
    assert 0 < change < 2e-3, change


def test_training_validates_and_keeps_the_best_model(trained):
    output_dir, process = trained
    assert {"checkpoint_iteration=2.pt", "checkpoint_iteration=4.pt", "checkpoint_final_iteration=4.pt"} <= (
        checkpoint_names(output_dir)
    )
    best = load(output_dir / "checkpoints" / "model_best.pt")
    assert all(torch.isfinite(value).all() for value in best.values()), best.keys()
    dice = [float(v) for v in re.findall(r"Metrics -- val_dice: (\S+)", process.stdout)]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice), dice
    assert all_scalars(output_dir, "val_dice").keys() == {1, 2}
    losses = logged_losses(process.stdout)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    assert all(math.isfinite(v) for v in all_scalars(output_dir, "train_loss").values())


# -------------------------------------------------------------------------------------------------- resuming


def test_training_resumes_after_a_kill(heads, tmp_path):
    """Killed (SIGKILL) once the first interval checkpoint is there, the same command resumes from it: the
    iteration count, the optimizer's step count and the LR schedule continue where the checkpoint left them."""
    output_dir = tmp_path / "run"
    max_epochs, epoch_length = 20, 2
    command = bundle_command(
        "training",
        [TRAIN],
        *MODEL,
        *TRAIN_DATA,
        "--dataset_dir",
        str(heads),
        "--output_dir",
        str(output_dir),
        "--epoch_length",
        str(epoch_length),
        "--max_epochs",
        str(max_epochs),
        "--save_every",
        "2",
        "--val_interval",
        "1000",
        "--lr_step_epochs",
        "1",
        "--lr_decay",
        "0.9",
    )
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and first.poll() is None:
            if list((output_dir / "checkpoints").glob("checkpoint_iteration=*.pt")):
                break
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, f"the first run ended by itself (exit code {first.returncode})"
    names = checkpoint_names(output_dir)
    assert names and not any("final" in name for name in names), f"the first run was not killed mid-way: {names}"
    killed_at = load(Path(latest_checkpoint(str(output_dir / "checkpoints"))))["trainer"]["iteration"]
    assert 0 < killed_at < max_epochs * epoch_length

    second = run(command)
    assert second.returncode == 0, tail(second)
    assert re.search(rf"Restored all variables from .*checkpoint_iteration={killed_at}\.pt", second.stdout)
    losses = logged_losses(second.stdout)
    assert min(losses) == killed_at + 1 and max(losses) == max_epochs * epoch_length, sorted(losses)
    assert all(math.isfinite(v) for v in losses.values())
    final = load(output_dir / "checkpoints" / f"checkpoint_final_iteration={max_epochs * epoch_length}.pt")
    assert final["trainer"]["iteration"] == max_epochs * epoch_length
    # Adam counts its steps: a fresh optimizer state would count only the second run's
    steps = {int(state["step"]) for state in final["optimizer"]["state"].values()}
    assert steps == {max_epochs * epoch_length}, steps
    # one LR step per epoch, none lost at the resume (the checkpoint at an epoch's end follows the epoch-end step)
    assert final["lr_scheduler"]["last_epoch"] == max_epochs
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.9**max_epochs)


def test_a_corrupt_checkpoint_is_named_in_one_line(heads, pretrained, tmp_path):
    good = pretrained[0] / "checkpoints" / "checkpoint_iteration=2.pt"
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(good, checkpoints / good.name)
    bad = checkpoints / "checkpoint_iteration=4.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated, as by a full disk

    process = run(
        bundle_command(
            "training",
            [TRAIN],
            *MODEL,
            *SHORT,
            *TRAIN_DATA,
            "--dataset_dir",
            str(heads),
            "--output_dir",
            str(tmp_path / "run"),
        )
    )
    assert process.returncode != 0
    lines = [line for line in (process.stdout + process.stderr).splitlines() if "KeyMorphInputError: " in line]
    assert lines, tail(process)
    assert lines[0].endswith(
        f"KeyMorphInputError: {bad}: unreadable checkpoint (File is not a zip file); "
        "delete or move it to resume from the checkpoint before it, or use another output_dir"
    )
    assert checkpoint_names(tmp_path / "run") == {good.name, bad.name}


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    torch.save({"model": {}}, tmp_path / "checkpoint_iteration=10.pt")
    torch.save({"model": {}}, tmp_path / "checkpoint_final_iteration=12.pt")
    (tmp_path / "model_best.pt").write_bytes(b"")  # not an iteration checkpoint: ignored
    (tmp_path / "tmpa1b2c3").write_bytes(b"half")  # an atomic save's leftover: ignored
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_final_iteration=12.pt")
    (tmp_path / "checkpoint_iteration=14.pt").write_bytes(b"")
    with pytest.raises(KeyMorphInputError, match=r"checkpoint_iteration=14\.pt: unreadable checkpoint"):
        latest_checkpoint(str(tmp_path))
    (tmp_path / "checkpoint_iteration=14.pt").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    with pytest.raises(KeyMorphInputError, match="not a PyTorch checkpoint"):
        latest_checkpoint(str(tmp_path))


def test_the_best_model_stays_the_best_of_the_whole_run_across_resumes(tmp_path):
    """Each saver is one process of a resumed run: a resumed run's first, worse validation must not replace the
    best model of an earlier process; a better one must."""
    from ignite.engine import Engine

    from scripts.checkpoints import AtomicCheckpointSaver

    def validate(weight: float, dice: float) -> None:
        network = torch.nn.Linear(1, 1)
        torch.nn.init.constant_(network.weight, weight)
        validator = Engine(lambda engine, batch: None)
        validator.state.metrics = {"val_dice": dice}
        saver = AtomicCheckpointSaver(
            str(tmp_path), {"model": network}, save_key_metric=True, key_metric_name="val_dice",
            key_metric_filename="model_best.pt",
        )  # fmt: skip
        saver.attach(validator)
        validator.run([0], max_epochs=1)

    def best_weight() -> float:
        return float(torch.load(tmp_path / "model_best.pt", weights_only=True)["weight"])

    validate(1.0, 0.6)
    assert best_weight() == 1.0
    validate(2.0, 0.5)  # resumed, worse
    assert best_weight() == 1.0
    validate(3.0, 0.7)  # resumed, better
    assert best_weight() == 3.0
    assert json.loads((tmp_path / "model_best.json").read_text()) == {"score": 0.7}


# ------------------------------------------------------------------------------------------------ multi-process


def test_multi_process_training_with_torchrun(heads, tmp_path):
    """Two CPU processes (gloo): a few iterations, validation on both, checkpoints and TensorBoard from rank 0."""
    output_dir = tmp_path / "run"
    command = bundle_command(
        "training",
        [TRAIN, MULTI],
        *MODEL,
        *SHORT,
        *TRAIN_DATA,
        "--dataset_dir",
        str(heads),
        "--output_dir",
        str(output_dir),
        "--val_interval",
        "1",
        "--save_every",
        "2",
    )
    process = run(torchrun_command(command))
    assert process.returncode == 0, tail(process, 80)
    assert checkpoint_names(output_dir) == {
        "checkpoint_iteration=2.pt",
        "checkpoint_iteration=4.pt",
        "checkpoint_final_iteration=4.pt",
        "model_best.pt",
    }
    final = load(output_dir / "checkpoints" / "checkpoint_final_iteration=4.pt")
    assert final["trainer"]["iteration"] == 4
    # the bare network's weights (no DDP "module." prefix): the single-process configs load them as they are
    from scripts.keypoint_net import KeypointDetector

    KeypointDetector(num_keypoints=16, channels=(8, 8, 16, 16)).load_state_dict(final["model"], strict=True)
    # one process wrote TensorBoard files (their names end in the writer's pid) and logged
    event_files = sorted(glob.glob(str(output_dir / "events.out.tfevents.*")))
    assert event_files and len({path.split(".")[-2] for path in event_files}) == 1, event_files
    assert process.stdout.count("Train completed, saved final checkpoint") == 1
    losses = logged_losses(process.stdout)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    dice = [float(v) for v in re.findall(r"Metrics -- val_dice: (\S+)", process.stdout)]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice), dice


def layered_parser(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([TRAIN, MULTI])
    parser.update(overrides)
    return parser


def enabled_handlers(parser, list_id: str) -> list[str]:
    targets = []
    for index, handler in enumerate(parser[list_id]):
        disabled = parser.get_parsed_content(f"{list_id}#{index}#_disabled_") if "_disabled_" in handler else False
        if not disabled:
            targets.append(handler["_target_"].split(".")[-1])
    return targets


def test_multi_process_config_disables_writers_on_other_ranks(heads, tmp_path, monkeypatch):
    """The layered config's rank-0 switch (is_main_process) in train.yaml's handlers: rank 0 keeps every handler, the others
    only the LR schedule and validation (no logs, TensorBoard, progress bar or checkpoints)."""
    overrides = {**TINY_TRAIN, "dataset_dir": str(heads), "output_dir": str(tmp_path)}
    enabled = {}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, rank=rank, **kwargs: rank)
        parser = layered_parser(overrides)
        enabled[rank] = {
            name: enabled_handlers(parser, name)
            for name in ("train#handlers", "train#stateful_handlers", "validate#handlers")
        }
        assert parser.get_parsed_content("train#handlers#1#print_lr") == (rank == 0)
    # no checkpoint in output_dir and no pretrained_ckpt: the loaders are off on every rank
    writers = ["StatsHandler", "TensorBoardStatsHandler", "ProgressBar"]
    assert enabled[0] == {
        "train#handlers": ["LrScheduleHandler", "ValidationHandler", *writers, "TensorBoardStatsHandler"],
        "train#stateful_handlers": ["AtomicCheckpointSaver"],
        "validate#handlers": [*writers[:2], "AtomicCheckpointSaver"],
    }
    assert enabled[1] == {
        "train#handlers": ["LrScheduleHandler", "ValidationHandler"],
        "train#stateful_handlers": [],
        "validate#handlers": [],
    }


def test_ranks_draw_different_training_pairs(heads, tmp_path, monkeypatch):
    """The multi-process config's seeding (seed + rank) gives each rank its own pairs, reproducibly."""
    first_images = []
    for rank in (0, 1, 0):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, rank=rank, **kwargs: rank)
        parser = layered_parser({**TINY_TRAIN, "dataset_dir": str(heads), "output_dir": str(tmp_path)})
        seeding = [i for i, item in enumerate(parser["initialize"]) if "set_determinism" in item]
        assert len(seeding) == 1
        parser.get_parsed_content(f"initialize#{seeding[0]}")
        pair = next(iter(parser.get_parsed_content("train#dataloader")))[0]
        first_images.append(pair["fixed"]["image"].as_tensor())
    assert not torch.equal(first_images[0], first_images[1])
    assert torch.equal(first_images[0], first_images[2])


# ------------------------------------------------------------------------------------------------- properties


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("configs", [[PRETRAIN], [TRAIN], [TRAIN, MULTI]], ids=["pretrain", "train", "multi_gpu"])
def test_train_configs_have_the_zoo_properties(configs, heads, tmp_path, monkeypatch):
    import ignite.distributed as idist
    from monai.bundle import ConfigWorkflow

    if MULTI in configs:  # a process group of one
        group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
        for name, value in {**group, "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(name, value)
    overrides = {**(TINY if configs == [PRETRAIN] else TINY_TRAIN), "dataset_dir": str(heads)}
    workflow = ConfigWorkflow(
        config_file=configs if len(configs) > 1 else configs[0],
        workflow_type="train",
        logging_file=False,
        output_dir=str(tmp_path),
        **overrides,
    )
    try:
        workflow.initialize()
        assert workflow.check_properties() == []
    finally:
        workflow.finalize()
        idist.sync()  # forget the destroyed process group
    assert not torch.distributed.is_initialized()


def test_inference_config_has_the_zoo_properties(tmp_path):
    from monai.bundle import ConfigWorkflow

    weights = ROOT / "models" / "model.pt"
    if not weights.is_file():
        pytest.skip(f"{weights} (the released weights, see large_files.yml) is missing: inference cannot initialize")
    images = tmp_path / "input"
    images.mkdir()
    labels, affine = head_label_map(1)
    nib.save(nib.Nifti1Image(((labels > 0) & (labels < 500)).astype(np.float32), affine), images / "moving.nii.gz")
    workflow = ConfigWorkflow(
        config_file=INFERENCE,
        workflow_type="infer",
        logging_file=False,
        bundle_root=str(ROOT),
        dataset_dir=str(images),
        output_dir=str(tmp_path / "output"),
        fixed_image=str(images / "moving.nii.gz"),
        skull_strip="none",
    )
    workflow.initialize()
    assert workflow.check_properties() == []


# --------------------------------------------------------------------------------------------- non-finite loss


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(heads, tmp_path, caplog):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({**TINY_TRAIN, "epoch_length": 4, "dataset_dir": str(heads), "output_dir": str(tmp_path)})
    parser.update({"save_every": 1, "train#handlers": []})
    trainer = parser.get_parsed_content("train#trainer")
    for handler in parser.get_parsed_content("train#stateful_handlers"):
        handler.attach(trainer)
    loss = parser.get_parsed_content("train#loss")
    dice = loss.dice
    loss.dice = lambda *args: dice(*args) * (math.nan if trainer.state.iteration == 3 else 1.0)

    with caplog.at_level("ERROR"):
        trainer.run()
    assert trainer.state.iteration == 3, "training went on after a NaN loss"
    assert "iteration 3: loss is nan (not finite); stopping" in caplog.text
    assert math.isnan(trainer.state.output["loss"])
    checkpoints = tmp_path / "checkpoints"
    good = load(checkpoints / "checkpoint_iteration=2.pt")
    newest = load(Path(latest_checkpoint(str(checkpoints))))
    assert newest["trainer"]["iteration"] == 3
    for name, value in newest["model"].items():  # no step was taken on the NaN: the weights after iteration 2
        assert torch.isfinite(value).all() and torch.equal(value, good["model"][name]), name
    assert {int(state["step"]) for state in newest["optimizer"]["state"].values()} == {2}

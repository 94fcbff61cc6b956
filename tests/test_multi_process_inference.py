"""Folder inference under ``torchrun`` (``configs/multi_gpu_inference.yaml`` on ``configs/inference.yaml``) with two
CPU processes (gloo) on small synthetic brains and the small random network of ``tests/test_inference.py``.

Checked: every case registered exactly once across the ranks, one merged ``summary.csv`` row per case in the order
a single process writes them, the same matrices as a single-process run, resuming after a deleted case folder and
after one rank was killed mid-run (no finished case lost or redone, the killed rank's rows kept), also killed
between putting a case folder in place and writing its row (the rerun gives the case its real row), a rank without
cases (more ranks than cases), and the overlay merging with ``inference.yaml``.

Every run here uses one thread per process (``OMP_NUM_THREADS=1``, what ``torchrun`` sets for its workers): a
single-process run with the default threads sums in another order and can end a refined case a few mm apart.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_inference import ROOT, inference_arguments, rigid, run_bundle, write_checkpoint, write_fixed, write_moving
from torchrun_commands import torchrun_command

from scripts.case_outputs import case_done
from scripts.output_folder import rank_rows_files, read_summary_rows
from scripts.transform_io import read_itk_transform

INFERENCE = str(ROOT / "configs" / "inference.yaml")
MULTI = str(ROOT / "configs" / "multi_gpu_inference.yaml")
CONFIGS = repr([INFERENCE, MULTI])
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NAMES = [f"case{index}" for index in range(5)]


def write_cases(folder: Path, names) -> None:
    """Moving images of the phantom, each moved by its own rigid transform."""
    folder.mkdir(parents=True)
    for index, name in enumerate(names):
        write_moving(folder / f"{name}.nii.gz", rigid([0.2, 0.3 + index, 1.0], 10.0 * index - 20, [index, -2, 1]))


def layered_inference_command(arguments) -> list[str]:
    """One process's command: the bundle runner on ``inference.yaml`` with the overlay, and ``arguments``."""
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", CONFIGS, *arguments]


def torchrun_env(python_path=()) -> dict[str, str]:
    """The environment of a job: one thread per process, the bundle (after ``python_path``) on PYTHONPATH."""
    path = os.pathsep.join([*map(str, python_path), str(ROOT)])
    return {**os.environ, **ONE_THREAD, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


def run_torchrun(arguments, processes: int = 2, python_path=()) -> subprocess.CompletedProcess:
    command = torchrun_command(layered_inference_command(arguments), processes)
    environment = torchrun_env(python_path)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def log(process) -> str:
    return process.stdout + process.stderr


def summary_rows(output_dir: Path) -> list[dict]:
    with open(output_dir / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def with_output(arguments: list[str], output_dir: Path) -> list[str]:
    changed = list(arguments)
    changed[changed.index("--output_dir") + 1] = str(output_dir)
    return changed


def snapshot(output_dir: Path, names) -> dict[str, tuple[int, int]]:
    """Inode and modification time of every file of these case folders (a rewritten file changes both)."""
    files = [p for name in names for p in (output_dir / name).rglob("*") if p.is_file()]
    return {str(p.relative_to(output_dir)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same five cases registered by two ranks and by one process."""
    root = tmp_path_factory.mktemp("multi_process")
    write_cases(root / "in", NAMES)
    fixed, ckpt = write_fixed(root / "fixed.nii.gz"), write_checkpoint(root / "model.pt")
    # the small random network does not register the phantoms well: their brains overlap the fixed one 0.45-0.84,
    # which QC would mark suspect; these tests count every registration as "ok" (the ranks' work, not the QC)
    arguments = inference_arguments(root / "in", root / "two", fixed, ckpt, "--qc_min_brain_overlap", "0")
    return {
        "arguments": arguments,
        "root": root,
        "two": run_torchrun(arguments),
        "one": run_bundle(*with_output(arguments, root / "one"), env=ONE_THREAD),
    }


def test_two_ranks_register_every_case_exactly_once(runs):
    process, output = runs["two"], runs["root"] / "two"
    assert process.returncode == 0, log(process)[-3000:]
    # the job's counts, logged once by rank 0: five registrations in all, so none twice
    assert log(process).count("5 input(s): ") == 1 and "5 input(s): 5 ok" in log(process), log(process)[-2000:]
    assert all(case_done(str(output), name) for name in NAMES)
    assert sorted(os.listdir(output)) == sorted([*NAMES, "index.html", "summary.csv"])  # no lock, row or staging file
    rows = summary_rows(output)
    assert [row["name"] for row in rows] == NAMES  # one row each, in the order one process writes them
    assert all(row["status"] == "ok" and float(row["keypoint_residual_mm"]) > 0 for row in rows)


def test_two_ranks_give_the_matrices_and_scores_of_one_process(runs):
    assert runs["one"].returncode == 0, log(runs["one"])[-3000:]
    two, one = runs["root"] / "two", runs["root"] / "one"
    for name in NAMES:
        matrix = read_itk_transform(str(two / name / "transform.tfm"))
        np.testing.assert_array_equal(matrix, read_itk_transform(str(one / name / "transform.tfm")))
    assert without_seconds(summary_rows(two)) == without_seconds(summary_rows(one))


def test_rerun_after_deleting_a_case_folder_redoes_only_that_case(runs, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(runs["root"] / "two", output)
    shutil.rmtree(output / "case3")  # registered by rank 1
    kept = [name for name in NAMES if name != "case3"]
    before, rows = snapshot(output, kept), summary_rows(output)
    process = run_torchrun(with_output(runs["arguments"], output))
    assert process.returncode == 0, log(process)[-3000:]
    assert "5 input(s): 1 ok, 4 skipped" in log(process), log(process)[-2000:]
    assert snapshot(output, kept) == before and case_done(str(output), "case3")
    # the skipped cases keep their rows, the redone one gets the same row back (but for its time)
    assert without_seconds(summary_rows(output)) == without_seconds(rows)
    assert sorted(os.listdir(output)) == sorted([*NAMES, "index.html", "summary.csv"])


def rank_process(agent_pid: int, rank: int) -> int:
    """PID of the torchrun worker of ``rank`` started by the agent ``agent_pid`` (Linux ``/proc``)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent_pid and f"RANK={rank}".encode() in environment:
            return int(entry)
    raise LookupError(f"no worker of rank {rank} under {agent_pid}")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the rank's process through /proc (Linux)")
def test_a_killed_rank_loses_no_finished_case_and_a_rerun_completes_the_rest(runs, tmp_path):
    names = [f"scan{index}" for index in range(8)]
    write_cases(tmp_path / "in", names)
    output = tmp_path / "out"
    arguments = with_output(runs["arguments"], output)
    arguments[arguments.index("--dataset_dir") + 1] = str(tmp_path / "in")
    job = subprocess.Popen(
        torchrun_command(layered_inference_command(arguments)),
        cwd=ROOT,
        env=torchrun_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not case_done(str(output), "scan1") and time.monotonic() < deadline:  # rank 1's first case
            time.sleep(0.02)
        os.kill(rank_process(job.pid, 1), signal.SIGKILL)
        assert job.wait(timeout=120) != 0  # torchrun ends the other rank and fails
    finally:
        if job.poll() is None:
            job.kill()
    finished = [name for name in names if case_done(str(output), name)]
    assert "scan1" in finished and len(finished) < len(names), finished  # killed mid-run
    before = snapshot(output, finished)

    process = run_torchrun(arguments)
    assert process.returncode == 0, log(process)[-3000:]
    redone = len(names) - len(finished)
    assert f"8 input(s): {redone} ok, {len(finished)} skipped" in log(process), log(process)[-2000:]
    assert snapshot(output, finished) == before  # finished cases are neither lost nor redone
    rows = summary_rows(output)
    assert [row["name"] for row in rows if row["name"] not in finished] == [n for n in names if n not in finished]
    assert sorted(row["name"] for row in rows) == names
    # every row is a registration's, also those of the killed rank's finished cases (kept in its row file)
    assert all(row["status"] == "ok" and row["keypoint_residual_mm"] for row in rows), rows
    assert sorted(os.listdir(output)) == sorted([*names, "index.html", "summary.csv"])


# Loaded by every python of the job through PYTHONPATH: rank 1 is killed (as by kill -9) the moment it has put its
# first case folder in place (renamed from staging), before the case's row reaches its row file.
KILL_RANK_1_AFTER_ITS_FIRST_FOLDER = """
import os, signal

if os.environ.get("RANK") == "1":
    rename = os.rename

    def rename_then_die(source, target):
        rename(source, target)
        if os.path.basename(source).startswith(".keymorph-tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
"""


def test_a_rank_killed_between_a_case_folder_and_its_row_leaves_the_rerun_its_real_row(runs, tmp_path):
    """The window a kill can hit at any time, hit on purpose: the rerun skips the finished case and the merged
    summary has its registration's row (status, QC scores), as an uninterrupted job writes it, not ``skipped``."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(KILL_RANK_1_AFTER_ITS_FIRST_FOLDER)
    output = tmp_path / "out"
    arguments = with_output(runs["arguments"], output)
    killed = run_torchrun(arguments, python_path=[tmp_path / "inject"])
    assert killed.returncode != 0, log(killed)[-3000:]
    assert case_done(str(output), "case1")  # rank 1's first case is in place ...
    written = {}
    for path in [output / "summary.csv", *map(Path, rank_rows_files(str(output)))]:
        written.update(read_summary_rows(str(path)) if path.exists() else {})
    assert "case1" not in written, written  # ... and its row is nowhere
    finished = [name for name in NAMES if case_done(str(output), name)]
    before = snapshot(output, finished)

    process = run_torchrun(arguments)
    assert process.returncode == 0, log(process)[-3000:]
    assert f"5 input(s): {5 - len(finished)} ok, {len(finished)} skipped" in log(process), log(process)[-2000:]
    assert snapshot(output, finished) == before  # not redone
    rows = {row["name"]: row for row in without_seconds(summary_rows(output))}
    uninterrupted = {row["name"]: row for row in without_seconds(summary_rows(runs["root"] / "two"))}
    assert len(summary_rows(output)) == len(NAMES) and rows == uninterrupted
    assert sorted(os.listdir(output)) == sorted([*NAMES, "index.html", "summary.csv"])


def test_more_ranks_than_cases_and_a_bad_input(runs, tmp_path):
    """Three ranks, two inputs, one of them not an image: the third rank has no case and still takes part (no
    hang), the bad input gets its error row and every rank ends with the job's one line (torchrun then exits 1)."""
    write_cases(tmp_path / "in", ["a"])
    (tmp_path / "in" / "bad.nii.gz").write_bytes(b"not an image")
    arguments = with_output(runs["arguments"], tmp_path / "out")
    arguments[arguments.index("--dataset_dir") + 1] = str(tmp_path / "in")
    process = run_torchrun(arguments, processes=3)
    assert process.returncode == 1, log(process)[-3000:]
    assert "2 input(s): 1 ok, 1 error" in log(process), log(process)[-3000:]
    line = f"keymorph: error: 1 of 2 input(s) failed; see {tmp_path / 'out' / 'summary.csv'} for each message"
    assert process.stderr.count(line) == 3, process.stderr[-3000:]
    rows = summary_rows(tmp_path / "out")
    assert [(row["name"], row["status"]) for row in rows] == [("a", "ok"), ("bad", "error")]
    assert str(tmp_path / "in" / "bad.nii.gz") in rows[1]["message"]


def test_a_folder_another_run_holds_is_refused_by_every_rank(runs, tmp_path):
    from scripts.output_folder import RunLock

    output = tmp_path / "out"
    output.mkdir()
    with RunLock(str(output)):
        process = run_torchrun(with_output(runs["arguments"], output))
    assert process.returncode != 0
    line = f"keymorph: error: {output}: another KeyMorph run (PID {os.getpid()}) is writing to this output folder"
    assert process.stderr.count(line) == 2, process.stderr[-3000:]
    assert os.listdir(output) == []


def test_a_rerun_merges_the_row_files_a_killed_job_left(tmp_path):
    """Also without torchrun: the rows a killed job's ranks kept go into summary.csv (newer than its rows), once."""
    from scripts.case_outputs import RegistrationWriter
    from scripts.output_folder import rank_rows_path

    def write_rows(path, rows):
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["name", "status", "keypoint_residual_mm"])
            writer.writeheader()
            writer.writerows(rows)

    write_rows(tmp_path / "summary.csv", [{"name": "a", "status": "ok"}, {"name": "b", "status": "error"}])
    write_rows(rank_rows_path(str(tmp_path), 1), [{"name": "b", "status": "ok", "keypoint_residual_mm": "2.5"}])
    write_rows(rank_rows_path(str(tmp_path), 3), [{"name": "c", "status": "suspect"}])
    writer = RegistrationWriter(str(tmp_path))
    writer._load_summary(None)
    writer.lock.release()
    assert [(row["name"], row["status"]) for row in summary_rows(tmp_path)] == [
        ("a", "ok"),
        ("b", "ok"),
        ("c", "suspect"),
    ]
    assert summary_rows(tmp_path)[1]["keypoint_residual_mm"] == "2.5"
    assert sorted(os.listdir(tmp_path)) == ["index.html", "summary.csv"]  # the row files are merged and gone


# --- the overlay as a config ------------------------------------------------------------------------------------


def layered_parser(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([INFERENCE, MULTI])
    parser.update(overrides)
    return parser


def test_the_overlay_keeps_the_run_id_and_extends_the_steps():
    from monai.bundle import ConfigParser

    alone = ConfigParser()
    alone.read_config(INFERENCE)
    layered = layered_parser({})
    assert layered.get("run") == "%#inference"
    initialize = layered.get("initialize")
    assert initialize[: len(alone.get("initialize"))] == alone.get("initialize")  # the checks and weights first
    assert any("init_process_group" in step for step in initialize[len(alone.get("initialize")) :])
    assert layered.get("inference") == ["$scripts.inference.register_cases(@evaluator)"]
    assert layered.get("finalize")[-1] == "$scripts.inference.exit_if_failed(@evaluator)"


@pytest.mark.parametrize("world_size, cases", [(2, 5), (4, 3)])
def test_the_ranks_shares_are_disjoint_and_cover_the_cases(monkeypatch, world_size, cases):
    import torch.distributed as dist

    shares = []
    for rank in range(world_size):
        monkeypatch.setattr(dist, "get_rank", lambda *args, rank=rank, **kwargs: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: world_size)
        parser = layered_parser({"dataset": f"$list(range({cases}))"})  # the sampler reads the number of cases only
        shares.append(list(parser.get_parsed_content("dataloader").sampler))
    assert sorted(index for share in shares for index in share) == list(range(cases))
    assert [len(share) for share in shares] == [len(range(rank, cases, world_size)) for rank in range(world_size)]


@pytest.mark.parametrize("rank, expected", [(0, ["ProgressBar", "RegistrationWriter"]), (1, ["RegistrationWriter"])])
def test_every_rank_writes_and_rank_0_alone_shows_progress(monkeypatch, rank, expected):
    """The overlay turns the progress bar off (show_progress) on ranks above 0; the writer stays on every rank."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_rank", lambda *args, **kwargs: rank)
    handlers = layered_parser({}).get_parsed_content("handlers")
    assert [type(handler).__name__ for handler in handlers] == expected


def test_the_layered_workflow_has_the_bundle_properties(runs, tmp_path, monkeypatch):
    """``ConfigWorkflow`` on both files, initialized as a world of one process (what torchrun's variables say)."""
    import socket

    import torch.distributed as dist
    from monai.bundle import ConfigWorkflow

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    root = runs["root"]
    settings = {
        "dataset_dir": str(root / "in"),
        "output_dir": str(tmp_path / "out"),
        "fixed_image": str(root / "fixed.nii.gz"),
        "skull_strip": "none",
        "ckpt_path": str(root / "model.pt"),
        "num_keypoints": 16,
        "network_channels": [8, 8, 16, 16],
        "spatial_size": 32,
    }
    workflow = ConfigWorkflow(config_file=[INFERENCE, MULTI], workflow_type="infer", logging_file=False, **settings)
    try:
        workflow.initialize()
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert workflow.check_properties() == []
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

"""Folders of many cases: preprocessing workers change nothing but the speed, the summary grows by appended rows,
and every process takes its share of the cores.

The runs use the small random network and phantoms of ``tests/test_inference.py`` with ``--skull_strip none``; both
runs of a comparison have one torch thread per process (``OMP_NUM_THREADS=1``), so their float sums agree exactly.
"""

from __future__ import annotations

import csv
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_inference import (
    OUTPUT_FILES,
    ROOT,
    TRUTH,
    _snapshot,
    has_traceback,
    inference_arguments,
    rigid,
    run_bundle,
    write_checkpoint,
    write_fixed,
    write_moving,
)

from scripts.output_folder import read_summary_rows
from scripts.transform_io import read_ras_matrix

CASES = {"a": TRUTH["moving_a"], "b": TRUTH["moving_b"], "c": rigid([0.0, 1.0, 0.3], 15.0, [-3.0, 2.0, 4.0])}


def summary_rows_in_order(output) -> list[dict]:
    """The rows of ``summary.csv`` as the file lists them, without the seconds (a measurement)."""
    with open(os.path.join(output, "summary.csv"), newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three phantoms and a broken file (an error row) in ``in/``, a fixed image and small weights; ``run(output,
    workers, *arguments)`` registers them with that many preprocessing workers."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "in").mkdir()
    for name, fixed_to_moving in CASES.items():
        write_moving(root / "in" / f"{name}.nii.gz", fixed_to_moving)
    (root / "in" / "broken.nii.gz").write_bytes(b"not an image")
    fixed, ckpt = write_fixed(root / "fixed.nii.gz"), write_checkpoint(root / "model.pt")

    def run(output, workers: int, *arguments: str, python_path=()):
        settings = ["--num_workers", str(workers), "--refine_iterations", "3", *arguments]
        arguments = inference_arguments(root / "in", output, fixed, ckpt, *settings)
        return run_bundle(*arguments, python_path=python_path, env={"OMP_NUM_THREADS": "1"})

    return SimpleNamespace(root=root, run=run)


def test_workers_give_the_rows_and_matrices_of_one_process_and_resume_alike(folder):
    alone, prefetched = folder.root / "alone", folder.root / "prefetched"
    process = folder.run(alone, 0)
    assert process.returncode == 1, process.stderr[-3000:]  # the broken file; the others are registered
    # what a run with workers killed after its first case leaves: that case's folder and its row
    shutil.copytree(alone / "a", prefetched / "a")
    with open(alone / "summary.csv") as source, open(prefetched / "summary.csv", "w") as target:
        target.writelines(source.readlines()[:2])
    kept = _snapshot(prefetched / "a")
    process = folder.run(prefetched, 2)
    assert process.returncode == 1, process.stderr[-3000:]
    log = process.stdout + process.stderr
    assert "4 input(s): " in log and "1 error, 1 skipped" in log, log[-3000:]
    assert _snapshot(prefetched / "a") == kept  # skipped, not redone
    rows = summary_rows_in_order(prefetched)
    assert [row["name"] for row in rows] == ["a", "b", "broken", "c"]  # the order of the folder
    assert rows == summary_rows_in_order(alone)  # statuses, messages and QC scores
    assert rows[2]["status"] == "error" and "broken.nii.gz" in rows[2]["message"]
    for name in ("b", "c"):
        np.testing.assert_array_equal(
            read_ras_matrix(str(prefetched / name / "affine_ras.txt")),
            read_ras_matrix(str(alone / name / "affine_ras.txt")),
        )


# Loaded by the bundle's python through PYTHONPATH: a DataLoader worker (a forked child) that starts reading c.nii.gz
# is killed at once, as the kernel kills a process when memory runs out (the fourth case: the first ones are
# registered meanwhile).
KILL_THE_WORKER_OF_C = """
import os, signal


def _in_a_forked_child():
    import scripts.image_io as image_io

    read = image_io.LoadVolumed.__call__

    def read_or_die(self, data):
        if str(data.get("image", "")).endswith("c.nii.gz"):
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, data)

    image_io.LoadVolumed.__call__ = read_or_die


os.register_at_fork(after_in_child=_in_a_forked_child)
"""


def test_a_killed_worker_ends_the_run_with_one_line_and_blames_no_case(folder, tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(KILL_THE_WORKER_OF_C)
    output = tmp_path / "out"
    process = folder.run(output, 2, python_path=[tmp_path / "inject"])
    assert process.returncode == 2 and not has_traceback(process), process.stderr[-3000:]
    line = process.stderr.strip().splitlines()[-1]
    # PyTorch's words ("is killed by signal: Killed" or "exited unexpectedly", as it notices), then ours
    assert line.startswith("keymorph: error: DataLoader worker (pid") and "(out of memory?)" in line, line
    assert "--num_workers 1 or 0" in line
    rows = read_summary_rows(str(output / "summary.csv"))
    assert "a" in rows and "c" not in rows
    for name, row in rows.items():  # what finished is whole, and no case is blamed for the worker
        assert "DataLoader" not in row["message"], row
        assert name == "broken" or sorted(os.listdir(output / name)) == sorted(OUTPUT_FILES)


# --- the summary during a run ---------------------------------------------------------------------------------


def error_output(name: str) -> dict:
    """What the evaluator hands the writer for a case that failed (no files to write)."""
    return {"name": name, "status": "error", "message": f"{name}.nii.gz: broken", "seconds": 0.5}


def test_rows_are_appended_and_the_index_is_rebuilt_every_few_seconds(tmp_path, monkeypatch):
    import scripts.case_outputs as case_outputs

    with open(tmp_path / "summary.csv", "w", newline="") as handle:  # an earlier run: case_003 failed then
        handle.write("name,status,message\ncase_003,error,old failure\nother,ok,\n")
    index_writes, clock = [], [1000.0]
    real_write_index = case_outputs.write_index
    monkeypatch.setattr(case_outputs, "write_index", lambda *a: index_writes.append(clock[0]) or real_write_index(*a))
    monkeypatch.setattr(case_outputs.time, "monotonic", lambda: clock[0])
    writer = case_outputs.RegistrationWriter(str(tmp_path))
    engine = SimpleNamespace(state=SimpleNamespace())
    writer._load_summary(engine)  # the earlier summary written again (the run appends to it): the index too
    assert index_writes == [1000.0]
    for number in range(30):
        clock[0] += 1.0  # a case a second
        engine.state.output = error_output(f"case_{number:03d}")
        before, rebuilds = (tmp_path / "summary.csv").read_text(), len(index_writes)
        writer(engine)
        after = (tmp_path / "summary.csv").read_text()
        if len(index_writes) == rebuilds:  # no rebuild: one row appended, the rest of the file untouched
            assert after.startswith(before) and after.count("\n") == before.count("\n") + 1
        # a run killed now leaves a summary with every case so far, case_003's newest row winning over the old one
        rows = read_summary_rows(str(tmp_path / "summary.csv"))
        assert set(rows) == {"other", "case_003", *(f"case_{n:03d}" for n in range(number + 1))}
        assert rows["case_003"]["message"] == ("old failure" if number < 3 else "case_003.nii.gz: broken")
    # rebuilt at the start, then whenever REBUILD_SECONDS had passed (case_003's two rows become one)
    assert index_writes == [1000.0, 1010.0, 1020.0, 1030.0]
    writer._report(engine)
    assert len(index_writes) == 5  # and at the end
    text = (tmp_path / "summary.csv").read_text()
    assert text.count("case_003,") == 1 and len(read_summary_rows(str(tmp_path / "summary.csv"))) == 31


def test_a_slow_rebuild_comes_less_often(tmp_path, monkeypatch):
    import scripts.case_outputs as case_outputs

    clock = [0.0]
    monkeypatch.setattr(case_outputs.time, "monotonic", lambda: clock[0])
    writer = case_outputs.RegistrationWriter(str(tmp_path))
    engine = SimpleNamespace(state=SimpleNamespace(output=error_output("first")))
    writer._load_summary(engine)
    writer.rebuild_seconds = 2.0  # a folder so large that its index takes 2 s to write
    writer.last_rebuild = 0.0
    clock[0] = 39.0
    assert not writer._rebuild_due()  # at most REBUILD_SHARE of the time: 2 s / 5% = 40 s apart
    clock[0] = 40.0
    assert writer._rebuild_due()
    writer.lock.release()


# --- threads ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cores, environment, workers, threads, expected",
    [
        (8, {}, 0, None, 8),
        (8, {}, 2, None, 6),  # a core per worker
        (2, {}, 1, None, 1),
        (2, {}, 3, None, 1),  # never 0
        (8, {"LOCAL_WORLD_SIZE": "2"}, 1, None, 3),  # torchrun's processes on this machine share the cores too
        (8, {"OMP_NUM_THREADS": "3"}, 1, None, 3),  # the user's (or torchrun's) choice
        (8, {"OMP_NUM_THREADS": "3"}, 1, 5, 5),  # --num_threads first
        (8, {}, 1, "null", 7),
    ],
)
def test_main_process_threads(monkeypatch, cores, environment, workers, threads, expected):
    from scripts.inference import main_process_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    for key in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert main_process_threads(workers, threads) == expected


class ThreadedWork(torch.utils.data.Dataset):
    """Work that torch spreads over its threads (a convolution, as deepbet's), then the worker's thread count."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        volume, kernel = torch.ones(1, 4, 48, 48, 48), torch.ones(4, 4, 3, 3, 3)
        torch.nn.functional.conv3d(volume, kernel)
        return torch.get_num_threads()


def test_workers_of_a_multi_threaded_run_run_one_thread_and_finish():
    """The inference config's DataLoader, its main process on two threads that have run (as a run's have before its
    workers start): OpenMP cannot start threads again in a forked child, so a worker given two hung at its first
    parallel step, forever and without a message (a 6-core machine's default). Each worker must run one thread, and
    the loader must deliver (it raises after its timeout instead of hanging)."""
    from scripts.bundle_api import load_config

    parser = load_config(ROOT, num_workers=2, num_threads=2)
    parser["dataset"], parser["dataloader"]["timeout"] = ThreadedWork(), 120
    loader = parser.get_parsed_content("dataloader")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        torch.nn.functional.conv3d(torch.ones(1, 4, 48, 48, 48), torch.ones(4, 4, 3, 3, 3))
        assert list(loader) == [[1], [1]]  # no collation: a list per case
    finally:
        torch.set_num_threads(threads)

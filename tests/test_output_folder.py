"""Issue 15: the output folder is the only place a run writes to, and one run at a time writes to it.

Through the bundle runner: pairs-CSV case names that try to leave OUT_DIR (``../victim``, an absolute path) or are
not one folder name (``sub/dir``, ``.``) are ``error`` rows that touch nothing outside and leave no staging folder;
an input named ``summary.csv.nii.gz`` cannot replace the summary; a second run into a folder that a live run holds
is refused with one line naming the PID, and a killed holder leaves no stale lock. The name rules and the path
guard of :mod:`scripts.output_folder` are also checked on their own.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_inference import (
    OUTPUT_FILES,
    ROOT,
    TRUTH,
    has_traceback,
    inference_arguments,
    read_summary,
    run_bundle,
    write_checkpoint,
    write_fixed,
    write_moving,
)

from scripts.errors import KeyMorphInputError
from scripts.output_folder import LOCK_FILE, RunLock, case_name_problem, inside, staging_name


def staging_leftovers(output) -> list[str]:
    return [name for name in os.listdir(output) if name.startswith(".")]


def test_case_names_that_leave_the_output_folder_touch_nothing_outside(tmp_path):
    (tmp_path / "images").mkdir()
    write_moving(tmp_path / "images" / "m.nii.gz", TRUTH["moving_a"])
    write_fixed(tmp_path / "images" / "f.nii.gz")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    absolute = tmp_path / "elsewhere" / "abs_case"
    names = ["../victim", str(absolute), "sub/dir", ".", "..", "back\\slash", "good"]
    with open(tmp_path / "pairs.csv", "w", newline="") as handle:
        handle.write("moving,fixed,name\n")
        for name in names:
            handle.write(f"images/m.nii.gz,images/f.nii.gz,{name}\n")
    ckpt = write_checkpoint(tmp_path / "model.pt")
    output = tmp_path / "out"
    arguments = inference_arguments(tmp_path / "unused", output, tmp_path / "unused.nii.gz", ckpt)
    process = run_bundle(*arguments, "--pairs_csv", str(tmp_path / "pairs.csv"), "--refine_iterations", "0")
    assert process.returncode == 1 and not has_traceback(process), process.stderr[-3000:]
    assert sorted(os.listdir(victim)) == ["keep.txt"] and (victim / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(os.listdir(output)) == [
        "good",
        "index.html",
        "summary.csv",
    ]  # no staging folder, no stray case folder
    assert sorted(os.listdir(tmp_path)) == ["images", "model.pt", "out", "pairs.csv", "victim"]
    rows = read_summary(output)
    assert rows["good"]["status"] in ("ok", "suspect")
    for name in names[:-1]:
        row = rows[name]
        assert row["status"] == "error" and "m.nii.gz: case name" in row["message"], row


def test_an_input_named_like_the_summary_cannot_replace_it(tmp_path):
    (tmp_path / "in").mkdir()
    write_moving(tmp_path / "in" / "a.nii.gz", TRUTH["moving_a"])
    write_moving(tmp_path / "in" / "summary.csv.nii.gz", TRUTH["moving_b"])
    fixed = write_fixed(tmp_path / "fixed.nii.gz")
    ckpt = write_checkpoint(tmp_path / "model.pt")
    output = tmp_path / "out"
    arguments = inference_arguments(tmp_path / "in", output, fixed, ckpt, "--refine_iterations", "0")
    for run in range(2):  # the rerun keeps the earlier rows
        process = run_bundle(*arguments)
        assert process.returncode == 1 and not has_traceback(process), process.stderr[-3000:]
        assert (output / "summary.csv").is_file()
        rows = read_summary(output)
        assert rows["a"]["status"] in ("ok", "suspect")
        assert rows["summary.csv"]["status"] == "error"
        assert "summary.csv.nii.gz: case name 'summary.csv'" in rows["summary.csv"]["message"]
        assert sorted(os.listdir(output)) == ["a", "index.html", "summary.csv"]


HOLD_LOCK = """
import sys, time
from scripts.output_folder import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_into_a_held_folder_is_refused_with_the_pid(tmp_path):
    (tmp_path / "in").mkdir()
    write_moving(tmp_path / "in" / "a.nii.gz", TRUTH["moving_a"])
    fixed = write_fixed(tmp_path / "fixed.nii.gz")
    ckpt = write_checkpoint(tmp_path / "model.pt")
    output = tmp_path / "out"
    output.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(output)], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        arguments = inference_arguments(tmp_path / "in", output, fixed, ckpt, "--refine_iterations", "0")
        process = run_bundle(*arguments)
        assert process.returncode == 2 and not has_traceback(process), process.stderr[-3000:]
        line = process.stderr.strip().splitlines()[-1]
        assert line.startswith(f"keymorph: error: {output}: another KeyMorph run (PID {holder.pid})"), line
        assert sorted(os.listdir(output)) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock, the file stays
        holder.wait()
    assert (output / LOCK_FILE).exists()
    process = run_bundle(*arguments)
    assert process.returncode == 0, process.stderr[-3000:]
    assert sorted(os.listdir(output)) == [
        "a",
        "index.html",
        "summary.csv",
    ]  # the lock file goes with the run that held it


def test_run_lock_in_process(tmp_path):
    first, second = RunLock(str(tmp_path)), RunLock(str(tmp_path))
    with first:
        with pytest.raises(KeyMorphInputError, match=f"PID {os.getpid()}"):
            second.acquire()
    with second:  # released: free again
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(
    "name, words",
    [
        ("", "empty"),
        ("  ", "empty"),
        (".", "not a folder name"),
        ("..", "not a folder name"),
        ("../victim", "path separator"),
        ("/abs/path", "path separator"),
        ("a\\b", "path separator"),
        ("a\nb", "line break"),
        ("a\0b", "NUL"),
        (".keymorph-tmp-1-x", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("summary.csv", "file of the run"),
        ("SUMMARY.CSV", "file of the run"),
        ("x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
    ],
)
def test_invalid_case_names(name, words):
    assert words in case_name_problem(name)


@pytest.mark.parametrize("name", ["a", "with space", "non_ascii_é_脑", "x" * 255, "summary", "a.b", "-x", "~"])
def test_valid_case_names(name):
    assert case_name_problem(name) is None


def test_the_guard_keeps_every_path_inside(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", output / "link")
    assert inside(str(output), "case") == str(output / "case")
    assert inside(str(output), "case", "registered.nii.gz") == str(output / "case" / "registered.nii.gz")
    for parts in (("..", "x"), (str(tmp_path / "abs"),), ("link",), ("link", "file"), (".",), ("",)):
        with pytest.raises(KeyMorphInputError, match="outside the output folder"):
            inside(str(output), *parts)


def test_staging_names_are_short_and_distinct():
    long_name = "x" * 255
    assert len(staging_name("tmp", long_name)) < 50
    assert staging_name("tmp", "a") != staging_name("tmp", "b") != staging_name("old", "a")


def test_a_summary_saved_by_a_spreadsheet_keeps_its_rows(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("café", "b"):
        write_moving(tmp_path / "in" / f"{name}.nii.gz", TRUTH["moving_a"])
    fixed = write_fixed(tmp_path / "fixed.nii.gz")
    ckpt = write_checkpoint(tmp_path / "model.pt")
    output = tmp_path / "out"
    arguments = inference_arguments(tmp_path / "in", output, fixed, ckpt, "--refine_iterations", "0")
    assert run_bundle(*arguments).returncode == 0
    before = read_summary(output)
    for encoding, delimiter in (("utf-8-sig", ","), ("cp1252", ","), ("cp1252", ";")):
        text = (output / "summary.csv").read_text(encoding="utf-8").replace(",", delimiter).replace("\n", "\r\n")
        (output / "summary.csv").write_bytes(text.encode(encoding))
        process = run_bundle(*arguments)
        assert process.returncode == 0 and not has_traceback(process), (encoding, process.stderr[-3000:])
        assert read_summary(output) == before, encoding  # statuses and QC scores kept; rewritten as UTF-8, commas
        assert ("not UTF-8" in process.stdout + process.stderr) == (encoding == "cp1252")


# Loaded by the bundle's python through PYTHONPATH: once OUT_DIR/<trigger> exists, every change below OUT_DIR fails
# with EROFS, as when a disk is remounted read-only (root ignores permission bits, so chmod cannot show this).
READ_ONLY_LATER = """
import builtins, errno, os

_OUT = os.environ["KEYMORPH_TEST_OUT"]
_TRIGGER = os.path.join(_OUT, os.environ["KEYMORPH_TEST_TRIGGER"])


def _check(path):
    if isinstance(path, int):
        return
    path = os.path.abspath(os.fspath(path))
    if path.startswith(_OUT + os.sep) and os.path.exists(_TRIGGER):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)


def _guard(function, writes=lambda *a, **k: True):
    def guarded(path, *args, **kwargs):
        if writes(path, *args, **kwargs):
            _check(path)
        return function(path, *args, **kwargs)

    return guarded


builtins.open = _guard(builtins.open, lambda p, mode="r", *a, **k: any(c in mode for c in "wax+"))
for _name in ("mkdir", "rename", "replace", "remove", "unlink", "rmdir"):
    setattr(os, _name, _guard(getattr(os, _name)))
"""


def test_an_output_folder_turning_read_only_mid_run_ends_with_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a", "b", "c"):
        write_moving(tmp_path / "in" / f"{name}.nii.gz", TRUTH["moving_a"])
    fixed = write_fixed(tmp_path / "fixed.nii.gz")
    ckpt = write_checkpoint(tmp_path / "model.pt")
    output = tmp_path / "out"
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(READ_ONLY_LATER)
    arguments = inference_arguments(tmp_path / "in", output, fixed, ckpt, "--refine_iterations", "0")
    env = {"KEYMORPH_TEST_OUT": str(output), "KEYMORPH_TEST_TRIGGER": "a"}
    process = run_bundle(*arguments, python_path=[tmp_path / "inject"], env=env)
    assert process.returncode == 2 and not has_traceback(process), process.stderr[-3000:]
    line = process.stderr.strip().splitlines()[-1]
    assert line.startswith(f"keymorph: error: {output / 'summary.csv'}: cannot write the summary (Read-only"), line
    assert "3 input(s) this run: 1 ok, 2 error" in line or "1 suspect, 2 error" in line, line
    assert sorted(os.listdir(output / "a")) == sorted(OUTPUT_FILES)  # the case written before stays whole
    assert not (output / "b").exists() and not (output / "c").exists()

"""``python -m scripts.register``: its help (every user setting of the config, defaults, choices), the inputs it
finds (a file, a folder, a tree, a glob pattern, a BIDS-like tree) and the bundle workflow it drives."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_inference import TRUTH, read_summary, write_fixed, write_moving

from scripts.api import register
from scripts.register import FROM_ARGUMENTS, OPTIONS, case_names, extra_images, find_moving_images, main
from scripts.transform_io import read_itk_transform

ROOT = Path(__file__).resolve().parents[1]
# the bundle's own weights, no refinement, brain-extracted phantoms: a fast run of the real workflow
FAST = ["--skull_strip", "none", "--refine_iterations", "0"]


def user_settings() -> list[str]:
    """The keys of the "settings users change" block of configs/inference.yaml."""
    text = (ROOT / "configs" / "inference.yaml").read_text()
    block = text.split("# ---- settings users change", 1)[1].split("# ---- model", 1)[0]
    return re.findall(r"^(\w+):", block, re.MULTILINE)


def test_every_user_setting_has_an_option_or_an_argument():
    settings = user_settings()
    assert "skull_strip" in settings and "qc_min_smoothness" in settings  # the block was found
    assert set(settings) - set(FROM_ARGUMENTS) <= set(OPTIONS), "a config setting without a command-line option"


def test_help_lists_settings_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in OPTIONS:
        assert f"--{name}" in text
    for words in (
        "--skull_strip {bundle,deepbet,mask,none}",
        "(default: deepbet)",
        "--aligner {affine,rigid,similarity}",
        "(default: 40)",
        "--search_turns, --no-search_turns",
        "--threads",
        "--bids SUFFIX",
        "-o OUTPUT_DIR",
    ):
        assert words in text, words


@pytest.fixture
def tree(tmp_path):
    """A BIDS-like tree with sessions and two suffixes, a plain subfolder, a hidden file and a non-NIfTI file."""
    files = [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii",
        "sub-02/ses-2/func/sub-02_ses-2_bold.nii.gz",
        "extra/scan.nii.gz",
        "top.nii.gz",
        ".hidden.nii.gz",
        "notes.txt",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def relative(paths, root) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def test_inputs_from_a_file_a_folder_a_tree_a_pattern_and_bids(tree):
    assert relative(find_moving_images(str(tree / "top.nii.gz")), tree) == ["top.nii.gz"]
    assert relative(find_moving_images(str(tree)), tree) == ["top.nii.gz"]
    everything = relative(find_moving_images(str(tree), recursive=True), tree)
    assert everything == sorted(everything) and len(everything) == 7 and ".hidden.nii.gz" not in everything
    assert relative(find_moving_images(str(tree / "sub-*" / "**" / "*_T1w.nii*")), tree) == [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
        "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii",
    ]
    assert relative(find_moving_images(str(tree), bids="T2w"), tree) == ["sub-01/anat/sub-01_T2w.nii.gz"]
    assert len(find_moving_images(str(tree), bids="T1w")) == 3
    # the output folder inside the input tree is never an input
    assert relative(find_moving_images(str(tree), recursive=True, exclude=str(tree / "sub-02")), tree) == [
        "extra/scan.nii.gz",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",
        "top.nii.gz",
    ]


@pytest.mark.parametrize(
    "moving, options, words",
    [
        ("nowhere", {}, "nowhere: no such file or folder"),
        ("notes.txt", {}, "notes.txt: not a .nii or .nii.gz file"),
        ("sub-01", {"bids": "FLAIR"}, "no sub-*/[ses-*/]anat/*_FLAIR.nii[.gz] to register"),
        ("extra/*.nii", {}, "no .nii or .nii.gz files to register"),
    ],
)
def test_no_inputs_is_one_line(tree, moving, options, words):
    from scripts.errors import KeyMorphInputError

    with pytest.raises(KeyMorphInputError, match=re.escape(words)):
        find_moving_images(str(tree / moving), **options)


def test_case_names_are_file_names_unless_they_collide(tmp_path):
    paths = [str(tmp_path / p) for p in ("a/x.nii.gz", "b/x.nii.gz", "b/y.nii")]
    assert case_names(paths, str(tmp_path)) == ["a_x", "b_x", "y"]


def test_accompanying_images_are_found_next_to_each_moving_image(tmp_path):
    (tmp_path / "s1" / "labels").mkdir(parents=True)
    (tmp_path / "s1" / "labels" / "scan_seg.nii.gz").write_bytes(b"")
    assert extra_images(str(tmp_path / "s1" / "scan.nii.gz"), "labels/{name}_seg.nii.gz") == [
        str(tmp_path / "s1" / "labels" / "scan_seg.nii.gz")
    ]
    assert extra_images(str(tmp_path / "s1" / "scan.nii.gz"), None) == []


# --- the workflow it drives ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bids_run(tmp_path_factory):
    """Two T1w images of a BIDS-like tree (one with a session) registered by the command, in process."""
    root = tmp_path_factory.mktemp("cli")
    for folder in ("sub-01/anat", "sub-02/ses-1/anat"):
        (root / "bids" / folder).mkdir(parents=True)
    write_moving(root / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", TRUTH["moving_a"])
    write_moving(root / "bids" / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz", TRUTH["moving_b"])
    write_moving(root / "bids" / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T2w.nii.gz", TRUTH["moving_b"])
    fixed = write_fixed(root / "fixed.nii.gz")
    threads = torch.get_num_threads()
    try:
        code = main([str(root / "bids"), fixed, "--bids", "T1w", "-o", str(root / "out"), "--threads", "1", *FAST])
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "fixed": fixed, "code": code, "threads": used_threads}


def test_a_bids_tree_is_registered_case_by_case(bids_run):
    out = bids_run["root"] / "out"
    assert bids_run["code"] == 0 and bids_run["threads"] == 1
    assert sorted(os.listdir(out)) == ["index.html", "sub-01_T1w", "sub-02_ses-1_T1w", "summary.csv"]
    assert {row["status"] for row in read_summary(out).values()} <= {"ok", "suspect"}
    registered = nib.load(str(out / "sub-02_ses-1_T1w" / "registered.nii.gz"))
    np.testing.assert_allclose(registered.affine, nib.load(bids_run["fixed"]).affine, atol=1e-6)  # FIXED was used


def test_the_command_and_the_python_api_run_one_workflow(bids_run):
    moving = bids_run["root"] / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    result = register(str(moving), bids_run["fixed"], skull_strip="none", refine_iterations=0)
    written = read_itk_transform(str(bids_run["root"] / "out" / "sub-01_T1w" / "transform.tfm"))
    np.testing.assert_allclose(result.fixed_to_moving, written, atol=1e-4)  # 1 vs all threads: float sums differ


def test_a_rerun_skips_finished_cases(bids_run, capsys):
    out = bids_run["root"] / "out"
    before = (out / "sub-01_T1w" / "transform.tfm").stat().st_mtime_ns
    assert main([str(bids_run["root"] / "bids"), bids_run["fixed"], "--bids", "T1w", "-o", str(out), *FAST]) == 0
    assert (out / "sub-01_T1w" / "transform.tfm").stat().st_mtime_ns == before


def test_a_wrong_setting_exits_2_with_one_line(bids_run, capsys, tmp_path):
    moving = str(bids_run["root"] / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    with pytest.raises(SystemExit) as exit_info:
        main([moving, bids_run["fixed"], "-o", str(tmp_path / "out"), *FAST, "--turn_search_above_mm", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "keymorph: error: --turn_search_above_mm -1.0: must be at least 0\n"
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_failed_input_exits_1_and_the_others_are_registered(bids_run, capsys, tmp_path):
    (tmp_path / "in").mkdir()
    write_moving(tmp_path / "in" / "good.nii.gz", TRUTH["moving_a"])
    flat = nib.Nifti1Image(np.ones((40, 40, 40), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(flat, str(tmp_path / "in" / "flat.nii.gz"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "in"), bids_run["fixed"], "-o", str(tmp_path / "out"), *FAST])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("keymorph: error: 1 of 2 input(s) failed")
    rows = read_summary(tmp_path / "out")
    assert rows["flat"]["status"] == "error" and rows["good"]["status"] in ("ok", "suspect")


@pytest.mark.parametrize(
    "extra, words",
    [(["fixed.nii.gz"], "a pairs CSV names its fixed images"), (["--apply_to", "{name}_seg.nii.gz"], "'extra' column")],
)
def test_a_pairs_csv_takes_no_fixed_image_and_no_apply_to(tmp_path, capsys, extra, words):
    (tmp_path / "pairs.csv").write_text("moving,fixed\na.nii.gz,b.nii.gz\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "pairs.csv"), *extra, "-o", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err

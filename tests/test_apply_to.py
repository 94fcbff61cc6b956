"""Issue 15, ``apply_to``: label values beyond float32, accompanying images sharing a file name, patterns that
match nothing; through the bundle runner.

One folder run with ``--apply_to "*/{name}_seg.nii.gz"``: case ``a`` has ``labels/a_seg.nii.gz`` (int32 labels
2**24 + 1 and 2**24 + 3, which float32 cannot hold) and ``lesions/a_seg.nii.gz`` (another image with the same file
name); case ``b`` has none.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
from test_inference import (
    OUTPUT_FILES,
    TRUTH,
    has_traceback,
    inference_arguments,
    label_map,
    read_summary,
    run_bundle,
    write_checkpoint,
    write_fixed,
    write_moving,
    write_nifti,
)

from scripts.case_outputs import extra_output_names
from scripts.errors import KeyMorphInputError

BIG_LABELS = (2**24 + 1, 2**24 + 3)  # float32 turns them into 2**24 and 2**24 + 4


@pytest.fixture(scope="module")
def apply_to_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("apply_to")
    for folder in ("labels", "lesions"):
        (root / "in" / folder).mkdir(parents=True)
    image = nib.load(write_moving(root / "in" / "a.nii.gz", TRUTH["moving_a"]))
    write_moving(root / "in" / "b.nii.gz", TRUTH["moving_b"])
    labels = label_map(image).astype(np.int32)
    big = np.select([labels == 1, labels >= 2], BIG_LABELS, 0).astype(np.int32)
    write_nifti(root / "in" / "labels" / "a_seg.nii.gz", big, image.affine)
    write_nifti(root / "in" / "lesions" / "a_seg.nii.gz", (labels == 3).astype(np.uint8), image.affine)
    fixed = write_fixed(root / "fixed.nii.gz")
    ckpt = write_checkpoint(root / "model.pt")
    output = root / "out"
    arguments = inference_arguments(root / "in", output, fixed, ckpt, "--apply_to", "*/{name}_seg.nii.gz")
    process = run_bundle(*arguments, "--refine_iterations", "0")
    return process, root, output


def test_the_run_succeeds(apply_to_run):
    process, _, output = apply_to_run
    assert process.returncode == 0 and not has_traceback(process), process.stderr[-3000:]
    assert sorted(os.listdir(output / "a")) == sorted(
        [*OUTPUT_FILES, "registered_labels_a_seg.nii.gz", "registered_lesions_a_seg.nii.gz"]
    )


def test_label_values_above_2_to_the_24_survive(apply_to_run):
    _, _, output = apply_to_run
    warped = nib.load(str(output / "a" / "registered_labels_a_seg.nii.gz"))
    assert warped.get_data_dtype() == np.int32
    values = set(np.unique(np.asarray(warped.dataobj)).tolist())
    assert values == {0, *BIG_LABELS}  # both labels present, none rounded


def test_two_images_with_one_file_name_get_two_outputs(apply_to_run):
    _, _, output = apply_to_run
    lesions = nib.load(str(output / "a" / "registered_lesions_a_seg.nii.gz"))
    assert lesions.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(lesions.dataobj)).tolist()) == {0, 1}


def test_a_pattern_matching_nothing_says_so(apply_to_run):
    process, _, output = apply_to_run
    rows = read_summary(output)
    assert "matched no file" not in rows["a"]["message"]
    assert rows["b"]["status"] in ("ok", "suspect")
    assert "--apply_to '*/{name}_seg.nii.gz' matched no file for this case" in rows["b"]["message"]
    assert "matched no file" in process.stderr + process.stdout


def test_extra_output_names():
    assert extra_output_names(["x/a.nii.gz", "y/b.nii.gz"]) == ["registered_a.nii.gz", "registered_b.nii.gz"]
    assert extra_output_names(["r/labels/a.nii", "r/lesions/a.nii", "r/b.nii"]) == [
        "registered_labels_a.nii",
        "registered_lesions_a.nii",
        "registered_b.nii",
    ]
    assert extra_output_names(["p/x/a.nii", "q/x/a.nii"]) == ["registered_p_x_a.nii", "registered_q_x_a.nii"]
    with pytest.raises(KeyMorphInputError, match="overwrite each other"):
        extra_output_names(["r/labels/a.nii", "r/lesions/a.nii", "r/labels_a.nii"])

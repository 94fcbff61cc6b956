"""Issue 15: a rerun never keeps results made from another fixed image, other settings or other weights.

Through the bundle runner, one case registered four times into one output folder: as it is (the record in
``provenance.json`` is checked), again unchanged (skipped), with another fixed image at the same path (redone onto
the new grid) and with other weights and settings (redone, the row says what changed).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from test_inference import (
    TRUTH,
    grid_affine,
    inference_arguments,
    phantom_volume,
    read_summary,
    run_bundle,
    write_checkpoint,
    write_fixed,
    write_moving,
    write_nifti,
)

from scripts.hashes import file_hash


def test_reruns_redo_cases_made_otherwise(tmp_path):
    (tmp_path / "in").mkdir()
    moving = write_moving(tmp_path / "in" / "a.nii.gz", TRUTH["moving_a"])
    fixed = write_fixed(tmp_path / "fixed.nii.gz")
    ckpt = write_checkpoint(tmp_path / "model.pt")
    output = tmp_path / "out"
    arguments = inference_arguments(tmp_path / "in", output, fixed, ckpt, "--refine_iterations", "0")

    def run(*extra: str, skipped: bool = False) -> dict:
        process = run_bundle(*arguments, *extra)
        assert process.returncode == 0, process.stderr[-3000:]
        assert ("1 input(s): 1 skipped" in process.stdout + process.stderr) == skipped
        return read_summary(output)["a"]

    assert run()["status"] in ("ok", "suspect")
    record = json.loads((output / "a" / "provenance.json").read_text())
    assert record["fixed_sha256"] == file_hash(fixed) and record["moving_sha256"] == file_hash(moving)
    assert record["weights_sha256"] == file_hash(ckpt)
    assert record["settings"]["refine_iterations"] == 0 and record["settings"]["aligner"] == "affine"

    first = read_summary(output)["a"]
    assert run(skipped=True) == first  # unchanged: skipped, the row of the first run kept
    assert (output / "a" / "provenance.json").read_text() == json.dumps(record, indent=2, sort_keys=True)

    other_grid = grid_affine((2.5, 2.5, 2.5), (32, 34, 30))
    write_nifti(fixed, phantom_volume(other_grid, (32, 34, 30)), other_grid)
    row = run()
    assert row["status"] in ("ok", "suspect") and "redone: the fixed image changed" in row["message"], row
    assert nib.load(str(output / "a" / "registered.nii.gz")).shape == (32, 34, 30)
    np.testing.assert_array_equal(nib.load(str(output / "a" / "registered.nii.gz")).affine, other_grid)

    write_checkpoint(ckpt, seed=1)
    row = run("--refine_iterations", "3")
    assert "redone: the weights, the settings (refine_iterations) changed" in row["message"], row
    record = json.loads((output / "a" / "provenance.json").read_text())
    assert record["weights_sha256"] == file_hash(ckpt) and record["settings"]["refine_iterations"] == 3

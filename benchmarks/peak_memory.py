"""Peak memory of the inference command on one large input (issue 15: a 512^3 input peaked at 3.7-4.0 GB).

Writes the MNI152 brain (the default fixed image, so any run gives the same input) resampled onto a ``S^3`` grid
that holds the brain (``--size 512``: 0.45 mm voxels, float32, 0.5 GB, uncompressed) into a temporary folder,
registers it with ``python -m monai.bundle run inference`` and the given ``--skull_strip`` (default: the
config's default, deepbet), and prints the peak memory of the command's whole process tree (the runner and its
DataLoader workers): the largest sum of their proportional set sizes (PSS, shared pages divided among the
processes that share them), sampled every ``--sample_seconds`` (``process_memory.py``, Linux ``/proc``). One
process's ``ru_maxrss``, what this printed before, leaves out the workers, which prepare the case::

    python benchmarks/peak_memory.py [--size 512] [--skull_strip deepbet|none] [--sample_seconds 0.1] [--keep DIR]

A measurement, not a test: nothing here asserts a size (``tests/test_large_volumes.py`` bounds a smaller case).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import nibabel as nib
import numpy as np
from scipy.ndimage import map_coordinates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the bundle root
sys.path.insert(0, ROOT)

from process_memory import run_measured  # noqa: E402  (benchmarks/, the folder of this script)

from scripts.image_io import default_atlas_path  # noqa: E402

# Field of view of the large grid (mm): the MNI152 brain is about 140 x 175 x 150 mm, its template box 197 x 233 x 189.
FIELD_OF_VIEW_MM = 230.0


def write_large_input(path: str, size: int) -> None:
    """The MNI152 brain on a ``size^3`` grid of ``FIELD_OF_VIEW_MM / size`` mm voxels centred on its box, trilinear,
    computed slab by slab (the coordinates of the whole grid would take gigabytes)."""
    atlas = nib.load(default_atlas_path())
    source = np.asarray(atlas.dataobj, dtype=np.float32)
    spacing = FIELD_OF_VIEW_MM / size
    center = atlas.affine[:3, :3] @ ((np.array(source.shape) - 1) / 2) + atlas.affine[:3, 3]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = center - spacing * (size - 1) / 2
    to_source = np.linalg.inv(atlas.affine) @ affine
    data = np.zeros((size, size, size), np.float32)
    j, k = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for i in range(size):
        voxels = np.stack([np.full_like(j, i), j, k, np.ones_like(j)]).reshape(4, -1).astype(np.float64)
        coordinates = (to_source @ voxels)[:3]
        data[i] = map_coordinates(source, coordinates, order=1, mode="constant").reshape(size, size)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="voxels per axis of the input")
    parser.add_argument("--skull_strip", default=None, help="deepbet or none (default: the config's)")
    parser.add_argument("--sample_seconds", type=float, default=0.1, help="memory sampling interval")
    parser.add_argument("--keep", default=None, help="write input and outputs here instead of a temporary folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or temporary
        os.makedirs(os.path.join(folder, "in"), exist_ok=True)
        path = os.path.join(folder, "in", f"mni_{args.size}.nii")
        write_large_input(path, args.size)
        command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml"]
        command += ["--dataset_dir", os.path.dirname(path), "--output_dir", os.path.join(folder, "out")]
        command += ["--overwrite", "true"] + (["--skull_strip", args.skull_strip] if args.skull_strip else [])
        env = {**os.environ, "PYTHONPATH": ROOT}
        log_path = os.path.join(folder, "run.log")
        with open(log_path, "w") as log:  # a file, not a pipe: nobody reads a pipe while the sampler runs
            result = run_measured(command, args.sample_seconds, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result["exit_code"] != 0:
            with open(log_path) as log:
                print(log.read()[-2000:], file=sys.stderr)
        summary_path = os.path.join(folder, "out", "summary.csv")
        if not os.path.exists(summary_path):
            sys.exit(f"the run wrote no summary.csv (exit code {result['exit_code']}; its log is above)")
        summary = open(summary_path).read().strip().splitlines()[-1]
        print(
            f"input: {args.size}^3 float32 ({os.path.getsize(path) / 1e9:.2f} GB); skull_strip {args.skull_strip or '(default)'}"
        )
        print(
            f"exit code {result['exit_code']}; peak memory of the run's process tree: {result['peak_pss_mb'] / 1e3:.2f}"
            f" GB (PSS, sampled every {args.sample_seconds} s)"
        )
        print(f"summary row: {summary}")


if __name__ == "__main__":
    main()

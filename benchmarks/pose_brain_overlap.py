"""The brain overlap of each case of a finished pose benchmark, from its saved outputs (no registration is rerun).

    python benchmarks/pose_brain_overlap.py --output_dir docs/benchmark/pose [--spacing_mm 2]

For each case of ``benchmarks/pose_robustness.py``'s run in ``--output_dir`` (``work/cases.json``, ``out/cases.csv``
and the case folders in ``work/registered``): the Dice of the case's ``moving_mask.nii.gz`` carried into the fixed
image by its ``affine_ras.txt`` (moving RAS mm -> fixed RAS mm, nearest neighbour) and the fixed brain (the fixed
image > 0), on the fixed grid sampled every ``--spacing_mm``. This is the quantity of the QC score ``brain_overlap``
(:mod:`scripts.qc`), measured on the native grids instead of the network grids, for runs made before ``summary.csv``
recorded it (later runs have the QC score itself in ``cases.csv``, column ``brain_overlap``). Prints one line per case (failed by the truth, the status the run gave, the overlap) and the range of
the overlap among failures, among right registrations, and among the failures the run's status left ``ok``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import nibabel as nib
import numpy as np
from scipy import ndimage


def carried_overlap(fixed_path: str, case_dir: str, spacing_mm: float) -> float:
    """Dice of the case's moving brain mask carried onto the fixed grid and the fixed brain (fixed image > 0)."""
    fixed = nib.load(fixed_path)
    step = max(1, int(round(spacing_mm / float(np.linalg.norm(fixed.affine[:3, 0])))))
    fixed_brain = (np.asarray(fixed.dataobj) > 0)[::step, ::step, ::step]
    moving_mask = nib.load(os.path.join(case_dir, "moving_mask.nii.gz"))
    moving_to_fixed = np.loadtxt(os.path.join(case_dir, "affine_ras.txt"))
    # fixed voxel (of the sampled lattice) -> fixed world -> moving world -> moving voxel
    lattice = np.diag([step, step, step, 1.0])
    to_moving = np.linalg.inv(moving_mask.affine) @ np.linalg.inv(moving_to_fixed) @ fixed.affine @ lattice
    voxels = np.indices(fixed_brain.shape).reshape(3, -1)
    points = to_moving[:3, :3] @ voxels + to_moving[:3, 3:]
    carried = ndimage.map_coordinates(np.asarray(moving_mask.dataobj) > 0, points, order=0).reshape(fixed_brain.shape)
    return float(2 * (carried & fixed_brain).sum() / max(carried.sum() + fixed_brain.sum(), 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="the --output_dir of benchmarks/pose_robustness.py")
    parser.add_argument("--spacing_mm", type=float, default=2.0, help="sampling of the fixed grid (mm)")
    args = parser.parse_args(argv)
    work = os.path.join(args.output_dir, "work")
    with open(os.path.join(work, "cases.json")) as handle:
        cases = {case["name"]: case for case in json.load(handle)}
    with open(os.path.join(args.output_dir, "out", "cases.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[str, list[float]] = {"failures": [], "right registrations": [], "failures left ok": []}
    for row in rows:
        case_dir = os.path.join(work, "registered", row["name"])
        if not os.path.exists(os.path.join(case_dir, "affine_ras.txt")):
            continue
        overlap = carried_overlap(cases[row["name"]]["fixed"], case_dir, args.spacing_mm)
        failed = row["failed"] == "True"
        print(f"{row['name']}: failed {failed}, status {row['status']}, overlap {overlap:.3f}")
        groups["failures" if failed else "right registrations"].append(overlap)
        if failed and row["status"] == "ok":
            groups["failures left ok"].append(overlap)
    for name, values in groups.items():
        if values:
            print(f"{name}: {len(values)} cases, overlap {min(values):.3f}-{max(values):.3f}")


if __name__ == "__main__":
    main()

"""Cohort throughput: images per hour and peak memory of the default inference command on a folder of N scans.

Usage (from the bundle root)::

    python benchmarks/cohort_throughput.py [--counts 50 200] [--setting KEY=VALUE ...]
        [--label_maps_dir ../shared/data/label_maps] [--subjects training_seg_13 ... training_seg_16]
        [--output_dir docs/benchmark/cohort] [--work_dir DIR] [--report_only]

Images
------
Whole heads at 1 mm rendered from the held-out label maps by :func:`pose_robustness.render` (not the training
generator): image ``i`` shows subject ``i mod S`` in contrast T1, T2, PD or FLAIR by turns, cropped to the head
with a margin, turned by up to :data:`MAX_ANGLE_DEG` degrees about a random axis and shifted by up to 10 mm, the
pose either in the header (an oblique acquisition) or in the voxels (a world-aligned grid: a head tilted in the
scanner), stored as int16 ``.nii.gz`` as scanners write them. Image ``i`` depends only on ``i`` and ``--seed``,
so the images are made once into ``--work_dir`` and the folders of every count share them.

Run
---
For each N of ``--counts``: ``python -m monai.bundle run inference --config_file configs/inference.yaml
--dataset_dir IN --output_dir OUT`` on a folder of the first N images, as a user runs it (a subprocess, a fresh
output folder, the DEFAULT settings; ``--setting KEY=VALUE`` adds ``--KEY VALUE``, e.g. ``num_workers=0`` or
``skull_strip=none``). Reported per N (``throughput.csv``, ``summary.md``):

* wall seconds of the command (start-up included), images per hour and seconds per image from them;
* seconds per image in the steady state: the spread of the case folders' completion times over N - 1;
* peak memory of the process tree (the command and its preprocessing workers), sampled every
  ``--sample_seconds`` from ``/proc`` (Linux; ``process_memory.py``): the largest sum of resident set sizes (RSS;
  pages shared between processes, such as the libraries of forked workers, count once per process, so this is an
  upper bound) and of proportional set sizes (PSS: shared pages divided among their processes, the memory the
  tree really takes);
* the statuses of ``summary.csv`` (T2 and PD whole heads are often ``suspect`` or wrong: deepbet is a T1 network;
  they still take their time).

A measurement, not a test: nothing here asserts a speed (``tests/test_cohort_benchmark.py`` checks the report).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from collections import Counter

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BUNDLE_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from network_speed import cpu_model  # noqa: E402
from pose_robustness import CONTRASTS, render  # noqa: E402
from process_memory import run_measured  # noqa: E402

from scripts.image_io import resample_world_aligned  # noqa: E402
from scripts.random_motions import misalignment, random_axis  # noqa: E402
from scripts.synthesis import EXTRA_CEREBRAL_MIN, load_label_map  # noqa: E402

#: Largest turn of a rendered head (degrees): scanner positioning, not the any-pose benchmark's 180.
MAX_ANGLE_DEG = 30.0
#: Air kept around the head when a label map is cropped (mm).
HEAD_MARGIN_MM = 8.0
#: The columns of ``throughput.csv``.
COLUMNS = [
    "images",
    "settings",
    "wall_seconds",
    "images_per_hour",
    "seconds_per_image",
    "steady_seconds_per_image",
    "peak_rss_mb",
    "peak_pss_mb",
    "statuses",
    "exit_code",
]


# --- images ---------------------------------------------------------------------------------------------------


def cropped_to_head(labels: MetaTensor, margin_mm: float = HEAD_MARGIN_MM) -> MetaTensor:
    """The label map ``(1, D, H, W)`` (1 mm, RAS) cropped to its non-zero voxels plus ``margin_mm``, affine moved."""
    array = labels[0].numpy()
    margin = int(round(margin_mm))
    low, high = [], []
    for axis, size in enumerate(array.shape):
        occupied = np.nonzero(array.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        low.append(max(int(occupied[0]) - margin, 0))
        high.append(min(int(occupied[-1]) + margin + 1, size))
    affine = torch.as_tensor(labels.affine, dtype=torch.float64).clone()
    affine[:3, 3] += affine[:3, :3] @ torch.tensor(low, dtype=torch.float64)
    crop = array[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(crop))[None], affine=affine)


def write_image(path: str, labels: MetaTensor, index: int, seed: int) -> None:
    """Image ``index`` of the cohort (module docstring) from its subject's cropped label map, written to ``path``."""
    rng = np.random.RandomState([seed, index])
    contrast = CONTRASTS[index % len(CONTRASTS)]
    array = labels[0].numpy()
    affine = torch.as_tensor(labels.affine, dtype=torch.float64)
    head = render(array, np.ones(3), contrast, rng, head=True)
    brain = (array > 0) & (array < EXTRA_CEREBRAL_MIN)
    centre = (affine[:3, :3] @ torch.from_numpy(np.argwhere(brain).mean(0)) + affine[:3, 3]).numpy()
    move = misalignment(rng.uniform(0, MAX_ANGLE_DEG), random_axis(rng), np.ones(3), rng.uniform(-10, 10, 3), centre)
    image = MetaTensor(torch.from_numpy(head)[None], affine=move @ affine)
    if rng.rand() < 0.5:  # the pose in the voxels: the turned head on a world-aligned grid
        image = resample_world_aligned(image, [1.0, 1.0, 1.0])
    nifti = nib.Nifti1Image(np.round(image[0].numpy() * 1000).astype(np.int16), image.affine.numpy())
    nifti.header.set_xyzt_units("mm")
    nib.save(nifti, path)


def make_images(label_maps: list[str], count: int, work_dir: str, seed: int = 0) -> list[str]:
    """The paths of images ``0 .. count - 1`` in ``work_dir/images``, writing those not made yet."""
    folder = os.path.join(work_dir, "images")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"head_{seed}_{index:04d}.nii.gz") for index in range(count)]
    subjects: dict[int, MetaTensor] = {}
    for index, path in enumerate(paths):
        if os.path.exists(path):
            continue
        subject = index % len(label_maps)
        if subject not in subjects:
            subjects[subject] = cropped_to_head(load_label_map(label_maps[subject], spacing=1.0))
        write_image(path + ".part.nii.gz", subjects[subject], index, seed)
        os.replace(path + ".part.nii.gz", path)
    return paths


def input_folder(paths: list[str], folder: str) -> str:
    """A fresh ``folder`` of symbolic links to ``paths`` (the run reads exactly these images)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for path in paths:
        os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))
    return folder


# --- one timed run --------------------------------------------------------------------------------------------


def inference_command(dataset_dir: str, output_dir: str, settings: list[str]) -> list[str]:
    """The user's command on a folder, with ``KEY=VALUE`` settings as ``--KEY VALUE``."""
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml"]
    command += ["--dataset_dir", dataset_dir, "--output_dir", output_dir]
    for setting in settings:
        key, value = setting.split("=", 1)
        command += [f"--{key}", value]
    return command


def steady_seconds_per_image(output_dir: str, names: list[str]) -> float:
    """Seconds between the first and the last case folder's completion, per image after the first (nan when fewer
    than two folders were written)."""
    folders = [os.path.join(output_dir, name) for name in names]
    times = sorted(os.path.getmtime(folder) for folder in folders if os.path.isdir(folder))
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")


def measure(paths: list[str], work_dir: str, settings: list[str], sample_seconds: float) -> dict:
    """One run of the inference command on a folder of ``paths`` (module docstring); a row of ``throughput.csv``."""
    count = len(paths)
    folder = input_folder(paths, os.path.join(work_dir, f"in_{count}"))
    output = os.path.join(work_dir, f"out_{count}")
    shutil.rmtree(output, ignore_errors=True)
    log_path = os.path.join(work_dir, f"run_{count}.log")
    with open(log_path, "w") as log:
        result = run_measured(
            inference_command(folder, output, settings),
            sample_seconds,
            cwd=BUNDLE_ROOT,
            env={**os.environ, "PYTHONPATH": BUNDLE_ROOT},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    statuses: Counter = Counter()
    summary = os.path.join(output, "summary.csv")
    if os.path.exists(summary):
        with open(summary, newline="") as handle:
            statuses.update(row["status"] for row in csv.DictReader(handle))
    names = [os.path.basename(p)[: -len(".nii.gz")] for p in paths]
    wall = result["wall_seconds"]
    return {
        "images": count,
        "settings": " ".join(settings) or "defaults",
        "wall_seconds": f"{wall:.1f}",
        "images_per_hour": f"{count / wall * 3600:.0f}",
        "seconds_per_image": f"{wall / count:.2f}",
        "steady_seconds_per_image": f"{steady_seconds_per_image(output, names):.2f}",
        "peak_rss_mb": f"{result['peak_rss_mb']:.0f}",
        "peak_pss_mb": f"{result['peak_pss_mb']:.0f}",
        "statuses": " ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "no summary",
        "exit_code": result["exit_code"],
    }


# --- report ---------------------------------------------------------------------------------------------------


def summary_markdown(rows: list[dict]) -> str:
    """The report of ``throughput.csv``'s rows: one table row per run."""
    lines = ["# Cohort throughput (benchmarks/cohort_throughput.py)", ""]
    lines += [
        f"Whole heads at 1 mm (T1, T2, PD, FLAIR by turns, turned by up to {MAX_ANGLE_DEG:g} degrees), the default "
        "inference command on a folder of N of them. Machine: "
        f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores available.",
        "",
        "| images | settings | wall (s) | images / hour | s / image | s / image, steady | peak RSS, tree (MB) "
        "| peak PSS, tree (MB) | statuses | exit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    lines += [
        "",
        "Wall time includes the start-up (the network, deepbet and the fixed image loaded once); the steady state is "
        "the spread of the case folders' completion times. RSS counts the pages the processes share once per "
        "process (an upper bound), PSS divides them among the processes.",
    ]
    return "\n".join(lines) + "\n"


def write_report(output_dir: str, rows: list[dict]) -> str:
    """Write ``throughput.csv`` and ``summary.md`` into ``output_dir``; returns the markdown."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "throughput.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    text = summary_markdown(rows)
    with open(os.path.join(output_dir, "summary.md"), "w") as handle:
        handle.write(text)
    return text


def read_rows(output_dir: str) -> list[dict]:
    """The rows of an earlier ``throughput.csv``."""
    with open(os.path.join(output_dir, "throughput.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", nargs="+", type=int, default=[50, 200], help="folder sizes to time")
    parser.add_argument("--setting", action="append", default=[], help="KEY=VALUE override of inference.yaml")
    parser.add_argument("--label_maps_dir", default=os.path.join(BUNDLE_ROOT, "..", "shared", "data", "label_maps"))
    parser.add_argument("--subjects", nargs="+", default=[f"training_seg_{n}" for n in (13, 14, 15, 16)])
    parser.add_argument("--output_dir", default=os.path.join(BUNDLE_ROOT, "docs", "benchmark", "cohort"))
    parser.add_argument("--work_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "keymorph", "cohort"))
    parser.add_argument("--sample_seconds", type=float, default=0.2, help="memory sampling interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report_only", action="store_true", help="rewrite summary.md from throughput.csv; no run")
    args = parser.parse_args(argv)
    if args.report_only:
        print(write_report(args.output_dir, read_rows(args.output_dir)))
        return 0
    bad = [s for s in args.setting if "=" not in s]
    if bad:
        parser.error(f"--setting {bad[0]!r}: expected KEY=VALUE")
    label_maps = [os.path.join(args.label_maps_dir, f"{s}.nii.gz") for s in args.subjects]
    missing = [p for p in label_maps if not os.path.exists(p)]
    if missing:
        print(f"cohort_throughput: error: label maps not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    images = make_images(label_maps, max(args.counts), args.work_dir, args.seed)
    rows = [measure(images[:count], args.work_dir, args.setting, args.sample_seconds) for count in args.counts]
    print(write_report(args.output_dir, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The default user path at any pose: whole-head scans, default settings, rotations in the header and in the voxels.

Usage (from the bundle root)::

    python benchmarks/pose_robustness.py --label_maps_dir ../shared/data/label_maps \\
        --subjects training_seg_13 training_seg_14 training_seg_15 training_seg_16 --output_dir docs/benchmark/pose \\
        [--angles 0 45 90 135 180] [--spacing 1.0] [--work_dir DIR] [--setting KEY=VALUE ...] [--mask_only]
        [--mask_methods bundle deepbet deepbet+pose] [--brain_mask_weights PATH] [--report_only]

Images
------
Rendered from the held-out label maps by :func:`render`, a generator other than the training synthesis: one fixed
intensity per tissue class and contrast (T1, T2, PD, FLAIR), the extra-cerebral labels as fat, muscle, bone and
fluid by turns, a Gaussian partial-volume blur of 0.6 mm, a smooth quadratic bias field and Rician noise, on the
label map's own 1 mm grid. Fixed images are brain-extracted T1s (label-map brain), as a user's atlas or reference
is; moving images are WHOLE HEADS (skull, scalp, eyes, neck) in T1, T2, PD or FLAIR.

Cases
-----
For each subject ``s`` (its successor in ``--subjects`` is ``s'``) and angle: a same-subject pair (moving: the whole
head of ``s`` in the next contrast, fixed: the brain of ``s``; the truth is known: mean error over the fixed brain
voxels) and a different-subject pair (moving: the whole head of ``s``, fixed: the brain of ``s'``; Dice of the 32
brain structures). The moving image is turned by exactly ``angle`` about a random axis through its brain centre,
with a shift of up to 10 mm, and written two ways: ``header`` (the same voxels, the turn in the affine) and
``voxel`` (resampled onto a world-aligned 1 mm grid: a head tilted in the scanner).

Every pair goes through ``python -m monai.bundle run inference --config_file configs/inference.yaml --pairs_csv``
with the DEFAULT settings (``--setting`` overrides one, e.g. ``skull_strip=none``), and is scored from the
``affine_ras.txt`` it wrote. A case FAILS when its mean error exceeds 5 mm or its Dice is below 0.3. Each case also
keeps what the run's ``summary.csv`` says of it: its status (``suspect`` when QC flagged it) and its QC
``brain_overlap`` (:mod:`scripts.qc`). Issue #10 accepts a failure that QC flags for review, so the registration
tables count the flagged failures beside the failures.

The brain extraction itself is scored separately (``mask_dice.csv``): the moving images' brain masks from
:class:`scripts.skull_strip.SkullStripd` with each of ``--mask_methods``: ``bundle`` (the bundle's brain-mask
network; by default only when its weights exist, and a one-line error before the run when asked for without them),
``deepbet`` (deepbet alone) and ``deepbet+pose`` (deepbet, the brain's pose, deepbet again upright), against the
label map's brain, per angle and contrast, with the seconds per image.

Outputs in ``--output_dir``: ``cases.csv`` (one row per case: name, condition, pair, kind, angle, contrast, status,
seconds, brain_overlap, dice, error_mm, failed), ``mask_dice.csv``, ``summary.md`` (failure rate, flagged failures,
Dice and error per angle and rotation kind; the QC brain_overlap of the failures and of the right registrations;
mask Dice per angle; the machine). ``--report_only`` rewrites ``summary.md`` from the csv files, also those of a run
before ``cases.csv`` had ``brain_overlap`` (then unknown).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, BUNDLE_ROOT)

from scripts.evaluation import score_case  # noqa: E402
from scripts.image_io import resample_world_aligned  # noqa: E402
from scripts.random_motions import misalignment, random_axis  # noqa: E402
from scripts.synthesis import EXTRA_CEREBRAL_MIN, load_label_map, tissue_class  # noqa: E402

CONTRASTS = ("T1", "T2", "PD", "FLAIR")
#: Intensity per tissue class and contrast of :func:`render` (not the training presets).
INTENSITIES = {
    "T1": {"wm": 0.85, "brainstem": 0.75, "cortex": 0.45, "deep_gm": 0.62, "pallidum": 0.72, "csf": 0.1},
    "T2": {"wm": 0.25, "brainstem": 0.35, "cortex": 0.5, "deep_gm": 0.42, "pallidum": 0.28, "csf": 1.0},
    "PD": {"wm": 0.55, "brainstem": 0.6, "cortex": 0.75, "deep_gm": 0.7, "pallidum": 0.62, "csf": 0.85},
    "FLAIR": {"wm": 0.45, "brainstem": 0.5, "cortex": 0.7, "deep_gm": 0.62, "pallidum": 0.5, "csf": 0.05},
}
#: Extra-cerebral tissue kinds and their intensity per contrast (fat, muscle, bone, fluid).
EXTRA = {
    "T1": (0.95, 0.35, 0.05, 0.1),
    "T2": (0.6, 0.2, 0.05, 1.0),
    "PD": (0.8, 0.5, 0.1, 0.85),
    "FLAIR": (0.8, 0.3, 0.05, 0.05),
}
FAILURE_ERROR_MM, FAILURE_DICE = 5.0, 0.3
#: What real scans have that the framing must survive (see :func:`with_condition`).
CONDITIONS = ("cut_top", "cut_bottom", "big_ventricles", "lesion")
#: Label of the synthetic lesion (not a FreeSurfer brain label: its own intensity, scored as no structure).
LESION_LABEL = 99


def render(labels: np.ndarray, spacing: np.ndarray, contrast: str, rng: np.random.RandomState, head: bool):
    """A float32 image in [0, 1] of a label map ``(D, H, W)`` (see the module docstring); 0 outside the brain
    without ``head``."""
    table = np.zeros(int(labels.max()) + 1, dtype=np.float32)
    for value in np.unique(labels):
        if 0 < value < EXTRA_CEREBRAL_MIN:
            table[value] = 0.98 if value == LESION_LABEL else INTENSITIES[contrast].get(tissue_class(int(value)), 0.5)
        elif value >= EXTRA_CEREBRAL_MIN and head:
            table[value] = EXTRA[contrast][int(value) % 4]
    image = table[labels] * rng.uniform(0.97, 1.03, size=table.shape)[labels]
    image = ndimage.gaussian_filter(image, 0.6 / spacing)
    axes = [np.linspace(-1, 1, n) for n in labels.shape]
    grid = np.meshgrid(*axes, indexing="ij")
    bias = sum(rng.uniform(-0.15, 0.15) * g + rng.uniform(-0.1, 0.1) * g**2 for g in grid)
    image = image * np.exp(bias)
    sigma = rng.uniform(0.01, 0.03)
    image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    if not head:
        image = image * ((labels > 0) & (labels < EXTRA_CEREBRAL_MIN))
    return (image / np.percentile(image, 99.9)).clip(0, 1).astype(np.float32)


def _save(path: str, data, affine, dtype) -> None:
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def with_condition(array: np.ndarray, condition: str, spacing: float, rng: np.random.RandomState) -> np.ndarray:
    """The label map changed as real scans differ (module docstring, Conditions); ``full``: unchanged.

    Cuts are applied to the label map (cut-off tissue becomes air, label 0) along the world's superior axis.
    """
    array = array.copy()
    brain = (array > 0) & (array < EXTRA_CEREBRAL_MIN)
    z = np.nonzero(brain.any((0, 1)))[0]
    cut = int(round(20.0 / spacing))
    if condition == "cut_top":
        array[..., z.max() - cut :] = 0
    elif condition == "cut_bottom":
        array[..., : z.min() + cut] = 0
    elif condition == "big_ventricles":
        for ventricle, white in ((4, 2), (43, 41)):
            grown = ndimage.binary_dilation(array == ventricle, iterations=int(round(4.0 / spacing)))
            array[grown & (array == white)] = ventricle
    elif condition == "lesion":
        white = np.argwhere(array == 2)
        centre = white[rng.randint(len(white))]
        index = np.stack(np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij"), -1)
        array[(np.linalg.norm(index - centre, axis=-1) * spacing <= 12.0) & brain] = LESION_LABEL
    return array


def make_cases(
    label_maps: list[str], angles: list[float], spacing: float, work_dir: str, seed: int, condition_angles: list[float]
) -> list[dict]:
    """Write every case's images (module docstring) and return the case records."""
    rng = np.random.RandomState(seed)
    subjects = [load_label_map(path, spacing=spacing) for path in label_maps]
    fixed_paths, cases = [], []
    for index, labels in enumerate(subjects):
        array = labels[0].numpy()
        affine = torch.as_tensor(labels.affine, dtype=torch.float64)
        brain = (array > 0) & (array < EXTRA_CEREBRAL_MIN)
        path = os.path.join(work_dir, f"fixed_{index}.nii.gz")
        _save(path, render(array, np.full(3, spacing), "T1", rng, head=False), affine, np.float32)
        _save(path.replace(".nii.gz", "_labels.nii.gz"), array * brain, affine, np.int16)
        fixed_paths.append(path)
    runs = [("full", angle, ("header", "voxel"), ("same", "other")) for angle in angles]
    runs += [(c, angle, ("voxel",), ("same",)) for c in CONDITIONS for angle in condition_angles]
    for index, labels in enumerate(subjects):
        original = labels[0].numpy()
        affine = torch.as_tensor(labels.affine, dtype=torch.float64)
        brain = (original > 0) & (original < EXTRA_CEREBRAL_MIN)
        centre = (affine[:3, :3] @ torch.from_numpy(np.argwhere(brain).mean(0)) + affine[:3, 3]).numpy()
        for run, (condition, angle, kinds, pairs) in enumerate(runs):
            contrast = CONTRASTS[(index + run) % len(CONTRASTS)]
            array = with_condition(original, condition, spacing, rng)
            head = render(array, np.full(3, spacing), contrast, rng, head=True)
            move = misalignment(angle, random_axis(rng), np.ones(3), rng.uniform(-10, 10, 3), centre)
            scored = original * (array > 0)  # scored labels: the subject's own anatomy where the image shows it
            for kind in kinds:
                name = f"s{index}_{contrast}_{condition}_r{int(angle)}_{kind}"
                image = MetaTensor(torch.from_numpy(head)[None], affine=move @ affine)
                label = MetaTensor(torch.from_numpy(scored)[None], affine=move @ affine)
                if kind == "voxel":
                    image = resample_world_aligned(image, [spacing] * 3)
                    label = resample_world_aligned(label, [spacing] * 3, mode="nearest")
                moving_path = os.path.join(work_dir, f"{name}.nii.gz")
                _save(moving_path, image[0].numpy(), image.affine, np.float32)
                _save(moving_path.replace(".nii.gz", "_labels.nii.gz"), label[0].numpy(), label.affine, np.int16)
                for pair in pairs:
                    fixed_index = index if pair == "same" else (index + 1) % len(subjects)
                    cases.append(
                        {
                            "name": f"{name}_{pair}",
                            "moving": moving_path,
                            "fixed": fixed_paths[fixed_index],
                            "condition": condition,
                            "pair": pair,
                            "kind": kind,
                            "angle": angle,
                            "contrast": contrast,
                            "truth": move.tolist() if pair == "same" else None,
                        }
                    )
    return cases


def run_inference(cases: list[dict], output_dir: str, settings: list[str]) -> None:
    """Register every case with the bundle runner (one process, default settings plus ``settings``)."""
    pairs = os.path.join(output_dir, "pairs.csv")
    with open(pairs, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["moving", "fixed", "name"])
        for case in cases:
            writer.writerow([case["moving"], case["fixed"], case["name"]])
    extra = []
    for setting in settings:
        key, value = setting.split("=", 1)
        extra += [f"--{key}", value]
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml"]
    command += ["--pairs_csv", pairs, "--output_dir", os.path.join(output_dir, "registered"), *extra]
    subprocess.run(command, cwd=BUNDLE_ROOT, env={**os.environ, "PYTHONPATH": BUNDLE_ROOT}, check=False)


def _load(path: str, label: bool = False):
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.int32 if label else np.float32)
    return MetaTensor(torch.from_numpy(data)[None], affine=torch.as_tensor(image.affine, dtype=torch.float64))


def score(cases: list[dict], output_dir: str) -> list[dict]:
    """Dice / mean error of each registered case (module docstring); status, seconds and the QC brain_overlap from
    summary.csv (empty when the run gave the case none: an error, or no row)."""
    with open(os.path.join(output_dir, "registered", "summary.csv"), newline="") as handle:
        summary = {row["name"]: row for row in csv.DictReader(handle)}
    rows = []
    for case in cases:
        row = {k: case[k] for k in ("name", "condition", "pair", "kind", "angle", "contrast")}
        result = summary.get(case["name"], {})
        row.update(
            status=result.get("status", "missing"),
            seconds=result.get("seconds", ""),
            brain_overlap=result.get("brain_overlap", ""),
        )
        matrix_path = os.path.join(output_dir, "registered", case["name"], "affine_ras.txt")
        dice = error = float("nan")
        if os.path.exists(matrix_path):
            fixed_to_moving = torch.linalg.inv(torch.from_numpy(np.loadtxt(matrix_path)))
            fixed_labels = _load(case["fixed"].replace(".nii.gz", "_labels.nii.gz"), label=True)
            record = {
                "fixed": {"label": fixed_labels, "mask": (fixed_labels > 0).float()},
                "moving": {"label": _load(case["moving"].replace(".nii.gz", "_labels.nii.gz"), label=True)},
            }
            record["moving"]["label"] = record["moving"]["label"] * (record["moving"]["label"] < EXTRA_CEREBRAL_MIN)
            if case["truth"] is not None:
                record["true_fixed_to_moving"] = torch.tensor(case["truth"], dtype=torch.float64)
            dice, error = score_case(record, fixed_to_moving)
        row.update(dice=dice, error_mm=error)
        row["failed"] = not (np.isfinite(dice) and dice >= FAILURE_DICE) or (
            case["truth"] is not None and not error <= FAILURE_ERROR_MM
        )
        rows.append(row)
    return rows


#: The brain-extraction methods :func:`mask_scores` can compare: settings of :class:`scripts.skull_strip.SkullStripd`.
MASK_METHODS = {
    "bundle": {"backend": "bundle"},
    "deepbet": {"backend": "deepbet", "head_pose": False},
    "deepbet+pose": {"backend": "deepbet", "head_pose": True},
}


def mask_scores(cases: list[dict], methods=tuple(MASK_METHODS), brain_mask_weights: str | None = None) -> list[dict]:
    """Brain-mask Dice and seconds of each moving image with each of ``methods`` (keys of :data:`MASK_METHODS`);
    ``brain_mask_weights``: the weights of ``bundle`` (default: the bundle's ``models/brain_mask.pt``)."""
    from scripts.image_io import load_volume
    from scripts.skull_strip import BRAIN_MASK_WEIGHTS, SkullStripd

    weights = brain_mask_weights or BRAIN_MASK_WEIGHTS
    strippers = {method: SkullStripd(**MASK_METHODS[method], weights=weights) for method in methods}
    rows, seen = [], set()
    for case in cases:
        if case["moving"] in seen or case["condition"] != "full":
            continue
        seen.add(case["moving"])
        image = load_volume(case["moving"])
        labels = _load(case["moving"].replace(".nii.gz", "_labels.nii.gz"), label=True)[0]
        truth = (labels > 0) & (labels < EXTRA_CEREBRAL_MIN)
        for method, stripper in strippers.items():
            start = time.perf_counter()
            mask = stripper({"image": image})["mask"][0] > 0.5
            seconds = time.perf_counter() - start
            dice = float(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
            rows.append(
                {
                    "image": os.path.basename(case["moving"]),
                    "method": method,
                    "kind": case["kind"],
                    "angle": case["angle"],
                    "contrast": case["contrast"],
                    "dice": dice,
                    "seconds": seconds,
                }
            )
    return rows


def _known(values) -> list[float]:
    """The finite numbers among csv values (numbers, or strings; "" and NaN are unknown)."""
    return [float(v) for v in values if v != "" and np.isfinite(float(v))]


def _mean(values) -> str:
    values = _known(values)
    return f"{np.mean(values):.3f}" if values else "-"


def _failures_cell(group: list[dict]) -> str:
    """``failed/cases fail``, with how many of the failures QC flagged ``suspect`` when there are any."""
    failed = [r for r in group if bool(r["failed"])]
    flagged = sum(r["status"] == "suspect" for r in failed)
    return f"{len(failed)}/{len(group)} fail" + (f" ({flagged} flagged)" if failed else "")


def overlap_lines(rows: list[dict]) -> list[str]:
    """The range of the QC brain_overlap among the failures and among the right registrations, as list items; it is
    unknown for rows without one (a run before ``cases.csv`` had the column, or a case the run gave none)."""
    groups = {
        "failures": [r for r in rows if bool(r["failed"])],
        "right registrations": [r for r in rows if not bool(r["failed"])],
    }
    lines = []
    for words, group in groups.items():
        known = _known(r.get("brain_overlap", "") for r in group)
        if not known:
            lines.append(f"- {words}: unknown ({len(group)} cases)")
            continue
        unknown = f"; unknown for {len(group) - len(known)}" if len(known) < len(group) else ""
        lines.append(f"- {words}: {min(known):.3f}-{max(known):.3f} ({len(known)} cases{unknown})")
    return lines


def run_lines(settings: list[str]) -> list[str]:
    """The ``Settings:`` and ``Machine:`` lines of a run made here and now."""
    return [
        f"Settings: defaults of configs/inference.yaml{' with ' + ', '.join(settings) if settings else ''}.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}.",
    ]


def recorded_run_lines(summary_path: str) -> list[str] | None:
    """The ``Settings:`` and ``Machine:`` lines of an earlier ``summary.md`` (None without both): a rewritten
    report must describe the run that made its csv files, not the process that rewrites it."""
    if not os.path.exists(summary_path):
        return None
    with open(summary_path) as handle:
        lines = [line.rstrip("\n") for line in handle if line.startswith(("Settings:", "Machine:"))]
    return lines if len(lines) == 2 else None


def summary_markdown(rows: list[dict], mask_rows: list[dict], run: list[str]) -> str:
    """The report; ``run``: its settings and machine lines (:func:`run_lines`)."""
    conditions = [r for r in rows if r["condition"] != "full"]
    rows = [r for r in rows if r["condition"] == "full"]
    angles = sorted({r["angle"] for r in rows} | {r["angle"] for r in mask_rows})
    lines = ["# Default user path at any pose (benchmarks/pose_robustness.py)", ""] + run + [""]
    if rows:
        lines += ["## Registration: failures (error > 5 mm or Dice < 0.3) per angle", ""]
        lines += ["(N flagged): failures that QC marked `suspect`, which issue #10 accepts (they go to review).", ""]
        lines += ["| rotation in | pairs | " + " | ".join(f"{a:g} deg" for a in angles) + " |"]
        lines += ["|---|---|" + "---|" * len(angles)]
        for kind in ("header", "voxel"):
            for pair in ("same", "other"):
                cells = []
                for angle in angles:
                    group = [r for r in rows if r["kind"] == kind and r["pair"] == pair and r["angle"] == angle]
                    key = "error_mm" if pair == "same" else "dice"
                    unit = " mm" if pair == "same" else ""
                    cells.append(f"{_failures_cell(group)}, {_mean(r[key] for r in group)}{unit}")
                label = "same subject (mean error)" if pair == "same" else "other subject (Dice)"
                lines += [f"| {kind} | {label} | " + " | ".join(cells) + " |"]
        lines += [""]
    if conditions:
        lines += ["## What real scans have: same-subject pairs (voxel rotations), mean error and status", ""]
        lines += ["A case passes when it registers (error <= 5 mm) or is flagged `suspect` for review.", ""]
        lines += ["| condition | angle | cases | failed | suspect | mean error (mm) | full case at that angle (mm) |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for condition in CONDITIONS:
            for angle in sorted({r["angle"] for r in conditions}):
                group = [r for r in conditions if r["condition"] == condition and r["angle"] == angle]
                if not group:
                    continue
                full = [
                    r["error_mm"] for r in rows if r["pair"] == "same" and r["kind"] == "voxel" and r["angle"] == angle
                ]
                failed = sum(bool(r["failed"]) for r in group)
                suspect = sum(r["status"] == "suspect" for r in group)
                unflagged = sum(bool(r["failed"]) and r["status"] != "suspect" for r in group)
                lines += [
                    f"| {condition} | {angle:g} | {len(group)} | {failed} ({unflagged} not flagged) | {suspect} | "
                    f"{_mean(r['error_mm'] for r in group)} | {_mean(full)} |"
                ]
        lines += [""]
    if rows or conditions:
        lines += ["## QC brain_overlap of every case (the threshold qc_min_brain_overlap flags below it)", ""]
        lines += [*overlap_lines(rows + conditions), ""]
    if mask_rows:
        lines += ["## Brain extraction: mask Dice against the label-map brain, and seconds per image", ""]
        lines += ["| method | " + " | ".join(f"{a:g} deg" for a in angles) + " | seconds (median) |"]
        lines += ["|---|" + "---|" * len(angles) + "---|"]
        for method in sorted({r["method"] for r in mask_rows}):
            group = [r for r in mask_rows if r["method"] == method]
            cells = []
            for angle in angles:
                dice = [r["dice"] for r in group if r["angle"] == angle]
                cells.append(f"{_mean(dice)} (min {min(dice):.3f})" if dice else "-")
            seconds = np.median([r["seconds"] for r in group])
            lines += [f"| {method} | " + " | ".join(cells) + f" | {seconds:.1f} |"]
        lines += ["", "The same per contrast (all angles):", ""]
        contrasts = [c for c in CONTRASTS if any(r["contrast"] == c for r in mask_rows)]
        lines += ["| method | " + " | ".join(contrasts) + " |", "|---|" + "---|" * len(contrasts)]
        for method in sorted({r["method"] for r in mask_rows}):
            cells = [
                _mean(r["dice"] for r in mask_rows if r["method"] == method and r["contrast"] == c) for c in contrasts
            ]
            lines += [f"| {method} | " + " | ".join(cells) + " |"]
        lines += [""]
    return "\n".join(lines)


def _read_csv(path: str) -> list[dict]:
    """Rows written by :func:`_write_csv`, with their booleans and numbers back (none when the file is absent)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if value in ("True", "False"):
                row[key] = value == "True"
            elif key in ("angle", "dice", "error_mm", "seconds", "brain_overlap"):
                row[key] = float(value) if value else float("nan")
    return rows


def _write_csv(path: str, rows: list[dict]) -> None:
    if rows:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label_maps_dir", default=os.path.join(BUNDLE_ROOT, "..", "shared", "data", "label_maps"))
    parser.add_argument("--subjects", nargs="+", default=[f"training_seg_{n}" for n in (13, 14, 15, 16)])
    parser.add_argument("--output_dir", default=os.path.join(BUNDLE_ROOT, "docs", "benchmark", "pose"))
    parser.add_argument("--work_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "keymorph", "pose"))
    parser.add_argument("--angles", nargs="+", type=float, default=[0, 45, 90, 135, 180])
    parser.add_argument("--condition_angles", nargs="*", type=float, default=[0, 135])
    parser.add_argument("--spacing", type=float, default=1.0)
    parser.add_argument("--setting", action="append", default=[], help="KEY=VALUE override of inference.yaml")
    parser.add_argument("--mask_only", action="store_true", help="only the brain-extraction table")
    parser.add_argument(
        "--mask_methods",
        nargs="+",
        choices=list(MASK_METHODS),
        default=None,
        help="default: every method, bundle only when its weights exist",
    )
    parser.add_argument("--brain_mask_weights", default=None, help="weights of --mask_methods bundle (a checkpoint)")
    parser.add_argument(
        "--report_only", action="store_true", help="rewrite summary.md from the csv files in --output_dir; no run"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.report_only:
        rows = _read_csv(os.path.join(args.output_dir, "cases.csv"))
        mask_rows = _read_csv(os.path.join(args.output_dir, "mask_dice.csv"))
        recorded = recorded_run_lines(os.path.join(args.output_dir, "summary.md"))
        return _report(args.output_dir, rows, mask_rows, recorded or run_lines(args.setting))
    # before the hour of registrations, not after: the bundle's brain-mask weights are not shipped yet
    from scripts.skull_strip import BRAIN_MASK_WEIGHTS

    brain_mask_weights = args.brain_mask_weights or BRAIN_MASK_WEIGHTS
    if args.mask_methods is None:
        args.mask_methods = [m for m in MASK_METHODS if m != "bundle" or os.path.exists(brain_mask_weights)]
    elif "bundle" in args.mask_methods and not os.path.exists(brain_mask_weights):
        print(f"pose_robustness: error: --mask_methods bundle: no weights at {brain_mask_weights}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    os.makedirs(args.work_dir, exist_ok=True)
    label_maps = [os.path.join(args.label_maps_dir, f"{s}.nii.gz") for s in args.subjects]
    missing = [p for p in label_maps if not os.path.exists(p)]
    if missing:
        print(f"pose_robustness: error: label maps not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    cases = make_cases(label_maps, args.angles, args.spacing, args.work_dir, args.seed, args.condition_angles)
    with open(os.path.join(args.work_dir, "cases.json"), "w") as handle:
        json.dump(cases, handle)
    rows = []
    if not args.mask_only:
        run_inference(cases, args.work_dir, args.setting)
        rows = score(cases, args.work_dir)
        _write_csv(os.path.join(args.output_dir, "cases.csv"), rows)
    mask_rows = mask_scores(cases, args.mask_methods, args.brain_mask_weights)
    _write_csv(os.path.join(args.output_dir, "mask_dice.csv"), mask_rows)
    return _report(args.output_dir, rows, mask_rows, run_lines(args.setting))


def _report(output_dir: str, rows: list[dict], mask_rows: list[dict], run: list[str]) -> int:
    text = summary_markdown(rows, mask_rows, run)
    with open(os.path.join(output_dir, "summary.md"), "w") as handle:
        handle.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

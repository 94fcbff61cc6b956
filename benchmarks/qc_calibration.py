"""QC calibration: the keypoint residual, image similarity and brain overlap of right and of wrong registrations.

    python benchmarks/qc_calibration.py --cases_dir ~/.cache/keymorph/benchmark/cases \\
        [--ckpt_path models/model.pt] [--output_dir docs/benchmark]

Reads the case folders that ``benchmarks/compare_methods.py --keep_cases`` leaves in ``WORK_DIR/cases`` (the
benchmark's held-out pairs). For each pair it fits the keypoints with the moving network grid in each of its four
180-degree turns (:data:`scripts.registration.GRID_TURNS`), without refinement, and scores every fit: the QC scores
of :mod:`scripts.qc` (keypoint ``residual`` in mm, ``similarity`` = normalized mutual information on the fixed
network grid, ``brain_overlap`` = Dice of the carried moving brain mask and the fixed one) and the truth (TRE for same-subject pairs, else Dice of the labels). A pair's RIGHT registration is its
best-scoring turn (lowest TRE, or highest Dice); the other three are WRONG ones: the network saw the moving brain in
a pose it was not trained for, which is how this method fails when the brain's axes are misread (most such fits are
tens of millimetres off; a few only several). The thresholds of ``configs/inference.yaml``
are then counted on both: how many right registrations they flag (false alarms) and how many wrong ones they miss.

It also answers whether the first turn can be trusted without trying the others: how often it is the right one,
and how its residual compares with the wrong turns'.

Writes ``qc_calibration.csv`` (one row per pair and turn) and ``qc_calibration.md`` into ``--output_dir`` and
prints the markdown. ``--from_csv`` rewrites the markdown from an earlier ``qc_calibration.csv`` (e.g. after the
thresholds changed) without registering anything; a CSV written before ``brain_overlap`` was recorded has no
such column, and its summary says so instead of counting it.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the bundle root, for `scripts`

from monai.transforms import LoadImage  # noqa: E402

from scripts.bundle_api import load_config, load_state_dict  # noqa: E402
from scripts.coordinates import affine_of  # noqa: E402
from scripts.coordinates import turned  # noqa: E402
from scripts.evaluation import score_case  # noqa: E402
from scripts.qc import QC_THRESHOLDS, qc_flags, qc_scores  # noqa: E402
from scripts.registration import GRID_TURNS, fit, keypoints_world  # noqa: E402

COLUMNS = ["case", "turn", "right", "residual_mm", "similarity", "brain_overlap", "dice", "tre_mm"]


def load_case(rotation_dir: str) -> dict:
    """A kept benchmark case (``<base>/r<angle>``) as :func:`scripts.evaluation.score_case` takes it."""
    load = LoadImage(image_only=True, ensure_channel_first=True)
    base = os.path.dirname(rotation_dir)
    case = {"fixed": {"mask": load(os.path.join(base, "fixed_mask.nii.gz"))}, "moving": {}}
    labels = (os.path.join(base, "fixed_labels.nii.gz"), os.path.join(rotation_dir, "moving_labels.nii.gz"))
    if all(os.path.isfile(path) for path in labels):  # TRE-only cases (the MNI152 template) have none
        case["fixed"]["label"], case["moving"]["label"] = (load(path) for path in labels)
    with open(os.path.join(rotation_dir, "case.json")) as handle:
        truth = json.load(handle).get("true_fixed_to_moving")
    if truth is not None:
        case["true_fixed_to_moving"] = truth
    return case


def turn_rows(fixed_preprocessing, preprocessing, network, rotation_dir: str) -> list[dict]:
    """One row per turn of the moving grid for one case (the inference config's preprocessing of both images)."""
    base = os.path.dirname(rotation_dir)
    fixed = fixed_preprocessing({"image": os.path.join(base, "fixed.nii.gz")})
    moving = preprocessing({"image": os.path.join(rotation_dir, "moving.nii.gz")})
    case = load_case(rotation_dir)
    if "true_fixed_to_moving" in case:  # the truth decides; Dice of 1 mm label maps would only cost time
        case["fixed"].pop("label", None)
    fixed_image = fixed["image"][None]
    moving_image = moving["image"][None]
    fixed_affine = affine_of(fixed_image)[None]
    moving_affine = affine_of(moving_image)[None]
    rows = []
    with torch.no_grad():
        fixed_points = keypoints_world(network, fixed_image.as_tensor(), fixed_affine)
        for index, axes in enumerate(GRID_TURNS):
            image, affine = turned(moving_image.as_tensor(), moving_affine, axes)
            registration = fit(fixed_points, keypoints_world(network, image, affine))
            scores = qc_scores(registration, fixed, moving)
            dice, tre = score_case(case, registration.fixed_to_moving[0])
            rows.append(
                {
                    "case": os.path.relpath(rotation_dir, os.path.dirname(base)),
                    "turn": index,
                    "residual_mm": scores["residual"],
                    "similarity": scores["similarity"],
                    "brain_overlap": scores["brain_overlap"],
                    "dice": dice,
                    "tre_mm": tre,
                }
            )
    by_tre = [r["tre_mm"] for r in rows]
    best = int(np.nanargmin(by_tre)) if np.isfinite(by_tre).any() else int(np.nanargmax([r["dice"] for r in rows]))
    for row in rows:
        row["right"] = row["turn"] == best
    return rows


def _quantiles(values) -> str:
    values = np.asarray(values, dtype=float)
    if not len(values):
        return "-"
    low, median, high = np.percentile(values, [0, 50, 100])
    return f"{low:.3f} / {median:.3f} / {high:.3f}"


def summary_markdown(rows: list[dict], thresholds: dict, ckpt: str) -> str:
    """The markdown summary of the rows; rows without ``brain_overlap`` (an older CSV) leave it out of the table,
    and :func:`scripts.qc.qc_flags` counts what is there."""
    limits = {**QC_THRESHOLDS, **thresholds}
    right = [r for r in rows if r["right"]]
    wrong = [r for r in rows if not r["right"]]
    columns = {"residual_mm": "residual (mm)", "similarity": "similarity (NMI)"}
    rules = [f"residual > {limits['max_residual_mm']:g} mm", f"similarity < {limits['min_similarity']:g}"]
    with_overlap = all("brain_overlap" in r for r in rows)
    if with_overlap:
        columns["brain_overlap"] = "brain overlap (Dice)"
        rules.append(f"brain overlap < {limits['min_brain_overlap']:g}")

    def flagged(row: dict) -> bool:
        scores = {"residual": row["residual_mm"], "similarity": row["similarity"]}
        return bool(qc_flags({**scores, "brain_overlap": row.get("brain_overlap", float("nan"))}, limits))

    def table_row(name: str, group: list[dict]) -> str:
        return f"| {name} | {len(group)} | " + " | ".join(_quantiles([r[key] for r in group]) for key in columns) + " |"

    first = [r for r in rows if r["turn"] == 0]
    lines = [
        "# QC calibration",
        "",
        f"`python benchmarks/qc_calibration.py` with `{os.path.relpath(ckpt, ROOT)}` on {len(first)} benchmark pairs;",
        "right = each pair's best turn by the truth, wrong = its other three turns of the moving grid.",
        "Scores of the keypoint fit before refinement (min / median / max):",
        "",
        f"| registrations | n | {' | '.join(columns.values())} |",
        "|---|---|" + "---|" * len(columns),
        table_row("right", right),
        table_row("wrong", wrong),
        "",
        f"Thresholds of configs/inference.yaml (suspect when {', '.join(rules[:-1])} or {rules[-1]}): flag "
        f"{sum(map(flagged, right))} of {len(right)} right and {sum(map(flagged, wrong))} of {len(wrong)} wrong "
        "registrations.",
    ]
    if not with_overlap:
        lines += ["", "(No brain overlap: this qc_calibration.csv was written before the score was recorded.)"]
    lines += [
        "",
        f"The first turn (the principal-axes frame as it is) is the right one for "
        f"{sum(r['right'] for r in first)} of {len(first)} pairs.",
        "",
    ]
    return "\n".join(lines)


def inference_thresholds() -> dict:
    parser = load_config(ROOT)
    return {
        **QC_THRESHOLDS,
        "min_similarity": float(parser["qc_min_similarity"]),
        "max_residual_mm": float(parser["qc_max_residual_mm"]),
        "min_brain_overlap": float(parser["qc_min_brain_overlap"]),
    }


def read_rows(path: str) -> list[dict]:
    """The rows of a ``qc_calibration.csv`` (``brain_overlap`` only when the file has the column)."""
    if not os.path.isfile(path):
        raise SystemExit(f"keymorph: error: {path}: no such file; run without --from_csv first")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["turn"], row["right"] = int(row["turn"]), row["right"] == "True"
        for key in ("residual_mm", "similarity", "brain_overlap", "dice", "tre_mm"):
            if key in row:
                row[key] = float(row[key])
    return rows


def register_cases(args: argparse.Namespace) -> list[dict]:
    """Every kept case of ``--cases_dir``, four turns each (:func:`turn_rows`)."""
    pattern = os.path.join(args.cases_dir or "", "*", "r*", "moving.nii.gz")
    case_dirs = sorted(os.path.dirname(p) for p in glob.glob(pattern)) if args.cases_dir else []
    if not case_dirs:
        raise SystemExit(f"keymorph: error: {args.cases_dir}: no kept benchmark cases (<base>/r<angle>/moving.nii.gz)")
    torch.set_num_threads(args.threads)
    parser = load_config(ROOT, skull_strip="none", fixed_skull_strip="none", device="$torch.device('cpu')")
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(load_state_dict(args.ckpt_path, "cpu"), strict=True)
    network.eval()
    transforms = parser.get_parsed_content("fixed_preprocessing"), parser.get_parsed_content("preprocessing")
    return [row for case_dir in tqdm(case_dirs, desc="pairs") for row in turn_rows(*transforms, network, case_dir)]


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--cases_dir", help="compare_methods.py's WORK_DIR/cases (run with --keep_cases)")
    cli.add_argument("--ckpt_path", default=os.path.join(ROOT, "models", "model.pt"))
    cli.add_argument("--output_dir", default=os.path.join(ROOT, "docs", "benchmark"))
    cli.add_argument("--threads", type=int, default=2)
    cli.add_argument("--from_csv", action="store_true", help="summarize --output_dir's qc_calibration.csv again")
    args = cli.parse_args(argv)
    csv_path = os.path.join(args.output_dir, "qc_calibration.csv")
    if args.from_csv:
        rows = read_rows(csv_path)
    else:
        rows = register_cases(args)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    markdown = summary_markdown(rows, inference_thresholds(), os.path.abspath(args.ckpt_path))
    with open(os.path.join(args.output_dir, "qc_calibration.md"), "w") as handle:
        handle.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

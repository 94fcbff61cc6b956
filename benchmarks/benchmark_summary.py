"""The benchmark's rows (``cases.csv``) and their summary: statistics per method, rotation and modality pair, the
speed ratios and the issue's targets (:mod:`scripts.reports` for the shared parts).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from scripts.reports import column, describe

METHODS = ("keymorph", "ants", "elastix", "identity")


COLUMNS = [
    "case",
    "dataset",
    "method",
    "modality_pair",
    "fixed_subject",
    "moving_subject",
    "same_subject",
    "rotation_deg",
    "dice",
    "tre_mm",
    "seconds_compute",
    "seconds_end_to_end",
    "peak_rss_mb",
    "qc_residual_mm",
    "qc_similarity",
    "status",
]


NUMERIC_COLUMNS = COLUMNS[COLUMNS.index("rotation_deg") : COLUMNS.index("status")]


#: The issue's targets.
DICE_MARGIN = 0.02


TRE_TARGET_MM = 1.0


COMPUTE_TARGET_S = 1.0


END_TO_END_TARGET_S = 3.0


MEMORY_TARGET_MB = 3072.0


SPEEDUP_TARGETS = {"ants": 30.0, "elastix": 3.0}


def to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_rows(path: str) -> list[dict]:
    """The rows of ``cases.csv`` (numbers as floats, ``same_subject`` as bool); [] when there is none."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in NUMERIC_COLUMNS:
            row[key] = to_float(row.get(key))
        row["same_subject"] = str(row.get("same_subject")) == "True"
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """``cases.csv`` (columns :data:`COLUMNS`; unknown values empty), written atomically, methods in order."""
    from scripts.reports import write_cases_csv

    order = {method: index for index, method in enumerate(METHODS)}
    write_cases_csv(path, rows, COLUMNS, sort_key=lambda r: (r["case"], order.get(r["method"], len(order))))


def stats(rows: list[dict]) -> dict:
    """Dice (mean, sd), TRE (mean, median, max), seconds (median, mean, max) and peak memory of a group of rows.

    Failed cases count as Dice 0 (on labelled pairs) and have no TRE; ``n_failed`` says how many there are.
    """

    dice, tre = column(rows, "dice"), column(rows, "tre_mm")
    return {
        "n": len(rows),
        "n_failed": sum(r["status"] != "ok" for r in rows),
        "n_dice": int(len(dice)),
        **describe(dice, "dice", ("mean", "std")),
        "n_tre": int(len(tre)),
        **describe(tre, "tre", ("mean", "median", "max"), "_mm"),
        **describe(column(rows, "seconds_compute"), "seconds_compute", ("median", "mean", "max")),
        **describe(column(rows, "seconds_end_to_end"), "seconds_end_to_end", ("median", "mean", "max")),
        **describe(column(rows, "peak_rss_mb"), "peak_rss_mb", ("median", "max")),
    }


def _angle(angle: float) -> str:
    return f"{angle:g}"


def dice_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """The rows Dice is reported on: different-subject label-map pairs (the issue's Dice target); all labelled
    pairs when the run has no different-subject pair (``--quick``). Also says which."""
    labelled = [r for r in rows if r["dataset"] == "label_maps"]
    different = [r for r in labelled if not r["same_subject"]]
    if different:
        return different, "different-subject pairs"
    return labelled, "same-subject pairs: this run has no different-subject pair"


def group_name(row: dict) -> str:
    """A row's modality-pair group: ``T1-T2`` for label-map cases, ``MNI152 T1-T2`` for the template's."""
    return row["modality_pair"] if row["dataset"] == "label_maps" else f"MNI152 {row['modality_pair']}"


def summarize(rows: list[dict], methods: Sequence[str]) -> dict:
    """``summary.json``'s results: per method overall, Dice and TRE per rotation and per modality pair and
    rotation, seconds and memory; the speed ratios; the issue's targets."""
    methods = [m for m in methods if any(r["method"] == m for r in rows)] or list(
        dict.fromkeys(r["method"] for r in rows)
    )
    angles = sorted({r["rotation_deg"] for r in rows})
    for_dice, dice_scope = dice_rows(rows)
    for_tre = [r for r in rows if r["same_subject"]]
    results = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        dice_mine = [r for r in for_dice if r["method"] == method]
        tre_mine = [r for r in for_tre if r["method"] == method]
        results[method] = {
            "overall": stats(mine),
            "dice_by_rotation": {_angle(a): stats([r for r in dice_mine if r["rotation_deg"] == a]) for a in angles},
            "tre_by_rotation": {_angle(a): stats([r for r in tre_mine if r["rotation_deg"] == a]) for a in angles},
            "dice_by_pair": _by_pair(dice_mine, angles),
            "tre_by_pair": _by_pair(tre_mine, angles),
        }
    ratios = {}
    if "keymorph" in results:
        own = results["keymorph"]["overall"]
        for method in ("ants", "elastix"):
            if method in results:
                other = results[method]["overall"]
                ratios[method] = {
                    kind: _ratio(other[f"seconds_{kind}_median"], own[f"seconds_{kind}_median"])
                    for kind in ("compute", "end_to_end")
                }
    return {"dice_scope": dice_scope, "methods": results, "speed_ratios": ratios, "targets": targets(results, ratios)}


def _by_pair(rows: list[dict], angles: list[float]) -> dict:
    groups = list(dict.fromkeys(group_name(r) for r in rows))
    return {
        group: {
            _angle(a): stats([r for r in rows if group_name(r) == group and r["rotation_deg"] == a])
            for a in angles
            if any(group_name(r) == group and r["rotation_deg"] == a for r in rows)
        }
        for group in groups
    }


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def targets(results: dict, ratios: dict) -> list[dict]:
    """The issue's targets that this run can check: ``[{"target", "value", "threshold", "met"}]`` (``met`` None
    when the run lacks what the target needs)."""
    checks = []

    def add(name: str, value, threshold, met) -> None:
        checks.append({"target": name, "value": value, "threshold": threshold, "met": met})

    own = results.get("keymorph")
    if own is None:
        return checks
    ants = results.get("ants")
    ants_zero = ants["dice_by_rotation"].get("0", {}).get("dice_mean") if ants else None
    own_dice = [s["dice_mean"] for s in own["dice_by_rotation"].values() if s["dice_mean"] is not None]
    if own_dice and ants_zero is not None:
        zero = own["dice_by_rotation"].get("0", {}).get("dice_mean")
        if zero is not None:
            add(
                "KeyMorph Dice at 0 deg >= ANTs Dice at 0 deg - 0.02",
                zero,
                round(ants_zero - DICE_MARGIN, 6),
                bool(zero >= ants_zero - DICE_MARGIN),
            )
        worst = min(own_dice)
        add(
            "KeyMorph Dice at every rotation >= ANTs Dice at 0 deg - 0.02",
            worst,
            round(ants_zero - DICE_MARGIN, 6),
            bool(worst >= ants_zero - DICE_MARGIN),
        )
    tre = [s["tre_mean_mm"] for s in own["tre_by_rotation"].values() if s["tre_mean_mm"] is not None]
    if tre:
        add(
            "KeyMorph mean TRE (mm, same-subject pairs) at every rotation <= 1",
            max(tre),
            TRE_TARGET_MM,
            bool(max(tre) <= TRE_TARGET_MM),
        )
    overall = own["overall"]
    for key, name, threshold in (
        ("seconds_compute_median", "KeyMorph registration compute per pair (s, median) <= 1", COMPUTE_TARGET_S),
        ("seconds_end_to_end_median", "KeyMorph end to end per pair (s, median) <= 3", END_TO_END_TARGET_S),
        ("peak_rss_mb_max", "KeyMorph peak memory (MB, max over pairs) <= 3072", MEMORY_TARGET_MB),
    ):
        if overall[key] is not None:
            add(name, overall[key], threshold, bool(overall[key] <= threshold))
    for method, threshold in SPEEDUP_TARGETS.items():
        ratio = ratios.get(method, {}).get("end_to_end")
        if ratio is not None:
            add(
                f"{method} / KeyMorph seconds per pair (end to end, medians) >= {threshold:g}",
                ratio,
                threshold,
                bool(ratio >= threshold),
            )
    return checks

"""The reports of the robustness sweep and of the benchmarks: statistics per group of cases, ``cases.csv``,
``summary.json`` and the plots against the initial rotation.

A row is one case scored by one method (:data:`CASE_COLUMNS`; the benchmark adds columns of its own). Failed cases
count in Dice as 0 and have no TRE. :class:`RobustnessReport` is the Ignite handler of ``configs/evaluate.yaml``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os

import numpy as np
from ignite.engine import Engine, Events

from scripts.transform_io import write_atomically

logger = logging.getLogger(__name__)


def rounded(x) -> float | None:
    """A statistic for ``summary.json``: rounded to 6 decimals; None when missing or not finite."""
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def column(rows: list[dict], key: str, finite: bool = True) -> np.ndarray:
    """The values of ``key`` in ``rows`` as float64, the finite ones only (unless ``finite`` is False)."""
    values = np.array([r[key] for r in rows], dtype=np.float64)
    return values[np.isfinite(values)] if finite else values


_STATISTICS = {
    "mean": (1, np.mean),
    "std": (2, lambda v: v.std(ddof=1)),  # the sample standard deviation
    "median": (1, np.median),
    "max": (1, np.max),
}


def describe(values: np.ndarray, name: str, statistics: tuple[str, ...], unit: str = "") -> dict:
    """``{f"{name}_{statistic}{unit}": value}`` for each of ``statistics`` (mean, std, median, max) of ``values``,
    :func:`rounded`; None where there are too few values (none; fewer than 2 for the standard deviation)."""
    out = {}
    for statistic in statistics:
        least, function = _STATISTICS[statistic]
        out[f"{name}_{statistic}{unit}"] = rounded(function(values)) if len(values) >= least else None
    return out


def pyplot():
    """matplotlib's pyplot drawing to files only (the Agg backend), never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: str, content) -> None:
    """Write ``content`` as indented JSON with a final line break, atomically."""

    def dump(temporary: str) -> None:
        with open(temporary, "w") as handle:
            json.dump(content, handle, indent=2)
            handle.write("\n")

    write_atomically(path, dump)


CASE_COLUMNS = [
    "case",
    "method",
    "modality_pair",
    "fixed_modality",
    "moving_modality",
    "fixed_subject",
    "moving_subject",
    "same_subject",
    "rotation_deg",
    "dice",
    "tre_mm",
    "seconds",
    "status",
]
OUTPUT_FILES = ("cases.csv", "summary.json", "dice_vs_rotation.png", "tre_vs_rotation.png")


def _stats(rows: list[dict]) -> dict:
    """Mean/std Dice, mean/median TRE (mm), mean/median seconds and counts of a group of rows (None when empty).

    ``dice_std`` is the sample standard deviation (None for fewer than 2 cases). Failed cases count in Dice as 0
    and have no TRE; ``n_failed`` says how many there are.
    """
    dice, tre, seconds = column(rows, "dice"), column(rows, "tre_mm"), column(rows, "seconds", finite=False)
    return {
        "n": len(rows),
        **describe(dice, "dice", ("mean", "std")),
        "n_tre": int(len(tre)),
        **describe(tre, "tre", ("mean", "median"), "_mm"),
        **describe(seconds, "seconds", ("mean", "median")),
        "n_failed": sum(r["status"] != "ok" for r in rows),
    }


def _angle_key(angle: float) -> str:
    return f"{angle:g}"


def summarize(rows: list[dict]) -> dict:
    """``summary.json``: statistics (:func:`_stats`) overall, per rotation, per modality pair, and per modality pair
    and rotation. Angles are keys such as ``"45"``."""
    pairs = list(dict.fromkeys(r["modality_pair"] for r in rows))
    angles = sorted({r["rotation_deg"] for r in rows})
    overall = _stats(rows)
    return {
        "method": rows[0]["method"] if rows else None,
        "mean_dice": overall["dice_mean"],
        "overall": overall,
        "by_rotation": {_angle_key(a): _stats([r for r in rows if r["rotation_deg"] == a]) for a in angles},
        "by_modality_pair": {
            pair: {
                "overall": _stats([r for r in rows if r["modality_pair"] == pair]),
                "by_rotation": {
                    _angle_key(a): _stats([r for r in rows if r["modality_pair"] == pair and r["rotation_deg"] == a])
                    for a in angles
                    if any(r["modality_pair"] == pair and r["rotation_deg"] == a for r in rows)
                },
            }
            for pair in pairs
        },
    }


def write_cases_csv(path: str, rows: list[dict], columns: list[str] = CASE_COLUMNS, sort_key=None) -> None:
    """``cases.csv``: one row per case (sorted by ``sort_key``, default the case number), ``columns`` (default
    :data:`CASE_COLUMNS`); unknown values (missing or NaN) are empty. Written atomically."""

    def cell(value):
        if isinstance(value, float):
            return "" if not math.isfinite(value) else f"{value:.6g}"
        return value

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in sorted(rows, key=sort_key or (lambda r: r["case"])):
                writer.writerow({column: cell(row.get(column, "")) for column in columns})

    write_atomically(path, write)


def plot_against_rotation(path: str, summary: dict, statistic: str, ylabel: str, title: str) -> None:
    """One line per modality pair of ``summary["by_modality_pair"][pair]["by_rotation"][angle][statistic]``."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    plotted = False
    for pair, group in summary["by_modality_pair"].items():
        points = [(float(a), s[statistic]) for a, s in group["by_rotation"].items() if s[statistic] is not None]
        if points:
            angles, values = zip(*sorted(points))
            ax.plot(angles, values, marker="o", label=pair)
            plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "no values (truth or labels unknown)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("initial rotation (degrees, net angle)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted({float(a) for g in summary["by_modality_pair"].values() for a in g["by_rotation"]}))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(title="fixed-moving", fontsize="small")
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


class RobustnessReport:
    """Ignite handler: collects the rows of every iteration and, when the pass completes, writes ``cases.csv``,
    ``summary.json``, ``dice_vs_rotation.png`` and ``tre_vs_rotation.png`` into ``output_dir`` (each atomically).

    ``engine.state.robustness_summary`` holds the summary afterwards.
    """

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine) -> None:
        self.rows = []

    def collect(self, engine: Engine) -> None:
        self.rows.extend(engine.state.output["rows"])

    def write(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        summary = summarize(self.rows)
        write_cases_csv(os.path.join(self.output_dir, "cases.csv"), self.rows)
        write_json(os.path.join(self.output_dir, "summary.json"), summary)
        method = summary["method"]
        plot_against_rotation(
            os.path.join(self.output_dir, "dice_vs_rotation.png"),
            summary,
            "dice_mean",
            "mean Dice of brain structures",
            f"{method}: Dice against the initial rotation",
        )
        plot_against_rotation(
            os.path.join(self.output_dir, "tre_vs_rotation.png"),
            summary,
            "tre_mean_mm",
            "mean TRE over the brain (mm)",
            f"{method}: TRE (same-subject pairs) against the initial rotation",
        )
        engine.state.robustness_summary = summary
        overall = summary["overall"]
        logger.info(
            f"{overall['n']} cases: mean Dice {overall['dice_mean']}, mean TRE {overall['tre_mean_mm']} mm; "
            f"outputs in {os.path.abspath(self.output_dir)}"
        )

"""The benchmark's report: ``summary.json``, ``summary.md`` (tables, targets, the machine) and the plots against
the rotation and of the seconds per pair.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from benchmark_cases import write_text
from benchmark_summary import METHODS, TRE_TARGET_MM, summarize

from scripts.reports import pyplot, write_json
from scripts.transform_io import write_atomically

OUTPUT_FILES = (
    "cases.csv",
    "summary.json",
    "summary.md",
    "dice_vs_rotation.png",
    "tre_vs_rotation.png",
    "seconds_per_pair.png",
)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _dice_cell(s: dict) -> str:
    if not s or s.get("dice_mean") is None:
        return "-"
    cell = f"{s['dice_mean']:.3f}"
    if s.get("dice_std") is not None:
        cell += f" ± {s['dice_std']:.3f}"
    cell += f" ({s['n_dice']})"
    return cell + (f", {s['n_failed']} failed" if s.get("n_failed") else "")


def _tre_cell(s: dict) -> str:
    if not s or not s.get("n"):
        return "-"
    if s.get("tre_mean_mm") is None:
        return f"{s['n_failed']} failed" if s.get("n_failed") else "-"
    cell = f"{s['tre_mean_mm']:.2f} (max {s['tre_max_mm']:.2f}, {s['n_tre']})"
    return cell + (f", {s['n_failed']} failed" if s.get("n_failed") else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_markdown(summary: dict) -> str:
    """``summary.md``: the tables of :func:`summarize`, the targets, the machine and the command."""
    results, machine = summary["results"], summary["machine"]
    methods = list(results["methods"])
    angles = sorted({float(a) for m in results["methods"].values() for a in m["dice_by_rotation"]})
    heads = [f"{a:g}°" for a in angles]
    lines = ["# KeyMorph against ANTs and elastix", ""]
    lines += [f"Command: `{summary['command']}`", ""]
    settings = summary["settings"]["cases"]
    lines += [
        "Pairs: synthetic brains (skull-stripped, preset contrasts) from the label maps"
        f" {', '.join(settings['subjects'])}"
        f" at {settings['spacing']:g} mm"
        + (", plus same-image pairs on the MNI152 T1 template (TRE only)" if settings.get("include_mni") else "")
        + "; the moving image turned by the stated net angle about a random axis (with scale and translation) and"
        " resampled. Cells: mean ± sd (n). See benchmarks/compare_methods.py for the definitions.",
        "",
    ]
    lines += [f"## Dice of brain structures ({results['dice_scope']})", ""]
    lines += _table(
        ["method", *heads],
        [[m, *[_dice_cell(results["methods"][m]["dice_by_rotation"].get(f"{a:g}")) for a in angles]] for m in methods],
    )
    lines += ["", "### Dice per modality pair (fixed-moving)", ""]
    body = []
    groups = list(dict.fromkeys(g for m in methods for g in results["methods"][m]["dice_by_pair"]))
    for group in groups:
        for m in methods:
            cells = results["methods"][m]["dice_by_pair"].get(group, {})
            body.append([group, m, *[_dice_cell(cells.get(f"{a:g}")) for a in angles]])
    lines += _table(["pair", "method", *heads], body)
    lines += ["", "## TRE over the brain, mm (same-subject pairs with a known transform): mean (max, n)", ""]
    lines += _table(
        ["method", *heads],
        [[m, *[_tre_cell(results["methods"][m]["tre_by_rotation"].get(f"{a:g}")) for a in angles]] for m in methods],
    )
    lines += ["", "### TRE per modality pair", ""]
    body = []
    groups = list(dict.fromkeys(g for m in methods for g in results["methods"][m]["tre_by_pair"]))
    for group in groups:
        for m in methods:
            cells = results["methods"][m]["tre_by_pair"].get(group, {})
            body.append([group, m, *[_tre_cell(cells.get(f"{a:g}")) for a in angles]])
    lines += _table(["pair", "method", *heads], body)
    lines += ["", "## Seconds per pair and memory", ""]
    body = []
    for m in methods:
        s = results["methods"][m]["overall"]
        body.append(
            [
                m,
                str(s["n"]),
                _fmt(s["seconds_compute_median"], 2),
                _fmt(s["seconds_compute_max"], 2),
                _fmt(s["seconds_end_to_end_median"], 2),
                _fmt(s["seconds_end_to_end_max"], 2),
                _fmt(s["peak_rss_mb_median"], 0),
                _fmt(s["peak_rss_mb_max"], 0),
            ]
        )
    lines += _table(
        [
            "method",
            "pairs",
            "compute s (median)",
            "compute s (max)",
            "end to end s (median)",
            "end to end s (max)",
            "peak RSS MB (median)",
            "peak RSS MB (max)",
        ],
        body,
    )
    if results["speed_ratios"]:
        lines += ["", "Speed ratios (the other method's median seconds per pair / KeyMorph's):", ""]
        lines += _table(
            ["", "compute", "end to end"],
            [
                [f"{m} / keymorph", _fmt(r["compute"], 1), _fmt(r["end_to_end"], 1)]
                for m, r in results["speed_ratios"].items()
            ],
        )
    if results["targets"]:
        lines += ["", "## The issue's targets", ""]
        lines += _table(
            ["target", "value", "threshold", "met"],
            [
                [
                    t["target"],
                    _fmt(t["value"], 3),
                    _fmt(t["threshold"], 3),
                    {True: "yes", False: "**no**", None: "-"}[t["met"]],
                ]
                for t in results["targets"]
            ],
        )
    lines += ["", "## Method settings", ""]
    for method, values in summary["settings"].get("methods", {}).items():
        if method in results["methods"]:
            described = ", ".join(f"{k}: {v}" for k, v in values.items()) or "defaults"
            lines.append(f"- {method}: {described}")
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    runs = summary["settings"].get("runs", [])
    if len(runs) > 1:
        lines += ["", f"cases.csv gathers the rows of {len(runs)} runs (the machine above is the last run's):", ""]
        lines += [f"- {run['date']}: `{run['command']}`" for run in runs]
    lines += [
        "",
        "Timing: compute = registration only (KeyMorph: network on both images, fit, refinement, warp on the network"
        " grid; ANTs: the ants.registration call; elastix: the registration call without its result image); end to"
        " end = reading both files, preprocessing, registration, resampling onto the fixed image's native grid and"
        " writing the result and the transform. Each method ran in its own process limited to the threads above,"
        " after an untimed warm-up; peak RSS is that process's (libraries included) during the pair.",
        "",
    ]
    return "\n".join(lines)


def plot_against_rotation(
    path: str, results: dict, by_pair: str, statistic: str, ylabel: str, title: str, log=False, target=None
):
    """One panel per modality pair, one line per method (``results["methods"][m][by_pair][pair][angle][stat]``);
    ``target`` draws a dashed horizontal line."""
    plt = pyplot()
    methods = list(results["methods"])
    groups = list(dict.fromkeys(g for m in methods for g in results["methods"][m][by_pair]))
    columns = min(3, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(max(6.4, 4.2 * columns), 3.4 * rows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, group in zip(axes.flat, groups):
        for method in methods:
            cells = results["methods"][method][by_pair].get(group, {})
            points = sorted((float(a), s[statistic]) for a, s in cells.items() if s[statistic] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_title(group, fontsize="medium")
        ax.set_xlabel("initial rotation (degrees)")
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        if log:
            ax.set_yscale("log")
    if not groups:
        axes[0, 0].text(0.5, 0.5, "no values", ha="center", va="center", transform=axes[0, 0].transAxes)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if groups:
        axes.flat[0].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


def plot_seconds(path: str, rows: list[dict], methods: Sequence[str]) -> None:
    """Seconds per pair per method (compute and end to end), log scale, one box per method."""
    plt = pyplot()
    methods = [m for m in methods if any(r["method"] == m and r["status"] == "ok" for r in rows)]
    figure, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("seconds_compute", "seconds_end_to_end"), ("registration compute", "end to end")):
        data = [[r[key] for r in rows if r["method"] == m and r["status"] == "ok" and r[key] > 0] for m in methods]
        shown = [(m, d) for m, d in zip(methods, data) if d]
        if shown:
            ax.boxplot([d for _, d in shown], tick_labels=[m for m, _ in shown])
            for i, (_, d) in enumerate(shown, start=1):
                ax.annotate(
                    f"{np.median(d):.2g} s",
                    (i, np.median(d)),
                    xytext=(24, -3),
                    textcoords="offset points",
                    fontsize="small",
                )
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("seconds per pair")
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


def write_outputs(output_dir: str, rows: list[dict], meta: dict, plots: bool = True) -> dict:
    """``summary.json`` and ``summary.md`` (and, with ``plots``, the three figures) from all the rows (every method
    in ``cases.csv``, whichever this run registered)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    summary = {**meta, "results": summarize(rows, methods)}
    write_json(os.path.join(output_dir, "summary.json"), summary)
    markdown = summary_markdown(summary)
    write_text(os.path.join(output_dir, "summary.md"), markdown)
    if plots:
        results = summary["results"]
        plot_against_rotation(
            os.path.join(output_dir, "dice_vs_rotation.png"),
            results,
            "dice_by_pair",
            "dice_mean",
            "mean Dice",
            f"Dice ({results['dice_scope']})",
        )
        plot_against_rotation(
            os.path.join(output_dir, "tre_vs_rotation.png"),
            results,
            "tre_by_pair",
            "tre_mean_mm",
            "mean TRE (mm, log)",
            "TRE over the brain (same-subject pairs; dashed: the 1 mm target)",
            log=True,
            target=TRE_TARGET_MM,
        )
        plot_seconds(os.path.join(output_dir, "seconds_per_pair.png"), rows, methods)
    return summary

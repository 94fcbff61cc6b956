"""The model card's headline figures, from the benchmark's summaries, into docs/README.md and metadata.json.

    python benchmarks/model_card_metrics.py --accuracy docs/benchmark/summary.json \\
        --speed docs/benchmark/speed/summary.json [--write]

Accuracy comes from the full benchmark run (different-subject Dice, same-subject TRE, per initial rotation), speed
and memory from the side-by-side speed run on an idle machine (``benchmarks/compare_methods.py`` writes both
``summary.json`` files). Prints the metric table; ``--write`` also replaces the table between the
``<!-- eval_metrics:`` markers of docs/README.md and ``eval_metrics`` in configs/metadata.json, which
``tests/test_metadata.py`` keeps equal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "README.md")
METADATA = os.path.join(ROOT, "configs", "metadata.json")


def metrics(accuracy: dict, speed: dict) -> dict[str, float]:
    """``{name: value}``, names saying what and on which pairs; rounded as the table shows them."""
    methods = accuracy["results"]["methods"]

    def dice(method: str, angle: str) -> float:
        return methods[method]["dice_by_rotation"][angle]["dice_mean"]

    own = methods["keymorph"]
    dice_by_angle = {a: s["dice_mean"] for a, s in own["dice_by_rotation"].items() if s["dice_mean"] is not None}
    tre_by_angle = [s["tre_mean_mm"] for s in own["tre_by_rotation"].values() if s["tre_mean_mm"] is not None]
    timing = speed["results"]["methods"]["keymorph"]["overall"]
    ratios = speed["results"]["speed_ratios"]
    values = {
        "keymorph_dice_different_subjects_0deg": dice("keymorph", "0"),
        "keymorph_dice_different_subjects_worst_rotation": min(dice_by_angle.values()),
        "ants_dice_different_subjects_0deg": dice("ants", "0"),
        "ants_dice_different_subjects_180deg": dice("ants", "180"),
        "elastix_dice_different_subjects_0deg": dice("elastix", "0"),
        "keymorph_tre_mm_same_subject_worst_rotation": max(tre_by_angle),
        "keymorph_seconds_compute_median": timing["seconds_compute_median"],
        "keymorph_seconds_end_to_end_median": timing["seconds_end_to_end_median"],
        "ants_over_keymorph_seconds_end_to_end": ratios["ants"]["end_to_end"],
        "elastix_over_keymorph_seconds_end_to_end": ratios["elastix"]["end_to_end"],
        "keymorph_peak_memory_mb": timing["peak_rss_mb_max"],
    }
    digits = {"_over_": 1, "_mb": 0, "seconds": 2, "tre": 2, "dice": 3}  # first match wins
    return {
        name: round(float(value), next(d for key, d in digits.items() if key in name)) for name, value in values.items()
    }


def table(values: dict[str, float]) -> str:
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {v:g} |" for k, v in values.items())])


def write(values: dict[str, float], docs: str = DOCS, metadata_path: str = METADATA) -> None:
    """Replace the model card's metric table and metadata's ``eval_metrics`` with ``values``."""
    text = open(docs).read()
    pattern = re.compile(r"(<!-- eval_metrics:[^\n]*-->\n).*?(<!-- end eval_metrics -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"keymorph: error: {docs}: no <!-- eval_metrics: ... --> markers")
    with open(docs, "w") as handle:
        handle.write(pattern.sub(lambda m: m.group(1) + table(values) + "\n" + m.group(2), text))
    metadata = json.load(open(metadata_path))
    metadata["eval_metrics"] = values
    with open(metadata_path, "w") as handle:
        handle.write(json.dumps(metadata, indent=4, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", required=True, help="summary.json of the full benchmark run")
    parser.add_argument("--speed", required=True, help="summary.json of the side-by-side speed run")
    parser.add_argument("--write", action="store_true", help="update docs/README.md and configs/metadata.json")
    args = parser.parse_args(argv)
    summaries = []
    for path in (args.accuracy, args.speed):
        try:
            with open(path) as handle:
                summaries.append(json.load(handle))
        except (OSError, ValueError) as error:
            raise SystemExit(f"keymorph: error: {path}: cannot read a benchmark summary ({error})") from None
    try:
        values = metrics(*summaries)
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"keymorph: error: the summaries lack a method or rotation the card needs ({error})") from None
    print(table(values))
    if args.write:
        write(values)
    return 0


if __name__ == "__main__":
    sys.exit(main())

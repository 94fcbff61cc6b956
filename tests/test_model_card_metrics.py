"""benchmarks/model_card_metrics.py: the headline figures from the benchmark summaries, written where the zoo wants."""

import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import model_card_metrics  # noqa: E402
from test_metadata import docs_eval_metrics  # noqa: E402


def rotation_stats(dice=None, tre=None) -> dict:
    return {"dice_mean": dice, "tre_mean_mm": tre}


def summaries() -> tuple[dict, dict]:
    angles = ("0", "90", "180")
    methods = {
        "keymorph": {
            "dice_by_rotation": {a: rotation_stats(d) for a, d in zip(angles, (0.6412, 0.6301, 0.6350))},
            "tre_by_rotation": {a: rotation_stats(tre=t) for a, t in zip(angles, (0.21, 0.34, 0.25))},
        },
        "ants": {"dice_by_rotation": {a: rotation_stats(d) for a, d in zip(angles, (0.6390, 0.06, 0.03))}},
        "elastix": {"dice_by_rotation": {a: rotation_stats(d) for a, d in zip(angles, (0.6011, 0.05, 0.02))}},
    }
    speed = {
        "results": {
            "methods": {
                "keymorph": {
                    "overall": {
                        "seconds_compute_median": 0.7321,
                        "seconds_end_to_end_median": 1.5049,
                        "peak_rss_mb_max": 1061.4,
                    }
                }
            },
            "speed_ratios": {"ants": {"end_to_end": 31.46}, "elastix": {"end_to_end": 5.04}},
        }
    }
    return {"results": {"methods": methods}}, speed


def test_metrics_pick_the_right_cells():
    values = model_card_metrics.metrics(*summaries())
    assert values["keymorph_dice_different_subjects_0deg"] == 0.641
    assert values["keymorph_dice_different_subjects_worst_rotation"] == 0.630
    assert values["ants_dice_different_subjects_0deg"] == 0.639
    assert values["ants_dice_different_subjects_180deg"] == 0.03
    assert values["keymorph_tre_mm_same_subject_worst_rotation"] == 0.34
    assert values["keymorph_seconds_end_to_end_median"] == 1.5
    assert values["ants_over_keymorph_seconds_end_to_end"] == 31.5
    assert values["keymorph_peak_memory_mb"] == 1061.0


def test_write_keeps_model_card_and_metadata_equal(tmp_path):
    docs, metadata = tmp_path / "README.md", tmp_path / "metadata.json"
    shutil.copy(model_card_metrics.DOCS, docs)
    shutil.copy(model_card_metrics.METADATA, metadata)
    values = model_card_metrics.metrics(*summaries())
    model_card_metrics.write(values, str(docs), str(metadata))
    assert docs_eval_metrics(docs.read_text()) == json.loads(metadata.read_text())["eval_metrics"] == values
    before = open(model_card_metrics.DOCS).read()
    assert docs.read_text().split("<!-- eval_metrics:")[0] == before.split("<!-- eval_metrics:")[0]

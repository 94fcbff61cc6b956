"""The benchmark's settings: the command line, the case settings shared with ``configs/evaluate.yaml``, each
method's settings (what decides whether its earlier rows still hold), the checks before any work, and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
from collections.abc import Sequence

from benchmark_summary import METHODS
from network_speed import cpu_model

from scripts.hashes import file_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DEFAULT_METHODS = ("keymorph", "ants", "elastix")


#: The Python module each method needs (checked before any work).
METHOD_MODULES = {"ants": "ants", "elastix": "itk"}


#: ANTs and elastix settings of ``--quick`` (few iterations); the full run uses the libraries' defaults.
QUICK_ANTS = {"aff_iterations": (40, 20, 0, 0)}


QUICK_ELASTIX = {"MaximumNumberOfIterations": "32", "NumberOfResolutions": "2"}


def evaluate_defaults() -> dict:
    """The sweep's settings of ``configs/evaluate.yaml`` that the benchmark shares."""
    import yaml

    with open(os.path.join(ROOT, "configs", "evaluate.yaml")) as handle:
        config = yaml.safe_load(handle)
    keys = (
        "modality_pairs",
        "rotations",
        "pairs_per_cell",
        "same_subject_fraction",
        "scale_range",
        "translate_mm",
        "test_subjects",
        "synthesis",
        "seed",
    )
    return {key: config[key] for key in keys}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "logical cores": os.cpu_count(),
        "memory": _memory_total(),
        "threads per method": threads,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "monai": _version("monai"),
        "antspyx": _version("antspyx"),
        "itk-elastix": _version("itk-elastix"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in load),
    }


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as handle:
            found = re.search(r"MemTotal:\s+(\d+)\s+kB", handle.read())
        return f"{int(found.group(1)) / 1024**2:.1f} GiB" if found else "unknown"
    except OSError:
        return "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--label_maps_dir", default=os.path.join(ROOT, "..", "shared", "data", "label_maps"), help="held-out label maps"
    )
    add("--subjects", nargs="+", help="label maps to use (substrings of file names; default: evaluate.yaml's)")
    add("--output_dir", default=os.path.join(ROOT, "docs", "benchmark"), help="tables and plots go here")
    add("--rotations", nargs="+", type=float, help="net initial rotations, degrees (default: evaluate.yaml's)")
    add("--modality_pairs", nargs="+", help="FIXED-MOVING contrasts (default: evaluate.yaml's)")
    add("--pairs_per_cell", type=int, help="pairs per modality pair and rotation (default: evaluate.yaml's)")
    add("--same_subject_fraction", type=float, help="share of same-subject pairs per cell (default: evaluate.yaml's)")
    add("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    add("--ckpt_path", default=os.path.join(ROOT, "models", "model.pt"), help="KeyMorph weights")
    add("--refine_iterations", type=int, help="KeyMorph refinement steps (default: the inference config's)")
    add("--include_mni", action="store_true", help="add TRE-only pairs on the MNI152 T1 template")
    add("--spacing", type=float, help="voxel size of the test images, mm (default 1; --quick: 2)")
    add("--seed", type=int, help="seed of every draw (default: evaluate.yaml's)")
    add("--threads", type=int, default=2, help="threads per method (default 2)")
    add("--timeout", type=float, default=3600.0, help="seconds allowed per pair (and per worker start)")
    add("--work_dir", help="where the case images go (default: ~/.cache/keymorph/benchmark)")
    add("--keep_cases", action="store_true", help="keep the case images and the methods' outputs")
    add("--retry_failed", action="store_true", help="redo the cases that failed in an earlier run")
    add("--no_warmup", action="store_true", help="skip the untimed warm-up of each method")
    add("--quick", action="store_true", help="tiny smoke configuration (see the module docstring)")
    add("--num_keypoints", type=int, help="network setting (must match the weights; default: the config's)")
    add("--network_channels", type=int, nargs="+", help="network setting (must match the weights)")
    add("--spatial_size", type=int, help="network grid size (must match the weights)")
    add("--worker", choices=METHODS, help=argparse.SUPPRESS)
    add("--worker_settings", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> dict:
    """The case settings: the command line over ``--quick`` over ``configs/evaluate.yaml``."""
    defaults = evaluate_defaults()
    subjects = list(args.subjects or defaults["test_subjects"])
    pairs = list(args.modality_pairs or defaults["modality_pairs"])
    quick = {}
    if args.quick:
        subjects = subjects[:1]
        pairs = pairs[:1] if args.modality_pairs or "T1-T2" not in pairs else ["T1-T2"]
        quick = {"rotations": [0.0, 90.0], "pairs_per_cell": 1, "same_subject_fraction": 1.0, "spacing": 2.0}

    def pick(name: str, fallback):
        given = getattr(args, name, None)
        return given if given is not None else quick.get(name, fallback)

    return {
        "label_maps_dir": os.path.abspath(args.label_maps_dir),
        "subjects": subjects,
        "modality_pairs": pairs,
        "rotations": [float(r) for r in pick("rotations", defaults["rotations"])],
        "pairs_per_cell": int(pick("pairs_per_cell", defaults["pairs_per_cell"])),
        "same_subject_fraction": float(pick("same_subject_fraction", defaults["same_subject_fraction"])),
        "spacing": float(pick("spacing", 1.0)),
        "seed": int(pick("seed", defaults["seed"])),
        "scale_range": float(defaults["scale_range"]),
        "translate_mm": float(defaults["translate_mm"]),
        "synthesis": dict(defaults["synthesis"] or {}),
        "include_mni": bool(args.include_mni),
        "quick": bool(args.quick),
    }


def method_settings(method: str, args: argparse.Namespace) -> dict:
    """What a method's worker needs; everything but ``threads`` and ``warmup`` also decides whether its earlier
    rows are still valid (:func:`main`)."""
    if method == "keymorph":
        overrides = {}
        if args.num_keypoints is not None:
            overrides["num_keypoints"] = args.num_keypoints
        if args.network_channels is not None:
            overrides["network_channels"] = list(args.network_channels)
        if args.spatial_size is not None:
            overrides["spatial_size"] = args.spatial_size
        refine = args.refine_iterations
        if refine is None:  # the inference config's (its inferer's default when it sets none)
            from scripts.bundle_api import load_config

            refine = int(load_config(ROOT).get_parsed_content("inferer").refine_iterations)
        ckpt = os.path.abspath(args.ckpt_path)
        inside = os.path.relpath(ckpt, ROOT)  # the workers run in ROOT
        settings = {
            "ckpt_path": ckpt if inside.startswith("..") else inside,
            "ckpt_sha256": file_hash(ckpt)[:16],
            "refine_iterations": refine,
            "overrides": overrides,
        }
    elif method == "ants":
        settings = {"options": QUICK_ANTS if args.quick else {}, "antspyx": _version("antspyx")}
    elif method == "elastix":
        settings = {"options": QUICK_ELASTIX if args.quick else {}, "itk-elastix": _version("itk-elastix")}
    else:
        settings = {}
    return json.loads(json.dumps(settings))


def worker_environment(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_settings(settings: dict, args: argparse.Namespace) -> dict[str, str]:
    """Exit with one line on a setting that would fail later; returns the label maps ``{subject: path}``."""
    from scripts.errors import KeyMorphInputError, fail
    from scripts.robustness_cases import held_out_label_maps, parse_modality_pair

    try:
        for pair in settings["modality_pairs"]:
            parse_modality_pair(pair)
    except KeyMorphInputError as error:
        fail(f"--modality_pairs: {error}")
    if any(not 0.0 <= r <= 180.0 for r in settings["rotations"]):
        fail(f"--rotations {settings['rotations']}: net rotation angles must be within [0, 180] degrees")
    if settings["pairs_per_cell"] < 1 or not 0.0 <= settings["same_subject_fraction"] <= 1.0:
        fail("--pairs_per_cell must be >= 1 and --same_subject_fraction within [0, 1]")
    if not os.path.isdir(settings["label_maps_dir"]):
        fail(f"{settings['label_maps_dir']}: label maps folder not found (--label_maps_dir)")
    try:
        label_maps = held_out_label_maps(settings["label_maps_dir"], settings["subjects"])
    except KeyMorphInputError as error:
        fail(str(error))
    n_same = min(settings["pairs_per_cell"], math.ceil(settings["same_subject_fraction"] * settings["pairs_per_cell"]))
    if n_same < settings["pairs_per_cell"] and len(label_maps) < 2:
        fail("different-subject pairs need two subjects: give more --subjects or --same_subject_fraction 1")
    if settings["spacing"] <= 0 or args.threads < 1 or args.timeout <= 0:
        fail("--spacing, --threads and --timeout must be positive")
    for method in args.methods:
        module = METHOD_MODULES.get(method)
        if module and importlib.util.find_spec(module) is None:
            fail(f"--methods {method}: the Python module {module!r} is missing (pip install -r requirements-bench.txt)")
    if "keymorph" in args.methods and not os.path.isfile(args.ckpt_path):
        fail(f"{args.ckpt_path}: model weights not found (--ckpt_path)")
    if settings["include_mni"] and not any(p.startswith("T1-") for p in settings["modality_pairs"]):
        fail("--include_mni needs a modality pair with T1 fixed (the template is a T1 image)")
    return label_maps

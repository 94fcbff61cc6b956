"""One command for one pair or a whole tree: ``python -m scripts.register MOVING [FIXED] -o OUT [settings]``.

MOVING is a NIfTI file, a folder (its ``.nii``/``.nii.gz`` files; ``--recursive``: also those of its subfolders),
a quoted glob pattern (``"scans/**/*_T2w.nii.gz"``), a BIDS-like tree with ``--bids SUFFIX``
(``sub-*/[ses-*/]anat/*_SUFFIX.nii[.gz]``) or a pairs CSV (columns ``moving``, ``fixed`` and optionally ``name``,
``extra``; then no FIXED). FIXED defaults to the MNI152 2009 T1 template (brain-extracted).

The inputs become one pairs CSV (a temporary file) and the bundle's own workflow (``configs/inference.yaml``,
:func:`scripts.api.inference_workflow`) registers them: the outputs, ``OUT/summary.csv``, ``OUT/index.html``, the
resuming of an interrupted run and the exit codes (0; 1 when an input failed; 2 for a wrong setting or input, one
line ``keymorph: error: ...``) are the bundle runner's. The defaults shown by ``--help`` are the config's.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import glob
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence

import yaml

from scripts.api import INFERENCE_CONFIG, inference_workflow, run_workflow
from scripts.errors import KeyMorphInputError, KeyMorphWorkflowError, fail
from scripts.image_io import default_atlas_path, is_nifti, nifti_stem
from scripts.settings_checks import INFERENCE_ALIGNERS
from scripts.skull_strip import BACKENDS

#: The settings of configs/inference.yaml that this command sets from its own arguments, not from an option.
FROM_ARGUMENTS = {
    "bundle_root": "the bundle folder (this command's own)",
    "dataset_dir": "MOVING",
    "output_dir": "-o/--output_dir",
    "fixed_image": "FIXED",
    "pairs_csv": "MOVING (a .csv file)",
    "num_threads": "--threads",
}
#: Options for the other user settings of configs/inference.yaml: help text and choices (None: any value).
OPTIONS: dict[str, tuple[str, Sequence[str] | None]] = {
    "skull_strip": (
        "how the moving brains are found: bundle (the bundle's brain-mask network, any contrast and pose), "
        "deepbet (T1 whole-head scans), mask (--mask_dir), none",
        BACKENDS,
    ),
    "fixed_skull_strip": ("the same for the fixed image (the default atlas is brain-extracted)", BACKENDS),
    "mask_dir": ("with --skull_strip mask: the brain mask of NAME.nii.gz is MASK_DIR/NAME.nii.gz", None),
    "head_pose": (
        "with deepbet: measure the pose of the brain it finds and run it again on an upright view of a turned head",
        None,
    ),
    "device": ("torch device of the network and deepbet (default: cuda when available, else cpu)", None),
    "apply_to": (
        "also transform accompanying images, relative to each moving image's folder, {name} = its case name, e.g."
        " 'labels/{name}_seg.nii.gz' (integer images: nearest neighbour)",
        None,
    ),
    "header_only": ("also write registered_header_only.nii.gz (moving voxels, header moved to the fixed space)", None),
    "overwrite": ("redo cases whose outputs exist (else they are skipped: a rerun resumes)", None),
    "aligner": ("the transform fitted to the keypoints", INFERENCE_ALIGNERS),
    "search_turns": ("also try the network grid turned by 180 degrees about each axis when the fit is poor", None),
    "turn_search_above_mm": ("keypoint residual (mm) above which the turns are tried (0: always)", None),
    "refine_iterations": ("steps of mutual-information refinement after the keypoint fit (0: none)", None),
    "refine_fine_iterations": ("refinement steps at the images' own resolution after those on the 2 mm grids", None),
    "refine_margin_mm": ("the refinement's points cover the fixed brain and this margin around it (mm)", None),
    "refine_samples": ("points of the refinement's mutual information", None),
    "refine_check_samples": (
        "other points that must confirm the refinement's gain, else it is dropped (0: none)",
        None,
    ),
    "num_workers": ("processes preparing the next images while one is registered (0: none, one after another)", None),
    "qc_min_similarity": ("QC: 'suspect' below this normalized mutual information", None),
    "qc_max_residual_mm": ("QC: 'suspect' above this keypoint residual (mm)", None),
    "qc_max_brain_fill": ("QC: 'suspect' when the moving brain mask fills more of its image", None),
    "qc_min_smoothness": ("QC: 'suspect' when neighbouring brain voxels correlate less (noise)", None),
    "qc_min_brain_overlap": (
        "QC: 'suspect' when the registered moving brain mask overlaps the fixed brain mask less (Dice)",
        None,
    ),
    "ckpt_path": ("the network weights (default: the bundle's models/model.pt)", None),
    "brain_mask_weights": ("the brain-mask network's weights (default: the bundle's models/brain_mask.pt)", None),
}
_GLOB_CHARACTERS = "*?["


def config_defaults() -> dict:
    """The raw values of ``configs/inference.yaml`` (expressions unevaluated)."""
    with open(INFERENCE_CONFIG) as handle:
        return yaml.safe_load(handle)


def _typed(default):
    """The argparse type of a setting whose config default is ``default``."""
    if isinstance(default, bool):
        return None
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    defaults = config_defaults()
    parser = argparse.ArgumentParser(
        prog="python -m scripts.register",
        description="Register MRI brain images to a fixed image with KeyMorph: one pair, a folder, a glob pattern, a"
        " BIDS-like tree or a pairs CSV. Outputs go to OUT/NAME/ (see README 'Register your images'), with"
        " OUT/summary.csv and OUT/index.html; a rerun skips finished cases. Exit code 1: an input failed; 2: a wrong"
        " setting or input.",
        epilog="The same workflow runs as `python -m monai.bundle run --config_file configs/inference.yaml`; the"
        " defaults are that config's.",
    )
    parser.add_argument("moving", metavar="MOVING", help="NIfTI file, folder, quoted glob pattern, BIDS tree or CSV")
    parser.add_argument("fixed", metavar="FIXED", nargs="?", help="fixed image (default: the MNI152 T1 template)")
    parser.add_argument("-o", "--output_dir", required=True, help="output folder (OUT)")
    parser.add_argument("-r", "--recursive", action="store_true", help="with a folder: its subfolders too")
    parser.add_argument(
        "--bids",
        metavar="SUFFIX",
        help="MOVING is a BIDS-like tree: register sub-*/[ses-*/]anat/*_SUFFIX.nii[.gz] (e.g. T1w, T2w, FLAIR)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per process (default: the cores shared among the run's processes)"
    )
    for name, (text, choices) in OPTIONS.items():
        default = defaults[name]
        shown = "" if isinstance(default, str) and default.startswith("$") else f" (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=text + shown)
        else:
            parser.add_argument(f"--{name}", type=_typed(default), choices=choices, help=text + shown)
    return parser


def _under(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(folder)


def _is_input(path: str, exclude: str | None) -> bool:
    """A visible NIfTI file outside the ``exclude`` folder."""
    hidden = os.path.basename(path).startswith(".")
    return is_nifti(path) and os.path.isfile(path) and not hidden and not (exclude and _under(path, exclude))


def find_moving_images(moving: str, recursive: bool = False, bids: str | None = None, exclude: str | None = None):
    """The moving images of MOVING (see the module docstring), sorted; files under ``exclude`` (the output folder)
    are left out. Raises :class:`KeyMorphInputError` when there are none."""
    if os.path.isfile(moving):
        if not is_nifti(moving):
            raise KeyMorphInputError(f"{moving}: not a .nii or .nii.gz file")
        found = [moving]
    elif os.path.isdir(moving) and bids:
        found = [
            path
            for pattern in ("sub-*/anat", "sub-*/ses-*/anat")
            for path in glob.glob(os.path.join(glob.escape(moving), pattern, f"*_{bids}.nii*"))
        ]
    elif os.path.isdir(moving):
        pattern = os.path.join(glob.escape(moving), "**" if recursive else "", "*")
        found = glob.glob(pattern, recursive=recursive)
    elif any(c in moving for c in _GLOB_CHARACTERS):
        found = glob.glob(moving, recursive=True)
    else:
        raise KeyMorphInputError(f"{moving}: no such file or folder")
    found = sorted(p for p in found if _is_input(p, exclude))
    if not found:
        where = f"sub-*/[ses-*/]anat/*_{bids}.nii[.gz]" if bids else ".nii or .nii.gz files"
        raise KeyMorphInputError(f"{moving}: no {where} to register")
    return found


def case_names(paths: Sequence[str], root: str | None = None) -> list[str]:
    """Output folder names: each file's name without ``.nii[.gz]``; files whose names collide (``a/x.nii.gz``,
    ``b/x.nii.gz``) get their path relative to ``root`` (or their parent folders) joined by ``_`` instead."""
    stems = [nifti_stem(p) for p in paths]
    counts = Counter(stems)
    names = []
    for path, stem in zip(paths, stems):
        if counts[stem] == 1:
            names.append(stem)
            continue
        relative = os.path.relpath(path, root) if root and _under(path, root) else os.path.abspath(path).lstrip(os.sep)
        parts = [*os.path.dirname(relative).split(os.sep), stem]
        names.append("_".join(part for part in parts if part and part not in (".", "..")))
    return names


def extra_images(moving: str, apply_to: str | None) -> list[str]:
    """The accompanying images of a moving image: ``apply_to`` relative to its folder, ``{name}`` its case name."""
    if not apply_to:
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(moving), apply_to.replace("{name}", nifti_stem(moving)))))


def is_extra_image(path: str, apply_to: str | None) -> bool:
    """Whether ``path`` is itself an accompanying image of the ``apply_to`` pattern (then it is not a moving image)."""
    return bool(apply_to) and fnmatch.fnmatch(os.path.basename(path), os.path.basename(apply_to.replace("{name}", "*")))


def write_inputs_csv(path: str, movings: Sequence[str], fixed: str, apply_to: str | None, root: str | None) -> None:
    """The pairs CSV the workflow registers: absolute paths, the case names, the accompanying images."""
    movings = [m for m in movings if not is_extra_image(m, apply_to)]
    if not movings:
        raise KeyMorphInputError("every input matches --apply_to: nothing left to register")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["moving", "fixed", "name", "extra"])
        for moving, name in zip(movings, case_names(movings, root)):
            extra = ";".join(os.path.abspath(p) for p in extra_images(moving, apply_to))
            writer.writerow([os.path.abspath(moving), os.path.abspath(fixed), name, extra])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns 0, or exits through :func:`scripts.errors.fail` (one line; 1: inputs failed, 2: a
    wrong setting or input)."""
    args = build_parser().parse_args(argv)
    settings = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
    apply_to = settings.pop("apply_to", None)  # becomes the inputs' "extra" column
    if args.threads is not None:
        if args.threads < 1:
            fail(f"--threads {args.threads}: must be at least 1")
        settings["num_threads"] = args.threads
    try:
        output_dir = os.path.abspath(args.output_dir)
        # the found inputs' CSV stays out of OUT: a wrong setting leaves nothing behind
        with tempfile.TemporaryDirectory(prefix="keymorph-inputs-") as scratch:
            if args.moving.lower().endswith(".csv"):
                if args.fixed is not None:
                    raise KeyMorphInputError(f"{args.moving}: a pairs CSV names its fixed images; drop FIXED")
                if apply_to:
                    raise KeyMorphInputError(
                        f"{args.moving}: a pairs CSV lists accompanying images in its 'extra' column"
                    )
                pairs_csv = args.moving
            else:
                fixed = args.fixed if args.fixed is not None else default_atlas_path()
                root = args.moving if os.path.isdir(args.moving) else None
                movings = find_moving_images(args.moving, args.recursive, args.bids, exclude=output_dir)
                pairs_csv = os.path.join(scratch, "inputs.csv")
                write_inputs_csv(pairs_csv, movings, fixed, apply_to, root)
            run_workflow(inference_workflow(**settings, pairs_csv=pairs_csv, output_dir=output_dir))
    except KeyMorphWorkflowError as error:
        fail(str(error), error.exit_code)
    except (KeyMorphInputError, OSError) as error:
        fail(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())

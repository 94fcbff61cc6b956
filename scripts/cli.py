"""What the bundle's command-line entry points do around the engines: clear one-line errors and exit codes."""

from __future__ import annotations

import logging
import sys

from scripts.errors import KeyMorphInputError

logger = logging.getLogger(__name__)


def fail(message: str, code: int = 2) -> None:
    """Print ``keymorph: error: message`` on one line and exit with ``code`` (no traceback)."""
    print(f"keymorph: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_registration(evaluator) -> None:
    """Run the inference evaluator; exit 1 when any input failed, 2 on a bad setting or fixed image."""
    try:
        evaluator.run()
    except KeyMorphInputError as error:
        fail(str(error))
    counts = getattr(evaluator.state, "registration_counts", {})
    failed = counts.get("error", 0)
    if failed:
        fail(f"{failed} of {sum(counts.values())} input(s) failed; see summary.csv for each message", code=1)


def check_inference_settings(
    dataset_dir: str,
    output_dir: str,
    fixed_image: str,
    skull_strip: str,
    ckpt_path: str,
    pairs_csv: str | None = None,
) -> None:
    """Check, before any work starts, what would otherwise fail late: exits with one line on the first problem."""
    import os

    from scripts.image_io import load_volume
    from scripts.skull_strip import BACKENDS

    if skull_strip not in BACKENDS:
        fail(f"--skull_strip {skull_strip!r} is not one of {', '.join(BACKENDS)}")
    if not pairs_csv and not os.path.isdir(dataset_dir):
        fail(f"{dataset_dir}: input folder not found (--dataset_dir)")
    if not os.path.isfile(ckpt_path):
        fail(f"{ckpt_path}: model weights not found; see README 'Use it from the model zoo' to download them")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        fail(f"{output_dir}: cannot create the output folder ({error.strerror})")
    if not os.access(output_dir, os.W_OK):
        fail(f"{output_dir}: output folder is not writable")
    if not pairs_csv:
        try:
            load_volume(fixed_image)
        except KeyMorphInputError as error:
            fail(f"fixed image: {error}")

"""Quality control at a glance: each case's ``qc.png`` and the folder's ``index.html``.

* ``qc.png``: the registered image on the FIXED image's native grid (what the user will use), three orthogonal
  slices, with the fixed image's edges drawn over it (nilearn's ``add_edges``): a good alignment puts the fixed
  image's brain outline, ventricles and sulci on the same structures of the registered image. The network-grid
  figure with the keypoints is ``qc_keypoints.png`` (:func:`scripts.qc.qc_figure`).
* ``index.html``: one row per case of ``summary.csv``, worst first (errors, then suspect cases, then the rest, each
  by decreasing keypoint residual), with the ``qc.png`` thumbnail, the status, the QC scores, the message and links
  to the case's files. Plain HTML and CSS, no script, so it opens from the disk in any browser.

:func:`screenshot` renders a page to PNG in headless Chromium (the Debian package ``chromium``), as a check that a
real browser shows it and for the documentation: ``python -m scripts.qc_report OUT_DIR/index.html docs/qc_index.png``
(``make qc-screenshot`` registers the demo images first).
"""

from __future__ import annotations

import argparse
import html
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from scripts.errors import KeyMorphInputError  # noqa: E402
from scripts.errors import fail  # noqa: E402

#: Order of the statuses in ``index.html``: what needs a look comes first.
STATUS_ORDER = ("error", "suspect", "ok", "skipped")
#: The columns of ``summary.csv`` shown as QC scores, with their headings.
SCORE_COLUMNS = {
    "keypoint_residual_mm": "residual (mm)",
    "similarity": "similarity",
    "brain_fill": "brain fill",
    "smoothness": "smoothness",
    "brain_overlap": "brain overlap",
}
#: Files of a case folder linked from its row, when present.
LINKED_FILES = (
    "registered.nii.gz",
    "registered_header_only.nii.gz",
    "transform.tfm",
    "transform_inverse.tfm",
    "affine_ras.txt",
    "transform_flirt.mat",
    "transform.lta",
    "moving_mask.nii.gz",
    "qc_keypoints.png",
)


class EdgesFigure:
    """Writes ``qc.png`` of the cases registered to one fixed image (a ``nibabel`` image): the fixed image's voxels
    and the point the slices go through (its centre of intensity) are read and computed once, not per case."""

    def __init__(self, fixed: nib.Nifti1Image):
        fixed_data = np.nan_to_num(np.asarray(fixed.dataobj, dtype=np.float32))
        if fixed_data.ndim == 4:
            fixed_data = fixed_data[..., 0]
        self.fixed = nib.Nifti1Image(fixed_data, fixed.affine)
        self.cut_coords = _centre_of_intensity(fixed_data, fixed.affine)

    def __call__(self, path: str, registered: np.ndarray | torch.Tensor, title: str = "") -> None:
        """Write ``qc.png``: ``registered`` ``(X, Y, Z)`` (on the fixed grid) in grey, three orthogonal slices
        through the fixed image's centre of intensity, with the fixed image's edges in red."""
        from nilearn import plotting  # imported here: nilearn's plotting module takes a second to import

        data = registered.detach().cpu().numpy() if isinstance(registered, torch.Tensor) else np.asarray(registered)
        registered_image = nib.Nifti1Image(data.astype(np.float32), self.fixed.affine)
        display = plotting.plot_anat(
            registered_image, cut_coords=self.cut_coords, title=title or None, draw_cross=False, dim=0
        )
        display.add_edges(self.fixed, color="r")
        display.savefig(path, dpi=80)
        display.close()


def edges_figure(path: str, registered: np.ndarray | torch.Tensor, fixed: nib.Nifti1Image, title: str = "") -> None:
    """Write the ``qc.png`` of :class:`EdgesFigure` for one case."""
    EdgesFigure(fixed)(path, registered, title)


def _centre_of_intensity(data: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """World (RAS mm) centre of the positive intensities of a volume (its centre when there are none)."""
    weights = np.clip(data, 0, None)
    if not weights.any():
        index = (np.array(data.shape[:3]) - 1) / 2.0
    else:
        grids = np.meshgrid(*[np.arange(s) for s in data.shape[:3]], indexing="ij")
        index = np.array([(g * weights).sum() for g in grids]) / weights.sum()
    return tuple(float(v) for v in affine[:3, :3] @ index + affine[:3, 3])


def _number(value, default: float = float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def worst_first(rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """Summary rows sorted for review: by status (:data:`STATUS_ORDER`), then by decreasing keypoint residual
    (missing residuals last), then by name."""

    def key(row):
        status = row.get("status", "")
        rank = STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)
        residual = _number(row.get("keypoint_residual_mm"))
        return rank, -residual if residual == residual else float("inf"), row.get("name", "")

    return sorted(rows, key=key)


_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; text-align: left; }
th { background: #eee; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 320px; display: block; }
td.name { white-space: nowrap; }
.error { background: #f8d0d0; } .suspect { background: #fbeec0; } .ok { background: #d8f0d8; }
.links a { margin-right: 0.6em; white-space: nowrap; }
"""


def index_html(output_dir: str, rows: Iterable[Mapping[str, str]]) -> str:
    """The text of ``OUT_DIR/index.html`` for these summary rows (see the module docstring)."""
    rows = worst_first(rows)
    counts = {status: sum(row.get("status") == status for row in rows) for status in STATUS_ORDER}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    headings = ["case", "QC figure", "status", *SCORE_COLUMNS.values(), "seconds", "message", "files"]
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>KeyMorph registrations</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>KeyMorph registrations</h1><p>{len(rows)} case(s): {html.escape(summary or 'none')}; worst first."
        ' Red edges in a figure are the fixed image\'s; <a href="summary.csv">summary.csv</a> has the same rows.</p>',
        "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in headings) + "</tr></thead><tbody>",
    ]
    for row in rows:
        lines.append(_row(output_dir, row))
    lines.append("</tbody></table></body></html>")
    return "\n".join(lines) + "\n"


def _row(output_dir: str, row: Mapping[str, str]) -> str:
    name = str(row.get("name", ""))
    status = str(row.get("status", ""))
    folder = os.path.join(output_dir, name)

    def link(file: str) -> str:
        return f"{quote(name)}/{quote(file)}"

    figure = (
        f'<a href="{link("qc.png")}"><img src="{link("qc.png")}" loading="lazy" alt="QC figure of {html.escape(name)}"></a>'
        if os.path.isfile(os.path.join(folder, "qc.png"))
        else ""
    )
    scores = "".join(f'<td class="number">{html.escape(str(row.get(c, "")))}</td>' for c in SCORE_COLUMNS)
    files = " ".join(
        f'<a href="{link(f)}">{html.escape(f)}</a>' for f in LINKED_FILES if os.path.isfile(os.path.join(folder, f))
    )
    cells = [
        f'<td class="name">{html.escape(name)}</td>',
        f"<td>{figure}</td>",
        f"<td>{html.escape(status)}</td>",
        scores,
        f'<td class="number">{html.escape(str(row.get("seconds", "")))}</td>',
        f"<td>{html.escape(str(row.get('message', '')))}</td>",
        f'<td class="links">{files}</td>',
    ]
    return f'<tr class="{html.escape(status)}">' + "".join(cells) + "</tr>"


def write_index(path: str, output_dir: str, rows: Iterable[Mapping[str, str]]) -> None:
    """Write :func:`index_html` to ``path`` (the caller makes it atomic)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(index_html(output_dir, rows))


#: Names of a Chromium binary, in the order they are looked for on PATH.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Headless, and nothing that reaches out or persists: no GPU, no first-run page, no background network, no
# component updates, no sync; a fresh profile folder per call.
_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH, or None."""
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def screenshot(page: str, png: str, width: int = 1400, height: int = 900, timeout: float = 120.0) -> None:
    """Render the HTML file ``page`` in headless Chromium and save the window (``width`` x ``height`` pixels) as
    ``png``.

    Raises:
        KeyMorphInputError: no Chromium on PATH (``apt-get install chromium``), ``page`` missing, or Chromium wrote
            no PNG (its last line of output is in the message).
    """
    binary = find_chromium()
    if binary is None:
        raise KeyMorphInputError(
            f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}): apt-get install chromium"
        )
    if not os.path.isfile(page):
        raise KeyMorphInputError(f"{page}: no such page")
    png = os.path.abspath(png)
    with tempfile.TemporaryDirectory(prefix="keymorph-chromium-") as profile:
        command = [
            binary,
            *_CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png}",
            Path(os.path.abspath(page)).as_uri(),
        ]
        process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if not os.path.isfile(png):
        lines = (process.stderr or process.stdout).strip().splitlines()
        raise KeyMorphInputError(f"{page}: Chromium wrote no screenshot ({lines[-1] if lines else process.returncode})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.qc_report",
        description="Render a QC page (OUT_DIR/index.html) to PNG in headless Chromium.",
    )
    parser.add_argument("page", help="the HTML file, e.g. OUT_DIR/index.html")
    parser.add_argument("png", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400, help="window width in pixels (default: 1400)")
    parser.add_argument("--height", type=int, default=900, help="window height in pixels (default: 900)")
    args = parser.parse_args(argv)
    try:
        screenshot(args.page, args.png, args.width, args.height)
    except KeyMorphInputError as error:
        fail(str(error))
    print(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

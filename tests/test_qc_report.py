"""QC at a glance: the edges figure on the fixed grid, the folder's index.html (worst first, escaped, linked) and the
page as headless Chromium renders it."""

from __future__ import annotations

import re

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from test_inference import FIXED_AFFINE, FIXED_SHAPE, phantom_volume

from scripts.qc_report import edges_figure, find_chromium, index_html, screenshot, worst_first

ROWS = [
    {"name": "good", "status": "ok", "keypoint_residual_mm": "1.5", "similarity": "0.3", "seconds": "2.0"},
    {"name": "worse", "status": "ok", "keypoint_residual_mm": "4.0", "similarity": "0.2", "seconds": "2.0"},
    {"name": "flagged", "status": "suspect", "keypoint_residual_mm": "9.1", "message": "QC flagged: large residual"},
    {"name": "broken", "status": "error", "message": "in/broken.nii.gz: file is empty"},
    {"name": "old", "status": "skipped", "message": "outputs exist"},
]


def test_worst_first_orders_by_status_then_residual():
    assert [row["name"] for row in worst_first(ROWS)] == ["broken", "flagged", "worse", "good", "old"]


@pytest.fixture
def output_dir(tmp_path):
    """A folder of cases as the writer leaves it: figures and files for the registered cases only."""
    for name in ("good", "worse", "flagged"):
        (tmp_path / name).mkdir()
        for file in ("qc.png", "registered.nii.gz", "transform.tfm", "transform_flirt.mat"):
            (tmp_path / name / file).write_bytes(b"")
    return tmp_path


def test_index_has_one_row_per_case_worst_first_with_figure_scores_and_links(output_dir):
    page = index_html(str(output_dir), ROWS)
    rows = re.findall(r'<tr class="(\w+)">(.*?)</tr>', page)
    assert [status for status, _ in rows] == ["error", "suspect", "ok", "ok", "skipped"]
    flagged = rows[1][1]
    assert '<img src="flagged/qc.png"' in flagged and "9.1" in flagged and "QC flagged: large residual" in flagged
    assert '<a href="flagged/transform_flirt.mat">' in flagged
    assert "transform.lta" not in flagged  # only files that exist are linked
    assert "<img" not in rows[0][1] and "in/broken.nii.gz: file is empty" in rows[0][1]
    assert "5 case(s): 1 error, 1 suspect, 2 ok, 1 skipped" in page


def test_index_escapes_names_and_messages(tmp_path):
    (tmp_path / "a&b <c>").mkdir()
    (tmp_path / "a&b <c>" / "qc.png").write_bytes(b"")
    page = index_html(str(tmp_path), [{"name": "a&b <c>", "status": "ok", "message": "<script>x</script>"}])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'src="a%26b%20%3Cc%3E/qc.png"' in page and "a&amp;b &lt;c&gt;" in page


def test_edges_figure_draws_the_fixed_edges_over_the_registered_image(tmp_path):
    fixed = nib.Nifti1Image(phantom_volume(FIXED_AFFINE, FIXED_SHAPE), FIXED_AFFINE)
    registered = phantom_volume(FIXED_AFFINE, FIXED_SHAPE)  # on the fixed grid
    path = tmp_path / "qc.png"
    edges_figure(str(path), registered, fixed, "case: fixed image edges over the registered image")
    pixels = matplotlib.image.imread(str(path))[..., :3]
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    grey = (np.ptp(pixels, axis=-1) < 0.02) & (pixels[..., 0] > 0.2) & (pixels[..., 0] < 0.9)
    assert red.sum() > 200, "no edges drawn"
    assert grey.sum() > 1000, "no registered image under the edges"


def test_a_real_browser_renders_the_index(output_dir, tmp_path):
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH (Debian package chromium): the page is not rendered")
    for name in ("good", "worse", "flagged"):  # real thumbnails
        matplotlib.image.imsave(str(output_dir / name / "qc.png"), np.random.default_rng(0).random((60, 180)))
    (output_dir / "index.html").write_text(index_html(str(output_dir), ROWS))
    png = tmp_path / "index.png"
    screenshot(str(output_dir / "index.html"), str(png), width=1000, height=600)
    pixels = matplotlib.image.imread(str(png))[..., :3]
    assert pixels.shape[:2] == (600, 1000)
    error_red = np.all(np.abs(pixels - np.array([0xF8, 0xD0, 0xD0]) / 255) < 0.02, axis=-1)
    suspect_yellow = np.all(np.abs(pixels - np.array([0xFB, 0xEE, 0xC0]) / 255) < 0.02, axis=-1)
    # the worst row (error, red) is drawn above the suspect one (yellow)
    assert error_red.any() and suspect_yellow.any()
    assert np.nonzero(error_red)[0].mean() < np.nonzero(suspect_yellow)[0].mean()

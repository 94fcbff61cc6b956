"""benchmarks/cohort_throughput.py without an inference run: its images and its report; and the memory sampling it
shares with benchmarks/peak_memory.py (benchmarks/process_memory.py)."""

from __future__ import annotations

import os
import sys

import nibabel as nib
import numpy as np
import pytest
from synthetic_heads import write_label_maps_dir

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import cohort_throughput  # noqa: E402
import process_memory  # noqa: E402


def test_images_have_their_own_pose_at_1_mm_and_are_made_once(tmp_path):
    maps = write_label_maps_dir(str(tmp_path / "maps"), subjects=(1, 2))
    label_maps = [os.path.join(maps, name) for name in sorted(os.listdir(maps))]
    paths = cohort_throughput.make_images(label_maps, 3, str(tmp_path / "work"))
    assert [os.path.basename(p) for p in paths] == ["head_0_0000.nii.gz", "head_0_0001.nii.gz", "head_0_0002.nii.gz"]
    images = [nib.load(p) for p in paths]
    assert all(image.get_data_dtype() == np.int16 for image in images)
    assert all(np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), 1.0) for image in images)  # 1 mm
    assert len({image.affine.tobytes() for image in images}) == 3  # each its own pose
    # a second call (a larger count) reuses what exists, and an image depends only on its index and the seed
    stamp = os.path.getmtime(paths[0])
    again = cohort_throughput.make_images(label_maps, 4, str(tmp_path / "work"))
    assert again[:3] == paths and os.path.getmtime(paths[0]) == stamp
    elsewhere = cohort_throughput.make_images(label_maps, 2, str(tmp_path / "other"))
    np.testing.assert_array_equal(np.asarray(nib.load(elsewhere[1]).dataobj), np.asarray(images[1].dataobj))


def test_peak_memory_counts_the_whole_process_tree(tmp_path):
    # a child that starts a grandchild holding 300 MB while the child itself stays small
    grandchild = "import time; block = bytearray(300 * 2**20); time.sleep(1.5)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    result = process_memory.run_measured([sys.executable, "-c", child], sample_seconds=0.05)
    assert result["exit_code"] == 0
    assert result["peak_rss_mb"] > 300 and result["peak_pss_mb"] > 300
    assert result["peak_rss_mb"] < 1000


def test_peak_pss_counts_the_pages_forked_workers_share_once():
    # a parent holding 200 MB forks two workers that only read it, as DataLoader workers share the runner's pages:
    # the RSS sum counts the 200 MB three times, the PSS sum once
    parent = (
        "import os, time\n"
        "block = b'x' * (200 * 2**20)\n"
        "workers = []\n"
        "for _ in range(2):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(1.5)\n"
        "        os._exit(0)\n"
        "    workers.append(pid)\n"
        "for pid in workers:\n"
        "    os.waitpid(pid, 0)\n"
    )
    result = process_memory.run_measured([sys.executable, "-c", parent], sample_seconds=0.05)
    assert result["exit_code"] == 0
    assert result["peak_rss_mb"] > 600, result
    assert 200 < result["peak_pss_mb"] < 350, result


def test_report_from_its_csv(tmp_path, capsys):
    rows = [
        {
            "images": 50,
            "settings": "defaults",
            "wall_seconds": "160.0",
            "images_per_hour": "1125",
            "seconds_per_image": "3.20",
            "steady_seconds_per_image": "2.90",
            "peak_rss_mb": "2900",
            "peak_pss_mb": "2100",
            "statuses": "40 ok 10 suspect",
            "exit_code": 0,
        },
        {
            "images": 200,
            "settings": "defaults",
            "wall_seconds": "600.0",
            "images_per_hour": "1200",
            "seconds_per_image": "3.00",
            "steady_seconds_per_image": "2.95",
            "peak_rss_mb": "2950",
            "peak_pss_mb": "2150",
            "statuses": "160 ok 40 suspect",
            "exit_code": 0,
        },
    ]
    cohort_throughput.write_report(str(tmp_path), rows)
    (tmp_path / "summary.md").unlink()
    assert cohort_throughput.main(["--report_only", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    table = [line for line in text.splitlines() if line.startswith("| 50 ") or line.startswith("| 200 ")]
    assert table == [
        "| 50 | defaults | 160.0 | 1125 | 3.20 | 2.90 | 2900 | 2100 | 40 ok 10 suspect | 0 |",
        "| 200 | defaults | 600.0 | 1200 | 3.00 | 2.95 | 2950 | 2150 | 160 ok 40 suspect | 0 |",
    ]


def test_a_setting_without_a_value_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cohort_throughput.main(["--counts", "1", "--setting", "num_workers", "--work_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--setting 'num_workers': expected KEY=VALUE" in capsys.readouterr().err

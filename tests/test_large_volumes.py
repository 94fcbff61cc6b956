"""Issue 15: peak memory of the inference preprocessing on large volumes, and the steps that keep it down giving
MONAI's results exactly (``scripts/large_volumes.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRangePercentilesd as MonaiScaleIntensityRangePercentilesd
from test_inference import ROOT, grid_affine, phantom_at, phantom_volume, write_nifti

from scripts.large_volumes import KeepOriginald, ScaleIntensityRangePercentilesd


@pytest.mark.parametrize("size", [20, 120])  # below and above the size where MONAI switches to numpy percentiles
@pytest.mark.parametrize("settings", [{}, {"b_min": -1.0, "b_max": 3.0, "clip": False}, {"relative": True}])
def test_scaling_is_monais_bit_for_bit(size, settings):
    rng = np.random.default_rng(size)
    image = MetaTensor(torch.from_numpy(rng.gamma(2.0, 50.0, (1, size, size, size)).astype(np.float32)))
    arguments = {"lower": 0.5, "upper": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True, **settings}
    ours = ScaleIntensityRangePercentilesd("image", **arguments)({"image": image})["image"]
    monai = MonaiScaleIntensityRangePercentilesd("image", **arguments)({"image": image})["image"]
    assert ours.dtype == monai.dtype == torch.float32 and isinstance(ours, MetaTensor)
    assert torch.equal(ours.as_tensor(), monai.as_tensor())


def test_the_kept_original_is_the_loaded_image_after_preprocessing(tmp_path):
    """KeepOriginald shares the tensor: no later step of the inference preprocessing may change it in place."""
    from monai.bundle import ConfigParser

    from scripts.image_io import load_volume

    affine = grid_affine((2.0, 2.0, 2.0), (40, 40, 40))
    path = write_nifti(tmp_path / "a.nii.gz", phantom_volume(affine, (40, 40, 40)) * 100 + 5, affine)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    parser.update({"skull_strip": "none", "spatial_size": 32})
    item = parser.get_parsed_content("preprocessing")({"image": path})
    loaded = load_volume(path)
    assert torch.equal(item["original"].as_tensor(), loaded.as_tensor())
    np.testing.assert_array_equal(np.asarray(item["original"].affine), np.asarray(loaded.affine))
    assert KeepOriginald("image")({"image": loaded})["original"] is loaded


MEASURE = """
import sys
from monai.bundle import ConfigParser

def resident():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])

parser = ConfigParser()
parser.read_config("configs/inference.yaml")
parser.update({"skull_strip": "none"})
preprocessing = parser.get_parsed_content("preprocessing")
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
before = resident()[0]
item = preprocessing({"image": sys.argv[1]})
print((resident()[1] - before) * 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads the peak resident size from /proc")
def test_preprocessing_peak_memory_stays_under_six_volumes(tmp_path):
    """The inference preprocessing of a 256^3 float32 volume (64 MiB) peaks below 5.8 times its size (measured
    4.7-5.2: the image, its brain mask and the kept original, and two temporaries); 6.7-7.2 before issue 15."""
    size = 256
    affine = grid_affine((0.8, 0.8, 0.8), (size, size, size))
    data = np.zeros((size, size, size), np.float32)
    index = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1).astype(np.float64)
    for i in range(size):  # slab by slab: the float64 coordinates of the whole grid would be 400 MB
        world = np.concatenate([np.full((size, size, 1), float(i)), index], -1) @ affine[:3, :3].T + affine[:3, 3]
        data[i] = phantom_at(world / 2.0)  # a brain-sized phantom
    path = write_nifti(tmp_path / "big.nii", data, affine)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}  # less noise
    process = subprocess.run(
        [sys.executable, "-c", MEASURE, path],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    peak = int(process.stdout.strip().splitlines()[-1])
    assert peak < 5.8 * data.nbytes, f"{peak / data.nbytes:.1f} volumes"

"""Make the demo's moving images from data that ships with the bundle's dependencies (no download, no ../shared).

The MNI152 2009 T1 template and its grey/white-matter probability maps come with nilearn. From them this writes
two brain-extracted moving images into ``--output_dir``, each moved by a known rigid transform of the world and
resampled (so any viewer shows the misalignment):

* ``demo_t1_rot30.nii.gz``: the T1 template turned 30 degrees and shifted;
* ``demo_t2like_rot150.nii.gz``: a T2-like contrast (CSF bright, white matter dark) turned 150 degrees, with
  3 mm slices.

The true moving-to-fixed RAS matrices go to ``--truth_dir`` as ``NAME_affine_ras.txt``, to compare with the
``affine_ras.txt`` the registration writes. Usage: ``python -m scripts.demo_data --output_dir demo/input``.
"""

from __future__ import annotations

import argparse
import os

import nibabel as nib
import numpy as np
import torch

from scripts.coordinates import resample_onto
from scripts.image_io import default_atlas_path, save_volume
from scripts.random_motions import misalignment
from scripts.transform_io import write_ras_matrix


def t2_like(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """A T2-like image from tissue probabilities: CSF bright, grey matter mid, white matter dark (brain only)."""
    brain = t1 > 0
    csf = np.clip(1.0 - gm - wm, 0, 1)
    return np.where(brain, 0.95 * csf + 0.55 * gm + 0.3 * wm, 0.0).astype(np.float32)


def write_moved(path: str, data: np.ndarray, affine: np.ndarray, moving_to_fixed: np.ndarray, spacing) -> None:
    """Write ``data`` (on the template grid ``affine``) moved by the inverse of ``moving_to_fixed`` onto a grid of
    ``spacing`` mm covering the same field of view."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    shape = np.ceil(np.array(data.shape) * zooms / np.asarray(spacing)).astype(int)
    out_affine = affine.copy()
    out_affine[:3, :3] = affine[:3, :3] / zooms * np.asarray(spacing)
    # the moving image at point p shows what the template shows at moving_to_fixed @ p
    moved = resample_onto(
        torch.from_numpy(data)[None],
        torch.from_numpy(affine),
        torch.from_numpy(out_affine),
        tuple(shape),
        torch.from_numpy(moving_to_fixed),
    )[0]
    reference = nib.Nifti1Image(np.zeros(shape, np.float32), out_affine)
    reference.header.set_xyzt_units("mm")
    save_volume(path, moved.numpy(), reference, np.float32)


def make_demo_data(output_dir: str, truth_dir: str) -> list[str]:
    """Write the demo images (see the module docstring); returns their paths."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    template = nib.load(default_atlas_path())
    t1 = np.asarray(template.dataobj, dtype=np.float32)
    affine = template.affine.astype(np.float64)
    gm = np.asarray(load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    center = affine[:3, :3] @ ((np.array(t1.shape) - 1) / 2) + affine[:3, 3]
    cases = {
        "demo_t1_rot30": (t1, misalignment(30, [1.0, 0.2, 0.1], [1.0] * 3, [8.0, -5.0, 4.0], center).numpy(), 1.0),
        "demo_t2like_rot150": (
            t2_like(t1, gm, wm),
            misalignment(150, [0.3, 0.2, 1.0], [1.0] * 3, [-6.0, 10.0, 0.0], center).numpy(),
            (1.0, 1.0, 3.0),
        ),
    }
    os.makedirs(output_dir, exist_ok=True)
    os.makedirs(truth_dir, exist_ok=True)
    paths = []
    for name, (data, moving_to_fixed, spacing) in cases.items():
        path = os.path.join(output_dir, f"{name}.nii.gz")
        write_moved(path, data, affine, moving_to_fixed, spacing)
        write_ras_matrix(os.path.join(truth_dir, f"{name}_affine_ras.txt"), moving_to_fixed)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo/input", help="where the moving images go")
    parser.add_argument("--truth_dir", default="demo/truth", help="where the true moving-to-fixed matrices go")
    args = parser.parse_args()
    for path in make_demo_data(args.output_dir, args.truth_dir):
        print(path)


if __name__ == "__main__":
    main()

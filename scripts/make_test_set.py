"""Write a synthetic test set in the IXI folder layout: T1, T2 and PD images of label-map subjects, moved by known
affines.

Usage::

    python -m scripts.make_test_set --label_maps_dir ../shared/data/label_maps \\
        --subjects training_seg_13 training_seg_14 --output_dir data/ixi_synth [--spacing 1.0] [--seed 0] \\
        [--rotation_range 180] [--skull false]

For each label map (a subject, numbered by the last digits of its file name: ``training_seg_13`` is ``IXI013``; by
its position among the chosen label maps when those digits are missing or repeat):

1. the label map is read in RAS at ``--spacing`` mm (nearest neighbour), cropped to the head, and deformed ONCE by
   a random smooth deformation (:class:`scripts.synthesis.SynthesizeImaged`): the subject's anatomy, shared by its
   three images; its world (RAS mm) is the subject's **common world**;
2. a T1-, T2- and PD-like image is synthesized from it (the preset contrasts, each with its own bias field, blur
   and noise; no thick-slice simulation: IXI scans are near-isotropic), brain only unless ``--skull true``;
3. each image is moved by its own random affine ``T`` of the world: a rotation of up to ``--rotation_range``
   degrees about each axis, a scaling of up to ``--scale_range``, a shear of up to ``--shear_range`` and a shift
   of up to ``--shift`` mm per axis, about the brain's centre. The move is RESAMPLED into the data (image
   trilinear, labels nearest neighbour) on a new axis-aligned RAS grid of ``--spacing`` mm that covers the moved
   head with a 10 mm margin, so any viewer shows the turned head and the header stays plain (a header-only move
   would look unrotated in viewers that ignore the orientation, and would hide resampling effects a real scan has).

Outputs (every file written atomically; ``<name>`` is ``IXI<id>-Synth-<n>-<MOD>.nii.gz``, ``id`` the 3-digit
subject number, ``n`` its 4-digit form)::

    OUT/IXI-T1/<name>          float32 image in [0, 1]     (and IXI-T2/, IXI-PD/)
    OUT/IXI-T1-labels/<name>   int16 label map of the image (FreeSurfer labels; 5xx head labels only with skull)
    OUT/IXI-T1-masks/<name>    uint8 brain mask (labels 1..499)
    OUT/transforms.csv         image,m00,...,m33: ``T``, the 4x4 RAS matrix from the subject's common world to
                               that image's world, row-major (image: path relative to OUT); rows of images made
                               by an earlier run into OUT are kept

Two images ``a`` and ``b`` of one subject are then related by the fixed-to-moving matrix ``T_b @ inv(T_a)`` (see
:mod:`scripts.coordinates`). Real IXI voxels are about 0.94 x 0.94 x 1.2 mm (``--spacing 0.94 0.94 1.2``);
``--spacing 2`` makes a quick small set.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re

import nibabel as nib
import numpy as np
import torch
from monai.transforms import CropForeground
from tqdm import tqdm

from scripts.coordinates import affine_of, apply_affine, grid_around, resample_onto
from scripts.datalists import TRANSFORM_COLUMNS, TRANSFORMS_CSV, read_transforms_csv
from scripts.errors import KeyMorphInputError, fail
from scripts.image_io import save_volume
from scripts.random_motions import random_affine_matrix
from scripts.synthesis import EXTRA_CEREBRAL_MIN, load_label_map, synthesize
from scripts.training_data import find_label_maps
from scripts.transform_io import write_atomically

MODALITIES = ("T1", "T2", "PD")
SITE = "Synth"
#: Air (mm) kept around the moved head on each side of the written grid.
MARGIN_MM = 10.0


def subject_numbers(paths: list[str]) -> list[int]:
    """IXI subject numbers (1..999) of label maps: the last digits of each file name (``training_seg_13`` -> 13)
    when every name has distinct ones, else the 1-based position in ``paths``."""
    found = [re.findall(r"\d+", os.path.basename(p).split(".")[0]) for p in paths]
    numbers = [int(digits[-1]) if digits else 0 for digits in found]
    if all(1 <= n <= 999 for n in numbers) and len(set(numbers)) == len(numbers):
        return numbers
    return list(range(1, len(paths) + 1))


def ixi_name(number: int, modality: str) -> str:
    """``IXI<id>-Synth-<n>-<MOD>.nii.gz`` of subject ``number``."""
    return f"IXI{number:03d}-{SITE}-{number:04d}-{modality}.nii.gz"


def covering_grid(
    foreground: torch.Tensor, affine: torch.Tensor, move: torch.Tensor, spacing: np.ndarray
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """An axis-aligned RAS grid of ``spacing`` mm that holds a moved object with :data:`MARGIN_MM` of air around it.

    Args:
        foreground: ``(D, H, W)`` bool, the object's voxels.
        affine: ``(4, 4)`` float64 voxel-to-world matrix of ``foreground``.
        move: ``(4, 4)`` float64 world affine the object is moved by.
        spacing: ``(3,)`` voxel size of the grid (mm).

    Returns:
        The grid's ``(4, 4)`` float64 voxel-to-world matrix and its spatial shape.
    """
    voxels = torch.nonzero(foreground).to(torch.float64)
    # a voxel is a box: its corners reach half a voxel beyond its centre along each (possibly turned) axis
    reach = (move[:3, :3] @ affine[:3, :3]).abs().sum(dim=1) / 2
    grid, shape = grid_around(apply_affine(move @ affine, voxels), spacing, margin_mm=reach + MARGIN_MM)
    return grid, tuple(shape)


def _save(path: str, data: torch.Tensor, affine: torch.Tensor, dtype) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    reference = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine.numpy())
    reference.header.set_xyzt_units("mm")
    save_volume(path, data.numpy().astype(dtype), reference, dtype)


def make_subject(
    label_map_path: str,
    number: int,
    output_dir: str,
    spacing: np.ndarray,
    seed: int,
    rotation_range: float,
    scale_range: float,
    shear_range: float,
    shift: float,
    skull: bool,
) -> dict[str, torch.Tensor]:
    """Write the three images of one subject with their labels and masks (see the module docstring).

    The draws depend only on ``seed`` and the subject ``number``, so a subject comes out the same whichever others
    are made with it. Returns ``{path relative to output_dir: T}``, ``T`` the ``(4, 4)`` float64 common-world to
    image-world matrix.
    """
    seeds = np.random.SeedSequence([seed, number]).generate_state(len(MODALITIES) + 1)
    labels = load_label_map(label_map_path, spacing=spacing.tolist())
    labels = CropForeground(select_fn=lambda values: values > 0, margin=2)(labels)
    first = synthesize(labels, MODALITIES[0], int(seeds[0]), skull, resolution_probability=0.0)
    anatomy = first["label"]  # deformed once; the other contrasts keep it
    images = {MODALITIES[0]: first["image"]}
    for modality, modality_seed in zip(MODALITIES[1:], seeds[1:]):
        again = synthesize(
            anatomy.clone(), modality, int(modality_seed), skull, resolution_probability=0.0, deform_std=0.0
        )
        images[modality] = again["image"]

    affine = affine_of(anatomy)
    brain = first["mask"][0] > 0.5
    centre = apply_affine(affine, torch.nonzero(brain).to(torch.float64)).mean(0)
    rng = np.random.RandomState(int(seeds[-1]))
    transforms = {}
    for modality in MODALITIES:
        move = random_affine_matrix(
            rng, math.radians(rotation_range), scale_range, shear_range, (shift,) * 3, centre.tolist()
        )
        grid, shape = covering_grid(anatomy[0] > 0, affine, move, spacing)
        # the written image at world point p shows the common world at inv(T) p: resampling pulls with inv(T)
        to_common = torch.linalg.inv(move)
        # clamped: trilinear weights sum to 1 only up to rounding, and the images promise [0, 1]
        image = resample_onto(images[modality].as_tensor(), affine, grid, shape, to_common)[0].clamp(0, 1)
        label = resample_onto(anatomy.as_tensor(), affine, grid, shape, to_common, mode="nearest")[0]
        mask = (label > 0) & (label < EXTRA_CEREBRAL_MIN)
        if not skull:
            # skull-stripped means 0 outside the brain mask written beside it (interpolation blurred the edge out)
            image = image * mask
        name = ixi_name(number, modality)
        _save(os.path.join(output_dir, f"IXI-{modality}", name), image, grid, np.float32)
        _save(os.path.join(output_dir, f"IXI-{modality}-labels", name), label, grid, np.int16)
        _save(os.path.join(output_dir, f"IXI-{modality}-masks", name), mask, grid, np.uint8)
        transforms[f"IXI-{modality}/{name}"] = move
    return transforms


def write_transforms_csv(path: str, transforms: dict[str, torch.Tensor]) -> None:
    """Write ``transforms.csv``: one row per image, its relative path and the 16 entries of its matrix (row-major)."""

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(TRANSFORM_COLUMNS)
            for image, matrix in sorted(transforms.items()):
                writer.writerow([image] + [repr(float(v)) for v in matrix.reshape(-1)])

    write_atomically(path, write)


def select_label_maps(label_maps_dir: str, subjects: list[str] | None) -> list[str]:
    """The label maps of ``label_maps_dir`` whose file names contain an entry of ``subjects`` (all when None);
    raises :class:`KeyMorphInputError` for an entry that matches none."""
    paths = find_label_maps(label_maps_dir)
    if not subjects:
        return paths
    for subject in subjects:
        if not any(subject in os.path.basename(p) for p in paths):
            raise KeyMorphInputError(f"{label_maps_dir}: no label map named like subject {subject!r}")
    return [p for p in paths if any(s in os.path.basename(p) for s in subjects)]


def make_test_set(
    label_maps_dir: str,
    output_dir: str,
    subjects: list[str] | None = None,
    spacing: float | list[float] = 1.0,
    seed: int = 0,
    rotation_range: float = 180.0,
    scale_range: float = 0.1,
    shear_range: float = 0.05,
    shift: float = 10.0,
    skull: bool = False,
) -> dict[str, torch.Tensor]:
    """Write the test set (see the module docstring); returns ``{image path relative to output_dir: T}`` of the
    images made by this call.

    Args:
        label_maps_dir: folder of ``.nii``/``.nii.gz`` whole-head label maps (read only).
        output_dir: where the IXI layout goes; must not lie inside ``label_maps_dir``.
        subjects: substrings of the label-map file names to use (all when None).
        spacing: voxel size (mm) of the synthesis and the written grids: one value or three.
        seed: random seed; a subject's images depend only on it and the subject number.
        rotation_range: largest rotation about each world axis, degrees (180: any orientation).
        scale_range: largest relative scaling per axis (0.1: 0.9 to 1.1).
        shear_range: largest shear term.
        shift: largest translation per axis, mm.
        skull: keep the head around the brain (else brain-only, skull-stripped images).
    """
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64).reshape(-1), (3,)).copy()
    inside = os.path.relpath(os.path.abspath(output_dir), os.path.abspath(label_maps_dir))
    if inside == "." or not inside.startswith(".."):
        raise KeyMorphInputError(f"{output_dir}: inside the label maps folder {label_maps_dir}; choose another")
    paths = select_label_maps(label_maps_dir, subjects)
    transforms: dict[str, torch.Tensor] = {}
    for path, number in tqdm(list(zip(paths, subject_numbers(paths))), desc="subjects", unit="subject"):
        transforms.update(
            make_subject(
                path, number, output_dir, spacing, seed, rotation_range, scale_range, shear_range, shift, skull
            )
        )
    csv_path = os.path.join(output_dir, TRANSFORMS_CSV)
    # other subjects made earlier into this folder keep their truth
    earlier = read_transforms_csv(csv_path) if os.path.isfile(csv_path) else {}
    write_transforms_csv(csv_path, {**earlier, **transforms})
    return transforms


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label_maps_dir", required=True, help="folder of whole-head label maps (read only)")
    parser.add_argument("--subjects", nargs="+", help="label-map names to use (substrings; default: all)")
    parser.add_argument("--output_dir", required=True, help="where the IXI-layout folders go")
    parser.add_argument("--spacing", type=float, nargs="+", default=[1.0], help="voxel size, mm (one or three)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rotation_range", type=float, default=180.0, help="largest rotation per axis, degrees")
    parser.add_argument("--scale_range", type=float, default=0.1, help="largest relative scaling per axis")
    parser.add_argument("--shear_range", type=float, default=0.05, help="largest shear term")
    parser.add_argument("--shift", type=float, default=10.0, help="largest translation per axis, mm")
    parser.add_argument("--skull", type=_boolean, default=False, help="keep the head (true) or brain only (false)")
    args = parser.parse_args(argv)
    if len(args.spacing) not in (1, 3) or min(args.spacing) <= 0:
        fail(f"--spacing needs one or three positive values, got {args.spacing}")
    try:
        make_test_set(
            args.label_maps_dir,
            args.output_dir,
            args.subjects,
            args.spacing,
            args.seed,
            args.rotation_range,
            args.scale_range,
            args.shear_range,
            args.shift,
            args.skull,
        )
    except KeyMorphInputError as error:
        fail(str(error))
    print(args.output_dir)


if __name__ == "__main__":
    main()

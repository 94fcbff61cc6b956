"""Groupwise registration against the truth: the group space up to one global transform, and label Dice.

    python benchmarks/groupwise_consistency.py [--label_maps_dir ../shared/data/label_maps] \\
        [--subject training_seg_13] [--seeds 0 1 2] [--aligner affine] [--template_iterations N] \\
        [--output_dir runs/groupwise_consistency]

Synthetic images with known transforms (:mod:`scripts.make_test_set`): for each seed, a T1-, T2- and PD-like
image of one label-map subject (brain only), each moved by its own random affine ``T`` (common world -> image
world); seeds draw other contrasts, other moves and a slightly different smooth deformation of the same anatomy
(so the truth holds up to those few millimetres). The folder of all these images (3 per seed) is then registered
twice, through the bundle runner with ``--skull_strip none`` and each image's label map as ``apply_to``:

* **groupwise** (``configs/groupwise.yaml``): every image to the group's own mean space;
* **to one member** (``configs/inference.yaml``, the usual folder run): every image to the first one.

For each, it reports the pairwise consistency error (:func:`scripts.groupwise.pairwise_consistency_mm`: how far
the recovered image-to-image maps ``T_j T_i^-1`` are from the true ``G_j G_i^-1``, mm, averaged over the brain
voxels of the first image's label map and over all ordered pairs; a global transform of the shared space cancels)
and the label Dice in the shared space (the registered label maps, nearest neighbour, mean Dice over the FreeSurfer
brain structures, averaged over all pairs of images). The shared spaces' grids differ: the group space's template
grid (1 mm) holds every label map resampled, the member's own grid one label map as it is and the others resampled, and
nearest-neighbour resampling alone costs Dice (the true transforms score 0.815 on a 1 mm grid and 0.843 on the
T1's own 1.5 mm grid, subject 13, seed 0). So it also reports the label Dice of every method on the first image's
grid, from the recovered image-to-image maps ``T_j T_0^-1``: the alignment alone, on one grid for all methods (for
"to one member" it is the shared-space Dice). Writes ``groupwise_consistency.json`` and prints a table.
Takes a few minutes per method on a CPU (three seeds: nine images). ``--score_only`` scores the outputs of an
earlier run again without registering anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the bundle root, for `scripts`

from scripts.coordinates import affine_of, apply_affine, resample_onto  # noqa: E402
from scripts.datalists import TRANSFORMS_CSV, read_transforms_csv  # noqa: E402
from scripts.groupwise import pairwise_consistency_mm  # noqa: E402
from scripts.image_io import load_volume  # noqa: E402
from scripts.make_test_set import make_test_set  # noqa: E402
from scripts.metrics import brain_points, mean_dice  # noqa: E402
from scripts.transform_io import read_itk_transform  # noqa: E402

LABELS_PATTERN = "labels/{name}_seg.nii.gz"


def make_images(label_maps_dir: str, subject: str, seeds: list[int], data_dir: str) -> dict[str, torch.Tensor]:
    """Write the images into ``data_dir/images`` (``s<seed>_<MOD>.nii.gz``, labels in ``labels/``); returns
    ``{case name: T}`` (common world -> image world), in the order of the seeds and modalities."""
    images_dir = os.path.join(data_dir, "images")
    truth = {}
    for seed in seeds:
        seed_dir = os.path.join(data_dir, f"seed_{seed}")
        transforms = make_test_set(label_maps_dir, seed_dir, subjects=[subject], seed=seed, spacing=1.5)
        for relative, matrix in sorted(transforms.items()):
            modality = relative.split("/")[0].split("-")[1]
            name = f"s{seed}_{modality}"
            os.makedirs(os.path.join(images_dir, "labels"), exist_ok=True)
            shutil.copyfile(os.path.join(seed_dir, relative), os.path.join(images_dir, f"{name}.nii.gz"))
            labels = relative.replace(f"IXI-{modality}/", f"IXI-{modality}-labels/")
            shutil.copyfile(os.path.join(seed_dir, labels), os.path.join(images_dir, LABELS_PATTERN.format(name=name)))
            truth[name] = matrix
    return truth


def run_bundle(run_id: str, config_files: list[str], *arguments: str) -> None:
    """``python -m monai.bundle run RUN_ID --config_file FILES ARGUMENTS`` in the bundle root; exit code 1 (a failed
    image) is reported, not fatal."""
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(config_files), *arguments]
    env = {**os.environ, "PYTHONPATH": ROOT}
    process = subprocess.run(command, cwd=ROOT, env=env, check=False)
    if process.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")


def recovered_transforms(output_dir: str, names: list[str]) -> torch.Tensor:
    """``(N, 4, 4)`` shared-space -> image RAS matrices from each case's ``transform.tfm``."""
    return torch.stack(
        [torch.as_tensor(read_itk_transform(os.path.join(output_dir, n, "transform.tfm"))) for n in names]
    ).to(torch.float64)


def pairwise_dice(output_dir: str, names: list[str]) -> float:
    """Mean Dice over all pairs of the registered label maps (one grid: the shared space)."""
    labels = {
        n: torch.from_numpy(np.asarray(nib.load(os.path.join(output_dir, n, f"registered_{n}_seg.nii.gz")).dataobj))[
            None, None
        ]
        for n in names
    }
    scores = [float(mean_dice(labels[a], labels[b])[0]) for a, b in itertools.combinations(names, 2)]
    return sum(scores) / len(scores)


def dice_on_first_grid(recovered: torch.Tensor, labels_paths: list[str]) -> float:
    """Mean Dice over all pairs of the label maps resampled (nearest neighbour) onto the first one's grid through the
    recovered maps from the first image to each (``T_i T_0^-1``, ``recovered`` ``(N, 4, 4)``)."""
    labels = [load_volume(path, to_register=False) for path in labels_paths]
    grid, shape = affine_of(labels[0]), labels[0].shape[1:]
    from_first = recovered @ torch.linalg.inv(recovered[0])
    warped = [
        resample_onto(image.as_tensor(), affine_of(image), grid, shape, matrix, mode="nearest")[None]
        for image, matrix in zip(labels, from_first)
    ]
    scores = [float(mean_dice(a, b)[0]) for a, b in itertools.combinations(warped, 2)]
    return sum(scores) / len(scores)


def register_both(
    common: list[str], groupwise_dir: str, member_dir: str, member_image: str, template_iterations: int | None
) -> None:
    """Register the folder groupwise (``template_iterations``: None for the config's), and to its first image (a
    usual folder run)."""
    groupwise_configs = ["configs/inference.yaml", "configs/groupwise.yaml"]
    rounds = [] if template_iterations is None else ["--template_iterations", str(template_iterations)]
    run_bundle("groupwise", groupwise_configs, *common, "--output_dir", groupwise_dir, *rounds)
    run_bundle(
        "inference", ["configs/inference.yaml"], *common, "--output_dir", member_dir, "--fixed_image", member_image
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label_maps_dir", default=os.path.join(ROOT, "..", "shared", "data", "label_maps"))
    parser.add_argument(
        "--subject", default="training_seg_13", help="a held-out label map (13-16 are never trained on)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--aligner", default="affine", choices=("affine", "similarity", "rigid"))
    parser.add_argument(
        "--template_iterations", type=int, default=None, help="template rounds of the groupwise run (default: config)"
    )
    parser.add_argument("--ckpt_path", default=os.path.join(ROOT, "models", "model.pt"))
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "runs", "groupwise_consistency"))
    parser.add_argument(
        "--score_only", action="store_true", help="score the outputs of an earlier run into --output_dir again"
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.label_maps_dir):
        raise SystemExit(f"{args.label_maps_dir}: label maps folder not found (--label_maps_dir)")
    data_dir = os.path.join(args.output_dir, "data")
    images_dir = os.path.join(data_dir, "images")
    if args.score_only:
        truth = {}
        for seed in args.seeds:
            for relative, matrix in sorted(
                read_transforms_csv(os.path.join(data_dir, f"seed_{seed}", TRANSFORMS_CSV)).items()
            ):
                truth[f"s{seed}_{relative.split(os.sep)[0].split('-')[1]}"] = matrix
    else:
        truth = make_images(args.label_maps_dir, args.subject, args.seeds, data_dir)
    names = list(truth)
    common = [
        "--dataset_dir",
        images_dir,
        "--skull_strip",
        "none",
        "--aligner",
        args.aligner,
        "--ckpt_path",
        args.ckpt_path,
        "--apply_to",
        LABELS_PATTERN,
    ]
    groupwise_dir, member_dir = os.path.join(args.output_dir, "groupwise"), os.path.join(args.output_dir, "to_member")
    member_image = os.path.join(images_dir, f"{names[0]}.nii.gz")
    if not args.score_only:
        register_both(common, groupwise_dir, member_dir, member_image, args.template_iterations)

    true_transforms = torch.stack([truth[n] for n in names])
    # the truth's common world: the first image's brain voxels mapped back into it
    first_labels = load_volume(os.path.join(images_dir, LABELS_PATTERN.format(name=names[0])), to_register=False)
    points = brain_points((first_labels > 0).float(), count=5000)
    points = apply_affine(torch.linalg.inv(truth[names[0]]), points)
    results = {}
    for method, folder in (("groupwise", groupwise_dir), ("to one member", member_dir)):
        ok = [n for n in names if os.path.isfile(os.path.join(folder, n, "transform.tfm"))]
        index = [names.index(n) for n in ok]
        recovered = recovered_transforms(folder, ok)
        results[method] = {
            "images": len(ok),
            "pairwise_consistency_mm": pairwise_consistency_mm(recovered, true_transforms[index], points),
            "label_dice": pairwise_dice(folder, ok),
            "label_dice_first_grid": dice_on_first_grid(
                recovered, [os.path.join(images_dir, LABELS_PATTERN.format(name=n)) for n in ok]
            ),
        }
    with open(os.path.join(args.output_dir, "groupwise_consistency.json"), "w") as handle:
        settings = {"aligner": args.aligner, "subject": args.subject, "seeds": args.seeds}
        json.dump({**settings, "template_iterations": args.template_iterations, **results}, handle, indent=2)
    print(
        "| method | images | pairwise consistency error (mm) | label Dice in the shared space"
        " | label Dice on the first image's grid |"
    )
    print("|---|---|---|---|---|")
    for method, result in results.items():
        print(
            f"| {method} | {result['images']} | {result['pairwise_consistency_mm']:.2f} | {result['label_dice']:.3f}"
            f" | {result['label_dice_first_grid']:.3f} |"
        )


if __name__ == "__main__":
    main()

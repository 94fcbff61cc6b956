"""Checks of a workflow's settings before any work starts: one line on the first problem, exit code 2.

Everything a user can get wrong in the settings of ``configs/inference.yaml`` is checked by
:func:`check_inference_settings` (the config's ``initialize``) before any image is read, and reported as one line
``keymorph: error: <file or setting>: <problem>`` with exit code 2 and no traceback (:func:`scripts.errors.fail`).
Problems with single inputs are not settings: they become ``error`` rows of ``summary.csv`` and exit code 1
(:func:`scripts.inference.run_registration`). The training workflows (``configs/pretrain.yaml``,
``configs/train.yaml``) check their data source, start weights and output folder the same way
(:func:`check_training_settings`, :func:`check_loss_weights`), and so does the robustness sweep
(``configs/evaluate.yaml``, :func:`check_evaluation_settings`).

The checks a config calls are :func:`scripts.errors.workflow_step` s: in a workflow created from Python they raise
:class:`scripts.errors.KeyMorphWorkflowError` instead of exiting. Unknown command-line keys are found by
:func:`scripts.cli.unknown_setting`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import torch

from scripts.aligners import MATRIX_ALIGNERS
from scripts.checkpoints import checkpoint_problem, is_iteration_checkpoint, load_state_dict
from scripts.cli import as_bool, optional, unknown_setting
from scripts.datalists import detect_source
from scripts.errors import KeyMorphInputError, fail, first_line, workflow_step
from scripts.evaluation import METHODS
from scripts.hashes import HashMismatch, check_file, recorded_entry
from scripts.image_io import load_volume
from scripts.inference import RegistrationDataset
from scripts.robustness_cases import held_out_datalist, held_out_label_maps, parse_modality_pair
from scripts.skull_strip import BACKENDS, BRAIN_MASK_WEIGHTS
from scripts.training_data import training_images

#: The aligners of inference: those whose transform is one matrix.
INFERENCE_ALIGNERS = MATRIX_ALIGNERS


#: What to do about missing registration weights (the default of :func:`weights_problem`).
DOWNLOAD_HINT = "see README 'Use it from the model zoo' to download them"


def weights_problem(
    ckpt_path: str, bundle_root: str | None = None, network=None, missing_hint: str = DOWNLOAD_HINT
) -> str | None:
    """The one-line problem with the model weights, or None: missing (the line then ends with ``missing_hint``, what
    to do about it; by default where to download the registration weights), unreadable, not matching the hash of
    ``large_files.yml`` (only for the bundle's own weights file with a hash set), not a PyTorch checkpoint (its zip
    directory, read without the tensors), or, given ``network``, not loading into it (the weights are then loaded
    into ``network``: the one time a run reads them)."""
    if not os.path.isfile(ckpt_path):
        return f"{ckpt_path}: model weights not found; {missing_hint}"
    if not os.access(ckpt_path, os.R_OK):
        return f"{ckpt_path}: model weights are not readable (permissions)"
    entry = recorded_entry(bundle_root, ckpt_path) if bundle_root else None
    if entry is not None:
        try:
            check_file(bundle_root, entry, shown=ckpt_path)
        except HashMismatch as error:
            return str(error)
    problem = checkpoint_problem(ckpt_path)
    if problem:
        return f"{ckpt_path}: {problem}"
    if network is not None:
        try:
            state = load_state_dict(ckpt_path)
        except Exception as error:
            return f"{ckpt_path}: not a readable PyTorch checkpoint ({first_line(error)})"
        try:
            network.load_state_dict(state)
        except Exception as error:
            return (
                f"{ckpt_path}: the weights do not fit the network (are --num_keypoints and --network_channels those"
                f" it was trained with?): {first_line(error)}"
            )
    return None


@workflow_step
def check_network_weights(ckpt_path: str, network) -> None:
    """Load the weights into ``network``; exit with one line (:func:`fail`, code 2) when they do not fit it (sizes
    and names)."""
    problem = weights_problem(ckpt_path, None, network)
    if problem:
        fail(problem)


# --- the check ----------------------------------------------------------------------------------------------------


def _device_problem(device) -> str | None:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        return f"--device {device!r}: not a torch device ({first_line(error)})"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {str(device)!r}: CUDA is not available on this machine; use --device cpu"
    return None


def writable_folder_problem(output_dir: str) -> str | None:
    """The one-line problem with ``output_dir`` as an output folder (created if missing), or None. Writing a probe
    file decides, not ``os.access``: that says yes to root even on a read-only mount."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        return f"{output_dir}: cannot create the output folder ({error.strerror or error})"
    if not os.path.isdir(output_dir):
        return f"{output_dir}: not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".keymorph-probe-"):
            pass
    except OSError as error:
        return f"{output_dir}: output folder is not writable ({error.strerror or error})"
    return None


def _path_problem(name: str, value) -> str | None:
    """The one-line problem with a file or folder setting that is not text: the runner (python-fire) turns
    ``--output_dir 123`` into a number and ``--output_dir "['out']"`` into a list."""
    if isinstance(value, (str, os.PathLike)):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (
            f"--{name} {value!r}: read as a number, not a path (the command line turns all-digit names into"
            f" numbers); write it as ./{value}"
        )
    return f"--{name} {value!r}: not a path but a {type(value).__name__}; give one file or folder name"


def _number_problem(name: str, value, minimum: float | None = None, integer: bool = False) -> str | None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        return f"--{name} {value!r}: not {'an integer' if integer else 'a number'}"
    if minimum is not None and value < minimum:
        return f"--{name} {value!r}: must be at least {minimum}"
    return None


@workflow_step
def check_inference_settings(
    dataset_dir: str,
    output_dir: str,
    fixed_image: str,
    skull_strip: str,
    ckpt_path: str,
    brain_mask_weights: str | None = None,
    pairs_csv: str | None = None,
    fixed_skull_strip: str = "none",
    mask_dir: str | None = None,
    apply_to: str | None = None,
    aligner: str = "affine",
    overwrite=False,
    header_only=False,
    search_turns=True,
    head_pose=True,
    refine_iterations: int = 0,
    refine_options: dict | None = None,
    turn_search_above_mm: float = 0.0,
    num_workers: int = 0,
    num_threads: int | None = None,
    bundle_root: str | None = None,
    network=None,
    spatial_size: int = 96,
    spacing: float = 2.0,
    qc_thresholds: dict | None = None,
    num_keypoints: int = 128,
    network_channels: Sequence[int] = (24, 48, 128, 256),
    device="cpu",
    argv: Sequence[str] | None = None,
    needs_fixed_image: bool = True,
) -> None:
    """Check, before any work starts, what would otherwise fail late; exits (:func:`fail`, code 2) with one line on
    the first problem.

    In order: command-line keys that the config does not have (only when run as ``python -m monai.bundle run``;
    ``argv`` defaults to ``sys.argv``); setting values (skull stripping backends, aligner, ``overwrite``,
    ``header_only``, ``search_turns``, ``head_pose``, ``refine_iterations``, the refinement's ``refine_options``
    (named as the config's ``refine_*`` settings), ``turn_search_above_mm``,
    ``num_workers``, ``num_threads``, network and grid sizes, device, QC thresholds, ``mask_dir``); the inputs
    (``dataset_dir`` with images, or a readable ``pairs_csv``); the fixed image (folder mode; in pairs mode a bad
    fixed image is an error of its rows; ``needs_fixed_image`` false: not at all, for a groupwise run, whose fixed
    image is the template it makes); the output folder (created, and written to); the weights (present, readable, the sha256 of ``large_files.yml`` when
    ``ckpt_path`` is the file it lists and ``hash_val`` is set, and, given ``network``, loadable into it); the
    brain-mask network's weights ``brain_mask_weights`` in the same way when a skull-strip backend is ``bundle``.

    Give it plain setting values only, not components of the config: a component is built when the check's
    expression is evaluated, before the check can say what is wrong with its settings. The weights are loaded into
    the network by a second check, :func:`check_network_weights`, once these values are known to be sound.
    """
    problem = unknown_setting(argv)
    if problem:
        fail(problem)
    paths = {"dataset_dir": dataset_dir, "output_dir": output_dir, "ckpt_path": ckpt_path}
    if needs_fixed_image:
        paths["fixed_image"] = fixed_image
    optional_paths = {"pairs_csv": pairs_csv, "mask_dir": mask_dir, "apply_to": apply_to, "bundle_root": bundle_root}
    paths.update({name: value for name, value in optional_paths.items() if optional(value) is not None})
    for name, value in paths.items():
        problem = _path_problem(name, value)
        if problem:
            fail(problem)
    for name, value in (("skull_strip", skull_strip), ("fixed_skull_strip", fixed_skull_strip)):
        if value not in BACKENDS:
            fail(f"--{name} {value!r}: not one of {', '.join(BACKENDS)}")
    if aligner not in INFERENCE_ALIGNERS:
        fail(f"--aligner {aligner!r}: not one of {', '.join(INFERENCE_ALIGNERS)}")
    try:
        as_bool(overwrite, "overwrite")
        as_bool(header_only, "header_only")
        as_bool(search_turns, "search_turns")
        as_bool(head_pose, "head_pose")
    except KeyMorphInputError as error:
        fail(str(error))
    problem = (
        _number_problem("refine_iterations", refine_iterations, 0, integer=True)
        or _number_problem("turn_search_above_mm", turn_search_above_mm, 0)
        or _number_problem("num_workers", num_workers, 0, integer=True)
        or (optional(num_threads) is not None and _number_problem("num_threads", num_threads, 1, integer=True))
        or _number_problem("spatial_size", spatial_size, 16, integer=True)
        or _number_problem("spacing", spacing)
        or _number_problem("num_keypoints", num_keypoints, 4, integer=True)
    )
    if problem:
        fail(problem)
    refine_minimums = {"fine_iterations": (0, True), "margin_mm": (0, False), "samples": (100, True)}
    refine_minimums["check_samples"] = (0, True)
    for name, value in dict(refine_options or {}).items():
        minimum, integer = refine_minimums[name]
        problem = _number_problem(f"refine_{name}", value, minimum, integer=integer)
        if problem:
            fail(problem)
    if (
        not isinstance(network_channels, (list, tuple))
        or len(network_channels) != 4
        or any(_number_problem("network_channels", c, 1, integer=True) for c in network_channels)
    ):
        fail(f"--network_channels {network_channels!r}: needs four positive integers, e.g. [24,48,128,256]")
    problem = _device_problem(device)
    if problem:
        fail(problem)
    if spatial_size % 16:
        fail(f"--spatial_size {spatial_size}: must be a multiple of 16 (the network halves the grid four times)")
    if not spacing > 0:
        fail(f"--spacing {spacing!r}: must be positive (mm)")
    for name, value in (qc_thresholds or {}).items():
        problem = _number_problem(name, value)
        if problem:
            fail(problem)
    mask_dir, pairs_csv, apply_to = optional(mask_dir), optional(pairs_csv), optional(apply_to)
    if skull_strip == "mask" and not mask_dir:
        fail("--skull_strip mask: needs --mask_dir, the folder of the brain masks")
    if mask_dir and not os.path.isdir(mask_dir):
        fail(f"{mask_dir}: mask folder not found (--mask_dir)")
    try:
        if pairs_csv:
            RegistrationDataset._pairs(pairs_csv)
        else:
            if not os.path.isdir(dataset_dir):
                fail(f"{dataset_dir}: input folder not found (--dataset_dir)")
            RegistrationDataset._folder(dataset_dir, fixed_image, apply_to)
    except KeyMorphInputError as error:
        fail(str(error))
    if not pairs_csv and needs_fixed_image:
        try:
            load_volume(fixed_image)
        except KeyMorphInputError as error:
            fail(f"fixed image {error}")
    problem = writable_folder_problem(output_dir)
    if problem:
        fail(problem)
    problem = weights_problem(ckpt_path, bundle_root, network)
    if problem:
        fail(problem)
    if "bundle" in (skull_strip, fixed_skull_strip):
        setting = "--skull_strip" if skull_strip == "bundle" else "--fixed_skull_strip"
        train = (
            f"{setting} bundle needs the brain-mask network's weights: train them with configs/train_brain_mask.yaml,"
            f" or use {setting} deepbet"
        )
        problem = weights_problem(os.fspath(brain_mask_weights or BRAIN_MASK_WEIGHTS), bundle_root, missing_hint=train)
        if problem:
            fail(problem)


@workflow_step
def check_training_settings(
    dataset_dir: str,
    output_dir: str,
    pretrained_ckpt: str | None = None,
    checkpoint_dir: str | None = None,
    exclude: Sequence[str] = (),
    validation_subjects: Sequence[str] | None = None,
    skull_strip: str | None = None,
    reference_label_map: str | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Check the settings of a training workflow (pretraining or training) before anything is built; exits
    (:func:`fail`, code 2) with one line on the first problem.

    In order: command-line keys that the config does not have (only when run as ``python -m monai.bundle run``;
    ``argv`` defaults to ``sys.argv``); ``skull_strip`` when given ("deepbet" or "none"); the data:
    ``dataset_dir`` exists and is a folder of label maps, an IXI-layout folder or a CSV datalist (see
    :func:`scripts.datalists.detect_source`) with images left for training once the subjects of ``exclude`` are
    held out and, given ``validation_subjects``, images of those for validation (the choices of
    :func:`scripts.training_data.training_images`), or, given ``reference_label_map`` (pretraining on that label
    map alone; ``dataset_dir`` is then not read), that file exists; ``pretrained_ckpt`` when given (a readable
    checkpoint file; not checked when ``checkpoint_dir`` holds a checkpoint to resume from, which the workflows
    then use instead); the output folder (created, and written to).

    Give it plain setting values only, not components of the config (see :func:`check_inference_settings`).
    """
    problem = unknown_setting(argv)
    if problem:
        fail(problem)
    skull_strip = optional(skull_strip)
    if skull_strip is not None and skull_strip not in ("deepbet", "none"):
        fail(f"--skull_strip {skull_strip!r}: not one of deepbet, none (images with a mask file use it)")
    reference_label_map = optional(reference_label_map)
    if reference_label_map is None:
        problem = _dataset_problem(optional(dataset_dir), exclude, validation_subjects)
        if problem:
            fail(problem)
    elif not os.path.isfile(str(reference_label_map)):
        fail(f"{reference_label_map}: label map not found (--reference_label_map)")
    pretrained_ckpt = optional(pretrained_ckpt)
    if pretrained_ckpt is not None and not _has_checkpoints(checkpoint_dir):
        pretrained_ckpt = str(pretrained_ckpt)
        if not os.path.isfile(pretrained_ckpt):
            fail(f"{pretrained_ckpt}: start weights not found (--pretrained_ckpt)")
        problem = checkpoint_problem(pretrained_ckpt)
        if problem:
            fail(f"{pretrained_ckpt}: {problem} (--pretrained_ckpt)")
    problem = writable_folder_problem(str(output_dir))
    if problem:
        fail(problem)


def check_loss_weights(
    dataset_dir: str,
    exclude: Sequence[str],
    same_subject_probability: float,
    dice_weight: float,
    image_weight: float,
    unlabeled_image_weight: float,
    keypoint_weight: float,
    transform_weight: float,
) -> None:
    """Refuse (:func:`fail`, one line naming the weight to set) loss weights that could leave a training pair of the
    training images of ``dataset_dir`` (``exclude``: the held-out subjects) without any loss term: pairs with labels
    need ``dice_weight`` or ``image_weight``, pairs without (any image without a label file) need
    ``unlabeled_image_weight``, unless every pair is of one subject (``same_subject_probability`` 1) and
    ``keypoint_weight`` or ``transform_weight`` is set. Call it after :func:`check_training_settings`."""
    if same_subject_probability >= 1 and (keypoint_weight or transform_weight):
        return
    if not (dice_weight or image_weight):
        fail("--dice_weight and --image_weight are both 0: pairs of labeled images would have no loss term; set one")
    kind, images = training_images(str(dataset_dir), "train", list(exclude))
    if kind != "label_maps" and not unlabeled_image_weight and any("label" not in image for image in images):
        fail(
            f"{dataset_dir}: images without labels, and --unlabeled_image_weight is 0: their pairs would have no loss"
            " term; set --unlabeled_image_weight (image similarity) above 0"
        )


def _dataset_problem(
    dataset_dir: str | None, exclude: Sequence[str] = (), validation_subjects: Sequence[str] | None = None
) -> str | None:
    """The one-line problem with a training source (see :func:`check_training_settings`), or None."""
    sources = "a folder of label maps, an IXI-layout folder or a CSV datalist"
    if dataset_dir is None:
        return f"--dataset_dir: not set ({sources})"
    dataset_dir = str(dataset_dir)
    if not os.path.exists(dataset_dir):
        return f"{dataset_dir}: not found (--dataset_dir: {sources})"
    try:
        training_images(dataset_dir, "train", list(exclude or ()))
        if validation_subjects is not None:
            training_images(dataset_dir, "validation", include=list(validation_subjects))
    except KeyMorphInputError as error:
        return str(error)
    return None


def _has_checkpoints(checkpoint_dir: str | None) -> bool:
    """Whether ``checkpoint_dir`` holds an iteration checkpoint (a run to resume; not read here)."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return False
    return any(is_iteration_checkpoint(name) for name in os.listdir(checkpoint_dir))


@workflow_step
def check_evaluation_settings(
    dataset_dir: str,
    output_dir: str,
    ckpt_path: str,
    method,
    test_subjects: Sequence[str] = (),
    modality_pairs: Sequence[str] = (),
    rotations: Sequence[float] = (),
) -> None:
    """Check, before any work starts, what would otherwise fail late: exits with one line on the first problem."""
    if not callable(method) and method not in METHODS:
        fail(f"--method {method!r} is not one of {', '.join(METHODS)}")
    try:
        for pair in modality_pairs:
            parse_modality_pair(pair)
    except KeyMorphInputError as error:
        fail(f"--modality_pairs: {error}")
    if any(not 0.0 <= float(r) <= 180.0 for r in rotations):
        fail(f"--rotations {list(rotations)}: net rotation angles must be within [0, 180] degrees")
    if not os.path.exists(dataset_dir):
        fail(f"{dataset_dir}: dataset_dir not found (--dataset_dir)")
    try:
        if detect_source(dataset_dir) == "label_maps":
            held_out_label_maps(dataset_dir, test_subjects)
        else:
            held_out_datalist(dataset_dir, test_subjects)
    except KeyMorphInputError as error:
        fail(str(error))
    if method == "keymorph" and not os.path.isfile(ckpt_path):
        fail(f"{ckpt_path}: model weights not found (--ckpt_path)")
    problem = writable_folder_problem(output_dir)
    if problem:
        fail(problem)

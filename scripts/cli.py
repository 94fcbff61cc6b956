"""What the bundle's command-line entry points do around the engines: clear one-line errors and exit codes.

Everything a user can get wrong in the settings of ``configs/inference.yaml`` is checked by
:func:`check_inference_settings` (the config's ``initialize``) before any image is read, and reported as one line
``keymorph: error: <file or setting>: <problem>`` with exit code 2 and no traceback (:func:`fail`). Problems with
single inputs are not settings: they become ``error`` rows of ``summary.csv`` and exit code 1
(:func:`run_registration`). The training workflows (``configs/pretrain.yaml``, ``configs/train.yaml``) check their
data source, start weights and output folder the same way (:func:`check_training_settings`).

Those exits belong to the command line only. The functions a config calls are :func:`workflow_step` s: when the
workflow was created from Python (``monai.bundle.ConfigWorkflow``, ``create_workflow``, a notebook, MONAI Label),
the same one-line message is raised as :class:`scripts.errors.KeyMorphWorkflowError` (with the exit code the command
line would use) instead of ending the interpreter.
"""

from __future__ import annotations

import ast
import contextvars
import difflib
import functools
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from scripts.errors import KeyMorphInputError, KeyMorphWorkflowError

logger = logging.getLogger(__name__)

#: Arguments of ``python -m monai.bundle run`` (and of the workflow it creates) that are not config keys.
RUNNER_ARGUMENTS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_name",
        "workflow_type",
        "properties_path",
    }
)
INFERENCE_ALIGNERS = ("affine", "rigid", "similarity")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# True while a workflow step runs in a workflow created from Python: `fail` raises instead of exiting.
_RAISE_INSTEAD_OF_EXIT = contextvars.ContextVar("keymorph_raise_instead_of_exit", default=False)


def fail(message: str, code: int = 2) -> None:
    """Print ``keymorph: error: message`` on one line and exit with ``code`` (no traceback); inside a
    :func:`workflow_step` of a workflow created from Python, raise :class:`KeyMorphWorkflowError` instead."""
    line = str(message).replace("\r", " ").replace("\n", " ")
    if _RAISE_INSTEAD_OF_EXIT.get():
        raise KeyMorphWorkflowError(line, code)
    print(f"keymorph: error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def workflow_step(function):
    """Decorate a function that a bundle config calls (a check, a run): under ``python -m monai.bundle run`` its
    :func:`fail` prints one line and exits; in a workflow created from Python it raises
    :class:`KeyMorphWorkflowError` (the program embedding the workflow decides what an error means)."""

    @functools.wraps(function)
    def step(*args, **kwargs):
        token = _RAISE_INSTEAD_OF_EXIT.set(bundle_run_arguments() is None)
        try:
            return function(*args, **kwargs)
        finally:
            _RAISE_INSTEAD_OF_EXIT.reset(token)

    return step


def as_bool(value, name: str = "value") -> bool:
    """A yes/no setting as given on the command line (``--overwrite true`` arrives as the string ``"true"``).

    Raises :class:`KeyMorphInputError` for anything but a bool, 0/1 or true/false, yes/no, on/off.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise KeyMorphInputError(f"--{name} {value!r}: not true or false")


def optional(value):
    """None for an unset optional setting: None, or ``null``/``none``/empty as typed on a command line."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    return value


@workflow_step
def run_registration(evaluator) -> None:
    """Run the inference evaluator; exit 1 when any input failed (saying how many), 2 on a bad setting."""
    try:
        evaluator.run()
    except KeyMorphInputError as error:
        fail(str(error))
    counts = getattr(evaluator.state, "registration_counts", {})
    failed = counts.get("error", 0)
    if failed:
        summary = os.path.join(getattr(evaluator, "output_dir", "."), "summary.csv")
        fail(f"{failed} of {sum(counts.values())} input(s) failed; see {summary} for each message", code=1)


# --- settings typed on the command line -------------------------------------------------------------------------


def bundle_run_arguments(argv: Sequence[str] | None = None) -> list[str] | None:
    """The arguments after ``run`` when this process is ``python -m monai.bundle run ...``, else None (a test, a
    notebook or another program creating the workflow: their ``sys.argv`` is not ours to judge)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or tuple(Path(argv[0]).parts[-3:]) != ("monai", "bundle", "__main__.py"):
        return None
    return argv[2:] if len(argv) > 1 and argv[1] == "run" else None


def command_line_settings(arguments: Sequence[str]) -> dict[str, object]:
    """``--key value``, ``--key=value`` and bare ``--flag`` arguments as python-fire reads them (``-`` in a key is
    ``_``); positional arguments (the run id) are left out."""
    settings: dict[str, object] = {}
    index = 0
    while index < len(arguments):
        token = arguments[index]
        index += 1
        if not token.startswith("--") or token == "--":
            continue
        key, equals, value = token[2:].partition("=")
        if not equals:
            if index < len(arguments) and not arguments[index].startswith("--"):
                value, index = arguments[index], index + 1
            else:
                value = True
        settings[key.replace("-", "_")] = value
    return settings


def _config_files(value) -> list[str]:
    if isinstance(value, str) and value.strip().startswith(("[", "(")):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            pass
    if isinstance(value, str):
        return [value] if os.path.isfile(value) or "," not in value else value.split(",")
    return [str(v) for v in value]


def _missing_part(config, config_id: str) -> tuple[list[str], object] | None:
    """For an id (``a#b#0`` or ``a::b::0``) that names no item of the config: the parts that exist and the node
    where the next part is missing; None when the item exists."""
    from monai.bundle import ReferenceResolver

    node, found = config, []
    for part in ReferenceResolver.split_id(config_id):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return found, node
        found.append(part)
    return None


def _unknown_key_message(config, key: str, files: list[str]) -> str:
    from monai.bundle import ReferenceResolver

    found, node = _missing_part(config, key)
    wrong = ReferenceResolver.split_id(key)[len(found)]
    prefix = "".join(f"{part}#" for part in found)
    names = [str(k) for k in node if not str(k).startswith("_")] if isinstance(node, dict) else []
    close = difflib.get_close_matches(wrong, names, n=1)
    if close:
        hint = f"; did you mean --{prefix}{close[0]}?"
    elif names and not found:
        hint = f"; the settings are: {', '.join(sorted(names))}"
    else:
        hint = ""
    return f"{', '.join(files)}: unknown setting --{key}{hint}"


def unknown_setting(argv: Sequence[str] | None = None) -> str | None:
    """The one-line problem with the first command-line setting that is not a key of the config files (a typo such
    as ``--skul_strip`` would otherwise be silently added to the config and ignored), or None."""
    from monai.bundle import ConfigParser

    arguments = bundle_run_arguments(argv)
    if arguments is None:
        return None
    given = command_line_settings(arguments)
    settings = dict(given)
    if isinstance(given.get("args_file"), str):
        try:
            settings = {**ConfigParser.load_config_file(given["args_file"]), **given}
        except Exception:  # the runner read it already; whatever it made of it is not a key question
            pass
    if not settings.get("config_file"):
        return None
    return unknown_key(_config_files(settings["config_file"]), settings)


def unknown_key(files: Sequence[str], keys) -> str | None:
    """The one-line problem with the first of ``keys`` (setting ids) that the config ``files`` do not have (runner
    arguments aside), or None (also when the files cannot be read: the runner reports that)."""
    from monai.bundle import ConfigParser

    try:
        config = ConfigParser.load_config_files(list(files))
    except Exception:
        return None
    for key in keys:
        if key in RUNNER_ARGUMENTS or key.startswith("_meta_") or _missing_part(config, key) is None:
            continue
        if key == "help":
            return (
                f"{', '.join(files)}: the settings are commented at the top of the config; for registration,"
                " `python -m scripts.register --help` lists them with their defaults and choices"
            )
        return _unknown_key_message(config, key, list(files))
    return None


# --- the model weights ------------------------------------------------------------------------------------------


def expected_hash(bundle_root: str, ckpt_path: str) -> tuple[str, str] | None:
    """``(hash_type, hash_val)`` that ``bundle_root/large_files.yml`` records for ``ckpt_path``, or None when
    ``ckpt_path`` is not one of its files or its hash is not set."""
    from scripts.hashes import large_files  # imported here: scripts.hashes uses this module's `fail`

    try:
        entries = large_files(bundle_root)
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    target = os.path.realpath(ckpt_path)
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("path"):
            continue
        if os.path.realpath(os.path.join(bundle_root, str(entry["path"]))) == target and entry.get("hash_val"):
            return str(entry["hash_type"] or "sha256"), str(entry["hash_val"]).strip().lower()
    return None


def weights_problem(ckpt_path: str, bundle_root: str | None = None, network=None) -> str | None:
    """The one-line problem with the model weights, or None: missing, unreadable, not matching the hash of
    ``large_files.yml`` (only for the bundle's own weights file with a hash set), or not fitting ``network``."""
    import torch

    download = "see README 'Use it from the model zoo' to download them"
    if not os.path.isfile(ckpt_path):
        return f"{ckpt_path}: model weights not found; {download}"
    if not os.access(ckpt_path, os.R_OK):
        return f"{ckpt_path}: model weights are not readable (permissions)"
    expected = expected_hash(bundle_root, ckpt_path) if bundle_root else None
    if expected is not None:
        hash_type, hash_val = expected
        try:
            from scripts.hashes import file_hash

            actual = file_hash(ckpt_path, hash_type)
        except (OSError, ValueError) as error:
            return f"{ckpt_path}: cannot compute its {hash_type} ({error})"
        if actual != hash_val:
            return (
                f"{ckpt_path}: {hash_type} {actual[:12]}... does not match large_files.yml ({hash_val[:12]}...);"
                f" the file is damaged or not the published weights: fetch them again with"
                f" `python -m monai.bundle download_large_files --bundle_path {bundle_root}`"
            )
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:
        return f"{ckpt_path}: not a readable PyTorch checkpoint ({_first_line(error)})"
    if network is not None:
        state = checkpoint["model"] if isinstance(checkpoint, dict) and "model" in checkpoint else checkpoint
        try:
            network.load_state_dict(state)
        except Exception as error:
            return (
                f"{ckpt_path}: the weights do not fit the network (are --num_keypoints and --network_channels those"
                f" it was trained with?): {_first_line(error)}"
            )
    return None


def _first_line(error: BaseException) -> str:
    """The first informative line of an error message (skipping a heading such as ``Error(s) in loading ...:``)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1]
    return lines[0] if lines else type(error).__name__


@workflow_step
def check_network_weights(ckpt_path: str, network) -> None:
    """Exit with one line (:func:`fail`, code 2) unless the weights load into ``network`` (sizes and names)."""
    problem = weights_problem(ckpt_path, None, network)
    if problem:
        fail(problem)


# --- the check ----------------------------------------------------------------------------------------------------


def _device_problem(device) -> str | None:
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        return f"--device {device!r}: not a torch device ({_first_line(error)})"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {str(device)!r}: CUDA is not available on this machine; use --device cpu"
    return None


def _writable_folder_problem(output_dir: str) -> str | None:
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        return f"{output_dir}: cannot create the output folder ({error.strerror or error})"
    if not os.path.isdir(output_dir):
        return f"{output_dir}: not a folder"
    try:  # os.access says yes to root even on a read-only mount; writing says the truth
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
    turn_search_above_mm: float = 0.0,
    bundle_root: str | None = None,
    network=None,
    spatial_size: int = 96,
    spacing: float = 2.0,
    qc_thresholds: dict | None = None,
    num_keypoints: int = 128,
    network_channels: Sequence[int] = (24, 48, 128, 256),
    device="cpu",
    argv: Sequence[str] | None = None,
) -> None:
    """Check, before any work starts, what would otherwise fail late; exits (:func:`fail`, code 2) with one line on
    the first problem.

    In order: command-line keys that the config does not have (only when run as ``python -m monai.bundle run``;
    ``argv`` defaults to ``sys.argv``); setting values (skull stripping backends, aligner, ``overwrite``,
    ``header_only``, ``search_turns``, ``head_pose``, ``refine_iterations``, ``turn_search_above_mm``, network
    and grid sizes, device, QC thresholds, ``mask_dir``); the inputs (``dataset_dir`` with images, or a readable
    ``pairs_csv``); the fixed image (folder mode; in pairs mode a bad fixed image is an error of its rows); the
    output folder (created, and written to); the weights (present, readable, the sha256 of ``large_files.yml`` when
    ``ckpt_path`` is the file it lists and ``hash_val`` is set, and, given ``network``, loadable into it).

    Give it plain setting values only, not components of the config: a component is built when the check's
    expression is evaluated, before the check can say what is wrong with its settings. The weights are loaded into
    the network by a second check, :func:`check_network_weights`, once these values are known to be sound.
    """
    from scripts.image_io import load_volume
    from scripts.inference import RegistrationDataset
    from scripts.skull_strip import BACKENDS

    problem = unknown_setting(argv)
    if problem:
        fail(problem)
    paths = {"dataset_dir": dataset_dir, "output_dir": output_dir, "fixed_image": fixed_image, "ckpt_path": ckpt_path}
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
        or _number_problem("spatial_size", spatial_size, 16, integer=True)
        or _number_problem("spacing", spacing)
        or _number_problem("num_keypoints", num_keypoints, 4, integer=True)
    )
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
    if not pairs_csv:
        try:
            load_volume(fixed_image)
        except KeyMorphInputError as error:
            fail(f"fixed image {error}")
    problem = _writable_folder_problem(output_dir)
    if problem:
        fail(problem)
    problem = weights_problem(ckpt_path, bundle_root, network)
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
    from scripts.checkpoints import checkpoint_problem

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
    problem = _writable_folder_problem(str(output_dir))
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
    from scripts.training_data import training_images

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
    from scripts.training_data import training_images

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
    return any(re.search(r"iteration=\d+\.pt$", name) for name in os.listdir(checkpoint_dir))

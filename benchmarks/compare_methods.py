"""KeyMorph against ANTs and elastix on the robustness sweep's pairs, side by side: accuracy, seconds, memory.

Usage (from the bundle root)::

    python benchmarks/compare_methods.py --label_maps_dir ../shared/data/label_maps \\
        --subjects training_seg_13 training_seg_14 training_seg_15 training_seg_16 --output_dir docs/benchmark \\
        [--rotations 0 45 90 135 180] [--modality_pairs T1-T2 ...] [--pairs_per_cell 2] \\
        [--methods keymorph ants elastix] [--ckpt_path models/model.pt] [--refine_iterations K] [--include_mni] \\
        [--spacing 1.0] [--threads 2] [--work_dir DIR] [--keep_cases] [--retry_failed] [--quick]

Cases
-----
The cases of ``configs/evaluate.yaml`` (:mod:`scripts.evaluation`; its defaults are read from that file): for each
modality pair ``FIXED-MOVING``, pair index ``k`` and net initial rotation, a fixed and a moving image synthesized
from the held-out label maps with the preset contrasts, brain only (skull-stripped) and without deformation, at
``--spacing`` mm (1 mm). The moving image is moved by ``M = C(c) Tr(t) R(axis, angle) S(s) C(-c)`` (a rotation by
exactly ``angle`` about a random axis, with a random scale and translation, see :mod:`scripts.evaluation`) and
RESAMPLED onto a world-aligned grid, then cropped to its brain plus 10 mm. The first ``ceil(same_subject_fraction *
pairs_per_cell)`` pairs of a cell are same-subject pairs (one anatomy in two contrasts; the truth ``M`` is exact:
Dice and TRE), the others different-subject pairs (Dice only). Each case is written as NIfTI files
(``WORK_DIR/cases/<base>/fixed.nii.gz``, ``fixed_labels``, ``fixed_mask`` and ``<base>/r<angle>/moving.nii.gz``,
``moving_labels``, ``moving_mask``, ``case.json`` holding the true fixed-to-moving matrix; ``WORK_DIR`` defaults to
``~/.cache/keymorph/benchmark``, and a case's files are removed once every method has registered it unless
``--keep_cases``), and every method reads the two image files, as users do. Dice and TRE are scored exactly as in
the sweep (:func:`scripts.evaluation.score_case`: Dice on the fixed label map's own grid, TRE over the fixed brain
voxels).

``--include_mni`` adds TRE-only cases on the MNI152 2009 T1 template (``scripts.image_io.default_atlas_path()``),
one per modality pair whose fixed contrast is T1 and rotation: the real template is the fixed image; the moving
image is the template itself (``T1-T1``) or a T2/PD image synthesized from a three-class tissue map of the template
(k-means of its brain intensities: CSF, grey matter, white matter), moved and resampled like the others. The
template has no anatomical labels (a tissue map cut from its own intensities would score the contrast change, not
the anatomy), so these cases are scored by TRE only; their rows say ``dataset: mni152``.

Methods
-------
Every method returns the FIXED-to-MOVING world matrix in RAS mm (:mod:`scripts.coordinates`).

* ``keymorph``: the bundle's own path from files: ``preprocessing`` and ``fixed_preprocessing`` of
  ``configs/inference.yaml`` with ``skull_strip none`` (the inputs are brains), the network of ``network_def`` with
  ``--ckpt_path`` (:func:`scripts.bundle_api.load_state_dict`), the config's ``inferer`` with
  ``--refine_iterations`` (default: the config's), then the native-grid resampling and ``registered.nii.gz`` and
  ``transform.tfm`` as :class:`scripts.case_outputs.RegistrationWriter` writes them.
* ``ants``: ``ants.registration(fixed, moving, type_of_transform="Affine")`` with its defaults (centre-of-mass
  initialisation, Mattes mutual information). Its forward transform (``fwdtransforms[0]``, an ITK
  ``MatrixOffsetTransform`` .mat file in LPS with a centre) maps fixed points to moving points; it is read with
  SimpleITK and flipped to RAS (:func:`ras_from_ants`).
* ``elastix``: itk-elastix's default affine parameter map (``GetDefaultParameterMap("affine")``, Mattes mutual
  information, 4 resolutions). Its ``TransformParameters`` (a row-major 3x3 matrix ``A`` and a translation ``t``,
  LPS, fixed to moving) act as ``p -> A (p - c) + c + t`` about ``CenterOfRotationPoint`` ``c``
  (:func:`ras_from_elastix`). The result image is made by transformix from the same parameters (see Timing).
* ``identity`` (optional): no registration, the scores of the starting misalignment.

``tests/test_benchmark.py`` checks both conversions by registering an image to a copy of itself moved by a known
small transform.

Timing and memory
-----------------
Each method runs in its own worker process (started once, fed the cases one by one through a pipe) limited to
``--threads`` threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``),
after one untimed warm-up on a small phantom pair that loads every library and kernel. Per pair:

* ``seconds_compute``: KeyMorph: the network on both network-grid images, the fit (and refinement) and the warp of
  the moving image on the network grid. ANTs: the ``ants.registration`` call (which also resamples both images
  onto each other's grids). elastix: the ``elastix_registration_method`` call with ``WriteResultImage false``.
* ``seconds_end_to_end``: reading both files, the preprocessing, the registration, the moving image resampled onto
  the fixed image's native grid and written as ``registered.nii.gz``, and the transform written (KeyMorph:
  ``transform.tfm``; ANTs: its .mat; elastix: ``TransformParameters.0.txt``; elastix's resampling is transformix
  with the default order-3 B-spline). Process start and imports are excluded for every method alike.
* ``peak_rss_mb``: the worker's peak resident memory during the pair (``VmHWM`` of ``/proc/self/status``, reset
  before each pair through ``/proc/self/clear_refs``), libraries included.

KeyMorph's rows also hold its QC scores (``qc_residual_mm``, ``qc_similarity``: :func:`scripts.qc.qc_scores`, computed
inside the end-to-end time as the inference writer does), the data for calibrating the QC thresholds of
``configs/inference.yaml`` against the errors.

Outputs in ``--output_dir``: ``cases.csv`` (one row per case and method, :data:`COLUMNS`), ``summary.json``,
``summary.md`` (tables and the machine), ``dice_vs_rotation.png``, ``tre_vs_rotation.png``,
``seconds_per_pair.png`` and ``settings.json``. The run resumes: cases already in ``cases.csv`` are skipped (failed
ones too, unless ``--retry_failed``); a method whose settings changed (e.g. new weights) is redone; other changed
case settings stop the run. ``--quick`` is a smoke configuration: 2 mm, the first subject, rotations 0 and 90, the
first modality pair, one same-subject pair per cell, ANTs and elastix with few iterations.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from network_speed import cpu_model  # noqa: E402

from scripts.transform_io import read_itk_transform, write_atomically  # noqa: E402

logger = logging.getLogger("compare_methods")

METHODS = ("keymorph", "ants", "elastix", "identity")
DEFAULT_METHODS = ("keymorph", "ants", "elastix")
#: The Python module each method needs (checked before any work).
METHOD_MODULES = {"ants": "ants", "elastix": "itk"}
COLUMNS = [
    "case",
    "dataset",
    "method",
    "modality_pair",
    "fixed_subject",
    "moving_subject",
    "same_subject",
    "rotation_deg",
    "dice",
    "tre_mm",
    "seconds_compute",
    "seconds_end_to_end",
    "peak_rss_mb",
    "qc_residual_mm",
    "qc_similarity",
    "status",
]
NUMERIC_COLUMNS = COLUMNS[COLUMNS.index("rotation_deg") : COLUMNS.index("status")]
OUTPUT_FILES = (
    "cases.csv",
    "summary.json",
    "summary.md",
    "dice_vs_rotation.png",
    "tre_vs_rotation.png",
    "seconds_per_pair.png",
)
#: Air (mm) kept around the moving brain when its resampled grid is cropped.
MOVING_MARGIN_MM = 10.0
#: ANTs and elastix settings of ``--quick`` (few iterations); the full run uses the libraries' defaults.
QUICK_ANTS = {"aff_iterations": (40, 20, 0, 0)}
QUICK_ELASTIX = {"MaximumNumberOfIterations": "32", "NumberOfResolutions": "2"}
#: The issue's targets.
DICE_MARGIN = 0.02
TRE_TARGET_MM = 1.0
COMPUTE_TARGET_S = 1.0
END_TO_END_TARGET_S = 3.0
MEMORY_TARGET_MB = 3072.0
SPEEDUP_TARGETS = {"ants": 30.0, "elastix": 3.0}


# ---------------------------------------------------------------------------------------------------------------
# Conversions of the baselines' transforms to the bundle's convention (fixed-to-moving, RAS mm)
# ---------------------------------------------------------------------------------------------------------------


def ras_from_ants(transform_path: str) -> np.ndarray:
    """The fixed-to-moving RAS matrix ``(4, 4)`` of an ANTs affine transform file (``fwdtransforms[0]`` of
    ``ants.registration``: an ITK ``AffineTransform`` .mat mapping fixed to moving points in LPS, with its centre in
    the fixed parameters); SimpleITK reads it, :func:`scripts.transform_io.ras_from_itk_affine` folds in the centre
    and flips x and y."""
    return read_itk_transform(transform_path)


def ras_from_elastix(parameter_map: Mapping[str, Sequence[str]]) -> np.ndarray:
    """The fixed-to-moving RAS matrix ``(4, 4)`` of an elastix affine parameter map (the result of a registration).

    elastix's ``AffineTransform`` maps a fixed point ``p`` (LPS mm) to ``A (p - c) + c + t``: ``TransformParameters``
    holds ``A`` row-major then ``t``, ``CenterOfRotationPoint`` holds ``c``.
    """
    kind = parameter_map["Transform"][0]
    if kind != "AffineTransform":
        raise ValueError(f"elastix transform {kind!r}: only AffineTransform is converted")
    initial = parameter_map.get("InitialTransformParameterFileName", ("NoInitialTransform",))[0]
    if initial != "NoInitialTransform":
        raise ValueError(f"elastix transform composed with an initial transform ({initial}): not converted")
    values = np.array([float(v) for v in parameter_map["TransformParameters"]], dtype=np.float64)
    if values.shape != (12,):
        raise ValueError(f"elastix affine with {values.size} parameters; expected 12 (3-D)")
    center = np.array([float(v) for v in parameter_map["CenterOfRotationPoint"]], dtype=np.float64)
    matrix = values[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = values[9:] + center - matrix @ center
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


# ---------------------------------------------------------------------------------------------------------------
# The methods, as they run inside a worker: run(fixed_path, moving_path, output_dir) -> dict
# ---------------------------------------------------------------------------------------------------------------


class KeyMorphRunner:
    """The bundle's inference path from files (see the module docstring).

    Args:
        ckpt_path: the weights.
        refine_iterations: mutual-information refinement steps; None keeps the inference config's inferer as it is.
        overrides: further settings of ``configs/inference.yaml`` (e.g. a small test network's ``num_keypoints``).
        threads: torch intra-op threads.
    """

    def __init__(self, ckpt_path: str, refine_iterations: int | None = None, overrides: dict | None = None, threads=2):
        import torch

        from scripts.bundle_api import load_config, load_state_dict

        torch.set_num_threads(int(threads))
        settings = {"skull_strip": "none", "fixed_skull_strip": "none", "device": "$torch.device('cpu')"}
        parser = load_config(ROOT, **{**settings, **dict(overrides or {})})
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.fixed_preprocessing = parser.get_parsed_content("fixed_preprocessing")
        self.network = parser.get_parsed_content("network_def", instantiate=True)
        self.network.load_state_dict(load_state_dict(ckpt_path, "cpu"), strict=True)
        self.network.eval()
        self.inferer = parser.get_parsed_content("inferer")
        if refine_iterations is not None:
            self.inferer.refine_iterations = int(refine_iterations)

    def run(self, fixed_path: str, moving_path: str, output_dir: str) -> dict:
        import nibabel as nib
        import torch

        from scripts.case_outputs import write_registered
        from scripts.coordinates import affine_of
        from scripts.qc import qc_scores
        from scripts.registration import warp_moving
        from scripts.transform_io import write_itk_transform

        start = time.perf_counter()
        fixed = self.fixed_preprocessing({"image": fixed_path})
        moving = self.preprocessing({"image": moving_path})
        fixed_net, moving_net = fixed["image"][None], moving["image"][None]
        with torch.no_grad():
            compute_start = time.perf_counter()
            registration = self.inferer(fixed_net, moving_net, self.network)
            warp_moving(
                registration,
                moving_net.as_tensor(),
                affine_of(fixed_net)[None],
                affine_of(moving_net)[None],
                fixed_net.shape[2:],
            )
            compute = time.perf_counter() - compute_start
        matrix = registration.fixed_to_moving[0].detach().cpu().to(torch.float64)
        # native grid and outputs, as scripts.case_outputs.RegistrationWriter writes them
        write_registered(
            os.path.join(output_dir, "registered.nii.gz"), moving["original"], nib.load(fixed_path), matrix
        )
        write_itk_transform(os.path.join(output_dir, "transform.tfm"), matrix)
        scores = qc_scores(registration, fixed, moving)
        end = time.perf_counter()
        return {
            "matrix": matrix.numpy(),
            "seconds_compute": compute,
            "seconds_end_to_end": end - start,
            "qc_residual_mm": scores["residual"],
            "qc_similarity": scores["similarity"],
        }


class AntsRunner:
    """``ants.registration(fixed, moving, type_of_transform="Affine", **options)`` from files.

    Args:
        options: further keyword arguments of ``ants.registration`` (none: its defaults; ``--quick``: few iterations).
    """

    def __init__(self, options: dict | None = None, threads=2):
        import ants

        self.ants = ants
        self.options = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(options or {}).items()}

    def run(self, fixed_path: str, moving_path: str, output_dir: str) -> dict:
        ants = self.ants
        start = time.perf_counter()
        fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
        compute_start = time.perf_counter()
        result = ants.registration(
            fixed, moving, type_of_transform="Affine", outprefix=os.path.join(output_dir, "ants_"), **self.options
        )
        compute = time.perf_counter() - compute_start
        ants.image_write(result["warpedmovout"], os.path.join(output_dir, "registered.nii.gz"))
        transform = result["fwdtransforms"][0]  # written by antsRegistration into output_dir
        end = time.perf_counter()
        return {"matrix": ras_from_ants(transform), "seconds_compute": compute, "seconds_end_to_end": end - start}


class ElastixRunner:
    """elastix's default affine registration (itk-elastix) from files, then transformix for the result image.

    Args:
        options: parameter map entries to change (none: the defaults; ``--quick``: few iterations).
    """

    def __init__(self, options: dict | None = None, threads=2):
        import itk

        self.itk, self.threads = itk, int(threads)
        self.options = {k: str(v) for k, v in dict(options or {}).items()}

    def parameters(self, write_result_image: bool):
        parameters = self.itk.ParameterObject.New()
        parameter_map = parameters.GetDefaultParameterMap("affine")
        for key, value in self.options.items():
            parameter_map[key] = (value,)
        # only whether elastix resamples the moving image itself at the end; transformix does it from the result
        parameter_map["WriteResultImage"] = ("true" if write_result_image else "false",)
        parameters.AddParameterMap(parameter_map)
        return parameters

    def run(self, fixed_path: str, moving_path: str, output_dir: str) -> dict:
        itk = self.itk
        start = time.perf_counter()
        fixed, moving = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
        compute_start = time.perf_counter()
        _, result = itk.elastix_registration_method(
            fixed,
            moving,
            parameter_object=self.parameters(write_result_image=False),
            log_to_console=False,
            number_of_threads=self.threads,
        )
        compute = time.perf_counter() - compute_start
        parameter_map = result.GetParameterMap(0)
        result.SetParameter(0, "WriteResultImage", "true")
        registered = itk.transformix_filter(moving, result, log_to_console=False)
        itk.imwrite(registered, os.path.join(output_dir, "registered.nii.gz"))
        result.WriteParameterFile(os.path.join(output_dir, "TransformParameters.0.txt"))
        end = time.perf_counter()
        return {
            "matrix": ras_from_elastix(dict(parameter_map)),
            "seconds_compute": compute,
            "seconds_end_to_end": end - start,
        }


class IdentityRunner:
    """No registration."""

    def __init__(self, **_):
        pass

    def run(self, fixed_path: str, moving_path: str, output_dir: str) -> dict:
        return {"matrix": np.eye(4), "seconds_compute": 0.0, "seconds_end_to_end": 0.0}


def make_runner(method: str, settings: dict):
    """The runner of ``method`` from its worker settings (:func:`method_settings`)."""
    threads = settings.get("threads", 2)
    if method == "keymorph":
        return KeyMorphRunner(
            settings["ckpt_path"], settings.get("refine_iterations"), settings.get("overrides"), threads
        )
    if method == "ants":
        return AntsRunner(settings.get("options"), threads)
    if method == "elastix":
        return ElastixRunner(settings.get("options"), threads)
    if method == "identity":
        return IdentityRunner()
    raise ValueError(f"unknown method {method!r}")


# ---------------------------------------------------------------------------------------------------------------
# Worker processes: one per method, a JSON line in (a pair), a JSON line out (its result)
# ---------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``) in MB; NaN where ``/proc`` has none."""
    try:
        with open("/proc/self/status") as handle:
            found = re.search(r"^VmHWM:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
        return int(found.group(1)) / 1024.0 if found else float("nan")
    except OSError:
        return float("nan")


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to the current resident size (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def worker_main(method: str, settings: dict) -> int:
    """A method's worker: set up, warm up, then register each pair read from stdin; one JSON line per pair.

    The protocol goes through a copy of the original stdout; stdout itself is sent to stderr so that libraries
    printing from C++ cannot corrupt it.
    """
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        runner = make_runner(method, settings)
        warmup = settings.get("warmup")
        if warmup:
            os.makedirs(warmup["output_dir"], exist_ok=True)
            runner.run(warmup["fixed"], warmup["moving"], warmup["output_dir"])
    except Exception as error:  # reported to the main process, which fails the method's cases
        traceback.print_exc()
        send({"ready": False, "error": f"{type(error).__name__}: {_first_line(error)}"})
        return 1
    send({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        reset = reset_peak_rss()
        try:
            os.makedirs(request["output_dir"], exist_ok=True)
            result = runner.run(request["fixed"], request["moving"], request["output_dir"])
            matrix = np.asarray(result.pop("matrix"), dtype=np.float64)
            message = {**result, "matrix": matrix.tolist(), "error": None}
        except Exception as error:  # one failing pair must not stop the worker
            traceback.print_exc()
            message = {"error": f"{type(error).__name__}: {_first_line(error)}"}
        message["peak_rss_mb"] = peak_rss_mb()
        message["peak_rss_reset"] = reset
        send(message)
    return 0


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


class Worker:
    """A method's worker process, started on first use (its stderr goes to ``log_path``).

    Args:
        method: the method's name.
        settings: its worker settings (JSON-serialisable).
        env: the process environment (thread limits).
        log_path: file receiving the worker's stderr.
        timeout: seconds allowed for the start (imports and warm-up) and for each pair.
    """

    def __init__(self, method: str, settings: dict, env: dict, log_path: str, timeout: float):
        self.method, self.settings, self.env = method, settings, env
        self.log_path, self.timeout = log_path, float(timeout)
        self.process: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.start_error: str | None = None

    def _start(self) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--worker", self.method]
        command += ["--worker_settings", json.dumps(self.settings)]
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self.env,
            cwd=ROOT,
            text=True,
            bufsize=1,
        )
        log.close()
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.process, self.lines), daemon=True).start()
        reply = self._reply()
        if not reply.get("ready"):
            self.start_error = reply.get("error") or "the worker did not start"
            self.close()

    @staticmethod
    def _read(process: subprocess.Popen, lines: queue.Queue) -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process exited

    def _reply(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                return {"error": f"timed out after {self.timeout:g} s"}
            if line is None:
                code = self.process.wait() if self.process else None
                self.process = None
                return {"error": f"the worker process exited (code {code}); see {self.log_path}"}
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue

    def run(self, fixed: str, moving: str, output_dir: str) -> dict:
        """Register one pair; a dict with ``matrix`` (or ``error``), the seconds and ``peak_rss_mb``."""
        if self.start_error:
            return {"error": f"the {self.method} worker did not start: {self.start_error}"}
        if self.process is None:
            self._start()
            if self.start_error:
                return {"error": f"the {self.method} worker did not start: {self.start_error}"}
        request = {"fixed": fixed, "moving": moving, "output_dir": output_dir}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.close()
            return {"error": f"the worker process died; see {self.log_path}"}
        return self._reply()

    def close(self) -> None:
        """Stop the worker (this process started it): end its input, then kill it if it does not exit."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.stdin.close()
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------


def _unframed(item: dict) -> dict:
    """The sweep datasets' ``frame``: the benchmark's methods read files, so no network grid is built here."""
    return item


def _tissue_labels(image, mask, iterations: int = 20):
    """A three-class tissue map of a T1 brain: k-means of the brain intensities into CSF (24), grey matter (3)
    and white matter (2), FreeSurfer labels whose tissue classes set the synthesis presets."""
    import torch

    values = image[mask]
    centers = torch.quantile(values[:: max(1, len(values) // 100000)], torch.tensor([0.15, 0.5, 0.85]))
    for _ in range(iterations):
        assignment = (values[:, None] - centers[None]).abs().argmin(1)
        centers = torch.stack(
            [values[assignment == c].mean() if (assignment == c).any() else centers[c] for c in range(3)]
        )
    labels = torch.zeros(image.shape, dtype=torch.int32)
    labels[mask] = torch.tensor([24, 3, 2], dtype=torch.int32)[assignment]
    return labels


def make_atlas_dataset(atlas_path: str, frame, spacing: float, synthesis: dict | None, **kwargs):
    """The MNI152 cases (module docstring): :class:`scripts.robustness_cases.RobustnessDataset` with the template as the
    fixed image, one same-image pair per modality pair and rotation. The modality pairs must have T1 fixed."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import CropForeground, Orientation, Spacing

    from scripts.image_io import load_volume
    from scripts.robustness_cases import RobustnessDataset, parse_modality_pair
    from scripts.synthesis import SynthesizeImaged

    class AtlasRobustnessDataset(RobustnessDataset):
        def __init__(self):
            super().__init__(frame, pairs_per_cell=1, same_subject_fraction=1.0, **kwargs)
            for pair in self.modality_pairs:
                if parse_modality_pair(pair)[0] != "T1":
                    raise ValueError(f"MNI152 cases need a T1 fixed image, not {pair}")
            self.synthesis = {"deform_std": 0.0, "skull_probability": 0.0, **dict(synthesis or {})}
            self.synthesis.pop("contrast", None)
            self._atlas: dict | None = None

        def atlas(self) -> dict:
            if self._atlas is None:
                image = Orientation(axcodes="RAS", labels=None)(load_volume(atlas_path))
                if not np.allclose(torch.as_tensor(image.affine)[:3, :3].norm(dim=0).numpy(), spacing, atol=1e-3):
                    image = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros")(image)
                image = CropForeground(select_fn=lambda x: x > 1e-3, margin=4)(image)
                data = image.as_tensor().clamp(0, 1)
                brain = data[0] > 1e-3
                data = data * brain
                labels = MetaTensor(_tissue_labels(data[0], brain)[None], affine=image.affine)
                self._atlas = {
                    "image": MetaTensor(data, affine=image.affine),
                    "mask": MetaTensor(brain[None].to(torch.float32), affine=image.affine),
                    "tissues": labels,
                }
            return self._atlas

        def base_pair(self, modality_pair: str, k: int, rng: np.random.RandomState) -> tuple[dict, dict]:
            _, moving_modality = parse_modality_pair(modality_pair)
            seed = int(rng.randint(0, 2**31 - 1))
            atlas = self.atlas()
            fixed = {"image": atlas["image"], "mask": atlas["mask"], "subject": "MNI152", "modality": "T1"}
            if moving_modality == "T1":
                image = atlas["image"].clone()
            else:
                transform = SynthesizeImaged(contrast=moving_modality, **self.synthesis)
                transform.set_random_state(seed=seed)
                image = transform({"label": atlas["tissues"].clone()})["image"]
            moving = {"image": image, "mask": atlas["mask"].clone(), "subject": "MNI152", "modality": moving_modality}
            return fixed, moving

    return AtlasRobustnessDataset()


def case_ids(dataset_name: str, modality_pair: str, k: int, angle: float) -> tuple[str, str]:
    """``(base id, case id)``: e.g. ``("label_maps_T1-T2_p0", "label_maps_T1-T2_p0_r90")``."""
    base = f"{dataset_name}_{modality_pair}_p{k}"
    return base, f"{base}_r{angle:g}"


def write_text(path: str, text: str) -> None:
    """Write a text file atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w") as handle:
            handle.write(text)

    write_atomically(path, write)


def _write_nifti(path: str, data, affine, dtype) -> None:
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda temporary: nib.save(image, temporary))


def crop_to_mask(image, mask, margin_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, mask, affine)`` of a ``(1, D, H, W)`` image and mask cropped to the mask's bounding box plus
    ``margin_mm`` (numpy ``(D, H, W)`` arrays; the affine moved to the new first voxel)."""
    data, brain = np.asarray(image[0]), np.asarray(mask[0]) > 0.5
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    found = np.argwhere(brain)
    if not len(found):
        return data, brain, affine
    margin = np.ceil(margin_mm / spacing).astype(int)
    low = np.maximum(found.min(0) - margin, 0)
    high = np.minimum(found.max(0) + margin + 1, brain.shape)
    region = tuple(slice(a, b) for a, b in zip(low, high))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    return data[region], brain[region], shifted


def write_case(case: dict, base_dir: str, case_dir: str, write_fixed: bool) -> dict:
    """Write a case's files (module docstring); returns the paths of the fixed and the moving image."""
    fixed, moving = case["fixed"], case["moving"]
    paths = {"fixed": os.path.join(base_dir, "fixed.nii.gz"), "moving": os.path.join(case_dir, "moving.nii.gz")}
    if write_fixed or not os.path.isfile(paths["fixed"]):
        affine = np.asarray(fixed["image"].affine, dtype=np.float64)
        _write_nifti(os.path.join(base_dir, "fixed_mask.nii.gz"), np.asarray(fixed["mask"][0]) > 0.5, affine, np.uint8)
        if "label" in fixed:
            _write_nifti(
                os.path.join(base_dir, "fixed_labels.nii.gz"), fixed["label"][0], fixed["label"].affine, np.int16
            )
        _write_nifti(paths["fixed"], fixed["image"][0], affine, np.float32)
    image, mask, affine = crop_to_mask(moving["image"], moving["mask"], MOVING_MARGIN_MM)
    _write_nifti(os.path.join(case_dir, "moving_mask.nii.gz"), mask, affine, np.uint8)
    if "label" in moving:
        _write_nifti(
            os.path.join(case_dir, "moving_labels.nii.gz"), moving["label"][0], moving["label"].affine, np.int16
        )
    _write_nifti(paths["moving"], image, affine, np.float32)
    truth = case.get("true_fixed_to_moving")
    description = {
        "case": case["case_id"],
        "modality_pair": case["modality_pair"],
        "rotation_deg": float(case["rotation_deg"]),
        "same_subject": bool(case["same_subject"]),
        "fixed_subject": fixed.get("subject", ""),
        "moving_subject": moving.get("subject", ""),
        "applied_transform": np.asarray(case["applied_transform"], dtype=np.float64).tolist(),
        "true_fixed_to_moving": None if truth is None else np.asarray(truth, dtype=np.float64).tolist(),
        "convention": "world RAS mm; true_fixed_to_moving maps fixed points to moving points",
    }
    write_text(os.path.join(case_dir, "case.json"), json.dumps(description, indent=2) + "\n")
    return paths


def write_phantom_pair(folder: str) -> dict:
    """A small brain-like phantom pair (the warm-up of each worker): ``{"fixed", "moving", "output_dir"}``."""
    paths = {
        "fixed": os.path.join(folder, "fixed.nii.gz"),
        "moving": os.path.join(folder, "moving.nii.gz"),
        "output_dir": os.path.join(folder, "output"),
    }
    if os.path.isfile(paths["fixed"]) and os.path.isfile(paths["moving"]):
        return paths
    size, spacing = 64, 2.5
    axis = (np.arange(size) - (size - 1) / 2) * spacing
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    brain = (x / 65) ** 2 + (y / 80) ** 2 + (z / 60) ** 2 <= 1
    ventricles = ((x - 10) / 8) ** 2 + ((y - 8) / 20) ** 2 + (z / 10) ** 2 <= 1
    ventricles |= ((x + 10) / 8) ** 2 + ((y - 8) / 20) ** 2 + (z / 10) ** 2 <= 1
    image = (0.6 + 0.25 * np.sin(x / 12) * np.cos(y / 17) + 0.1 * np.cos(z / 9)) * brain
    image[ventricles] = 0.15
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2 * spacing
    _write_nifti(paths["fixed"], image, affine, np.float32)
    shifted = affine.copy()
    shifted[:3, 3] += [4.0, -3.0, 2.0]
    _write_nifti(paths["moving"], image, shifted, np.float32)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Rows and summaries
# ---------------------------------------------------------------------------------------------------------------


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_rows(path: str) -> list[dict]:
    """The rows of ``cases.csv`` (numbers as floats, ``same_subject`` as bool); [] when there is none."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in NUMERIC_COLUMNS:
            row[key] = _float(row.get(key))
        row["same_subject"] = str(row.get("same_subject")) == "True"
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """``cases.csv`` (columns :data:`COLUMNS`; unknown values empty), written atomically, methods in order."""
    from scripts.reports import write_cases_csv

    order = {method: index for index, method in enumerate(METHODS)}
    write_cases_csv(path, rows, COLUMNS, sort_key=lambda r: (r["case"], order.get(r["method"], len(order))))


def _value(x) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def stats(rows: list[dict]) -> dict:
    """Dice (mean, sd), TRE (mean, median, max), seconds (median, mean, max) and peak memory of a group of rows.

    Failed cases count as Dice 0 (on labelled pairs) and have no TRE; ``n_failed`` says how many there are.
    """

    def finite(key: str) -> np.ndarray:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        return values[np.isfinite(values)]

    dice, tre = finite("dice"), finite("tre_mm")
    compute, total, memory = finite("seconds_compute"), finite("seconds_end_to_end"), finite("peak_rss_mb")
    return {
        "n": len(rows),
        "n_failed": sum(r["status"] != "ok" for r in rows),
        "n_dice": int(len(dice)),
        "dice_mean": _value(dice.mean()) if len(dice) else None,
        "dice_std": _value(dice.std(ddof=1)) if len(dice) > 1 else None,
        "n_tre": int(len(tre)),
        "tre_mean_mm": _value(tre.mean()) if len(tre) else None,
        "tre_median_mm": _value(np.median(tre)) if len(tre) else None,
        "tre_max_mm": _value(tre.max()) if len(tre) else None,
        "seconds_compute_median": _value(np.median(compute)) if len(compute) else None,
        "seconds_compute_mean": _value(compute.mean()) if len(compute) else None,
        "seconds_compute_max": _value(compute.max()) if len(compute) else None,
        "seconds_end_to_end_median": _value(np.median(total)) if len(total) else None,
        "seconds_end_to_end_mean": _value(total.mean()) if len(total) else None,
        "seconds_end_to_end_max": _value(total.max()) if len(total) else None,
        "peak_rss_mb_median": _value(np.median(memory)) if len(memory) else None,
        "peak_rss_mb_max": _value(memory.max()) if len(memory) else None,
    }


def _angle(angle: float) -> str:
    return f"{angle:g}"


def dice_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """The rows Dice is reported on: different-subject label-map pairs (the issue's Dice target); all labelled
    pairs when the run has no different-subject pair (``--quick``). Also says which."""
    labelled = [r for r in rows if r["dataset"] == "label_maps"]
    different = [r for r in labelled if not r["same_subject"]]
    if different:
        return different, "different-subject pairs"
    return labelled, "same-subject pairs: this run has no different-subject pair"


def group_name(row: dict) -> str:
    """A row's modality-pair group: ``T1-T2`` for label-map cases, ``MNI152 T1-T2`` for the template's."""
    return row["modality_pair"] if row["dataset"] == "label_maps" else f"MNI152 {row['modality_pair']}"


def summarize(rows: list[dict], methods: Sequence[str]) -> dict:
    """``summary.json``'s results: per method overall, Dice and TRE per rotation and per modality pair and
    rotation, seconds and memory; the speed ratios; the issue's targets."""
    methods = [m for m in methods if any(r["method"] == m for r in rows)] or list(
        dict.fromkeys(r["method"] for r in rows)
    )
    angles = sorted({r["rotation_deg"] for r in rows})
    for_dice, dice_scope = dice_rows(rows)
    for_tre = [r for r in rows if r["same_subject"]]
    results = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        dice_mine = [r for r in for_dice if r["method"] == method]
        tre_mine = [r for r in for_tre if r["method"] == method]
        results[method] = {
            "overall": stats(mine),
            "dice_by_rotation": {_angle(a): stats([r for r in dice_mine if r["rotation_deg"] == a]) for a in angles},
            "tre_by_rotation": {_angle(a): stats([r for r in tre_mine if r["rotation_deg"] == a]) for a in angles},
            "dice_by_pair": _by_pair(dice_mine, angles),
            "tre_by_pair": _by_pair(tre_mine, angles),
        }
    ratios = {}
    if "keymorph" in results:
        own = results["keymorph"]["overall"]
        for method in ("ants", "elastix"):
            if method in results:
                other = results[method]["overall"]
                ratios[method] = {
                    kind: _ratio(other[f"seconds_{kind}_median"], own[f"seconds_{kind}_median"])
                    for kind in ("compute", "end_to_end")
                }
    return {"dice_scope": dice_scope, "methods": results, "speed_ratios": ratios, "targets": targets(results, ratios)}


def _by_pair(rows: list[dict], angles: list[float]) -> dict:
    groups = list(dict.fromkeys(group_name(r) for r in rows))
    return {
        group: {
            _angle(a): stats([r for r in rows if group_name(r) == group and r["rotation_deg"] == a])
            for a in angles
            if any(group_name(r) == group and r["rotation_deg"] == a for r in rows)
        }
        for group in groups
    }


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def targets(results: dict, ratios: dict) -> list[dict]:
    """The issue's targets that this run can check: ``[{"target", "value", "threshold", "met"}]`` (``met`` None
    when the run lacks what the target needs)."""
    checks = []

    def add(name: str, value, threshold, met) -> None:
        checks.append({"target": name, "value": value, "threshold": threshold, "met": met})

    own = results.get("keymorph")
    if own is None:
        return checks
    ants = results.get("ants")
    ants_zero = ants["dice_by_rotation"].get("0", {}).get("dice_mean") if ants else None
    own_dice = [s["dice_mean"] for s in own["dice_by_rotation"].values() if s["dice_mean"] is not None]
    if own_dice and ants_zero is not None:
        zero = own["dice_by_rotation"].get("0", {}).get("dice_mean")
        if zero is not None:
            add(
                "KeyMorph Dice at 0 deg >= ANTs Dice at 0 deg - 0.02",
                zero,
                round(ants_zero - DICE_MARGIN, 6),
                bool(zero >= ants_zero - DICE_MARGIN),
            )
        worst = min(own_dice)
        add(
            "KeyMorph Dice at every rotation >= ANTs Dice at 0 deg - 0.02",
            worst,
            round(ants_zero - DICE_MARGIN, 6),
            bool(worst >= ants_zero - DICE_MARGIN),
        )
    tre = [s["tre_mean_mm"] for s in own["tre_by_rotation"].values() if s["tre_mean_mm"] is not None]
    if tre:
        add(
            "KeyMorph mean TRE (mm, same-subject pairs) at every rotation <= 1",
            max(tre),
            TRE_TARGET_MM,
            bool(max(tre) <= TRE_TARGET_MM),
        )
    overall = own["overall"]
    for key, name, threshold in (
        ("seconds_compute_median", "KeyMorph registration compute per pair (s, median) <= 1", COMPUTE_TARGET_S),
        ("seconds_end_to_end_median", "KeyMorph end to end per pair (s, median) <= 3", END_TO_END_TARGET_S),
        ("peak_rss_mb_max", "KeyMorph peak memory (MB, max over pairs) <= 3072", MEMORY_TARGET_MB),
    ):
        if overall[key] is not None:
            add(name, overall[key], threshold, bool(overall[key] <= threshold))
    for method, threshold in SPEEDUP_TARGETS.items():
        ratio = ratios.get(method, {}).get("end_to_end")
        if ratio is not None:
            add(
                f"{method} / KeyMorph seconds per pair (end to end, medians) >= {threshold:g}",
                ratio,
                threshold,
                bool(ratio >= threshold),
            )
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Markdown and plots
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _dice_cell(s: dict) -> str:
    if not s or s.get("dice_mean") is None:
        return "-"
    cell = f"{s['dice_mean']:.3f}"
    if s.get("dice_std") is not None:
        cell += f" ± {s['dice_std']:.3f}"
    cell += f" ({s['n_dice']})"
    return cell + (f", {s['n_failed']} failed" if s.get("n_failed") else "")


def _tre_cell(s: dict) -> str:
    if not s or not s.get("n"):
        return "-"
    if s.get("tre_mean_mm") is None:
        return f"{s['n_failed']} failed" if s.get("n_failed") else "-"
    cell = f"{s['tre_mean_mm']:.2f} (max {s['tre_max_mm']:.2f}, {s['n_tre']})"
    return cell + (f", {s['n_failed']} failed" if s.get("n_failed") else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def summary_markdown(summary: dict) -> str:
    """``summary.md``: the tables of :func:`summarize`, the targets, the machine and the command."""
    results, machine = summary["results"], summary["machine"]
    methods = list(results["methods"])
    angles = sorted({float(a) for m in results["methods"].values() for a in m["dice_by_rotation"]})
    heads = [f"{a:g}°" for a in angles]
    lines = ["# KeyMorph against ANTs and elastix", ""]
    lines += [f"Command: `{summary['command']}`", ""]
    settings = summary["settings"]["cases"]
    lines += [
        "Pairs: synthetic brains (skull-stripped, preset contrasts) from the label maps"
        f" {', '.join(settings['subjects'])}"
        f" at {settings['spacing']:g} mm"
        + (", plus same-image pairs on the MNI152 T1 template (TRE only)" if settings.get("include_mni") else "")
        + "; the moving image turned by the stated net angle about a random axis (with scale and translation) and"
        " resampled. Cells: mean ± sd (n). See benchmarks/compare_methods.py for the definitions.",
        "",
    ]
    lines += [f"## Dice of brain structures ({results['dice_scope']})", ""]
    lines += _table(
        ["method", *heads],
        [[m, *[_dice_cell(results["methods"][m]["dice_by_rotation"].get(f"{a:g}")) for a in angles]] for m in methods],
    )
    lines += ["", "### Dice per modality pair (fixed-moving)", ""]
    body = []
    groups = list(dict.fromkeys(g for m in methods for g in results["methods"][m]["dice_by_pair"]))
    for group in groups:
        for m in methods:
            cells = results["methods"][m]["dice_by_pair"].get(group, {})
            body.append([group, m, *[_dice_cell(cells.get(f"{a:g}")) for a in angles]])
    lines += _table(["pair", "method", *heads], body)
    lines += ["", "## TRE over the brain, mm (same-subject pairs with a known transform): mean (max, n)", ""]
    lines += _table(
        ["method", *heads],
        [[m, *[_tre_cell(results["methods"][m]["tre_by_rotation"].get(f"{a:g}")) for a in angles]] for m in methods],
    )
    lines += ["", "### TRE per modality pair", ""]
    body = []
    groups = list(dict.fromkeys(g for m in methods for g in results["methods"][m]["tre_by_pair"]))
    for group in groups:
        for m in methods:
            cells = results["methods"][m]["tre_by_pair"].get(group, {})
            body.append([group, m, *[_tre_cell(cells.get(f"{a:g}")) for a in angles]])
    lines += _table(["pair", "method", *heads], body)
    lines += ["", "## Seconds per pair and memory", ""]
    body = []
    for m in methods:
        s = results["methods"][m]["overall"]
        body.append(
            [
                m,
                str(s["n"]),
                _fmt(s["seconds_compute_median"], 2),
                _fmt(s["seconds_compute_max"], 2),
                _fmt(s["seconds_end_to_end_median"], 2),
                _fmt(s["seconds_end_to_end_max"], 2),
                _fmt(s["peak_rss_mb_median"], 0),
                _fmt(s["peak_rss_mb_max"], 0),
            ]
        )
    lines += _table(
        [
            "method",
            "pairs",
            "compute s (median)",
            "compute s (max)",
            "end to end s (median)",
            "end to end s (max)",
            "peak RSS MB (median)",
            "peak RSS MB (max)",
        ],
        body,
    )
    if results["speed_ratios"]:
        lines += ["", "Speed ratios (the other method's median seconds per pair / KeyMorph's):", ""]
        lines += _table(
            ["", "compute", "end to end"],
            [
                [f"{m} / keymorph", _fmt(r["compute"], 1), _fmt(r["end_to_end"], 1)]
                for m, r in results["speed_ratios"].items()
            ],
        )
    if results["targets"]:
        lines += ["", "## The issue's targets", ""]
        lines += _table(
            ["target", "value", "threshold", "met"],
            [
                [
                    t["target"],
                    _fmt(t["value"], 3),
                    _fmt(t["threshold"], 3),
                    {True: "yes", False: "**no**", None: "-"}[t["met"]],
                ]
                for t in results["targets"]
            ],
        )
    lines += ["", "## Method settings", ""]
    for method, values in summary["settings"].get("methods", {}).items():
        if method in results["methods"]:
            described = ", ".join(f"{k}: {v}" for k, v in values.items()) or "defaults"
            lines.append(f"- {method}: {described}")
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    runs = summary["settings"].get("runs", [])
    if len(runs) > 1:
        lines += ["", f"cases.csv gathers the rows of {len(runs)} runs (the machine above is the last run's):", ""]
        lines += [f"- {run['date']}: `{run['command']}`" for run in runs]
    lines += [
        "",
        "Timing: compute = registration only (KeyMorph: network on both images, fit, refinement, warp on the network"
        " grid; ANTs: the ants.registration call; elastix: the registration call without its result image); end to"
        " end = reading both files, preprocessing, registration, resampling onto the fixed image's native grid and"
        " writing the result and the transform. Each method ran in its own process limited to the threads above,"
        " after an untimed warm-up; peak RSS is that process's (libraries included) during the pair.",
        "",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_against_rotation(
    path: str, results: dict, by_pair: str, statistic: str, ylabel: str, title: str, log=False, target=None
):
    """One panel per modality pair, one line per method (``results["methods"][m][by_pair][pair][angle][stat]``);
    ``target`` draws a dashed horizontal line."""
    plt = _pyplot()
    methods = list(results["methods"])
    groups = list(dict.fromkeys(g for m in methods for g in results["methods"][m][by_pair]))
    columns = min(3, max(1, len(groups)))
    rows = max(1, math.ceil(len(groups) / columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(max(6.4, 4.2 * columns), 3.4 * rows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(groups) :]:
        ax.axis("off")
    for ax, group in zip(axes.flat, groups):
        for method in methods:
            cells = results["methods"][method][by_pair].get(group, {})
            points = sorted((float(a), s[statistic]) for a, s in cells.items() if s[statistic] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_title(group, fontsize="medium")
        ax.set_xlabel("initial rotation (degrees)")
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        if log:
            ax.set_yscale("log")
    if not groups:
        axes[0, 0].text(0.5, 0.5, "no values", ha="center", va="center", transform=axes[0, 0].transAxes)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if groups:
        axes.flat[0].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


def plot_seconds(path: str, rows: list[dict], methods: Sequence[str]) -> None:
    """Seconds per pair per method (compute and end to end), log scale, one box per method."""
    plt = _pyplot()
    methods = [m for m in methods if any(r["method"] == m and r["status"] == "ok" for r in rows)]
    figure, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("seconds_compute", "seconds_end_to_end"), ("registration compute", "end to end")):
        data = [[r[key] for r in rows if r["method"] == m and r["status"] == "ok" and r[key] > 0] for m in methods]
        shown = [(m, d) for m, d in zip(methods, data) if d]
        if shown:
            ax.boxplot([d for _, d in shown], tick_labels=[m for m, _ in shown])
            for i, (_, d) in enumerate(shown, start=1):
                ax.annotate(
                    f"{np.median(d):.2g} s",
                    (i, np.median(d)),
                    xytext=(24, -3),
                    textcoords="offset points",
                    fontsize="small",
                )
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("seconds per pair")
    figure.tight_layout()
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


def write_outputs(output_dir: str, rows: list[dict], meta: dict, plots: bool = True) -> dict:
    """``summary.json`` and ``summary.md`` (and, with ``plots``, the three figures) from all the rows (every method
    in ``cases.csv``, whichever this run registered)."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    summary = {**meta, "results": summarize(rows, methods)}

    def dump(temporary: str) -> None:
        with open(temporary, "w") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")

    write_atomically(os.path.join(output_dir, "summary.json"), dump)
    markdown = summary_markdown(summary)
    write_text(os.path.join(output_dir, "summary.md"), markdown)
    if plots:
        results = summary["results"]
        plot_against_rotation(
            os.path.join(output_dir, "dice_vs_rotation.png"),
            results,
            "dice_by_pair",
            "dice_mean",
            "mean Dice",
            f"Dice ({results['dice_scope']})",
        )
        plot_against_rotation(
            os.path.join(output_dir, "tre_vs_rotation.png"),
            results,
            "tre_by_pair",
            "tre_mean_mm",
            "mean TRE (mm, log)",
            "TRE over the brain (same-subject pairs; dashed: the 1 mm target)",
            log=True,
            target=TRE_TARGET_MM,
        )
        plot_seconds(os.path.join(output_dir, "seconds_per_pair.png"), rows, methods)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Settings and the machine
# ---------------------------------------------------------------------------------------------------------------


def evaluate_defaults() -> dict:
    """The sweep's settings of ``configs/evaluate.yaml`` that the benchmark shares."""
    import yaml

    with open(os.path.join(ROOT, "configs", "evaluate.yaml")) as handle:
        config = yaml.safe_load(handle)
    keys = (
        "modality_pairs",
        "rotations",
        "pairs_per_cell",
        "same_subject_fraction",
        "scale_range",
        "translate_mm",
        "test_subjects",
        "synthesis",
        "seed",
    )
    return {key: config[key] for key in keys}


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "logical cores": os.cpu_count(),
        "memory": _memory_total(),
        "threads per method": threads,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "monai": _version("monai"),
        "antspyx": _version("antspyx"),
        "itk-elastix": _version("itk-elastix"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in load),
    }


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as handle:
            found = re.search(r"MemTotal:\s+(\d+)\s+kB", handle.read())
        return f"{int(found.group(1)) / 1024**2:.1f} GiB" if found else "unknown"
    except OSError:
        return "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--label_maps_dir", default=os.path.join(ROOT, "..", "shared", "data", "label_maps"), help="held-out label maps"
    )
    add("--subjects", nargs="+", help="label maps to use (substrings of file names; default: evaluate.yaml's)")
    add("--output_dir", default=os.path.join(ROOT, "docs", "benchmark"), help="tables and plots go here")
    add("--rotations", nargs="+", type=float, help="net initial rotations, degrees (default: evaluate.yaml's)")
    add("--modality_pairs", nargs="+", help="FIXED-MOVING contrasts (default: evaluate.yaml's)")
    add("--pairs_per_cell", type=int, help="pairs per modality pair and rotation (default: evaluate.yaml's)")
    add("--same_subject_fraction", type=float, help="share of same-subject pairs per cell (default: evaluate.yaml's)")
    add("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    add("--ckpt_path", default=os.path.join(ROOT, "models", "model.pt"), help="KeyMorph weights")
    add("--refine_iterations", type=int, help="KeyMorph refinement steps (default: the inference config's)")
    add("--include_mni", action="store_true", help="add TRE-only pairs on the MNI152 T1 template")
    add("--spacing", type=float, help="voxel size of the test images, mm (default 1; --quick: 2)")
    add("--seed", type=int, help="seed of every draw (default: evaluate.yaml's)")
    add("--threads", type=int, default=2, help="threads per method (default 2)")
    add("--timeout", type=float, default=3600.0, help="seconds allowed per pair (and per worker start)")
    add("--work_dir", help="where the case images go (default: ~/.cache/keymorph/benchmark)")
    add("--keep_cases", action="store_true", help="keep the case images and the methods' outputs")
    add("--retry_failed", action="store_true", help="redo the cases that failed in an earlier run")
    add("--no_warmup", action="store_true", help="skip the untimed warm-up of each method")
    add("--quick", action="store_true", help="tiny smoke configuration (see the module docstring)")
    add("--num_keypoints", type=int, help="network setting (must match the weights; default: the config's)")
    add("--network_channels", type=int, nargs="+", help="network setting (must match the weights)")
    add("--spatial_size", type=int, help="network grid size (must match the weights)")
    add("--worker", choices=METHODS, help=argparse.SUPPRESS)
    add("--worker_settings", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> dict:
    """The case settings: the command line over ``--quick`` over ``configs/evaluate.yaml``."""
    defaults = evaluate_defaults()
    subjects = list(args.subjects or defaults["test_subjects"])
    pairs = list(args.modality_pairs or defaults["modality_pairs"])
    quick = {}
    if args.quick:
        subjects = subjects[:1]
        pairs = pairs[:1] if args.modality_pairs or "T1-T2" not in pairs else ["T1-T2"]
        quick = {"rotations": [0.0, 90.0], "pairs_per_cell": 1, "same_subject_fraction": 1.0, "spacing": 2.0}

    def pick(name: str, fallback):
        given = getattr(args, name, None)
        return given if given is not None else quick.get(name, fallback)

    return {
        "label_maps_dir": os.path.abspath(args.label_maps_dir),
        "subjects": subjects,
        "modality_pairs": pairs,
        "rotations": [float(r) for r in pick("rotations", defaults["rotations"])],
        "pairs_per_cell": int(pick("pairs_per_cell", defaults["pairs_per_cell"])),
        "same_subject_fraction": float(pick("same_subject_fraction", defaults["same_subject_fraction"])),
        "spacing": float(pick("spacing", 1.0)),
        "seed": int(pick("seed", defaults["seed"])),
        "scale_range": float(defaults["scale_range"]),
        "translate_mm": float(defaults["translate_mm"]),
        "synthesis": dict(defaults["synthesis"] or {}),
        "include_mni": bool(args.include_mni),
        "quick": bool(args.quick),
    }


def method_settings(method: str, args: argparse.Namespace) -> dict:
    """What a method's worker needs; everything but ``threads`` and ``warmup`` also decides whether its earlier
    rows are still valid (:func:`main`)."""
    if method == "keymorph":
        overrides = {}
        if args.num_keypoints is not None:
            overrides["num_keypoints"] = args.num_keypoints
        if args.network_channels is not None:
            overrides["network_channels"] = list(args.network_channels)
        if args.spatial_size is not None:
            overrides["spatial_size"] = args.spatial_size
        refine = args.refine_iterations
        if refine is None:  # the inference config's (its inferer's default when it sets none)
            from scripts.bundle_api import load_config

            refine = int(load_config(ROOT).get_parsed_content("inferer").refine_iterations)
        ckpt = os.path.abspath(args.ckpt_path)
        inside = os.path.relpath(ckpt, ROOT)  # the workers run in ROOT
        settings = {
            "ckpt_path": ckpt if inside.startswith("..") else inside,
            "ckpt_sha256": file_digest(ckpt),
            "refine_iterations": refine,
            "overrides": overrides,
        }
    elif method == "ants":
        settings = {"options": QUICK_ANTS if args.quick else {}, "antspyx": _version("antspyx")}
    elif method == "elastix":
        settings = {"options": QUICK_ELASTIX if args.quick else {}, "itk-elastix": _version("itk-elastix")}
    else:
        settings = {}
    return json.loads(json.dumps(settings))


def worker_environment(threads: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_settings(settings: dict, args: argparse.Namespace) -> dict[str, str]:
    """Exit with one line on a setting that would fail later; returns the label maps ``{subject: path}``."""
    from scripts.errors import KeyMorphInputError, fail
    from scripts.robustness_cases import held_out_label_maps, parse_modality_pair

    try:
        for pair in settings["modality_pairs"]:
            parse_modality_pair(pair)
    except KeyMorphInputError as error:
        fail(f"--modality_pairs: {error}")
    if any(not 0.0 <= r <= 180.0 for r in settings["rotations"]):
        fail(f"--rotations {settings['rotations']}: net rotation angles must be within [0, 180] degrees")
    if settings["pairs_per_cell"] < 1 or not 0.0 <= settings["same_subject_fraction"] <= 1.0:
        fail("--pairs_per_cell must be >= 1 and --same_subject_fraction within [0, 1]")
    if not os.path.isdir(settings["label_maps_dir"]):
        fail(f"{settings['label_maps_dir']}: label maps folder not found (--label_maps_dir)")
    try:
        label_maps = held_out_label_maps(settings["label_maps_dir"], settings["subjects"])
    except KeyMorphInputError as error:
        fail(str(error))
    n_same = min(settings["pairs_per_cell"], math.ceil(settings["same_subject_fraction"] * settings["pairs_per_cell"]))
    if n_same < settings["pairs_per_cell"] and len(label_maps) < 2:
        fail("different-subject pairs need two subjects: give more --subjects or --same_subject_fraction 1")
    if settings["spacing"] <= 0 or args.threads < 1 or args.timeout <= 0:
        fail("--spacing, --threads and --timeout must be positive")
    for method in args.methods:
        module = METHOD_MODULES.get(method)
        if module and importlib.util.find_spec(module) is None:
            fail(f"--methods {method}: the Python module {module!r} is missing (pip install -r requirements-bench.txt)")
    if "keymorph" in args.methods and not os.path.isfile(args.ckpt_path):
        fail(f"{args.ckpt_path}: model weights not found (--ckpt_path)")
    if settings["include_mni"] and not any(p.startswith("T1-") for p in settings["modality_pairs"]):
        fail("--include_mni needs a modality pair with T1 fixed (the template is a T1 image)")
    return label_maps


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def build_datasets(settings: dict, label_maps: dict[str, str]) -> list[tuple[str, object]]:
    """``[(dataset name, RobustnessDataset)]``: the label-map cases and, with ``include_mni``, the template's."""
    from scripts.robustness_cases import SyntheticRobustnessDataset

    common = {
        "rotations": settings["rotations"],
        "scale_range": settings["scale_range"],
        "translate_mm": settings["translate_mm"],
        "resample_moving": True,
        "seed": settings["seed"],
    }
    datasets = [
        (
            "label_maps",
            SyntheticRobustnessDataset(
                label_maps,
                _unframed,
                settings["synthesis"],
                settings["spacing"],
                modality_pairs=settings["modality_pairs"],
                pairs_per_cell=settings["pairs_per_cell"],
                same_subject_fraction=settings["same_subject_fraction"],
                **common,
            ),
        )
    ]
    if settings["include_mni"]:
        from scripts.image_io import default_atlas_path

        pairs = [p for p in settings["modality_pairs"] if p.startswith("T1-")]
        datasets.append(
            (
                "mni152",
                make_atlas_dataset(
                    default_atlas_path(),
                    _unframed,
                    settings["spacing"],
                    settings["synthesis"],
                    modality_pairs=pairs,
                    **common,
                ),
            )
        )
    return datasets


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_settings or "{}"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from scripts.errors import fail

    settings = resolve_settings(args)
    label_maps = check_settings(settings, args)
    output_dir = os.path.abspath(args.output_dir)
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    work_dir = os.path.abspath(args.work_dir or os.path.join(cache, "keymorph", "benchmark"))
    for folder in (output_dir, work_dir):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            fail(f"{folder}: cannot create the folder ({error.strerror})")
    methods = list(dict.fromkeys(args.methods))
    per_method = {m: method_settings(m, args) for m in methods}
    cases_settings = {k: v for k, v in settings.items() if k != "label_maps_dir"}
    cases_settings["label_maps"] = {s: os.path.basename(p) for s, p in sorted(label_maps.items())}

    # resume: earlier rows of the same cases and method settings are kept
    csv_path, settings_path = os.path.join(output_dir, "cases.csv"), os.path.join(output_dir, "settings.json")
    rows = read_rows(csv_path)
    earlier = {}
    if rows and os.path.isfile(settings_path):
        with open(settings_path) as handle:
            earlier = json.load(handle)
    if earlier and earlier.get("cases") != json.loads(json.dumps(cases_settings)):
        changed = sorted(
            k
            for k in set(earlier.get("cases", {})) | set(cases_settings)
            if earlier.get("cases", {}).get(k) != json.loads(json.dumps(cases_settings)).get(k)
        )
        fail(
            f"{output_dir} holds results of other case settings ({', '.join(changed)}); choose another --output_dir"
            " or remove its cases.csv"
        )
    method_record = dict(earlier.get("methods", {}))
    for method in methods:
        if method in method_record and method_record[method] != per_method[method]:
            dropped = sum(r["method"] == method for r in rows)
            logger.warning(
                f"{method}: its settings changed since the earlier run; its {dropped} earlier rows are redone"
            )
            rows = [r for r in rows if r["method"] != method]
        method_record[method] = per_method[method]
    if args.retry_failed:
        rows = [r for r in rows if r["status"] == "ok"]
    script = os.path.relpath(os.path.abspath(__file__), os.getcwd())
    command = " ".join(shlex.quote(a) for a in ["python", script, *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info(args.threads)
    # cases.csv may gather the rows of several runs (resumed or extended): each run is recorded
    runs = [*(earlier.get("runs", []) if rows else []), {"date": machine["date"], "command": command}]
    record = {"cases": cases_settings, "methods": method_record, "runs": runs}
    write_text(settings_path, json.dumps(record, indent=2) + "\n")
    done = {(r["case"], r["method"]) for r in rows}
    meta = {"command": command, "machine": machine, "settings": record}
    datasets = build_datasets(settings, label_maps)
    tasks = []  # (dataset name, dataset, index, case id, base id, pending methods)
    for name, dataset in datasets:
        for index, (pair, k, angle) in enumerate(dataset.cases):
            base, case = case_ids(name, pair, k, angle)
            pending = [m for m in methods if (case, m) not in done]
            if pending:
                tasks.append((name, dataset, index, case, base, pending))
    total = sum(len(t[-1]) for t in tasks)
    logger.info(f"{total} registrations to run ({len(rows)} done earlier); case images in {work_dir}")

    warmup = None if args.no_warmup else write_phantom_pair(os.path.join(work_dir, "warmup"))
    env = worker_environment(args.threads)
    workers = {}
    for method in methods:
        if method != "identity":
            worker_settings = {**per_method[method], "threads": args.threads, "warmup": warmup}
            log_path = os.path.join(work_dir, f"worker_{method}.log")
            workers[method] = Worker(method, worker_settings, env, log_path, args.timeout)
    identity = IdentityRunner()
    last_of_base = {t[4]: t[3] for t in tasks}
    written_bases: set[str] = set()
    from tqdm import tqdm

    try:
        with tqdm(total=total, desc="registrations", unit="pair") as progress:
            for name, dataset, index, case_id, base, pending in tasks:
                case = dataset[index]
                case["case_id"] = case_id
                base_dir = os.path.join(work_dir, "cases", base)
                case_dir = os.path.join(base_dir, f"r{case['rotation_deg']:g}")
                paths = write_case(case, base_dir, case_dir, write_fixed=base not in written_bases)
                written_bases.add(base)
                for method in pending:
                    progress.set_postfix_str(f"{method} {case_id}")
                    output = os.path.join(case_dir, method)
                    if method == "identity":
                        result = {**identity.run(paths["fixed"], paths["moving"], output), "error": None}
                    else:
                        result = workers[method].run(paths["fixed"], paths["moving"], output)
                    rows.append(score_row(case, name, method, result))
                    write_rows(csv_path, rows)
                    progress.update(1)
                    if not args.keep_cases:
                        shutil.rmtree(output, ignore_errors=True)
                if not args.keep_cases:
                    shutil.rmtree(case_dir, ignore_errors=True)
                    if last_of_base[base] == case_id:
                        shutil.rmtree(base_dir, ignore_errors=True)
                write_outputs(output_dir, rows, meta, plots=False)
    finally:
        for worker in workers.values():
            worker.close()
    write_rows(csv_path, rows)
    meta["machine"]["load average at end (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = write_outputs(output_dir, rows, meta)
    for check in summary["results"]["targets"]:
        logger.info(f"{'met' if check['met'] else 'NOT met'}: {check['target']} (value {check['value']})")
    logger.info(f"outputs in {output_dir}")
    return 0


def score_row(case: dict, dataset_name: str, method: str, result: dict) -> dict:
    """A row of ``cases.csv`` from a method's result (``matrix`` or ``error``) on a case."""
    import torch

    from scripts.evaluation import score_case

    status, dice, tre = "ok", float("nan"), float("nan")
    matrix = result.get("matrix")
    if result.get("error") is None and matrix is not None:
        matrix = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
        if matrix.shape != (4, 4) or not bool(torch.isfinite(matrix).all()):
            status = "failed: the method returned no finite 4x4 matrix"
    else:
        status = f"failed: {result.get('error') or 'no matrix'}"
    if status == "ok":
        dice, tre = score_case(case, matrix)
    else:
        logger.warning(f"{case['case_id']} {method}: {status}")
        dice = 0.0 if "label" in case["fixed"] else float("nan")
    fixed, moving = case["fixed"], case["moving"]
    return {
        "case": case["case_id"],
        "dataset": dataset_name,
        "method": method,
        "modality_pair": case["modality_pair"],
        "fixed_subject": fixed.get("subject", ""),
        "moving_subject": moving.get("subject", ""),
        "same_subject": bool(case["same_subject"]),
        "rotation_deg": float(case["rotation_deg"]),
        "dice": dice,
        "tre_mm": tre,
        "seconds_compute": _float(result.get("seconds_compute")) if status == "ok" else float("nan"),
        "seconds_end_to_end": _float(result.get("seconds_end_to_end")) if status == "ok" else float("nan"),
        "peak_rss_mb": _float(result.get("peak_rss_mb")),
        "qc_residual_mm": _float(result.get("qc_residual_mm")),
        "qc_similarity": _float(result.get("qc_similarity")),
        "status": status,
    }


if __name__ == "__main__":
    sys.exit(main())

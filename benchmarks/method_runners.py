"""The methods of the benchmark as they run inside a worker: ``run(fixed_path, moving_path, output_dir) -> dict``
with the fixed-to-moving RAS matrix (``matrix``) and the seconds, and the conversions of the baselines' transforms
to the bundle's convention (:mod:`scripts.coordinates`; see ``benchmarks/compare_methods.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import numpy as np

from scripts.transform_io import ras_from_itk_parts, read_itk_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    center = [float(v) for v in parameter_map["CenterOfRotationPoint"]]
    return ras_from_itk_parts(values[:9], values[9:], center)


class KeyMorphOnFiles:
    """The bundle's inference path from two files (``benchmarks/compare_methods.py``, Methods): the inference
    config's preprocessing, network and inferer, then the moving image on the fixed image's native grid
    (:func:`scripts.case_outputs.write_registered`) and ``transform.tfm``.

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
            registration = self.inferer(
                fixed_net,
                moving_net,
                self.network,
                fixed_native=[fixed.get("native")],
                moving_native=[moving.get("native")],
            )
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
        return KeyMorphOnFiles(
            settings["ckpt_path"], settings.get("refine_iterations"), settings.get("overrides"), threads
        )
    if method == "ants":
        return AntsRunner(settings.get("options"), threads)
    if method == "elastix":
        return ElastixRunner(settings.get("options"), threads)
    if method == "identity":
        return IdentityRunner()
    raise ValueError(f"unknown method {method!r}")

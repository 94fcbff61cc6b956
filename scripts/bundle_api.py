"""Use the bundle from Python: the network with its weights, ready for inference.

``monai.bundle.load()`` only builds networks from ``configs/inference.json``; this bundle's configs are YAML, so::

    import sys
    sys.path.insert(0, BUNDLE_DIR)          # e.g. "bundles/keymorph_brain_mri_affine" after `monai.bundle download`
    from scripts.bundle_api import load_network

    net = load_network(BUNDLE_DIR)          # KeypointDetector in eval mode with models/model.pt loaded
    keypoints = net(image)                  # (B, 1, 96, 96, 96) in [0, 1] -> (B, 128, 3) voxel indices

``load_config`` gives the parsed inference config for everything else (``parser.get_parsed_content("evaluator")``,
the preprocessing, the inferer), with any setting overridden as on the command line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts.checkpoints import load_state_dict  # noqa: F401 (part of this module's interface)
from scripts.keypoint_net import KeypointDetector

INFERENCE_CONFIG = os.path.join("configs", "inference.yaml")
METADATA = os.path.join("configs", "metadata.json")


def load_config(bundle_root: str | os.PathLike = ".", config_file: str = INFERENCE_CONFIG, **overrides) -> ConfigParser:
    """The bundle's config (default: the inference config) parsed with its metadata, ``bundle_root`` set, and
    ``overrides`` applied (config IDs, ``#`` for nesting, e.g. ``{"device": "$torch.device('cpu')"}``).

    The bundle root goes on ``sys.path`` (the configs import ``scripts``), as ``PYTHONPATH`` does for the runner.
    """
    root = str(Path(bundle_root).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    parser = ConfigParser()
    parser.read_config(os.path.join(root, config_file))
    parser.read_meta(os.path.join(root, METADATA))
    parser["bundle_root"] = root
    parser.update(overrides)
    return parser


def load_network(
    bundle_root: str | os.PathLike = ".",
    device: str | torch.device = "cpu",
    ckpt_path: str | os.PathLike | None = None,
    config_file: str = INFERENCE_CONFIG,
) -> KeypointDetector:
    """``network_def`` of the inference config with the bundle's weights, on ``device``, in eval mode.

    Args:
        bundle_root: the bundle folder (the one holding ``configs/`` and ``models/``).
        device: where the network goes.
        ckpt_path: weights to load instead of the config's ``ckpt_path`` (``models/model.pt``).
        config_file: the config defining ``network_def``, relative to ``bundle_root``.

    Raises:
        FileNotFoundError: no weights file (``python -m monai.bundle download_large_files`` fetches it).
        RuntimeError: the weights do not fit the network (``load_state_dict`` with ``strict=True``).
    """
    parser = load_config(bundle_root, config_file)
    weights = Path(ckpt_path if ckpt_path is not None else parser.get_parsed_content("ckpt_path"))
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: model weights not found; fetch them with "
            f"`python -m monai.bundle download_large_files --bundle_path {parser['bundle_root']}`"
        )
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(load_state_dict(weights, "cpu"), strict=True)
    return network.to(device).eval()

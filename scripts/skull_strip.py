"""Brain extraction as a MONAI dictionary transform: :class:`SkullStripd`.

The image must be one 3-D volume, a MetaTensor ``(1, D, H, W)`` whose ``affine`` maps voxels to RAS millimetres
(see :mod:`scripts.coordinates`); the pipeline runs ``Orientationd(axcodes="RAS")`` first. The transform zeroes the
image outside the brain and stores the brain mask next to it.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import warnings
from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

from scripts.brain_mask import brain_mask_network, predict_brain_mask
from scripts.checkpoints import load_state_dict
from scripts.cli import as_bool
from scripts.coordinates import apply_affine, grid_around, resample_onto, rotation_angle_deg
from scripts.errors import KeyMorphInputError, first_line
from scripts.hashes import BUNDLE_ROOT
from scripts.head_pose import HeadPoseSearch, foreground
from scripts.image_io import load_onto_grid, source_name

logger = logging.getLogger(__name__)

BACKENDS = ("bundle", "deepbet", "mask", "none")
#: The brain-mask network's weights shipped with the bundle (``skull_strip: bundle``).
BRAIN_MASK_WEIGHTS = os.path.join(BUNDLE_ROOT, "models", "brain_mask.pt")
_RAS = np.array([[0, 1], [1, 1], [2, 1]])
# Room around the head in the upright view deepbet sees again (mm).
UPRIGHT_VIEW_MARGIN_MM = 10.0


class SkullStripd(MapTransform):
    """Zero an image outside the brain and store the brain mask.

    For each key, ``data[key]`` is a MetaTensor ``(1, D, H, W)`` of any intensity unit and any voxel spacing
    (mm), normally RAS-oriented. Afterwards ``data[key]`` is the same tensor (dtype, affine, meta kept) with 0
    outside the brain and the values inside unchanged, and ``data[mask_key]`` is a float32 MetaTensor
    ``(1, D, H, W)`` of 0/1 on the same grid, with a copy of the image's meta (affine, filename, applied
    operations), so it follows the image through later transforms and inverses.

    Backends:

    * ``"bundle"``: the bundle's own brain-mask network (:mod:`scripts.brain_mask`, weights ``weights``, by default
      :data:`BRAIN_MASK_WEIGHTS`), trained on synthetic heads and brains of any contrast in any pose: one pass on
      the image's 2 mm world-aligned grid, whatever its orientation, voxel size or contrast; ``head_pose`` does not
      apply. Loaded once per transform instance, on first use, on ``device``.
    * ``"deepbet"``: the trained deepbet networks shipped in the ``deepbet`` wheel (Fisch et al. 2024), loaded
      once per transform instance, on first use, on ``device`` (CPU by default). The deepbet probability is
      thresholded at ``threshold``, then deepbet's own post-processing keeps the largest connected component and
      fills holes. No resampling to 1 mm is done: deepbet itself rescales the whole image to 128^3 voxels to
      find the brain's bounding box and that box to 256^3 voxels for the segmentation, per axis, so the voxel
      spacing never reaches the networks (Dice to the MNI152 brain stays 0.97-0.98 from 0.7 to 3 mm and at
      1 x 1 x 4 mm). A non-RAS image is reoriented to RAS for deepbet and the mask is oriented back, without
      interpolation. deepbet was trained on upright heads and fails on obliquely turned ones (mask Dice 0.96
      upright, 0.87 at 30 degrees, 0.77-0.80 beyond 45), so with ``head_pose`` the pose of the brain deepbet
      found is measured (:mod:`scripts.head_pose`, any orientation): when it is turned by more than
      ``upright_tolerance`` degrees from the image's array axes, deepbet runs again on the image resampled onto
      a grid along the brain's axes, and that mask comes back onto the image grid through world coordinates
      (trilinear, > 0.5).
    * ``"mask"``: a mask file given by ``data[mask_path_key]`` (NIfTI, any orientation and grid). It is
      reoriented to RAS; if its grid then differs from the image grid it is resampled onto it through world
      coordinates (the two affines) with nearest neighbour. Voxels above ``threshold`` are brain.
    * ``"none"``: the image is already brain-extracted: brain = image > 0 (NaN counts as 0).

    Raises:
        KeyMorphInputError: unknown ``backend`` (in ``__init__``); mask file missing, unreadable or not 3-D;
            image not a single 3-D volume; empty brain mask. The message names the file.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str | Sequence[str] = "mask",
        backend: str = "deepbet",
        mask_path_key: str | Sequence[str] = "mask_path",
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
        device: str | torch.device | None = None,
        head_pose: bool = True,
        upright_tolerance: float = 10.0,
        weights: str | os.PathLike = BRAIN_MASK_WEIGHTS,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if backend not in BACKENDS:
            raise KeyMorphInputError(
                f"unknown skull-stripping backend {backend!r}; valid backends: {', '.join(BACKENDS)}"
            )
        self.backend = backend
        self.mask_keys = ensure_tuple_rep(mask_key, len(self.keys))
        self.mask_path_keys = ensure_tuple_rep(mask_path_key, len(self.keys))
        self.threshold = float(threshold)
        self.device = torch.device("cpu" if device is None else device)
        self._extractor = None  # deepbet.bet.BrainExtraction, loaded on first use
        self.weights = os.fspath(weights)
        self._network = None  # the brain-mask U-Net of backend "bundle", loaded on first use
        self.head_pose, self.upright_tolerance = as_bool(head_pose, "head_pose"), float(upright_tolerance)
        self._pose_search = None  # scripts.head_pose.HeadPoseSearch, built on first use
        self._lock = threading.Lock()  # deepbet keeps per-call state (the bounding box) on the extractor

    def __getstate__(self) -> dict:
        # TorchScript models and locks do not pickle; DataLoader workers reload the model lazily.
        state = self.__dict__.copy()
        state["_extractor"], state["_lock"], state["_pose_search"], state["_network"] = None, None, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, mask_key, mask_path_key in self.key_iterator(d, self.mask_keys, self.mask_path_keys):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(f"SkullStripd needs a MetaTensor (with its affine) in data[{key!r}], got {type(image)}")
            name = source_name(image)
            if image.ndim != 4 or image.shape[0] != 1:
                raise KeyMorphInputError(
                    f"{name}: expected one 3-D volume (1, D, H, W) but got shape {tuple(image.shape)}"
                )
            if self.backend == "bundle":
                brain = self._network_mask(image, name)
            elif self.backend == "deepbet":
                brain = self._deepbet_mask(image, name)
            elif self.backend == "mask":
                brain = self._file_mask(image, d.get(mask_path_key), name)
            else:
                brain = image.as_tensor()[0].detach() > 0  # NaN is not brain
            if not bool(brain.any()):
                source = f"mask file {d.get(mask_path_key)}" if self.backend == "mask" else f"backend {self.backend!r}"
                raise KeyMorphInputError(f"{name}: the brain mask is empty ({source})")
            brain = brain.to(image.device)[None]
            d[key] = image.masked_fill(~brain, 0)
            d[mask_key] = MetaTensor(
                brain.to(torch.float32),
                meta=copy.deepcopy(image.meta),
                applied_operations=copy.deepcopy(image.applied_operations),
            )
        return d

    def _load_extractor(self):
        """deepbet's ``BrainExtraction`` on ``self.device``, loaded once (its TorchScript weights ship in the wheel)."""
        if self._extractor is None:
            try:  # deepbet.bet and deepbet.utils only, never deepbet.ui (its GUI needs customtkinter and a display)
                from deepbet.bet import BrainExtraction
            except ImportError as error:
                raise ImportError(
                    f"backend 'deepbet' needs the deepbet package (pip install deepbet): {error}"
                ) from error
            with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.load, which deepbet's weights need
                warnings.filterwarnings(
                    "ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning
                )
                extractor = BrainExtraction(no_gpu=True)
            extractor.model.to(self.device)
            extractor.bbox_model.to(self.device)
            self._extractor = extractor
        return self._extractor

    def _load_network(self) -> torch.nn.Module:
        """The brain-mask U-Net with its weights on ``self.device``, loaded once."""
        if self._network is None:
            network = brain_mask_network()
            network.load_state_dict(load_state_dict(self.weights))
            self._network = network.to(self.device).eval()
        return self._network

    def _network_mask(self, image: MetaTensor, name: str) -> torch.Tensor:
        """Boolean brain mask ``(D, H, W)`` from the bundle's brain-mask network, on the image's grid."""
        array = torch.nan_to_num(image.as_tensor()[0].detach().to(device="cpu", dtype=torch.float32))
        if float(array.max()) == float(array.min()):
            raise KeyMorphInputError(f"{name}: the image is constant ({float(array.max())}); no brain to extract")
        with self._lock:
            network = self._load_network()
        return predict_brain_mask(network, array, image.affine)

    def _load_pose_search(self) -> HeadPoseSearch:
        """The head-pose search of :mod:`scripts.head_pose` against the MNI152 brain, built once."""
        if self._pose_search is None:
            self._pose_search = HeadPoseSearch.mni152()
        return self._pose_search

    def _run_deepbet(self, array: np.ndarray, name: str) -> np.ndarray:
        """deepbet's boolean mask of a RAS-ordered array."""
        with self._lock:
            extractor = self._load_extractor()
            try:
                with torch.no_grad():
                    probability = extractor.run_model(np.ascontiguousarray(array))
                    return extractor.postprocess(probability > self.threshold)
            except (AssertionError, ValueError) as error:
                # get_bbox asserts on too little foreground; the largest-component step fails on an empty mask.
                raise KeyMorphInputError(f"{name}: deepbet found no brain ({first_line(error)})") from error

    def _deepbet_mask(self, image: MetaTensor, name: str) -> torch.Tensor:
        """Boolean brain mask ``(D, H, W)`` from deepbet, again on an upright view when the brain is turned."""
        array = np.nan_to_num(image.as_tensor()[0].detach().to(device="cpu", dtype=torch.float32).numpy())
        if float(array.max()) == float(array.min()):
            raise KeyMorphInputError(f"{name}: the image is constant ({float(array.max())}); no brain to extract")
        affine = np.asarray(image.affine, dtype=np.float64)
        orientation = nib.io_orientation(affine)
        to_ras = nib.orientations.ornt_transform(orientation, _RAS)
        ras = nib.orientations.apply_orientation(array, to_ras)
        from_ras = nib.orientations.ornt_transform(_RAS, orientation)
        mask = np.ascontiguousarray(nib.orientations.apply_orientation(self._run_deepbet(ras, name), from_ras))
        if self.head_pose:
            frame = self._load_pose_search()(torch.from_numpy(array * mask), torch.from_numpy(affine))
            # the array axes after reorientation to RAS, as unit world directions
            ras_axes = affine[:3, :3] @ nib.orientations.inv_ornt_aff(to_ras, array.shape)[:3, :3]
            ras_axes = torch.from_numpy(ras_axes / np.linalg.norm(ras_axes, axis=0))
            if rotation_angle_deg(ras_axes.T @ frame) > self.upright_tolerance:
                return self._upright_deepbet_mask(array, affine, frame, name)
        return torch.from_numpy(mask.astype(bool))

    def _upright_deepbet_mask(self, array: np.ndarray, affine: np.ndarray, frame: torch.Tensor, name: str):
        """deepbet on a view of the image along the brain's upright ``frame``; the mask back on the image grid.

        The view covers the head (:func:`scripts.head_pose.foreground`) with :data:`UPRIGHT_VIEW_MARGIN_MM` around
        it, and where it leaves the image it is filled with the image's own background level (the median of its
        outer voxel layer): a dark field-of-view edge across the view would look like a head outline to deepbet.
        """
        affine = torch.from_numpy(affine)
        spacing = max(1.0, float(affine[:3, :3].norm(dim=0).min()))  # deepbet rescales to 256^3 voxels anyway
        head = torch.nonzero(foreground(torch.from_numpy(array[::2, ::2, ::2]))).to(torch.float64) * 2
        grid, shape = grid_around(apply_affine(affine, head), spacing, frame, margin_mm=UPRIGHT_VIEW_MARGIN_MM)
        outer_layer = [array[[0, -1]], array[:, [0, -1]], array[:, :, [0, -1]]]
        background = float(np.median(np.concatenate([np.ravel(faces) for faces in outer_layer])))
        identity = torch.eye(4, dtype=torch.float64)
        upright = resample_onto(torch.from_numpy(array - background)[None], affine, grid, shape, identity)[0]
        mask = self._run_deepbet((upright + background).numpy(), name)
        back = resample_onto(torch.from_numpy(mask.astype(np.float32))[None], grid, affine, array.shape, identity)
        return back[0] > 0.5

    def _file_mask(self, image: MetaTensor, path, name: str) -> torch.Tensor:
        """Boolean brain mask ``(D, H, W)`` from a mask file (through :func:`scripts.image_io.load_onto_grid`'s
        checks), on the image grid."""
        if path is None:
            raise KeyMorphInputError(f"{name}: skull-stripping backend 'mask' needs a mask file but none was given")
        return load_onto_grid(os.fspath(path), image, to_register=False)[0] > self.threshold

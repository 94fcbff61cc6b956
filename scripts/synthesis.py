"""SynthSeg-style synthesis of brain MRI of random contrast and resolution from anatomical label maps.

Method
------
Training a contrast-agnostic registration network needs images of any contrast whose anatomy is known exactly.
Following the generative model of SynthSeg (Billot et al., "SynthSeg: Segmentation of brain MRI scans of any
contrast and resolution without retraining", Medical Image Analysis 86, 2023) and SynthMorph (Hoffmann et al.,
"SynthMorph: learning contrast-invariant registration without acquired images", IEEE TMI 41(3), 2022), an image
is drawn from a FreeSurfer-style whole-head label map by:

1. warping the label map with a random smooth, fold-free deformation (nearest neighbour), so every draw is a new
   anatomy;
2. dropping the extra-cerebral labels (>= 500: skull, scalp, eyes, ...) unless the head is kept, as a
   skull-stripped image would look;
3. drawing one Gaussian intensity distribution per label: either fully random (any contrast) or a T1-, T2- or
   PD-like preset per tissue class with a small per-label jitter;
4. partial-volume blur, a multiplicative smooth bias field, an optional thick-slice (or low-resolution) acquisition
   simulated by blurring with the slice profile, downsampling and interpolating back onto the same grid, and
   additive Gaussian noise;
5. rescaling to ``[0, 1]`` between the 0.5th and 99.5th percentiles.

Units
-----
Deformations and slice thicknesses are given in millimetres (converted with the voxel size of the label map's
affine); partial-volume blur in voxels; intensities, noise and bias-field strengths (the standard deviation of
the log-field) are relative to the ``[0, 1]`` range of the tissue means. Tensors are channel-first
``(1, D, H, W)`` in the array order of :mod:`scripts.coordinates`; the outputs share the label map's affine.

All heavy work is vectorised torch on the CPU: smooth fields and blurs are separable, so each is three small
matrix products along the array axes, which is several times faster than ``conv3d`` with one channel.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Orientation, RandomizableTransform, Spacing
from monai.utils.type_conversion import convert_to_dst_type

#: Labels at or above this value are extra-cerebral (skull, scalp, eyes, fat, ...); labels 1..499 are the brain.
EXTRA_CEREBRAL_MIN = 500

#: FreeSurfer labels grouped by the tissue class that sets their preset intensity.
TISSUE_CLASSES: dict[str, tuple[int, ...]] = {
    "background": (0,),
    # cerebral and cerebellar white matter, optic chiasm
    "wm": (2, 41, 7, 46, 85),
    # brain stem and ventral diencephalon: mostly white-matter tracts, slightly darker than WM in T1
    "brainstem": (16, 28, 60),
    # cerebral and cerebellar cortex, hippocampus, amygdala
    "cortex": (3, 42, 8, 47, 17, 53, 18, 54),
    # thalamus, caudate, putamen, accumbens
    "deep_gm": (10, 49, 11, 50, 12, 51, 26, 58),
    # the pallidum is myelinated and iron-rich: brighter than other grey matter in T1, darker in T2
    "pallidum": (13, 52),
    # lateral, inferior-lateral, 3rd, 4th and 5th ventricles and extra-ventricular CSF
    "csf": (4, 43, 5, 44, 14, 15, 24, 72),
}
#: The extra-ventricular CSF: the brain's outer layer, between the cortex and the meninges.
_OUTER_CSF = 24
_CLASS_OF_LABEL = {label: name for name, labels in TISSUE_CLASSES.items() for label in labels}

#: Mean intensity in [0, 1] per tissue class for each preset contrast. Extra-cerebral labels have no preset: what
#: each 5xx label is (fat, muscle, bone, ...) is not documented, so each draws its own mean from
#: ``extra_cerebral_range`` of :class:`SynthesizeImaged`.
CONTRAST_PRESETS: dict[str, dict[str, float]] = {
    "T1": {"background": 0.0, "wm": 0.80, "brainstem": 0.72, "cortex": 0.50, "deep_gm": 0.60, "pallidum": 0.70,
           "csf": 0.15},
    "T2": {"background": 0.0, "wm": 0.30, "brainstem": 0.38, "cortex": 0.55, "deep_gm": 0.45, "pallidum": 0.32,
           "csf": 0.95},
    "PD": {"background": 0.0, "wm": 0.60, "brainstem": 0.63, "cortex": 0.80, "deep_gm": 0.75, "pallidum": 0.68,
           "csf": 0.75},
}  # fmt: skip

#: Bound on each partial derivative of the random displacement (voxels per voxel). By Gershgorin's theorem a
#: Jacobian ``I + J`` with every row of ``|J|`` summing below 1 has a positive determinant, so 1/4 (< 1/3) keeps the
#: deformation free of folds with a margin for the approximate B-spline derivative bound used.
_MAX_DEFORMATION_GRADIENT = 0.25

#: Gaussian full width at half maximum per standard deviation: a slice profile of FWHM ``t`` has sigma ``t / 2.355``.
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Percentiles are estimated on at most this many voxels (a regular subsample): exact enough, and fast for 256^3.
_PERCENTILE_SAMPLES = 2**19


def tissue_class(label: int) -> str:
    """Tissue class (a key of :data:`CONTRAST_PRESETS` entries, or ``"extra_cerebral"``) of a FreeSurfer label.

    Labels >= 500 are extra-cerebral. Unlisted brain labels (vessels, lesions, choroid plexus and other small
    structures) fall back to ``"cortex"``: they are small and their intensities are closest to grey matter.
    """
    if label >= EXTRA_CEREBRAL_MIN:
        return "extra_cerebral"
    return _CLASS_OF_LABEL.get(int(label), "cortex")


def load_label_map(path: str, spacing: float | Sequence[float] | None = None) -> MetaTensor:
    """Load a label map, reorient it to RAS and optionally resample it to ``spacing`` mm (nearest neighbour).

    Args:
        path: NIfTI (or any format MONAI's ``LoadImage`` reads) holding one integer label per voxel.
        spacing: target voxel size in mm (one value for isotropic voxels, or three); None keeps the native grid.

    Returns:
        ``(1, D, H, W)`` int32 ``MetaTensor`` in RAS orientation whose ``.affine`` maps voxel indices to world mm
        of the (resampled) grid.
    """
    label = Orientation(axcodes="RAS", labels=None)(LoadImage(image_only=True, ensure_channel_first=True)(path))
    if spacing is not None:
        # zero padding: voxels of the new grid outside the old field of view are background, not a smeared edge label
        label = Spacing(pixdim=spacing, mode="nearest", padding_mode="zeros")(label)
    return label.round().to(torch.int32)


def _bspline_matrix(size: int, n_points: int) -> torch.Tensor:
    """``(size, n_points)`` weights interpolating ``n_points`` control values spread evenly over ``size`` voxels.

    Cubic B-spline kernels (C2-smooth) centred on the control points; rows are normalised to sum to 1 because the
    kernels of missing control points beyond the image edges would otherwise pull the field towards 0 there.
    """
    step = max(size - 1, 1) / (n_points - 1)
    u = (torch.arange(size, dtype=torch.float32)[:, None] - step * torch.arange(n_points)[None]).abs() / step
    weights = torch.where(u < 1, 2 / 3 - u**2 + u**3 / 2, torch.where(u < 2, (2 - u).clamp(min=0) ** 3 / 6, 0.0))
    return weights / weights.sum(dim=1, keepdim=True)


def _gaussian_matrix(size: int, sigma: float) -> torch.Tensor:
    """``(size, size)`` Gaussian blur of standard deviation ``sigma`` voxels along one axis (identity for 0).

    The kernel is truncated at 3 sigma and renormalised per row, so the edges of the field of view keep their
    intensity instead of fading towards the zero padding of a convolution.
    """
    if sigma <= 0:
        return torch.eye(size)
    offsets = torch.arange(size, dtype=torch.float32)
    distance = offsets[:, None] - offsets[None]
    weights = torch.exp(-0.5 * (distance / sigma) ** 2) * (distance.abs() <= 3 * sigma + 0.5)
    return weights / weights.sum(dim=1, keepdim=True)


def _linear_matrix(size_out: int, size_in: int) -> torch.Tensor:
    """``(size_out, size_in)`` linear interpolation between grids of at least 2 points that span the same extent
    (first and last voxel centres aligned, as ``align_corners=True``)."""
    position = torch.linspace(0, size_in - 1, size_out)
    lower = position.floor().long().clamp(max=size_in - 2)
    fraction = position - lower
    weights = torch.zeros(size_out, size_in)
    rows = torch.arange(size_out)
    weights[rows, lower] = 1 - fraction
    weights[rows, lower + 1] = fraction
    return weights


def _thick_slice_matrix(size: int, spacing: float, thickness: float) -> torch.Tensor:
    """``(size, size)`` operator simulating an acquisition of ``thickness`` mm along one axis of ``spacing`` mm voxels.

    Blurs with a Gaussian slice profile whose FWHM is the thickness, samples ``size * spacing / thickness`` slices
    and interpolates them back linearly onto the original grid. Identity when the slices are no thicker than the
    voxels or the axis is too short to lose resolution.
    """
    n_slices = max(2, round(size * spacing / thickness))
    if thickness <= spacing or n_slices >= size:
        return torch.eye(size)
    blur = _gaussian_matrix(size, thickness / _FWHM_PER_SIGMA / spacing)
    return _linear_matrix(size, n_slices) @ _linear_matrix(n_slices, size) @ blur


def _apply_separable(volume: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply one linear operator per spatial axis: ``(C, D, H, W)`` -> ``(C, D', H', W')`` for matrices of shapes
    ``(D', D)``, ``(H', H)`` and ``(W', W)``."""
    m_d, m_h, m_w = matrices
    channels, _, height, width = volume.shape
    out = torch.matmul(m_d, volume.reshape(channels, -1, height * width)).reshape(channels, -1, height, width)
    out = torch.matmul(m_h, out.reshape(-1, height, width))
    out = torch.matmul(out.reshape(-1, width), m_w.T)
    return out.reshape(channels, m_d.shape[0], m_h.shape[0], m_w.shape[0])


def _smooth_field(coefficients: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Upsample ``(C, n, n, n)`` control-point values to a C2-smooth ``(C, *shape)`` field (cubic B-splines)."""
    return _apply_separable(coefficients, [_bspline_matrix(size, n) for size, n in zip(shape, coefficients.shape[1:])])


def _fold_free(coefficients: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Scale ``(3, n, n, n)`` displacement control values (voxels) so no partial derivative of the field exceeds
    :data:`_MAX_DEFORMATION_GRADIENT`.

    The derivative of a B-spline field is bounded by the largest difference between neighbouring control values
    divided by the control-point spacing (exactly so away from the edges, where rows of :func:`_bspline_matrix` are
    renormalised; the margin below 1/3 covers the edges), so the check is on the control grid, not the dense field.
    """
    steepest = 0.0
    for axis, size in enumerate(shape):
        control_step = max(size - 1, 1) / (coefficients.shape[axis + 1] - 1)
        steepest = max(steepest, float(coefficients.diff(dim=axis + 1).abs().max()) / control_step)
    return coefficients * min(1.0, _MAX_DEFORMATION_GRADIENT / max(steepest, 1e-12))


def _warp_labels(labels: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp ``labels[x + displacement(x)]`` of ``(D, H, W)`` labels by a ``(3, D, H, W)``
    displacement in voxels; samples beyond the edges take the nearest edge voxel.

    An index gather rather than ``grid_sample``: labels stay exact integers of any dtype and it is faster.
    """
    shape = labels.shape
    index = torch.zeros((), dtype=torch.long)
    for axis, size in enumerate(shape):
        grid = torch.arange(size, dtype=torch.float32).view([-1 if a == axis else 1 for a in range(3)])
        index = index * size + (grid + displacement[axis]).round().clamp(0, size - 1).long()
    return labels.reshape(-1)[index.reshape(-1)].reshape(shape)


def _rescale(image: torch.Tensor, percentiles: tuple[float, float]) -> torch.Tensor:
    """Map the ``percentiles`` (in %) of ``image`` to 0 and 1 and clip to ``[0, 1]``.

    Nearest-rank percentiles by ``kthvalue`` (a selection, several times faster than the sort of ``quantile``).
    """
    flat = image.reshape(-1)
    sample = flat[:: max(1, flat.numel() // _PERCENTILE_SAMPLES)]
    low, high = (sample.kthvalue(1 + round(p / 100 * (sample.numel() - 1))).values for p in percentiles)
    return ((image - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)


class SynthesizeImaged(RandomizableTransform, MapTransform):
    """Synthesise a random MR image from a label map (SynthSeg-style generative model, see the module docstring).

    Reads ``data[label_key]``, a ``(1, D, H, W)`` non-negative integer label map (``MetaTensor`` with its affine, or a plain
    tensor taken as 1 mm voxels) and writes:

    * ``data[image_key]``: ``(1, D, H, W)`` float32 image in ``[0, 1]`` with the label map's affine and meta;
    * ``data[label_key]``: the deformed label map (same dtype and meta), extra-cerebral labels set to 0 when the
      skull was dropped, so it is the exact segmentation of the image;
    * ``data[mask_key]``: ``(1, D, H, W)`` float32 brain mask, 1 where the deformed label is in 1..499.

    In brain-only mode the image is exactly 0 outside the brain mask, as after skull stripping. With the whole head
    and ``contrast="random"`` the background (label 0) draws a random intensity too, as in SynthSeg, so a network
    cannot rely on a dark background; the presets keep it dark.

    Args:
        label_key: key of the input label map, replaced by the deformed label map.
        image_key: key the synthetic image is written to.
        mask_key: key the brain mask is written to.
        contrast: ``"random"`` (uniform random mean per label), ``"T1"``, ``"T2"`` or ``"PD"``, or a sequence of
            these to pick from uniformly at each call.
        deform_std: largest standard deviation (mm) of the deformation's control-point displacements; each call
            draws its standard deviation uniformly in ``[0, deform_std]``. 0 disables the deformation. The B-spline
            averaging makes the dense displacement about a third as large as its control values (a few mm at most
            with the default on a 2 mm head), and it is scaled down further if it could fold.
        deform_grid: inclusive range of the number of control points per axis of the deformation.
        label_std_range: range (intensity units) of each label's within-label standard deviation.
        preset_jitter: standard deviation of the per-label offset added to a preset class mean.
        extra_cerebral_range: range the mean of each extra-cerebral label is drawn from with a preset contrast.
        extra_cerebral_csf_probability: probability that an extra-cerebral label instead takes the mean of the
            extra-ventricular CSF (label 24), with any contrast. In real scans the brain's outer CSF often meets
            tissue of its own brightness (bone in T1 and FLAIR, fluid-filled meninges in T2), so its outer edge
            shows no step: a network must learn the brain's shape, not only an intensity edge.
        blur_sigma_range: range (voxels) of the partial-volume Gaussian blur sigma.
        bias_std: largest standard deviation of the log bias field at its control points; drawn uniformly in
            ``[0, bias_std]``.
        bias_grid: number of control points per axis of the bias field.
        resolution_probability: probability of simulating a low-resolution acquisition.
        thickness_range: range (mm) of the slice thickness of that acquisition, along one random axis or, with
            probability 1/4, along all axes.
        noise_std_range: range (intensity units) of the standard deviation of the additive Gaussian noise.
        skull_probability: probability of keeping the extra-cerebral labels (whole head) instead of dropping them.
        percentiles: lower and upper percentiles (%) mapped to 0 and 1 by the final rescaling.
    """

    def __init__(
        self,
        label_key: str = "label",
        image_key: str = "image",
        mask_key: str = "mask",
        contrast: str | Sequence[str] = "random",
        deform_std: float = 3.0,
        deform_grid: tuple[int, int] = (4, 6),
        label_std_range: tuple[float, float] = (0.0, 0.06),
        preset_jitter: float = 0.03,
        extra_cerebral_range: tuple[float, float] = (0.1, 0.9),
        extra_cerebral_csf_probability: float = 0.0,
        blur_sigma_range: tuple[float, float] = (0.3, 1.0),
        bias_std: float = 0.3,
        bias_grid: int = 4,
        resolution_probability: float = 0.5,
        thickness_range: tuple[float, float] = (2.0, 6.0),
        noise_std_range: tuple[float, float] = (0.0, 0.05),
        skull_probability: float = 0.5,
        percentiles: tuple[float, float] = (0.5, 99.5),
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys=[label_key])
        self.contrasts = (contrast,) if isinstance(contrast, str) else tuple(contrast)
        unknown = [c for c in self.contrasts if c != "random" and c not in CONTRAST_PRESETS]
        if unknown or not self.contrasts:
            raise ValueError(f"contrast must be 'random' or one of {sorted(CONTRAST_PRESETS)}, got {contrast!r}")
        if deform_grid[0] < 2 or deform_grid[1] < deform_grid[0] or bias_grid < 2:
            raise ValueError(f"need at least 2 control points per axis, got {deform_grid} and {bias_grid}")
        self.label_key, self.image_key, self.mask_key = label_key, image_key, mask_key
        self.deform_std, self.deform_grid = deform_std, deform_grid
        self.label_std_range, self.preset_jitter = label_std_range, preset_jitter
        self.extra_cerebral_range, self.blur_sigma_range = extra_cerebral_range, blur_sigma_range
        self.extra_cerebral_csf_probability = extra_cerebral_csf_probability
        self.bias_std, self.bias_grid = bias_std, bias_grid
        self.resolution_probability, self.thickness_range = resolution_probability, thickness_range
        self.noise_std_range, self.skull_probability, self.percentiles = noise_std_range, skull_probability, percentiles

    def randomize(self, data: torch.Tensor) -> None:
        """Draw every random quantity of one synthesis for the label map ``data`` (only its largest label is used).

        The voxel-level noise is drawn later by a torch generator seeded here, so a seed fixes the whole image.
        """
        super().randomize(None)
        n_labels = int(data.max()) + 1
        self._keep_skull = self.R.rand() < self.skull_probability
        self._contrast = self.contrasts[self.R.randint(len(self.contrasts))]

        n_control = self.R.randint(self.deform_grid[0], self.deform_grid[1] + 1)
        self._deform_mm = self.R.normal(0, self.R.uniform(0, self.deform_std), (3, n_control, n_control, n_control))

        if self._contrast == "random":
            means = self.R.uniform(0, 1, n_labels)
        else:
            preset = CONTRAST_PRESETS[self._contrast]
            classes = [tissue_class(label) for label in range(n_labels)]
            means = np.array([preset.get(c, 0.0) for c in classes]) + self.R.normal(0, self.preset_jitter, n_labels)
            extra = np.array([c == "extra_cerebral" for c in classes])
            means[extra] = self.R.uniform(*self.extra_cerebral_range, int(extra.sum()))
            # air is dark in every preset contrast: no jitter on the background
            means[0] = 0.0
        if self.extra_cerebral_csf_probability > 0 and n_labels > EXTRA_CEREBRAL_MIN:
            extra = np.arange(EXTRA_CEREBRAL_MIN, n_labels)
            like_csf = extra[self.R.rand(len(extra)) < self.extra_cerebral_csf_probability]
            means[like_csf] = means[_OUTER_CSF] + self.R.normal(0, self.preset_jitter, len(like_csf))
        stds = self.R.uniform(*self.label_std_range, n_labels)
        if not self._keep_skull:
            # a skull-stripped image has a zero background; the brain's blurred edge fades into it
            means[0] = stds[0] = 0.0
        self._means = torch.as_tensor(np.clip(means, 0, 1), dtype=torch.float32)
        self._stds = torch.as_tensor(stds, dtype=torch.float32)

        self._blur_sigma = self.R.uniform(*self.blur_sigma_range)
        self._bias_log = self.R.normal(0, self.R.uniform(0, self.bias_std), (1,) + (self.bias_grid,) * 3)
        self._thick_axes: tuple[int, ...] = ()
        if self.R.rand() < self.resolution_probability:
            axis = self.R.randint(4)
            self._thick_axes = (0, 1, 2) if axis == 3 else (axis,)
        self._thickness = self.R.uniform(*self.thickness_range)
        self._noise_std = self.R.uniform(*self.noise_std_range)
        self._noise_seed = int(self.R.randint(2**31))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        label_in = d[self.label_key]
        labels = torch.as_tensor(label_in.as_tensor() if isinstance(label_in, MetaTensor) else label_in)[0]
        spacing = label_in.pixdim.tolist() if isinstance(label_in, MetaTensor) else [1.0, 1.0, 1.0]
        shape = labels.shape
        self.randomize(labels)
        generator = torch.Generator().manual_seed(self._noise_seed)

        # a. random anatomy: smooth displacement (mm -> voxels per axis), made fold-free, nearest-neighbour warp
        control_vox = torch.as_tensor(self._deform_mm, dtype=torch.float32) / torch.tensor(spacing).view(3, 1, 1, 1)
        labels = _warp_labels(labels, _smooth_field(_fold_free(control_vox, shape), shape))
        # g. whole head or brain only (applied to the labels so the image and its segmentation agree)
        if not self._keep_skull:
            labels = torch.where(labels >= EXTRA_CEREBRAL_MIN, torch.zeros_like(labels), labels)
        mask = ((labels > 0) & (labels < EXTRA_CEREBRAL_MIN)).float()

        # b. one Gaussian per label, looked up by label value
        index = labels.long()
        image = self._means[index] + self._stds[index] * torch.randn(shape, generator=generator)
        image = image[None]
        # c. + e. partial-volume blur and the optional thick-slice acquisition are both linear per axis: one pass
        blur = [_gaussian_matrix(size, self._blur_sigma) for size in shape]
        for axis in self._thick_axes:
            blur[axis] = _thick_slice_matrix(shape[axis], spacing[axis], self._thickness) @ blur[axis]
        # d. the bias field (coil sensitivity) multiplies the object before the acquisition blurs it
        bias = torch.exp(_smooth_field(torch.as_tensor(self._bias_log, dtype=torch.float32), shape))
        image = _apply_separable(image * bias, blur)
        # f. scanner noise
        image = image + self._noise_std * torch.randn(image.shape, generator=generator)
        # h. robust rescaling to [0, 1]; brain-only images are exactly 0 outside the brain
        image = _rescale(image, self.percentiles)
        if not self._keep_skull:
            image = image * mask

        d[self.image_key] = convert_to_dst_type(image, label_in, dtype=torch.float32)[0]
        d[self.label_key] = convert_to_dst_type(labels[None], label_in)[0]
        d[self.mask_key] = convert_to_dst_type(mask[None], label_in, dtype=torch.float32)[0]
        return d


def synthesize(
    label_map: torch.Tensor, contrast: str | Sequence[str] = "random", seed: int = 0, skull: bool = False, **kwargs
) -> dict[str, torch.Tensor]:
    """Synthesise one image from a ``(1, D, H, W)`` label map with :class:`SynthesizeImaged`.

    Args:
        label_map: integer label map, ideally a ``MetaTensor`` (its affine gives the voxel size in mm).
        contrast: ``"random"``, ``"T1"``, ``"T2"``, ``"PD"`` or a sequence of these.
        seed: random seed; the same seed gives the same image.
        skull: keep the extra-cerebral labels (whole head) instead of a skull-stripped brain.
        kwargs: further arguments of :class:`SynthesizeImaged` (not its keys or ``skull_probability``).

    Returns:
        ``{"image", "label", "mask"}``: ``(1, D, H, W)`` float32 image in ``[0, 1]``, the deformed label map and the
        float32 brain mask, all with the label map's affine.
    """
    transform = SynthesizeImaged(contrast=contrast, skull_probability=float(skull), **kwargs)
    transform.set_random_state(seed)
    return transform({"label": label_map})

"""Closed-form fits of a transform to corresponding keypoints: affine, rigid, similarity and thin-plate spline.

:data:`ALIGNERS` names them all behind one interface (a :class:`FittedTransform`: the matrix and the point map).
All fits are batched and differentiable. They take ``source`` and ``target`` points of shape ``(B, N, 3)`` (the
same row of each is one pair) and optional non-negative ``weights`` ``(B, N)``, and return the transform that maps
``source`` onto ``target`` in the least-squares sense. Registration fits fixed keypoints (source) to moving
keypoints (target), in world millimetres, which gives the fixed-to-moving matrix directly
(see :mod:`scripts.coordinates`). Solves run in float64: near-degenerate point sets are common early in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from scripts.coordinates import apply_affine


def _weights(points: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``(B, N, 1)`` float64 weights that sum to 1 per batch item (uniform when ``weights`` is None)."""
    if weights is None:
        weights = torch.ones(points.shape[:2], dtype=torch.float64, device=points.device)
    weights = weights.to(torch.float64).clamp(min=0)
    return (weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12))[..., None]


def _homogeneous_matrix(linear: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` and ``(B, 3)`` -> ``(B, 4, 4)``."""
    matrix = torch.zeros(linear.shape[0], 4, 4, dtype=linear.dtype, device=linear.device)
    matrix[:, :3, :3] = linear
    matrix[:, :3, 3] = translation
    matrix[:, 3, 3] = 1.0
    return matrix


def fit_affine(
    source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None, ridge: float = 1e-8
) -> torch.Tensor:
    """Weighted least-squares affine ``A`` (``(B, 4, 4)``, float64) minimising ``sum w |A s - t|^2``.

    Points are centred and scaled by their weighted spread before the normal equations are solved, and ``ridge``
    (relative to that unit spread) regularises the linear part towards the best scaled identity, so coplanar or
    collinear points give a finite, well-behaved answer instead of NaN.
    """
    src, tgt = source.to(torch.float64), target.to(torch.float64)
    w = _weights(src, weights)
    src_mean, tgt_mean = (w * src).sum(1), (w * tgt).sum(1)
    src_c, tgt_c = src - src_mean[:, None], tgt - tgt_mean[:, None]
    scale = ((w * src_c.pow(2)).sum((1, 2)) + 1e-12).sqrt()[:, None, None]
    src_n = src_c / scale
    cov_ss = src_n.transpose(1, 2) @ (w * src_n)  # (B, 3, 3)
    cov_ts = tgt_c.transpose(1, 2) @ (w * src_n)  # (B, 3, 3)
    eye = torch.eye(3, dtype=torch.float64, device=src.device)
    # Ridge pulls the linear part towards  trace(cov_ts)/trace(cov_ss) * I, i.e. a scaled identity, not to zero.
    iso = cov_ts.diagonal(dim1=1, dim2=2).sum(-1) / cov_ss.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-12)
    rhs = cov_ts + ridge * iso[:, None, None] * eye
    linear = torch.linalg.solve((cov_ss + ridge * eye).transpose(1, 2), rhs.transpose(1, 2)).transpose(1, 2) / scale
    return _homogeneous_matrix(linear, tgt_mean - (linear @ src_mean[..., None])[..., 0])


def _procrustes(
    source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, with_scale: bool
) -> torch.Tensor:
    """Weighted Kabsch-Umeyama fit: rotation (proper, det = +1), translation, and an isotropic scale if asked."""
    src, tgt = source.to(torch.float64), target.to(torch.float64)
    w = _weights(src, weights)
    src_mean, tgt_mean = (w * src).sum(1), (w * tgt).sum(1)
    src_c, tgt_c = src - src_mean[:, None], tgt - tgt_mean[:, None]
    cross = src_c.transpose(1, 2) @ (w * tgt_c)  # H = sum w q_src q_tgt^T, (B, 3, 3)
    u, s, vh = torch.linalg.svd(cross)
    v = vh.transpose(1, 2)
    # The textbook reflection fix: flip the sign of the last singular direction when det(V U^T) < 0.
    signs = torch.ones_like(s)
    signs[:, 2] = torch.sign(torch.linalg.det(v @ u.transpose(1, 2)))
    signs[:, 2] = torch.where(signs[:, 2] == 0, torch.ones_like(signs[:, 2]), signs[:, 2])
    rotation = v @ torch.diag_embed(signs) @ u.transpose(1, 2)
    if with_scale:
        variance = (w * src_c.pow(2)).sum((1, 2)).clamp(min=1e-12)
        rotation = rotation * ((s * signs).sum(-1) / variance)[:, None, None]
    return _homogeneous_matrix(rotation, tgt_mean - (rotation @ src_mean[..., None])[..., 0])


def fit_rigid(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation and translation ``(B, 4, 4)`` minimising ``sum w |R s + t - t'|^2`` (never a reflection)."""
    return _procrustes(source, target, weights, with_scale=False)


def fit_similarity(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Isotropic scale, rotation and translation ``(B, 4, 4)`` (Umeyama's least-squares similarity)."""
    return _procrustes(source, target, weights, with_scale=True)


class ThinPlateSpline:
    """A 3-D thin-plate spline ``f(x) = A [x; 1] + sum_i w_i U(|x - c_i|)`` fitted with smoothing ``lam``.

    Solves ``[[K + lam I, P], [P^T, 0]] [w; a] = [t; 0]`` with the kernel ``U(r) = r^2 log r`` on the control points
    ``c = source``. ``lam = 0`` interpolates the points exactly; a large ``lam`` tends to the affine fit. Kernel
    distances use the source points' scale (mm / spread) so ``lam`` means the same for any unit.

    Args:
        source, target: ``(B, N, 3)`` control points and where they go.
        lam: smoothing weight (>= 0).
    """

    def __init__(self, source: torch.Tensor, target: torch.Tensor, lam: float = 0.0):
        src, tgt = source.to(torch.float64), target.to(torch.float64)
        batch, n_points = src.shape[:2]
        self.center = src.mean(1, keepdim=True)
        self.scale = src.sub(self.center).pow(2).sum(-1).mean(-1).sqrt().clamp(min=1e-12)[:, None, None]
        self.controls = (src - self.center) / self.scale
        kernel = self._kernel(self.controls, self.controls)
        kernel = kernel + lam * torch.eye(n_points, dtype=torch.float64, device=src.device)
        poly = torch.cat([self.controls, torch.ones(batch, n_points, 1, dtype=torch.float64, device=src.device)], -1)
        system = torch.zeros(batch, n_points + 4, n_points + 4, dtype=torch.float64, device=src.device)
        system[:, :n_points, :n_points] = kernel
        system[:, :n_points, n_points:] = poly
        system[:, n_points:, :n_points] = poly.transpose(1, 2)
        rhs = torch.cat([tgt, torch.zeros(batch, 4, 3, dtype=torch.float64, device=src.device)], 1)
        solution = torch.linalg.solve(system, rhs)
        self.kernel_weights, self.poly_weights = solution[:, :n_points], solution[:, n_points:]

    @staticmethod
    def _kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``U(r) = r^2 log r`` between ``(B, M, 3)`` and ``(B, N, 3)`` points; ``U(0) = 0``."""
        r2 = torch.cdist(a, b).pow(2)
        return 0.5 * r2 * torch.log(r2.clamp(min=1e-20))

    def __call__(self, points: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """Map ``(B, M, 3)`` points; evaluated ``chunk_size`` points at a time (a 128^3 grid with 512 controls in
        chunks of 65536 needs about 0.3 GB instead of 8 GB)."""
        out = []
        for chunk in points.split(chunk_size, dim=1):
            x = (chunk.to(torch.float64) - self.center) / self.scale
            affine_part = x @ self.poly_weights[:, :3] + self.poly_weights[:, 3:]
            out.append(affine_part + self._kernel(x, self.controls) @ self.kernel_weights)
        return torch.cat(out, 1)


def fit_residual(transform: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance ``(B,)`` between a fitted ``(B, 4, 4)`` transform of ``source`` and ``target``."""
    moved = apply_affine(transform, source.to(transform.dtype))
    return (moved - target.to(transform.dtype)).pow(2).sum(-1).mean(-1).sqrt()


@dataclass
class FittedTransform:
    """What every aligner returns: the fitted fixed-to-moving transform as its ``(B, 4, 4)`` world matrix (for a
    thin-plate spline, the weighted affine fit of the same points) and its point map (:meth:`__call__`).

    ``spline`` is the thin-plate spline when the transform is one (a 4x4 matrix is then only its affine part), else
    None: the matrix is the whole transform.
    """

    matrix: torch.Tensor
    spline: ThinPlateSpline | None = None

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Map ``(B, M, 3)`` fixed-world points to moving-world points."""
        return apply_affine(self.matrix, points) if self.spline is None else self.spline(points)


def _matrix_aligner(fit_matrix: Callable) -> Callable:
    def align(source, target, weights=None, tps_lambda: float = 0.0) -> FittedTransform:
        return FittedTransform(fit_matrix(source, target, weights))

    align.__doc__ = f"{fit_matrix.__name__} as an aligner (``tps_lambda`` unused)."
    return align


def fit_thin_plate_spline(source, target, weights=None, tps_lambda: float = 0.0) -> FittedTransform:
    """A :class:`ThinPlateSpline` through the points (unweighted, smoothing ``tps_lambda``) with the weighted
    affine fit as its matrix."""
    return FittedTransform(fit_affine(source, target, weights), ThinPlateSpline(source, target, lam=tps_lambda))


#: Every aligner by name: ``aligner(source, target, weights=None, tps_lambda=0.0) -> FittedTransform``.
ALIGNERS = {
    "affine": _matrix_aligner(fit_affine),
    "rigid": _matrix_aligner(fit_rigid),
    "similarity": _matrix_aligner(fit_similarity),
    "tps": fit_thin_plate_spline,
}
#: The aligners whose transform is one 4x4 matrix: those inference offers (and the turn search compares).
MATRIX_ALIGNERS = ("affine", "rigid", "similarity")

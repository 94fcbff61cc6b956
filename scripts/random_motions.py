"""Random motions of the world: every rotation (and affine move) this bundle draws or builds, in one place.

All are ``(4, 4)`` float64 world matrices in RAS mm (:mod:`scripts.coordinates`) acting on points about a centre:

* :func:`misalignment`: the robustness sweep's move ``M = C(c) Tr(t) R(axis, angle) S(s) C(-c)``, a rotation by
  EXACTLY ``angle`` about ``axis`` (:func:`axis_angle_rotation`, Rodrigues' formula) after a scale, with a
  translation; its net rotation angle (:func:`scripts.coordinates.rotation_angle_deg`) is ``angle``. With
  :func:`random_axis` (uniform on the sphere) it also builds the demo's and the benchmarks' known moves.
* :func:`random_affine_matrix`: the training augmentation's and the synthetic test set's draw, ``T = C Tr R Sh S
  C^-1`` with rotations about x, y and z, shear and scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def random_axis(rng: np.random.RandomState) -> np.ndarray:
    """A unit vector ``(3,)`` uniform on the sphere (a normalised isotropic Gaussian draw)."""
    while True:
        axis = rng.normal(size=3)
        norm = np.linalg.norm(axis)
        if norm > 1e-8:
            return axis / norm


def axis_angle_rotation(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` by ``angle_deg`` degrees about the unit ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    cross = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    angle = math.radians(angle_deg)
    return np.eye(3) * math.cos(angle) + math.sin(angle) * cross + (1 - math.cos(angle)) * np.outer(a, a)


def misalignment(
    angle_deg: float,
    axis: Sequence[float],
    scale: Sequence[float],
    translation_mm: Sequence[float],
    center_mm: Sequence[float],
) -> torch.Tensor:
    """The move ``M = C(c) Tr(t) R(axis, angle) S(s) C(-c)`` of the module docstring, ``(4, 4)`` float64 (world mm).

    Args:
        angle_deg: net rotation angle in degrees.
        axis: ``(3,)`` rotation axis (normalised here).
        scale: ``(3,)`` scale per world axis, applied before the rotation.
        translation_mm: ``(3,)`` translation in mm, applied after the rotation.
        center_mm: ``(3,)`` world point (mm) the rotation and scale are about.
    """
    center = np.asarray(center_mm, dtype=np.float64)
    linear = axis_angle_rotation(axis, angle_deg) @ np.diag(np.asarray(scale, dtype=np.float64))
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = center - linear @ center + np.asarray(translation_mm, dtype=np.float64)
    return torch.from_numpy(matrix)


def random_affine_matrix(
    rng: np.random.RandomState,
    rotate_range: float = math.pi,
    scale_range: float = 0.2,
    shear_range: float = 0.1,
    translate_range: Sequence[float] = (0.0, 0.0, 0.0),
    center: Sequence[float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """A random world affine ``(4, 4)`` float64 about ``center`` (mm).

    ``T = C Tr R Sh S C^-1``: scale ``1 +- scale_range`` per axis, shear ``+- shear_range`` (the three upper
    off-diagonal terms), rotation by angles ``+- rotate_range`` radians about x, then y, then z, translation
    ``+- translate_range`` mm per axis, all uniform.
    """
    angles = rng.uniform(-rotate_range, rotate_range, 3)
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        rotation = turn @ rotation
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = rng.uniform(-shear_range, shear_range, 3)
    scale = np.diag(rng.uniform(1 - scale_range, 1 + scale_range, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ shear @ scale
    center = np.asarray(center, dtype=np.float64)
    matrix[:3, 3] = center - matrix[:3, :3] @ center + rng.uniform(-1, 1, 3) * np.asarray(translate_range)
    return torch.from_numpy(matrix)

"""Random motions of the world: every rotation (and affine move) this bundle draws or builds, in one place.

All are ``(4, 4)`` float64 world matrices in RAS mm (:mod:`scripts.coordinates`) acting on points about a centre:

* :func:`misalignment`: the robustness sweep's move ``M = C(c) Tr(t) R(axis, angle) S(s) C(-c)``, a rotation by
  EXACTLY ``angle`` about ``axis`` (:func:`axis_angle_rotation`, Rodrigues' formula) after a scale, with a
  translation; its net rotation angle (:func:`scripts.coordinates.rotation_angle_deg`) is ``angle``. With
  :func:`random_axis` (uniform on the sphere) it also builds the demo's and the benchmarks' known moves.
* :func:`random_affine_matrix`: the training augmentation's and the synthetic test set's draw, ``T = C Tr R Sh S
  C^-1`` with rotations about x, y and z, shear and scale; :class:`RandWorldAffined` applies it to images, masks,
  labels and points (the training augmentation) and records the applied matrix so evaluation knows the truth.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from scripts.coordinates import affine_of, apply_affine


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


def image_center(image: torch.Tensor) -> torch.Tensor:
    """World coordinates ``(3,)`` of the centre of an image's field of view."""
    middle = torch.tensor([(s - 1) / 2 for s in image.shape[1:]], dtype=torch.float64)
    return apply_affine(affine_of(image), middle[None])[0]


def field_of_view(image: torch.Tensor) -> torch.Tensor:
    """Extent ``(3,)`` in mm of an image's field of view along its voxel axes."""
    return affine_of(image)[:3, :3].norm(dim=0) * torch.tensor(image.shape[1:], dtype=torch.float64)


class RandWorldAffined(RandomizableTransform, MapTransform):
    """Move images, masks, labels and points by one random affine ``T`` of the world (the training augmentation).

    The move is exact and costs nothing: each image keeps its voxels and gets the voxel-to-world matrix
    ``T @ affine``, so its content now lies at ``T p`` for every point ``p`` it held; point sets ``(N, 3)`` (world
    mm) under ``point_keys`` become ``T p``. ``T`` rotates about the first image's field-of-view centre and is
    written to ``data[matrix_key]`` (``(4, 4)`` float64, old world -> new world); identity when not applied.

    Args:
        keys: images, masks and label maps (MetaTensors) to move.
        point_keys: ``(N, 3)`` world point sets to move.
        prob: probability of applying a random affine.
        rotate_range: maximum rotation about each axis, radians (pi: any orientation).
        scale_range: maximum relative scaling per axis (0.2: 0.8 to 1.2).
        shear_range: maximum shear term.
        translate_range: maximum translation as a fraction of the field of view per axis.
        matrix_key: where the applied matrix goes.
    """

    def __init__(
        self,
        keys: KeysCollection,
        point_keys: KeysCollection = (),
        prob: float = 1.0,
        rotate_range: float = math.pi,
        scale_range: float = 0.2,
        shear_range: float = 0.1,
        translate_range: float = 0.1,
        matrix_key: str = "world_transform",
        allow_missing_keys: bool = False,
    ):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.point_keys = [point_keys] if isinstance(point_keys, str) else list(point_keys)
        self.rotate_range, self.scale_range = rotate_range, scale_range
        self.shear_range, self.translate_range = shear_range, translate_range
        self.matrix_key = matrix_key
        self.matrix = torch.eye(4, dtype=torch.float64)

    def randomize(self, reference: torch.Tensor) -> None:
        super().randomize(None)
        self.matrix = torch.eye(4, dtype=torch.float64)
        if self._do_transform:
            self.matrix = random_affine_matrix(
                self.R,
                self.rotate_range,
                self.scale_range,
                self.shear_range,
                (self.translate_range * field_of_view(reference)).tolist(),
                image_center(reference).tolist(),
            )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        self.randomize(d[keys[0]])
        for key in keys:
            moved = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(d[key])
            moved = moved.clone()
            moved.affine = self.matrix @ affine_of(moved)
            d[key] = moved
        for key in self.point_keys:
            if key in d:
                d[key] = apply_affine(self.matrix.to(torch.as_tensor(d[key]).dtype), torch.as_tensor(d[key]))
        d[self.matrix_key] = self.matrix.clone()
        return d

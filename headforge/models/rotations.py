"""Rotations shared by every model and stage: one Rodrigues formula for NumPy arrays and torch tensors.

The NumPy form serves the FLAME fit and the animation rig; the torch form is traced into ONNX by the
FLAME layer. Both run the same expression below, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

Array = TypeVar("Array")

# Added to the squared angle: the formula (and its gradient) stays finite at zero rotation, where it
# gives the identity; at any real angle the change is below float64 resolution.
_ANGLE_EPS_SQUARED = 1e-24


def _namespace(array: Any) -> Any:
    if isinstance(array, np.ndarray | np.generic):
        return np
    import torch

    return torch


def rodrigues(axis_angle: Array) -> Array:
    """Axis-angle vectors (..., 3), angle in radians, to rotation matrices (..., 3, 3):
    R = cos θ I + sin θ [k]× + (1 − cos θ) k kᵀ with k the unit axis."""
    xp = _namespace(axis_angle)
    v: Any = axis_angle
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    angle = xp.sqrt(x * x + y * y + z * z + _ANGLE_EPS_SQUARED)
    kx, ky, kz = x / angle, y / angle, z / angle
    cos, sin = xp.cos(angle), xp.sin(angle)
    versine = 1.0 - cos
    entries = [
        cos + kx * kx * versine, kx * ky * versine - kz * sin, kx * kz * versine + ky * sin,
        ky * kx * versine + kz * sin, cos + ky * ky * versine, ky * kz * versine - kx * sin,
        kz * kx * versine - ky * sin, kz * ky * versine + kx * sin, cos + kz * kz * versine,
    ]  # fmt: skip
    matrices: Array = xp.stack(entries, -1).reshape(*v.shape[:-1], 3, 3)
    return matrices

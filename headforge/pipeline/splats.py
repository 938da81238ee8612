"""Splats: surface-bound 2D Gaussians sampled on a textured mesh.

Points are drawn area-weighted (a triangle is picked with probability proportional to its area,
then a uniform barycentric point inside it), deterministically for a given seed. Each point is a flat
Gaussian in its triangle's tangent plane: the rotation's columns are (edge direction, normal ×
edge, normal), the two tangent scales come from the local sampling density (distance to the nearest
neighbours), the scale along the normal is a small epsilon, the color is the texture at the point's
UV, and the opacity is constant. Works on any topology (`uv_faces` seams included). Each splat keeps
its binding to the mesh (`Splats.binding`: triangle, barycentrics, local frame; `rig.py`), so it can
follow the mesh when it is animated.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from headforge.errors import InvalidOptionError
from headforge.pipeline.geometry import (
    face_normals,
    matrix_to_quaternion_wxyz,
    sample_uv_bilinear,
    triangle_areas,
)
from headforge.pipeline.rig import bind_splats
from headforge.pipeline.types import Mesh, Splats

MAX_SPLATS = 1_000_000
DEFAULT_OPACITY = 0.9
# Neighbours used for the local density, and the Gaussian's sigma as a fraction of the local spacing.
DENSITY_NEIGHBOURS = 4
SIGMA_PER_SPACING = 1.0
# Local spacing is kept within these multiples of the mean spacing sqrt(area / count).
MIN_SPACING_RATIO, MAX_SPACING_RATIO = 0.5, 2.0
NORMAL_SCALE_RATIO = 1e-3  # epsilon along the normal, relative to the tangent scale


def sample_surface(
    mesh: Mesh, count: int, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """`count` area-weighted points on the mesh: triangle index, barycentrics (N, 3) and positions (N, 3)."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    areas = triangle_areas(vertices, faces)
    cumulative = np.cumsum(areas)
    if not np.isfinite(cumulative[-1]) or cumulative[-1] <= 0:
        raise InvalidOptionError("cannot sample splats on a mesh with zero or non-finite area")
    rng = np.random.default_rng(seed)
    triangles = np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right")
    triangles = np.minimum(triangles, len(faces) - 1)
    root = np.sqrt(rng.random(count))
    second = rng.random(count)
    bary = np.stack([1.0 - root, root * (1.0 - second), root * second], axis=1)
    corners = vertices[faces[triangles]]  # (N, 3, 3)
    positions = np.einsum("nk,nkc->nc", bary, corners)
    return triangles, bary, positions


def _texture_colors(texture: NDArray[np.uint8], uv: NDArray[np.float64]) -> NDArray[np.float32]:
    """Bilinear texture colors in [0, 1] at UVs (v up; texture row 0 at v = 1)."""
    return sample_uv_bilinear(texture, uv[:, 0], uv[:, 1]).astype(np.float32) / 255.0


def sample_splats(
    mesh: Mesh,
    texture: NDArray[np.uint8],
    count: int = 8192,
    seed: int = 0,
    opacity: float = DEFAULT_OPACITY,
) -> Splats:
    """`count` surface-aligned 2D Gaussians on `mesh` (any frame; the pipeline passes the head frame),
    colored from `texture` through the mesh's UVs. Same inputs and seed, same splats."""
    if (
        isinstance(count, bool)
        or not isinstance(count, int | np.integer)
        or not 1 <= int(count) <= MAX_SPLATS
    ):
        raise InvalidOptionError(
            f"splat count must be an integer from 1 to {MAX_SPLATS}, got {count!r}",
            details={"splats": str(count)},
        )
    if not 0.0 < opacity < 1.0:
        raise InvalidOptionError(f"opacity must lie in (0, 1), got {opacity}")
    texture = np.asarray(texture)
    if texture.dtype != np.uint8 or texture.ndim != 3 or texture.shape[2] != 3:
        raise InvalidOptionError(
            "splats need an RGB uint8 texture (S, S, 3)", details={"shape": list(texture.shape)}
        )
    count = int(count)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    triangles, bary, means = sample_surface(mesh, count, seed)

    # Tangent frame per triangle: first edge, normal x edge, normal.
    edge = vertices[faces[:, 1]] - vertices[faces[:, 0]]
    normal = face_normals(vertices, faces)
    tangent = edge / np.maximum(np.linalg.norm(edge, axis=1, keepdims=True), 1e-30)
    frames = np.stack([tangent, np.cross(normal, tangent), normal], axis=2)  # columns
    rotations = matrix_to_quaternion_wxyz(frames)[triangles]  # once per triangle, not per splat

    # Tangent scale from the local sampling density.
    total_area = float(triangle_areas(vertices, faces).sum())
    mean_spacing = np.sqrt(total_area / count)
    if count > DENSITY_NEIGHBOURS:
        distances, _ = cKDTree(means).query(means, k=DENSITY_NEIGHBOURS + 1)
        radius = distances[:, -1]
        # k neighbours within radius r on a surface: density k / (pi r^2), spacing 1 / sqrt(density).
        spacing = radius * np.sqrt(np.pi / DENSITY_NEIGHBOURS)
    else:
        spacing = np.full(count, mean_spacing)
    spacing = np.clip(spacing, MIN_SPACING_RATIO * mean_spacing, MAX_SPACING_RATIO * mean_spacing)
    sigma = SIGMA_PER_SPACING * spacing
    scales = np.stack([sigma, sigma, sigma * NORMAL_SCALE_RATIO], axis=1)

    uv_faces = faces if mesh.uv_faces is None else np.asarray(mesh.uv_faces, dtype=np.int64)
    uvs = np.asarray(mesh.uvs, dtype=np.float64)
    uv = np.einsum("nk,nkc->nc", bary, uvs[uv_faces[triangles]])
    colors = _texture_colors(texture, uv)

    return Splats(
        means=means.astype(np.float32),
        normals=normal[triangles].astype(np.float32),
        colors=colors,
        opacities=np.full(count, opacity, dtype=np.float32),
        scales=scales.astype(np.float32),
        rotations=rotations.astype(np.float32),
        binding=bind_splats(vertices, faces, triangles, bary, means, rotations, scales),
    )

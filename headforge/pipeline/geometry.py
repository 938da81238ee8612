"""Shared mesh math for the geometry stages: normals, areas, boundaries, rigid fits, UV rasterization
and UV texture lookup.

Everything here works on any triangle mesh (468-vertex face mesh, 5023-vertex FLAME, templates).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from numpy.typing import NDArray


def triangle_cross(vertices: NDArray[np.floating], faces: NDArray[np.integer]) -> NDArray[np.float64]:
    """Per-face (v1 - v0) x (v2 - v0): direction is the right-hand normal, length is twice the area."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    return np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])


def triangle_areas(vertices: NDArray[np.floating], faces: NDArray[np.integer]) -> NDArray[np.float64]:
    """Per-face area (3D) or absolute area (2D input is padded with z = 0)."""
    v = np.asarray(vertices, dtype=np.float64)
    if v.shape[1] == 2:
        v = np.pad(v, ((0, 0), (0, 1)))
    return 0.5 * np.linalg.norm(triangle_cross(v, faces), axis=1)


def signed_areas_2d(points: NDArray[np.floating], faces: NDArray[np.integer]) -> NDArray[np.float64]:
    """Signed area per triangle of a 2D layout: positive when counter-clockwise (y up)."""
    p = np.asarray(points, dtype=np.float64)
    a, b, c = p[faces[:, 0]], p[faces[:, 1]], p[faces[:, 2]]
    return 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))


def face_normals(vertices: NDArray[np.floating], faces: NDArray[np.integer]) -> NDArray[np.float64]:
    """Unit right-hand normals per face (zero for degenerate faces)."""
    n = triangle_cross(vertices, faces)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, length, out=np.zeros_like(n), where=length > 0)


def vertex_normals(vertices: NDArray[np.floating], faces: NDArray[np.integer]) -> NDArray[np.float64]:
    """Area-weighted unit vertex normals (zero where the summed face normals vanish)."""
    n = triangle_cross(vertices, faces)
    acc = np.zeros((len(vertices), 3))
    for k in range(3):
        np.add.at(acc, faces[:, k], n)
    length = np.linalg.norm(acc, axis=1, keepdims=True)
    return np.divide(acc, length, out=np.zeros_like(acc), where=length > 0)


def angle_weighted_vertex_normals(
    vertices: NDArray[np.floating], faces: NDArray[np.integer]
) -> NDArray[np.float64]:
    """Unit vertex normals weighted by each face's corner angle at the vertex (trimesh's rule).

    A different weighting from `vertex_normals` (area), so the two disagree by a few degrees on
    uneven meshes; the GLB/OBJ exports use this one.
    """
    import trimesh

    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False, validate=False)
    return np.asarray(mesh.vertex_normals, dtype=np.float64)


def directed_edge_counts(faces: NDArray[np.integer]) -> dict[tuple[int, int], int]:
    """How many faces use each directed edge (a, b) in their winding."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for tri in np.asarray(faces).tolist():
        for k in range(3):
            counts[(tri[k], tri[(k + 1) % 3])] += 1
    return counts


def boundary_loops(faces: NDArray[np.integer]) -> list[list[int]]:
    """Closed loops of boundary edges (edges used by one face), each in the faces' winding order."""
    directed = directed_edge_counts(faces)
    successor: dict[int, int] = {}
    for (a, b), count in directed.items():
        if count == 1 and (b, a) not in directed:
            if a in successor:
                raise ValueError(f"vertex {a} has two outgoing boundary edges (not edge-manifold)")
            successor[a] = b
    loops: list[list[int]] = []
    remaining = dict(successor)
    while remaining:
        start = next(iter(remaining))
        loop = [start]
        nxt = remaining.pop(start)
        while nxt != start:
            loop.append(nxt)
            nxt = remaining.pop(nxt)
        loops.append(loop)
    return loops


def umeyama(
    source: NDArray[np.floating], target: NDArray[np.floating]
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """Similarity (scale, rotation, translation) minimizing |scale * R @ source + t - target|² (Umeyama 1991)."""
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    var_s = (xs**2).sum() / len(src)
    scale = float((sing * d).sum() / var_s)
    translation = mu_d - scale * rotation @ mu_s
    return scale, rotation, translation


def matrix_to_quaternion_wxyz(matrices: NDArray[np.floating]) -> NDArray[np.float64]:
    """Rotation matrices (N, 3, 3) to unit quaternions (N, 4), w first, with w >= 0."""
    from scipy.spatial.transform import Rotation

    xyzw = Rotation.from_matrix(np.asarray(matrices, dtype=np.float64)).as_quat()
    wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    wxyz *= np.where(wxyz[:, :1] < 0, -1.0, 1.0)
    return wxyz


def sample_uv_bilinear(
    texture: NDArray[np.uint8], u: NDArray[np.floating], v: NDArray[np.floating]
) -> NDArray[np.uint8]:
    """Texture values at (u, v) (v up; texture row 0 is v = 1), bilinear, clamped at the border: (N, C).

    Pixel coordinates are computed in the precision of `u` and `v`, then rounded to float32 for OpenCV.
    """
    height, width = texture.shape[:2]
    count = len(u)
    if count == 0:
        return np.zeros((0, texture.shape[2] if texture.ndim == 3 else 1), dtype=np.uint8)
    row_length = 1024  # OpenCV remap needs both map sides under 32767: wrap into rows of 1024
    padded = -(-count // row_length) * row_length
    map_x = np.zeros(padded, dtype=np.float32)
    map_y = np.zeros(padded, dtype=np.float32)
    map_x[:count] = u * width - 0.5
    map_y[:count] = (1.0 - v) * height - 0.5
    sampled = cv2.remap(
        texture,
        map_x.reshape(-1, row_length),
        map_y.reshape(-1, row_length),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.asarray(sampled, dtype=np.uint8).reshape(padded, -1)[:count]


@dataclass(frozen=True)
class UVRaster:
    """Which triangle covers each texel center of an S×S texture, and where inside it.

    Row 0 is the top of the texture (v = 1). `triangle` is -1 outside every UV island.
    `texel_index` lists the covered texels (flat indices), `barycentric` their weights (N, 3).
    """

    size: int
    triangle: NDArray[np.int32]  # (S, S)
    texel_index: NDArray[np.int64]  # (N,)
    barycentric: NDArray[np.float32]  # (N, 3)

    @property
    def island_mask(self) -> NDArray[np.bool_]:
        return self.triangle >= 0

    def texel_triangles(self) -> NDArray[np.int32]:
        return self.triangle.reshape(-1)[self.texel_index]


def rasterize_uv(uvs: NDArray[np.floating], uv_faces: NDArray[np.integer], size: int) -> UVRaster:
    """Rasterize a UV layout: per texel, the covering triangle and its barycentrics at the texel center.

    Texel (row, col) has center u = (col + 0.5) / S, v = 1 - (row + 0.5) / S. Triangles are drawn with
    OpenCV's polygon fill (1/256-texel vertex precision), which also takes texels their edges pass
    through; those get barycentrics clamped onto the triangle, so islands grow by up to one texel.
    A texel shared by two triangles goes to the later one.
    """
    uv = np.asarray(uvs, dtype=np.float64)
    faces = np.asarray(uv_faces, dtype=np.int64)
    px = np.empty_like(uv)
    px[:, 0] = uv[:, 0] * size - 0.5
    px[:, 1] = (1.0 - uv[:, 1]) * size - 0.5
    shift = 8
    fixed = np.round(px * (1 << shift)).astype(np.int32)
    corners = px[faces]  # (F, 3, 2)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    denom = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    valid = np.abs(denom) > 1e-12
    triangle = np.full((size, size), -1, dtype=np.int32)
    for t in np.flatnonzero(valid).tolist():
        cv2.fillConvexPoly(triangle, fixed[faces[t]], t, lineType=cv2.LINE_8, shift=shift)
    texel_index = np.flatnonzero(triangle.reshape(-1) >= 0)
    owner = triangle.reshape(-1)[texel_index]
    # Barycentrics are affine in the texel position: w = gx * (x - cx) + gy * (y - cy) per triangle.
    safe = np.where(valid, denom, 1.0)
    coefficients = np.stack(
        [
            (b[:, 1] - c[:, 1]) / safe,
            (c[:, 0] - b[:, 0]) / safe,
            (c[:, 1] - a[:, 1]) / safe,
            (a[:, 0] - c[:, 0]) / safe,
            c[:, 0],
            c[:, 1],
        ]
    ).astype(np.float32)
    per_texel = coefficients[:, owner]  # (6, N)
    rows, cols = np.divmod(texel_index, size)
    x = cols.astype(np.float32) - per_texel[4]
    y = rows.astype(np.float32) - per_texel[5]
    w0 = np.maximum(per_texel[0] * x + per_texel[1] * y, 0.0)
    w1 = np.maximum(per_texel[2] * x + per_texel[3] * y, 0.0)
    w2 = np.maximum(1.0 - (per_texel[0] + per_texel[2]) * x - (per_texel[1] + per_texel[3]) * y, 0.0)
    total = w0 + w1 + w2
    bary = np.stack([w0 / total, w1 / total, w2 / total], axis=1)
    return UVRaster(size, triangle, texel_index, bary)


@lru_cache(maxsize=4)
def _cached_uv_raster(uv_bytes: bytes, faces_bytes: bytes, size: int) -> UVRaster:
    uvs = np.frombuffer(uv_bytes, dtype=np.float64).reshape(-1, 2)
    faces = np.frombuffer(faces_bytes, dtype=np.int64).reshape(-1, 3)
    return rasterize_uv(uvs, faces, size)


def cached_uv_raster(uvs: NDArray[np.floating], uv_faces: NDArray[np.integer], size: int) -> UVRaster:
    """`rasterize_uv`, memoized per (layout, size): a topology's raster is computed once per process."""
    uv = np.ascontiguousarray(uvs, dtype=np.float64)
    faces = np.ascontiguousarray(uv_faces, dtype=np.int64)
    return _cached_uv_raster(uv.tobytes(), faces.tobytes(), int(size))

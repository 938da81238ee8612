"""Texture: unwrap the photo into the mesh's UV layout.

1. Rasterize the UV layout once per (layout, size): each texel knows its triangle and barycentrics.
2. Each texel's surface point projects into the photo (the image-frame mesh is in pixels); sample it
   bilinearly.
3. Visibility: the triangle must face the camera, and the point must be the nearest surface in a
   coarse image-space z-buffer. Grazing triangles get little weight.
4. Texels the camera does not see well take the photo at their mirror point (same barycentrics on the
   mirrored vertices), when a symmetric vertex map is given.
5. What is still unseen inside the islands is inpainted with OpenCV; everything outside the islands
   is filled by push-pull so that texture filtering never pulls black across seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from headforge.errors import InvalidOptionError
from headforge.pipeline.geometry import UVRaster, cached_uv_raster, triangle_cross, vertex_normals
from headforge.pipeline.types import Mesh

MIN_TEXTURE_SIZE = 512
MAX_TEXTURE_SIZE = 4096
# Facing weight ramps from 0 to 1 between these cosines of the angle between normal and view ray.
GRAZING_COS, CLEAR_COS = 0.1, 0.45
# Texels whose blended weight stays under this are treated as unseen and inpainted.
MIN_WEIGHT = 0.05
ZBUFFER_CELLS = 160  # z-buffer resolution along the mesh's longer projected side
ZBUFFER_SAMPLES_PER_CELL = 6
# Depth slack in cell sizes: a point may lie this far behind the nearest sample of its cell and still
# count as that surface (samples sit anywhere in the cell, so slack grows with the depth slope).
ZBUFFER_BASE_TOLERANCE = 1.0
ZBUFFER_SLOPE_TOLERANCE = 1.5
MAX_SLOPE = 8.0
PUSH_PULL_SIZE = 256  # the fill outside the islands is computed at most this wide
INPAINT_MAX_TEXELS = (
    6_000  # more hole texels than this: inpaint a downscaled copy (the fill is smooth anyway)
)
INPAINT_RADIUS = 3
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def check_texture_size(size: int) -> int:
    """Texture side in texels: an integer from 512 to 4096."""
    if (
        isinstance(size, bool)
        or not isinstance(size, int | np.integer)
        or not (MIN_TEXTURE_SIZE <= int(size) <= MAX_TEXTURE_SIZE)
    ):
        raise InvalidOptionError(
            f"texture size must be an integer from {MIN_TEXTURE_SIZE} to {MAX_TEXTURE_SIZE}, got {size!r}",
            details={"texture_size": str(size)},
        )
    return int(size)


@dataclass(frozen=True)
class _TexelPlan:
    """Per (layout, faces, size): the UV raster and a sparse barycentric matrix that turns per-vertex
    values into their value at the surface point behind every covered texel."""

    raster: UVRaster
    islands: NDArray[np.uint8]  # (S, S) 1 inside the UV islands
    triangles: NDArray[np.int32]  # (N,) triangle per covered texel
    own: sp.csr_matrix  # (N, V): texel point = own @ vertices


@lru_cache(maxsize=2)
def _cached_plan(uvs: bytes, uv_faces: bytes, faces: bytes, vertex_count: int, size: int) -> _TexelPlan:
    raster = cached_uv_raster(
        np.frombuffer(uvs, np.float64).reshape(-1, 2), np.frombuffer(uv_faces, np.int64).reshape(-1, 3), size
    )
    triangles = raster.texel_triangles().astype(np.int32)
    corners = np.frombuffer(faces, np.int64).reshape(-1, 3).astype(np.int32)[triangles]
    count = len(triangles)
    indptr = np.arange(0, 3 * count + 1, 3, dtype=np.int32 if 3 * count < 2**31 else np.int64)
    weights = raster.barycentric.reshape(-1)  # float32, shared with the raster (no copy)
    own = sp.csr_matrix((weights, corners.reshape(-1), indptr), shape=(count, vertex_count), copy=False)
    islands = raster.island_mask.astype(np.uint8)
    return _TexelPlan(raster, islands, triangles, own)


def texel_plan(mesh: Mesh, size: int) -> _TexelPlan:
    """The cached `_TexelPlan` for this mesh's topology at this texture size."""
    uvs = np.ascontiguousarray(mesh.uvs, dtype=np.float64)
    faces = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    uv_faces = faces if mesh.uv_faces is None else np.ascontiguousarray(mesh.uv_faces, dtype=np.int64)
    return _cached_plan(uvs.tobytes(), uv_faces.tobytes(), faces.tobytes(), len(mesh.vertices), size)


def _facing(vertices: NDArray[np.float64], faces: NDArray[np.int64]) -> NDArray[np.float32]:
    """Per vertex: a weight for how squarely the surface faces the camera there (image frame: the camera
    looks along +z). Smooth vertex normals, so weights blend across triangles."""
    normals = vertex_normals(vertices, faces)
    return np.clip((-normals[:, 2] - GRAZING_COS) / (CLEAR_COS - GRAZING_COS), 0.0, 1.0).astype(np.float32)


def _depth_slope(vertices: NDArray[np.float64], faces: NDArray[np.int64]) -> NDArray[np.float32]:
    """Per triangle: |dz/dxy| of its plane in the image frame, capped, for the z-buffer tolerance."""
    cross = triangle_cross(vertices, faces)
    slope = np.divide(
        np.linalg.norm(cross[:, :2], axis=1),
        np.abs(cross[:, 2]),
        out=np.full(len(faces), MAX_SLOPE),
        where=cross[:, 2] != 0,
    )
    return np.minimum(slope, MAX_SLOPE).astype(np.float32)


class _ZBuffer:
    """Nearest depth per coarse image cell, from dense samples of the surface."""

    def __init__(self, samples: NDArray[np.float32], vertices: NDArray[np.float32]):
        self.low = (vertices[:, :2].min(0) - 1.0).astype(np.float32)
        extent = float((vertices[:, :2].max(0) + 1.0 - self.low).max())
        self.cell = float(max(extent / ZBUFFER_CELLS, 1e-6))
        columns = ZBUFFER_CELLS + 2
        ij = ((samples[:, :2] - self.low) * np.float32(1.0 / self.cell)).astype(np.int32)
        depth = np.full(columns * columns, np.inf, dtype=np.float32)
        np.minimum.at(depth, ij[:, 1] * columns + ij[:, 0], samples[:, 2])
        self.depth = depth.reshape(columns, columns)
        # Sampling maps hold pixel-center coordinates (x - 0.5); this affine takes them to cell
        # coordinates for a nearest-neighbour lookup that rounds like the floor above.
        scale = 1.0 / self.cell
        self._to_cells = np.array(
            [
                [scale, 0.0, (0.5 - self.low[0]) * scale - 0.5],
                [0.0, scale, (0.5 - self.low[1]) * scale - 0.5],
            ],
            dtype=np.float32,
        )

    def tolerance(self, slope: NDArray[np.float32]) -> NDArray[np.float32]:
        """Depth slack per triangle: samples sit anywhere in a cell, so it grows with the depth slope."""
        return (self.cell * (ZBUFFER_BASE_TOLERANCE + ZBUFFER_SLOPE_TOLERANCE * slope)).astype(np.float32)

    def visible(
        self, sampling_map: NDArray[np.float32], depth: NDArray[np.float32], tolerance: NDArray[np.float32]
    ) -> NDArray[np.bool_]:
        """Points (given by their sampling map and depth) within `tolerance` of the nearest surface in
        their cell; a NaN tolerance is never visible."""
        cells = cv2.transform(sampling_map, self._to_cells)
        nearest = cv2.remap(self.depth, cells, None, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)  # type: ignore[call-overload]
        return depth - tolerance <= np.asarray(nearest, np.float32).reshape(-1)[: len(depth)]


def _sampling_map(points: NDArray[np.float32]) -> NDArray[np.float32]:
    """An OpenCV remap grid (side, side, 2) of the points' image positions (pixel centers at integers),
    padded to a square (the padding's samples are dropped)."""
    count = len(points)
    side = int(np.ceil(np.sqrt(max(count, 1))))
    padded = np.full((side * side, 2), -10.0, dtype=np.float32)
    np.subtract(points[:, :2], np.float32(0.5), out=padded[:count])
    return padded.reshape(side, side, 2)


def _sample(rgba: NDArray[np.uint8], sampling_map: NDArray[np.float32], count: int) -> NDArray[np.uint32]:
    """Bilinear photo colors along a sampling map, one packed RGBA uint32 per point; the edge pixels
    continue past the border (points outside the photo are never visible, but those within half a
    pixel of its edge are). Packed colors move through gathers and scatters as single elements."""
    colors = cv2.remap(rgba, sampling_map, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)  # type: ignore[call-overload]
    return np.ascontiguousarray(colors, dtype=np.uint8).view(np.uint32).reshape(-1)[:count]


def push_pull_fill(colors: NDArray[np.float32], weights: NDArray[np.float32]) -> NDArray[np.float32]:
    """Fill every texel of weight 0 from its surroundings through a weighted image pyramid (push-pull);
    texels of weight 1 keep their colors. Weights in between blend."""
    levels: list[tuple[NDArray[np.float32], NDArray[np.float32]]] = []
    premultiplied = colors * weights[..., None]
    weight = weights.astype(np.float32)
    while True:
        levels.append((premultiplied, weight))
        height, width = weight.shape
        if height <= 1 and width <= 1:
            break
        size = (max(1, (width + 1) // 2), max(1, (height + 1) // 2))
        premultiplied = np.asarray(cv2.resize(premultiplied, size, interpolation=cv2.INTER_AREA), np.float32)
        premultiplied = premultiplied.reshape(size[1], size[0], 3)
        weight = np.asarray(cv2.resize(weight, size, interpolation=cv2.INTER_AREA), np.float32).reshape(
            size[1], size[0]
        )
    filled = np.zeros_like(levels[-1][0])
    for level, (premultiplied, weight) in enumerate(reversed(levels)):
        height, width = weight.shape
        coarse = cv2.resize(filled, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, 3)
        # The coarsest level has nothing above it: any coverage there is the whole answer.
        covered = (weight > 0 if level == 0 else np.clip(weight, 0.0, 1.0)).astype(np.float32)[..., None]
        mean = np.divide(
            premultiplied, weight[..., None], out=np.zeros_like(premultiplied), where=weight[..., None] > 0
        )
        filled = covered * mean + (1.0 - covered) * coarse
    return filled


def _fill_outside(texture: NDArray[np.uint8], coverage: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Uncovered texels filled by push-pull from the covered ones, computed on blocks of k×k texels
    (at most PUSH_PULL_SIZE blocks wide) and upsampled; covered texels keep their colors.
    `texture` must be zero where `coverage` (0/1) is 0."""
    size = texture.shape[0]
    block = max(1, size // PUSH_PULL_SIZE)
    small = size // block
    used = small * block
    # Block means of the covered texels (float, so that thinly covered blocks are not rounded away).
    premultiplied = cv2.resize(
        texture[:used, :used].astype(np.float32), (small, small), interpolation=cv2.INTER_AREA
    )
    weight = cv2.resize(
        coverage[:used, :used].astype(np.float32), (small, small), interpolation=cv2.INTER_AREA
    )
    weight = np.asarray(weight, np.float32).reshape(small, small)
    premultiplied = np.asarray(premultiplied, np.float32).reshape(small, small, 3)
    mean = np.divide(
        premultiplied, weight[..., None], out=np.zeros_like(premultiplied), where=weight[..., None] > 0
    )
    # Trust only blocks that are at least half covered; push-pull spreads them to the rest.
    trusted = (weight >= 0.5).astype(np.float32)
    fill = np.clip(push_pull_fill(mean, trusted) + 0.5, 0, 255).astype(np.uint8)
    if block > 1:
        fill = np.asarray(cv2.resize(fill, (used, used), interpolation=cv2.INTER_LINEAR), np.uint8)
    if used < size:
        fill = np.asarray(
            cv2.copyMakeBorder(fill, 0, size - used, 0, size - used, cv2.BORDER_REPLICATE), np.uint8
        )
    cv2.copyTo(texture, coverage, fill)
    return fill


def _inpaint(texture: NDArray[np.uint8], holes: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """cv2.inpaint (Navier-Stokes) over `holes` (0/1); many holes are done on a downscaled copy."""
    count = cv2.countNonZero(holes)
    if count == 0:
        return texture
    size = texture.shape[0]
    factor = 1
    while count / (factor * factor) > INPAINT_MAX_TEXELS and size // (factor * 2) >= 64:
        factor *= 2
    if factor == 1:
        return np.asarray(cv2.inpaint(texture, holes, INPAINT_RADIUS, cv2.INPAINT_NS), np.uint8)
    small_size = (size // factor, size // factor)
    small = cv2.resize(texture, small_size, interpolation=cv2.INTER_AREA)
    small_holes = cv2.resize(holes * np.uint8(255), small_size, interpolation=cv2.INTER_AREA)
    patched = cv2.inpaint(small, (small_holes > 0).view(np.uint8), INPAINT_RADIUS, cv2.INPAINT_NS)
    upsampled = cv2.resize(patched, (size, size), interpolation=cv2.INTER_LINEAR)
    cv2.copyTo(upsampled, holes, texture)
    return texture


def unwrap_texture(
    rgb: NDArray[np.uint8],
    mesh_image: Mesh,
    size: int = 1024,
    symmetry: NDArray[np.integer] | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """The photo unwrapped into the mesh's UV layout.

    `mesh_image` is in image pixels (x right, y down, z away from the camera); any topology works, with
    per-vertex UVs or `uv_faces` seams. `symmetry` maps each vertex to its mirror image (omit it for
    meshes without one: unseen texels are then all inpainted).
    Returns the texture (S, S, 3) uint8, row 0 at v = 1, and the coverage mask (S, S) bool: texels
    colored from the photo (directly or through the mirror), as opposed to inpainted or outside the
    UV islands.
    """
    size = check_texture_size(size)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidOptionError(
            "unwrap_texture needs an RGB uint8 image (H, W, 3)", details={"shape": list(rgb.shape)}
        )
    vertices = np.asarray(mesh_image.vertices, dtype=np.float32)
    faces = np.asarray(mesh_image.faces, dtype=np.int64)
    if symmetry is not None and np.shape(symmetry) != (len(vertices),):
        raise InvalidOptionError(
            f"symmetry map must have one entry per vertex ({len(vertices)}), got shape {np.shape(symmetry)}"
        )
    plan = texel_plan(mesh_image, size)
    raster = plan.raster
    height, width = rgb.shape[:2]
    vertices64 = vertices.astype(np.float64)
    # Per vertex (x, y, z, facing weight), then the same at its mirror vertex: the sparse plan
    # interpolates all of them per texel in one product (the mirror point of a texel has the same
    # barycentrics on the mirrored corners).
    attributes = np.column_stack([vertices, _facing(vertices64, faces)]).astype(np.float32)
    if symmetry is not None:
        attributes = np.hstack([attributes, attributes[np.asarray(symmetry, dtype=np.int64)]])
    interpolated = np.asarray(plan.own @ attributes, dtype=np.float32)
    own = interpolated[:, :4]
    stride = max(1, len(own) // (ZBUFFER_CELLS * ZBUFFER_CELLS * ZBUFFER_SAMPLES_PER_CELL))
    zbuffer = _ZBuffer(np.concatenate([own[::stride, :3], vertices]), vertices)
    outside = (
        (vertices[:, 0] < 0) | (vertices[:, 0] > width) | (vertices[:, 1] < 0) | (vertices[:, 1] > height)
    )

    def tolerance(triangle_faces: NDArray[np.int64]) -> NDArray[np.float32]:
        """Per triangle z-buffer slack; NaN (never visible) where a corner lies outside the photo."""
        slack = zbuffer.tolerance(_depth_slope(vertices64, triangle_faces))
        slack[outside[triangle_faces].any(1)] = np.nan
        return slack

    rgba = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA), np.uint8)
    own_map = _sampling_map(own)
    own_weight = own[:, 3] * zbuffer.visible(own_map, own[:, 2], np.take(tolerance(faces), plan.triangles))
    colors = _sample(rgba, own_map, len(own))
    total = own_weight
    if symmetry is not None:
        # Only texels the camera does not see squarely look at their mirror point.
        rows = np.flatnonzero(own_weight < 1.0)
        mirror = np.take(interpolated, rows, axis=0)[:, 4:]  # np.take: whole rows, much faster here
        mirror_map = _sampling_map(mirror)
        mirror_faces = np.asarray(symmetry, dtype=np.int64)[faces]
        mirror_tolerance = np.take(tolerance(mirror_faces), plan.triangles[rows])
        mirror_weight = mirror[:, 3] * zbuffer.visible(mirror_map, mirror[:, 2], mirror_tolerance)
        own_part = own_weight[rows]
        mirror_weight *= 1.0 - own_part
        mirror_colors = _sample(rgba, mirror_map, len(rows))
        blended = cv2.blendLinear(
            colors[rows].view(np.uint8).reshape(-1, 1, 4),
            mirror_colors.view(np.uint8).reshape(-1, 1, 4),
            own_part[:, None],
            mirror_weight[:, None],
        )
        colors[rows] = np.ascontiguousarray(blended, np.uint8).view(np.uint32).reshape(-1)
        total = own_weight.copy()
        total[rows] += mirror_weight
    del own, interpolated  # per-texel geometry (17 MB at 1024²): not needed for the fill

    flat_texture = np.zeros(size * size, dtype=np.uint32)  # packed RGBA
    flat_texture[raster.texel_index] = colors
    flat_coverage = np.zeros(size * size, dtype=np.uint8)
    flat_coverage[raster.texel_index] = total >= MIN_WEIGHT
    # Isolated covered texels at occlusion edges read as speckles; let the inpainting take them.
    coverage = np.asarray(
        cv2.morphologyEx(flat_coverage.reshape(size, size), cv2.MORPH_OPEN, _CROSS), np.uint8
    )
    if not coverage.any():
        return np.full((size, size, 3), 128, dtype=np.uint8), coverage.view(bool)
    sampled = cv2.cvtColor(flat_texture.view(np.uint8).reshape(size, size, 4), cv2.COLOR_RGBA2RGB)
    texture = np.zeros((size, size, 3), dtype=np.uint8)
    cv2.copyTo(sampled, coverage, texture)  # drops the speckles too
    texture = _fill_outside(texture, coverage)
    holes = cv2.subtract(plan.islands, coverage)
    return _inpaint(texture, np.asarray(holes, np.uint8)), coverage.view(bool)

"""Texture: unwrap photos into the mesh's UV layout, fuse views, fill what no photo sees, without seams.

1. Rasterize the UV layout once per (layout, size): each texel knows its triangle and barycentrics.
2. `unwrap_view`: each texel's surface point projects into the photo (the image-frame mesh is in
   pixels); sample it bilinearly, and at its mirror point when a symmetric vertex map is given.
   Weights: the triangle must face the camera (a ramp in the cosine between normal and view ray), the
   point must be the nearest surface in a coarse image-space z-buffer, and the photo mask
   (`texture_mask.py`: person segmentation × the mesh outline) must keep the pixel.
3. `fuse_views` (several photos of one head): per texel, the views that see it, weighted by
   visibility × foreshortening (cos²), each view fading out over a few texels at the edge of what it
   sees.
4. `finish_texture`: texels seen directly keep the photo; the rest take the photo at their mirror
   point, else are inpainted (OpenCV); the filled part is blended into the seen part in the gradient
   domain (an offset membrane solved by push-pull) and cross-faded at the rim, so shading differences
   leave no seam; outside the islands, push-pull fill so that texture filtering never pulls black.
"""

from __future__ import annotations

from collections.abc import Iterable
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
# Photo pixels near the mesh's projected outline get little weight: it ramps from 0 half a z-buffer
# cell inside the outline to 1 this many cells further in.
OUTLINE_FEATHER_CELLS = 3.0
PUSH_PULL_SIZE = 256  # the fill outside the islands is computed at most this wide
INPAINT_MAX_TEXELS = (
    6_000  # more hole texels than this: inpaint a downscaled copy (the fill is smooth anyway)
)
INPAINT_RADIUS = 3
# Seen texels cross-fade into the fill over this many texels from the rim of the seen region, and the
# seam offset is measured on a rim band this wide (wider than the cross-fade, so that where the fill
# changes source the photo shows alone; both at 1024², scaled with the texture size).
SEAM_FEATHER = 6.0
SEAM_RIM = 8
OFFSET_LIMIT = 40.0  # levels (of 255)
OFFSET_SWEEPS = 24
OFFSET_GRID = 32  # the offset is solved on at most this many blocks across: shading varies slowly
# Texels (own or mirror) under this weight (grazing, at the mask's edge) are blended with the fill,
# never its source.
TRUSTED_WEIGHT = 0.5
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
        self._outline_ramp: NDArray[np.float32] | None = None

    def cells(self, sampling_map: NDArray[np.float32]) -> NDArray[np.float32]:
        """A sampling map's points in cell coordinates, for `outline_weight` and `visible`."""
        return np.asarray(cv2.transform(sampling_map, self._to_cells), np.float32)

    def outline_weight(self, cells: NDArray[np.float32], count: int) -> NDArray[np.float32]:
        """Per point (given in `cells` coordinates): 0 in the cells the mesh's projected outline passes through, ramping to 1 over
        OUTLINE_FEATHER_CELLS cells inside it. A photo pixel just inside the outline mixes in what lies
        beyond it (background, hair), most where the outline passes beyond the face in the photo."""
        if self._outline_ramp is None:
            # Closed: cells no sample fell into.
            footprint = cv2.morphologyEx(np.isfinite(self.depth).astype(np.uint8), cv2.MORPH_CLOSE, _CROSS)
            distance = np.asarray(cv2.distanceTransform(footprint, cv2.DIST_L2, 3), np.float32)
            self._outline_ramp = np.clip((distance - 0.5) * np.float32(1.0 / OUTLINE_FEATHER_CELLS), 0.0, 1.0)
        weight = cv2.remap(
            self._outline_ramp, cells, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )  # type: ignore[call-overload]
        return np.asarray(weight, np.float32).reshape(-1)[:count]

    def tolerance(self, slope: NDArray[np.float32]) -> NDArray[np.float32]:
        """Depth slack per triangle: samples sit anywhere in a cell, so it grows with the depth slope."""
        return (self.cell * (ZBUFFER_BASE_TOLERANCE + ZBUFFER_SLOPE_TOLERANCE * slope)).astype(np.float32)

    def visible(
        self, cells: NDArray[np.float32], depth: NDArray[np.float32], tolerance: NDArray[np.float32]
    ) -> NDArray[np.bool_]:
        """Points (given by their `cells` coordinates and depth) within `tolerance` of the nearest
        surface in their cell; a NaN tolerance is never visible."""
        nearest = cv2.remap(self.depth, cells, None, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)  # type: ignore[call-overload]
        return depth - tolerance <= np.asarray(nearest, np.float32).reshape(-1)[: len(depth)]


def _sampling_map(points: NDArray[np.float32]) -> NDArray[np.float32]:
    """An OpenCV remap grid (side, side, 2) of the points' image positions (pixel centers at integers),
    padded to a square (the padding's samples are dropped)."""
    count = len(points)
    side = int(np.ceil(np.sqrt(max(count, 1))))
    padded = np.empty((side * side, 2), dtype=np.float32)
    # (x, y) moved as one complex64 per point: a strided float32 pair is copied element by element.
    padded.view(np.complex64)[:count, 0] = points.view(np.complex64)[:, 0]
    padded[:count] -= np.float32(0.5)
    padded[count:] = -10.0
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
        # coarse + covered × (mean − coarse), in place
        mean -= coarse
        mean *= covered
        mean += coarse
        filled = mean
    return filled


def _fill_outside(texture: NDArray[np.uint8], coverage: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Uncovered texels filled by push-pull from the covered ones, computed on blocks of k×k texels
    (at most PUSH_PULL_SIZE blocks wide) and upsampled; covered texels keep their colors.
    `texture` must be zero where `coverage` (0/1) is 0."""
    size = texture.shape[0]
    block = max(1, size // PUSH_PULL_SIZE)
    small = size // block
    used = small * block
    # Block means of the covered texels. Taken in uint8 (no full-size float copy): a mean is off by at
    # most half a level, so by at most one level after the division in the blocks trusted below
    # (at least half covered); coverage is scaled to 255 so that its block share keeps 8 bits.
    premultiplied = cv2.resize(texture[:used, :used], (small, small), interpolation=cv2.INTER_AREA)
    weight = cv2.resize(coverage[:used, :used] * np.uint8(255), (small, small), interpolation=cv2.INTER_AREA)
    weight = np.asarray(weight, np.float32).reshape(small, small) * np.float32(1.0 / 255.0)
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


@dataclass(frozen=True)
class PhotoMask:
    """Which photo pixels may color a texel: weights (n, n) in [0, 1] over an axis-aligned square of the
    photo (`origin` its top-left photo pixel, `side` its side in pixels); 0 outside the square."""

    values: NDArray[np.float32]
    origin: tuple[float, float]
    side: float

    def sample(self, sampling_map: NDArray[np.float32], count: int) -> NDArray[np.float32]:
        """The mask at the points of a sampling map (pixel centers at integers), bilinear."""
        scale = len(self.values) / self.side
        to_cells = np.array(
            [
                [scale, 0.0, (0.5 - self.origin[0]) * scale - 0.5],
                [0.0, scale, (0.5 - self.origin[1]) * scale - 0.5],
            ],
            dtype=np.float32,
        )
        cells = cv2.transform(sampling_map, to_cells)
        values = cv2.remap(
            self.values, cells, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )  # type: ignore[call-overload]
        return np.asarray(values, np.float32).reshape(-1)[:count]


@dataclass
class ViewTexels:
    """One photo unwrapped into the UV layout, before anything is filled.

    Per texel: the photo's color at the texel's own surface point, and a weight in [0, 1] for how well
    the photo sees it there (facing ramp × visibility × outline feather × photo mask); `priority` ranks
    views against each other (weight × cos², cos between the surface normal and the view ray:
    foreshortening; the weight itself unless unwrapped `for_fusion`). The same three at the mirror
    point when the mesh has a symmetry map, for the texels the photo does not see squarely (weight
    < 1; the others hold 0 there). Row 0 is v = 1.
    """

    colors: NDArray[np.uint8]  # (S, S, 3)
    weights: NDArray[np.float32]  # (S, S), 0 outside the islands and where unseen
    priority: NDArray[np.float32]  # (S, S)
    islands: NDArray[np.uint8]  # (S, S) 1 inside the UV islands
    mirror_colors: NDArray[np.uint8] | None = None
    mirror_weights: NDArray[np.float32] | None = None
    mirror_priority: NDArray[np.float32] | None = None

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])

    def seen(self) -> NDArray[np.bool_]:
        """Texels seen directly (weight ≥ MIN_WEIGHT), without isolated specks."""
        return _opened(self.weights >= MIN_WEIGHT, self.islands)

    def covered(self, seen: NDArray[np.bool_] | None = None) -> NDArray[np.bool_]:
        """Texels seen directly or through the mirror (`seen`: `self.seen()`, when already known)."""
        seen = self.seen() if seen is None else seen
        if self.mirror_weights is None:
            return seen
        return seen | _opened((self.mirror_weights >= MIN_WEIGHT) | seen, self.islands)

    def share(self, mask: NDArray[np.bool_]) -> float:
        """The share of island texels in `mask`."""
        total = cv2.countNonZero(self.islands)
        return float(np.count_nonzero(mask & self.islands.view(bool)) / total) if total else 0.0


@dataclass
class TextureResult:
    """A finished texture and what colored it."""

    texture: NDArray[np.uint8]  # (S, S, 3) RGB, row 0 at v = 1
    coverage: NDArray[np.bool_]  # colored from a photo, directly or through the mirror
    seen: NDArray[np.bool_]  # colored directly (not mirrored, not inpainted)
    islands: NDArray[np.bool_]

    def share(self, mask: NDArray[np.bool_]) -> float:
        """The share of island texels in `mask`."""
        total = np.count_nonzero(self.islands)
        return float(np.count_nonzero(mask & self.islands) / total) if total else 0.0

    @property
    def coverage_share(self) -> float:
        return self.share(self.coverage)

    @property
    def seen_share(self) -> float:
        return self.share(self.seen)


def _opened(mask: NDArray[np.bool_], islands: NDArray[np.uint8]) -> NDArray[np.bool_]:
    """`mask` inside the islands, opened with a 3×3 cross: isolated texels at occlusion edges read as
    speckles, the fill takes them."""
    inside = cv2.bitwise_and(mask.view(np.uint8), islands)
    return np.asarray(cv2.morphologyEx(inside, cv2.MORPH_OPEN, _CROSS), np.uint8).view(bool)


def _facing_ramp(cosine: NDArray[np.float32]) -> NDArray[np.float32]:
    """Confidence that a surface point at this cosine to the view ray is seen well: 0 at grazing
    angles up to GRAZING_COS, 1 from CLEAR_COS."""
    ramp = np.subtract(cosine, np.float32(GRAZING_COS), dtype=np.float32)
    ramp *= np.float32(1.0 / (CLEAR_COS - GRAZING_COS))
    return np.clip(ramp, 0.0, 1.0, out=ramp)


def _check_inputs(rgb: NDArray[np.uint8], vertex_count: int, symmetry: NDArray[np.integer] | None) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidOptionError(
            "unwrap_texture needs an RGB uint8 image (H, W, 3)", details={"shape": list(rgb.shape)}
        )
    if symmetry is not None and np.shape(symmetry) != (vertex_count,):
        raise InvalidOptionError(
            f"symmetry map must have one entry per vertex ({vertex_count}), got shape {np.shape(symmetry)}"
        )


def unwrap_view(
    rgb: NDArray[np.uint8],
    mesh_image: Mesh,
    size: int = 1024,
    symmetry: NDArray[np.integer] | None = None,
    mask: PhotoMask | None = None,
    for_fusion: bool = False,
) -> ViewTexels:
    """The photo sampled at every texel's surface point (and at its mirror point, given `symmetry`),
    with weights; nothing filled yet. `mesh_image` is in image pixels (x right, y down, z away from the
    camera); any topology works, with per-vertex UVs or `uv_faces` seams. `mask` keeps photo pixels
    that are not the head (background, other people) out. `for_fusion` computes the priorities
    `fuse_views` ranks views by (otherwise `priority` is the weight itself, saving the work)."""
    size = check_texture_size(size)
    rgb = np.asarray(rgb)
    vertices = np.asarray(mesh_image.vertices, dtype=np.float32)
    faces = np.asarray(mesh_image.faces, dtype=np.int64)
    _check_inputs(rgb, len(vertices), symmetry)
    plan = texel_plan(mesh_image, size)
    height, width = rgb.shape[:2]
    vertices64 = vertices.astype(np.float64)
    # Per vertex (x, y, z, cosine to the view ray; the camera looks along +z), then the same at its
    # mirror vertex: one sparse product interpolates all of them per texel (the mirror point of a texel
    # has the same barycentrics on the mirrored corners). Smooth vertex normals, so weights blend.
    cosines = np.clip(-vertex_normals(vertices64, faces)[:, 2], 0.0, 1.0)
    attributes = np.column_stack([vertices, cosines]).astype(np.float32)
    if symmetry is not None:
        # One product for both (slicing the matrix's rows for the mirror costs more than the columns).
        attributes = np.column_stack([attributes, attributes[np.asarray(symmetry, dtype=np.int64)]])
    interpolated = np.asarray(plan.own @ attributes, dtype=np.float32)
    own_points = interpolated[:, :4]
    stride = max(1, len(own_points) // (ZBUFFER_CELLS * ZBUFFER_CELLS * ZBUFFER_SAMPLES_PER_CELL))
    zbuffer = _ZBuffer(np.concatenate([own_points[::stride, :3], vertices]), vertices)
    outside = (
        (vertices[:, 0] < 0) | (vertices[:, 0] > width) | (vertices[:, 1] < 0) | (vertices[:, 1] > height)
    )
    rgba = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2RGBA), np.uint8)

    def layer(
        points: NDArray[np.float32], layer_faces: NDArray[np.int64], rows: NDArray[np.int64] | None = None
    ) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
        """Colors, weights and priorities of per-texel points (of the texels `rows`, default all), as
        (S, S) images, and the weights per point."""
        sampling_map = _sampling_map(points)
        triangles = plan.triangles if rows is None else plan.triangles[rows]
        texel_index = plan.raster.texel_index if rows is None else plan.raster.texel_index[rows]
        # Per triangle z-buffer slack; NaN (never visible) where a corner lies outside the photo.
        slack = zbuffer.tolerance(_depth_slope(vertices64, layer_faces))
        slack[outside[layer_faces].any(1)] = np.nan
        cosine = points[:, 3]
        cells = zbuffer.cells(sampling_map)
        weight = _facing_ramp(cosine) * zbuffer.visible(cells, points[:, 2], np.take(slack, triangles))
        weight *= zbuffer.outline_weight(cells, len(points))
        del cells
        if mask is not None:
            weight *= mask.sample(sampling_map, len(points))
        colors = _sample(rgba, sampling_map, len(points))
        flat_colors = np.zeros(size * size, dtype=np.uint32)  # packed RGBA
        flat_colors[texel_index] = colors
        flat_weight = np.zeros(size * size, dtype=np.float32)
        flat_weight[texel_index] = weight
        priority = flat_weight
        if for_fusion:
            priority = np.zeros(size * size, dtype=np.float32)
            priority[texel_index] = weight * cosine * cosine
        rgb_image = cv2.cvtColor(flat_colors.view(np.uint8).reshape(size, size, 4), cv2.COLOR_RGBA2RGB)
        image = np.asarray(rgb_image, np.uint8)
        return image, flat_weight.reshape(size, size), priority.reshape(size, size), weight

    colors, weights, priority, point_weights = layer(own_points, faces)
    texels = ViewTexels(colors, weights, priority, plan.islands)
    if symmetry is not None:
        # Only texels the photo does not see squarely look at their mirror point (the same
        # barycentrics on the mirrored corners).
        rows = np.flatnonzero(point_weights < 1.0)
        # The mirror's four floats gathered as one 16-byte element per row (a fancy index with a
        # trailing slice copies them one by one).
        mirror_points = np.take(interpolated.view(np.complex128)[:, 1], rows).view(np.float32).reshape(-1, 4)
        mirror_faces = np.asarray(symmetry, dtype=np.int64)[faces]
        texels.mirror_colors, texels.mirror_weights, texels.mirror_priority, _ = layer(
            mirror_points, mirror_faces, rows
        )
    return texels


def _distance_to_unseen(seen: NDArray[np.bool_], islands: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Per texel, the distance in texels to the nearest island texel not in `seen` (the UV layout's
    own borders are no seam)."""
    unseen = cv2.subtract(islands, seen.view(np.uint8))
    return np.asarray(cv2.distanceTransform(1 - unseen, cv2.DIST_L2, 3), np.float32)


def _feather(distance: NDArray[np.float32], seen: NDArray[np.bool_]) -> NDArray[np.float32]:
    """A ramp inside `seen` from `_distance_to_unseen`: 0 on its rim texels, 1 from SEAM_FEATHER
    texels further in (at 1024², scaled with the size)."""
    width = max(1.0, SEAM_FEATHER * len(seen) / 1024)
    ramp = np.clip((distance - 1.0) * np.float32(1.0 / width), 0.0, 1.0)
    return np.multiply(ramp, seen, out=ramp)


class _LayerFusion:
    """Running sums for fusing one layer (own or mirror) of several views."""

    def __init__(self, islands: NDArray[np.uint8]):
        size = islands.shape[0]
        self.islands = islands
        self.color_sum = np.zeros((size, size, 3), np.float32)
        self.priority_sum = np.zeros((size, size), np.float32)
        self.best = np.zeros((size, size), np.float32)
        self.best_colors = np.zeros((size, size, 3), np.uint8)

    def add(
        self, colors: NDArray[np.uint8], weights: NDArray[np.float32], priority: NDArray[np.float32]
    ) -> None:
        seen = _opened(weights >= MIN_WEIGHT, self.islands)
        faded = priority * _feather(_distance_to_unseen(seen, self.islands), seen)
        self.color_sum += colors * faded[..., None]
        self.priority_sum += faded
        better = weights > self.best
        self.best_colors[better] = colors[better]
        np.maximum(self.best, weights, out=self.best)

    def result(self) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.float32]]:
        total = self.priority_sum[..., None]
        mean = np.divide(self.color_sum, total, out=np.zeros_like(self.color_sum), where=total > 0)
        colors = np.clip(mean + 0.5, 0, 255).astype(np.uint8)
        # Texels every view sees only at its faded edge keep the best view's plain color.
        edge_only = (self.priority_sum <= 0) & (self.best > 0)
        colors[edge_only] = self.best_colors[edge_only]
        return colors, self.best, self.priority_sum


def fuse_views(views: Iterable[ViewTexels]) -> ViewTexels:
    """Several photos of one head in one UV layout, fused: each texel's color is the average of the
    views that see it, weighted by their priority (visibility × foreshortening, cos²), and each view's
    priority fades to 0 over a few texels toward the edge of what it sees, so the seams between views
    blend. The fused weight is the best view's; the mirror layers are fused the same way. The views
    are consumed one at a time (a generator keeps one view's texels in memory)."""
    own: _LayerFusion | None = None
    mirror: _LayerFusion | None = None
    first: ViewTexels | None = None
    for view in views:
        if first is None:
            first = view
            continue
        if own is None:
            own = _LayerFusion(first.islands)
            own.add(first.colors, first.weights, first.priority)
            if first.mirror_colors is not None:
                mirror = _LayerFusion(first.islands)
                mirror.add(first.mirror_colors, first.mirror_weights, first.mirror_priority)  # type: ignore[arg-type]
        own.add(view.colors, view.weights, view.priority)
        if view.mirror_colors is not None:
            mirror = mirror or _LayerFusion(view.islands)
            mirror.add(view.mirror_colors, view.mirror_weights, view.mirror_priority)  # type: ignore[arg-type]
    if first is None:
        raise ValueError("fuse_views needs at least one view")
    if own is None:
        return first
    fused = ViewTexels(*own.result(), first.islands)
    if mirror is not None:
        fused.mirror_colors, fused.mirror_weights, fused.mirror_priority = mirror.result()
    return fused


def _seam_offset(
    seen_colors: NDArray[np.uint8],
    filled: NDArray[np.uint8],
    band: NDArray[np.bool_],
    rim_weights: NDArray[np.float32],
) -> NDArray[np.float32]:
    """Gradient-domain blend of the fill into the seen texels: a smooth offset field that equals
    (seen − fill) on the rim band of the seen region (texels weighted by `rim_weights`) and continues
    it smoothly everywhere else (a membrane interpolation, solved on ≤ OFFSET_GRID² blocks by a
    push-pull pyramid and Jacobi sweeps). Added to the fill, it keeps the fill's gradients (the
    mirrored detail) and removes the step at the rim, which is what Poisson cloning does. A difference
    larger than OFFSET_LIMIT is not shading (a pixel off the head, a specular spot) and is clipped."""
    size = len(band)
    block = max(1, size // OFFSET_GRID)
    cells = size // block
    texels = np.flatnonzero(band)
    rows, cols = np.divmod(texels, size)
    keep = (rows < cells * block) & (cols < cells * block)
    texels, rows, cols = texels[keep], rows[keep], cols[keep]
    cell = (rows // block) * cells + cols // block
    step = seen_colors.reshape(-1, 3)[texels].astype(np.float32) - filled.reshape(-1, 3)[texels]
    rim = rim_weights.reshape(-1)[texels]
    weight = np.bincount(cell, rim, cells * cells).astype(np.float32)
    summed = np.stack(
        [
            np.bincount(cell, np.clip(step[:, c], -OFFSET_LIMIT, OFFSET_LIMIT) * rim, cells * cells)
            for c in range(3)
        ],
        axis=-1,
    ).astype(np.float32)
    weight = weight.reshape(cells, cells) * np.float32(1.0 / (block * block))  # share of the block
    summed = summed.reshape(cells, cells, 3) * np.float32(1.0 / (block * block))
    mean = np.divide(summed, weight[..., None], out=np.zeros_like(summed), where=weight[..., None] > 0)
    trusted = np.minimum(weight * 4.0, 1.0).astype(np.float32)[..., None]
    offset = push_pull_fill(mean, trusted[..., 0])
    # Push-pull steps where trust ends; Jacobi sweeps of the membrane equation (each block the mean
    # of its neighbours, trusted blocks held) make the field continuous there.
    held = trusted * mean
    for _ in range(OFFSET_SWEEPS):
        offset = held + (1.0 - trusted) * np.asarray(cv2.blur(offset, (3, 3)), np.float32)
    full = cv2.resize(offset, (cells * block, cells * block), interpolation=cv2.INTER_LINEAR)
    if cells * block < size:
        pad = size - cells * block
        full = cv2.copyMakeBorder(full, 0, pad, 0, pad, cv2.BORDER_REPLICATE)
    return np.asarray(full, np.float32)


def finish_texture(texels: ViewTexels) -> TextureResult:
    """The texture from unwrapped texels: seen texels keep the photo's colors; the rest of each island
    is filled from the mirror point where the photo sees it, else inpainted, and the fill is blended
    into the seen part in the gradient domain (`_seam_offset`) and cross-faded over a few texels at
    the rim and where the photo sees poorly, so there is no seam; outside the islands, push-pull."""
    islands = texels.islands
    size = texels.size
    seen = texels.seen()
    coverage = texels.covered(seen)
    if not coverage.any():
        empty = np.full((size, size, 3), 128, dtype=np.uint8)
        return TextureResult(empty, coverage, seen, islands.view(bool))
    # The fill under every island texel: the mirror where the photo sees the mirror point well, else
    # the photo itself where it sees the texel well (both weight ≥ TRUSTED_WEIGHT) away from the rim
    # band of the seen region, inpainted in between; outside the islands, push-pull (so that texture
    # filtering never pulls black). Under the rim band the fill is what the fill alone gives, so
    # (photo − fill) there measures the seam, which the offset removes.
    distance = _distance_to_unseen(seen, islands)
    band = seen & (distance <= max(1, round(SEAM_RIM * size / 1024)))
    filled = np.zeros((size, size, 3), dtype=np.uint8)
    known = seen & ~band & (texels.weights >= TRUSTED_WEIGHT)
    cv2.copyTo(texels.colors, known.view(np.uint8), filled)
    if texels.mirror_colors is not None and texels.mirror_weights is not None:
        from_mirror = _opened(texels.mirror_weights >= TRUSTED_WEIGHT, islands)
        cv2.copyTo(texels.mirror_colors, from_mirror.view(np.uint8), filled)
        known |= from_mirror
    filled = _fill_outside(filled, known.view(np.uint8))
    filled = _inpaint(filled, np.asarray(cv2.subtract(islands, known.view(np.uint8)), np.uint8))
    weights = np.minimum(texels.weights, np.float32(1.0))
    if band.any():
        offset = _seam_offset(texels.colors, filled, band, weights)
        filled = np.asarray(cv2.add(filled, offset, dtype=cv2.CV_8U), np.uint8)
    # Seen texels cross-fade into the fill where the photo sees them poorly and over the first few
    # texels from the rim of the seen region.
    alpha = np.multiply(weights, _feather(distance, seen), out=weights)
    texture = np.asarray(cv2.blendLinear(texels.colors, filled, alpha, 1.0 - alpha), np.uint8)
    inside = islands.view(bool)
    return TextureResult(texture, coverage, seen, inside)


def unwrap_texture(
    rgb: NDArray[np.uint8],
    mesh_image: Mesh,
    size: int = 1024,
    symmetry: NDArray[np.integer] | None = None,
    mask: PhotoMask | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """One photo unwrapped and finished (`unwrap_view` then `finish_texture`).

    Returns the texture (S, S, 3) uint8, row 0 at v = 1, and the coverage mask (S, S) bool: texels
    colored from the photo (directly or through the mirror), as opposed to inpainted or outside the
    UV islands. `build_texture` also gives the texels seen directly.
    """
    result = build_texture(rgb, mesh_image, size, symmetry, mask)
    return result.texture, result.coverage


def build_texture(
    rgb: NDArray[np.uint8],
    mesh_image: Mesh,
    size: int = 1024,
    symmetry: NDArray[np.integer] | None = None,
    mask: PhotoMask | None = None,
) -> TextureResult:
    """One photo's finished texture with its coverage and seen masks."""
    return finish_texture(unwrap_view(rgb, mesh_image, size, symmetry, mask))

"""Preview stage: the photo with every head's mesh wireframe drawn over it, beside shaded renders
of the textured heads.

The renders come from a small z-buffer rasterizer (numpy, vectorized over all triangle/pixel
pairs): orthographic camera, per-pixel interpolated UVs, bilinear texture lookup
(OpenCV `remap`), and a Lambert key light plus ambient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from headforge.pipeline.geometry import sample_uv_bilinear, vertex_normals
from headforge.pipeline.types import Head, Mesh

BACKGROUND = (38, 40, 46)
HEAD_COLORS = (  # RGB, cycled per head
    (80, 220, 120),
    (255, 170, 40),
    (90, 170, 255),
    (255, 90, 150),
    (200, 120, 255),
    (60, 230, 230),
    (240, 240, 90),
)
MIN_PHOTO_HEIGHT = 384
MAX_PHOTO_HEIGHT = 768
MAX_RENDERED_HEADS = 16
MAX_RENDER_SIZE = 384  # larger tiles are upscaled: the rasterizer's cost grows faster than its pixels
RENDER_YAW_DEGREES = 25.0  # a three-quarter turn, so depth reads in the render
LIGHT_DIRECTION = np.array([0.35, 0.45, 1.0]) / np.linalg.norm(
    [0.35, 0.45, 1.0]
)  # view space, toward the light
AMBIENT = 0.35
WIREFRAME_OPACITY = 0.7


@dataclass(frozen=True)
class Raster:
    """Per pixel: the nearest triangle (-1 for none) and its barycentric weights."""

    triangle: NDArray[np.int32]  # (H, W)
    barycentric: NDArray[np.float32]  # (H, W, 3)

    @property
    def mask(self) -> NDArray[np.bool_]:
        return self.triangle >= 0


def rasterize(
    points: NDArray[np.floating],
    faces: NDArray[np.integer],
    width: int,
    height: int,
    cull_back_faces: bool = False,
) -> Raster:
    """Z-buffer rasterization of triangles given in screen space.

    `points` are (V, 3): x right and y down in pixels (pixel centers at integer coordinates), and
    depth, smaller nearer. With `cull_back_faces`, triangles that are clockwise on screen (facing
    away, for meshes wound counter-clockwise seen from outside) are skipped.
    """
    p = np.asarray(points, dtype=np.float32)
    f = np.asarray(faces, dtype=np.int64)
    triangle = np.full((height, width), -1, dtype=np.int32)
    barycentric = np.zeros((height, width, 3), dtype=np.float32)
    if len(f) == 0:
        return Raster(triangle, barycentric)
    a, b, c = p[f[:, 0]], p[f[:, 1]], p[f[:, 2]]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    corners = np.stack([a, b, c], axis=1)
    x0 = np.clip(np.ceil(corners[:, :, 0].min(axis=1)), 0, width).astype(np.int64)
    x1 = np.clip(np.floor(corners[:, :, 0].max(axis=1)), -1, width - 1).astype(np.int64)
    y0 = np.clip(np.ceil(corners[:, :, 1].min(axis=1)), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(corners[:, :, 1].max(axis=1)), -1, height - 1).astype(np.int64)
    spans_x = np.maximum(x1 - x0 + 1, 0)
    spans_y = np.maximum(y1 - y0 + 1, 0)
    # y points down on screen, so a counter-clockwise (front-facing) triangle has negative area.
    facing = area < -1e-9 if cull_back_faces else np.abs(area) > 1e-9
    keep = facing & (spans_x > 0) & (spans_y > 0)
    index = np.flatnonzero(keep)
    if len(index) == 0:
        return Raster(triangle, barycentric)
    # Edge functions and depth are affine in (x, y) over each triangle: w = gx * x + gy * y + g0.
    a64, b64, c64 = (corner[index].astype(np.float64) for corner in (a, b, c))
    inverse_area = 1.0 / area[index].astype(np.float64)
    w1_x, w1_y = (c64[:, 1] - a64[:, 1]) * inverse_area, (a64[:, 0] - c64[:, 0]) * inverse_area
    w2_x, w2_y = (a64[:, 1] - b64[:, 1]) * inverse_area, (b64[:, 0] - a64[:, 0]) * inverse_area
    # Evaluate at each bounding box's top-left pixel, then step by the gradients.
    origin_x, origin_y = x0[index] - a64[:, 0], y0[index] - a64[:, 1]
    w1_0 = w1_x * origin_x + w1_y * origin_y
    w2_0 = w2_x * origin_x + w2_y * origin_y
    dz1, dz2 = b64[:, 2] - a64[:, 2], c64[:, 2] - a64[:, 2]
    z_x, z_y, z_0 = dz1 * w1_x + dz2 * w2_x, dz1 * w1_y + dz2 * w2_y, a64[:, 2] + dz1 * w1_0 + dz2 * w2_0
    # One contiguous row per coefficient, so each candidate gathers only the ones it needs.
    coefficients = np.stack([w1_x, w1_y, w1_0, w2_x, w2_y, w2_0, z_x, z_y, z_0]).astype(np.float32)

    counts = (spans_x[index] * spans_y[index]).astype(np.int64)
    slot = np.repeat(np.arange(len(index), dtype=np.int32), counts)
    local = np.arange(int(counts.sum()), dtype=np.int32) - np.repeat(
        (np.cumsum(counts) - counts).astype(np.int32), counts
    )
    span = spans_x[index].astype(np.int32)[slot]
    local_y = local // span
    local_x = (local - local_y * span).astype(np.float32)
    local_y_f = local_y.astype(np.float32)
    w1 = coefficients[0][slot] * local_x + coefficients[1][slot] * local_y_f + coefficients[2][slot]
    w2 = coefficients[3][slot] * local_x + coefficients[4][slot] * local_y_f + coefficients[5][slot]
    w0 = 1.0 - w1 - w2
    tolerance = -1e-5
    inside = np.flatnonzero((w0 >= tolerance) & (w1 >= tolerance) & (w2 >= tolerance))
    slot = slot[inside]
    w0, w1, w2 = w0[inside], w1[inside], w2[inside]
    local_x, local_y = local_x[inside].astype(np.int64), local_y[inside].astype(np.int64)
    depth = coefficients[6][slot] * local_x + coefficients[7][slot] * local_y + coefficients[8][slot]
    pixel = (y0[index][slot] + local_y) * width + x0[index][slot] + local_x
    zbuffer = np.full(width * height, np.inf, dtype=np.float32)
    np.minimum.at(zbuffer, pixel, depth.astype(np.float32))
    first = np.flatnonzero(depth.astype(np.float32) == zbuffer[pixel])  # ties (shared edges): last write wins
    pixel = pixel[first]
    triangle.reshape(-1)[pixel] = index[slot[first]]
    flat = barycentric.reshape(-1)  # one channel at a time: single-element scatters are fast
    for corner, weight in enumerate((w0, w1, w2)):
        flat[pixel * 3 + corner] = weight[first]
    return Raster(triangle, barycentric)


def _rotation_y(degrees: float) -> NDArray[np.float64]:
    angle = math.radians(degrees)
    cosine, sine = math.cos(angle), math.sin(angle)
    return np.array([[cosine, 0.0, sine], [0.0, 1.0, 0.0], [-sine, 0.0, cosine]])


def render_textured(
    mesh: Mesh,
    texture: NDArray[np.uint8] | None,
    size: int,
    yaw_degrees: float = RENDER_YAW_DEGREES,
    background: tuple[int, int, int] = BACKGROUND,
) -> NDArray[np.uint8]:
    """A `size`×`size` RGB render of a head-frame mesh (+Y up, face toward +Z), turned by
    `yaw_degrees` about +Y, orthographic, Lambert-shaded, textured when `texture` is given."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    image = _filled(size, size, background)
    if len(vertices) == 0 or len(faces) == 0:
        return image
    view = vertices @ _rotation_y(yaw_degrees).T
    low, high = view[faces].reshape(-1, 3).min(axis=0), view[faces].reshape(-1, 3).max(axis=0)
    extent = max(float(high[0] - low[0]), float(high[1] - low[1]), 1e-9)
    scale = 0.9 * size / extent
    center = 0.5 * (low + high)
    screen = np.empty_like(view)
    screen[:, 0] = (view[:, 0] - center[0]) * scale + 0.5 * size - 0.5
    screen[:, 1] = (center[1] - view[:, 1]) * scale + 0.5 * size - 0.5
    screen[:, 2] = -view[:, 2]  # the camera looks down -Z, so larger z is nearer
    raster = rasterize(screen, faces, size, size, cull_back_faces=True)
    pixels = np.flatnonzero(raster.triangle.reshape(-1) >= 0)
    if len(pixels) == 0:
        return image
    triangle = raster.triangle.reshape(-1)[pixels]
    # np.take gathers whole rows at once (much faster than fancy indexing for short rows).
    weights = np.take(raster.barycentric.reshape(-1, 3), pixels, axis=0)
    # Gouraud shading: light per vertex, interpolate the scalar (cheap, smooth enough for a preview).
    vertex_shade = AMBIENT + (1.0 - AMBIENT) * np.clip(
        vertex_normals(view, faces) @ LIGHT_DIRECTION, 0.0, 1.0
    )
    shade = _interpolate(vertex_shade.astype(np.float32), np.take(faces, triangle, axis=0), weights)
    if texture is not None and mesh.uvs is not None and len(mesh.uvs) > 0:
        uv_faces = faces if mesh.uv_faces is None else np.asarray(mesh.uv_faces, dtype=np.int64)
        corners = np.take(uv_faces, triangle, axis=0)
        uvs = np.asarray(mesh.uvs, dtype=np.float32)
        u = _interpolate(np.ascontiguousarray(uvs[:, 0]), corners, weights)
        v = _interpolate(np.ascontiguousarray(uvs[:, 1]), corners, weights)
        colors = sample_uv_bilinear(texture, u, v).astype(np.float32)
    else:
        colors = np.full((len(triangle), 3), 200.0, dtype=np.float32)
    shaded = np.clip(colors * shade[:, None], 0, 255).astype(np.uint8)
    flat = image.reshape(-1)  # one channel at a time: single-byte scatters are fast
    for channel in range(3):
        flat[pixels * 3 + channel] = shaded[:, channel]
    return image


def _filled(height: int, width: int, color: tuple[int, int, int]) -> NDArray[np.uint8]:
    """A (height, width, 3) image of one color (row-wise copies: faster than broadcasting a pixel)."""
    return np.tile(np.asarray(color, dtype=np.uint8), (height, width, 1))


def _interpolate(
    values: NDArray[np.float32], corners: NDArray[np.int64], weights: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Barycentric interpolation of a per-vertex scalar at many points."""
    result: NDArray[np.float32] = values[corners[:, 0]] * weights[:, 0]
    result += values[corners[:, 1]] * weights[:, 1]
    result += values[corners[:, 2]] * weights[:, 2]
    return result


def draw_wireframes(rgb: NDArray[np.uint8], heads: list[Head], scale: float = 1.0) -> NDArray[np.uint8]:
    """A copy of `rgb` (already resized by `scale`) with each head's image-frame mesh, box and label."""
    canvas = np.ascontiguousarray(rgb.copy())
    thickness = max(1, round(min(canvas.shape[:2]) / 400))
    lines = canvas.copy()
    for head in heads:
        mesh = head.mesh_image
        if mesh is not None and len(mesh.faces):
            points = np.asarray(mesh.vertices, dtype=np.float64)[:, :2] * scale
            polygons = np.round(points[np.asarray(mesh.faces)] * 16).astype(np.int32)
            color = HEAD_COLORS[head.index % len(HEAD_COLORS)]
            cv2.polylines(lines, list(polygons), True, color, 1, cv2.LINE_AA, shift=4)
    for head in heads:
        # Small faces get fainter lines: at a few pixels per triangle the wireframe is a solid blob.
        x0, y0, x1, y1 = (float(v) * scale for v in head.detection.box)
        opacity = float(np.clip(max(x1 - x0, y1 - y0) / 400.0, 0.3, WIREFRAME_OPACITY))
        margin = 0.5 * max(x1 - x0, y1 - y0)
        left, top = max(int(x0 - margin), 0), max(int(y0 - margin), 0)
        right, bottom = min(int(x1 + margin) + 1, canvas.shape[1]), min(int(y1 + margin) + 1, canvas.shape[0])
        if right > left and bottom > top:
            region = canvas[top:bottom, left:right]
            cv2.addWeighted(lines[top:bottom, left:right], opacity, region, 1.0 - opacity, 0.0, dst=region)
    for head in heads:
        color = HEAD_COLORS[head.index % len(HEAD_COLORS)]
        x0, y0, x1, y1 = (float(v) * scale for v in head.detection.box)
        cv2.rectangle(canvas, (round(x0), round(y0)), (round(x1), round(y1)), color, thickness, cv2.LINE_AA)
        label_scale = max(0.4, min(canvas.shape[:2]) / 900)
        cv2.putText(
            canvas,
            f"h{head.index}",
            (round(x0), max(round(y0) - 4, 12)),
            cv2.FONT_HERSHEY_SIMPLEX,
            label_scale,
            color,
            thickness,
            cv2.LINE_AA,
        )
    return canvas


def compose_preview(rgb: NDArray[np.uint8], heads: list[Head]) -> NDArray[np.uint8]:
    """The full preview: photo with wireframes on the left, a grid of head renders on the right
    (one tile per head, up to `MAX_RENDERED_HEADS`). Without heads, just the photo."""
    height, width = rgb.shape[:2]
    display_height = int(min(max(height, MIN_PHOTO_HEIGHT), MAX_PHOTO_HEIGHT))
    scale = display_height / height
    display_width = max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    photo: NDArray[np.uint8] = rgb
    if scale != 1:
        photo = np.asarray(
            cv2.resize(rgb, (display_width, display_height), interpolation=interpolation), np.uint8
        )
    left = draw_wireframes(photo, heads, scale)
    rendered = [h for h in heads if h.mesh is not None][:MAX_RENDERED_HEADS]
    if not rendered:
        return left
    rows = math.ceil(math.sqrt(len(rendered)))
    columns = math.ceil(len(rendered) / rows)
    tile = display_height // rows
    panel = _filled(display_height, tile * columns, BACKGROUND)
    for slot, head in enumerate(rendered):
        assert head.mesh is not None
        row, column = divmod(slot, columns)
        render = render_textured(head.mesh, head.texture, min(tile, MAX_RENDER_SIZE))
        if render.shape[0] != tile:
            render = np.asarray(
                cv2.resize(render, (tile, tile), interpolation=cv2.INTER_CUBIC), dtype=np.uint8
            )
        color = HEAD_COLORS[head.index % len(HEAD_COLORS)]
        cv2.putText(render, f"h{head.index}", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, color, 1, cv2.LINE_AA)
        panel[row * tile : (row + 1) * tile, column * tile : (column + 1) * tile] = render
    return np.ascontiguousarray(np.concatenate([left, panel], axis=1))

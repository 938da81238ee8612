"""Animation rig of a head: FLAME expression morph targets and splats bound to the mesh's triangles.

Morph targets (`MorphTargets`): position offsets per vertex, in the mesh's frame, that a glTF player
adds with a weight each. For a FLAME head, target k is the change of the head (its own identity β,
fitted expression ψ and jaw) when ψ_k grows by 1; with the neck and eyes at rest FLAME is affine in
ψ at a fixed jaw rotation, so the targets are exact for any weights. The last target opens the jaw
by `JAW_OPEN_RAD` about FLAME's x axis from the fitted jaw (a linearisation: jaw rotation is not
linear).

Splat binding (`SplatBinding`): each splat stores its triangle, barycentric coordinates, an offset
along the triangle's unit normal (meters), and its rotation and scale in the triangle's frame. The
frame of triangle (v0, v1, v2) is: t = (v1 − v0)/|v1 − v0|, n = (e1 × e2)/|e1 × e2| with
e1 = v1 − v0, e2 = v2 − v0, and b = n × t, as the columns of R = [t b n]; its size is
σ = sqrt(|e1 × e2|). A posed splat is
    centre   = Σ_i bary_i v_i + offset · n
    rotation = R · R_local            (as a w, x, y, z quaternion)
    scale    = scale_local · σ
so splats follow, turn and stretch with their triangles. The file format is in docs/artifacts.md.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

BINDING_FORMAT = "headforge-splat-binding/1"
DEFAULT_EXPRESSIONS = 16
MAX_EXPRESSIONS = 50  # the fit's expression components
JAW_OPEN_RAD = 0.35
JAW_TARGET = "jaw_open"

F32 = NDArray[np.float32]


def expression_target_names(count: int) -> list[str]:
    """Morph target names: `expression_0` … `expression_{count-1}`, then `jaw_open`."""
    return [f"expression_{k}" for k in range(count)] + [JAW_TARGET]


@dataclass
class MorphTargets:
    """Named per-vertex position offsets (K, V, 3), in the owning mesh's frame and vertex order."""

    names: list[str]
    deltas: F32

    def __post_init__(self) -> None:
        if self.deltas.ndim != 3 or self.deltas.shape[0] != len(self.names) or self.deltas.shape[2] != 3:
            raise ValueError(f"morph deltas must be ({len(self.names)}, V, 3), got {self.deltas.shape}")


@dataclass
class SplatBinding:
    """Each splat's place on the mesh (see the module docstring for the frame)."""

    triangles: NDArray[np.int32]  # (N,) index into the mesh's faces
    barycentrics: F32  # (N, 3)
    offsets: F32  # (N,) meters along the triangle's unit normal
    rotations: F32  # (N, 4) w, x, y, z in the triangle's frame
    scales: F32  # (N, 3) in units of the triangle's size σ


def triangle_frames(
    vertices: NDArray[np.floating], faces: NDArray[np.integer], triangles: NDArray[np.integer]
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """For `triangles` of a mesh (vertices (..., V, 3), any leading batch shape): the frame
    matrices (..., N, 3, 3) with columns t, b, n, the size σ (..., N), and the corners (..., N, 3, 3)."""
    corner_ids = np.asarray(faces)[np.asarray(triangles)]  # (N, 3)
    corners = np.take(vertices, corner_ids, axis=-2)  # (..., N, 3, 3)
    e1 = corners[..., 1, :] - corners[..., 0, :]
    e2 = corners[..., 2, :] - corners[..., 0, :]
    cross = np.cross(e1, e2)
    double_area = np.linalg.norm(cross, axis=-1)
    normal = cross / np.maximum(double_area, 1e-30)[..., None]
    tangent = e1 / np.maximum(np.linalg.norm(e1, axis=-1), 1e-30)[..., None]
    bitangent = np.cross(normal, tangent)
    frames = np.stack([tangent, bitangent, normal], axis=-1)
    return frames, np.sqrt(double_area), corners


def quaternion_to_matrix(quaternions: NDArray[np.floating]) -> NDArray[Any]:
    """Unit quaternions (..., 4), w first, to rotation matrices (..., 3, 3)."""
    q = quaternions / np.linalg.norm(quaternions, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1),
        ],
        axis=-2,
    )


def matrix_to_quaternion(matrices: NDArray[np.floating]) -> NDArray[Any]:
    """Rotation matrices (..., 3, 3) to unit quaternions (..., 4), w first and w ≥ 0 (vectorised
    Shepperd: each row uses the best-conditioned of its four candidate formulas)."""
    m = matrices
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    candidates = np.stack(
        [
            np.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            np.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            np.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
            np.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
        ],
        axis=-2,
    )  # fmt: skip  # (..., 4 candidates, 4): candidate c is 4·q·q_c, best when its q_c is largest
    best = np.argmax(np.stack([m00 + m11 + m22, m00, m11, m22], axis=-1), axis=-1)
    chosen = np.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    chosen = chosen / np.linalg.norm(chosen, axis=-1, keepdims=True)
    return np.asarray(chosen * np.where(chosen[..., :1] < 0, -1.0, 1.0), dtype=matrices.dtype)


def bind_splats(
    vertices: NDArray[np.floating],
    faces: NDArray[np.integer],
    triangles: NDArray[np.integer],
    barycentrics: NDArray[np.floating],
    means: NDArray[np.floating],
    rotations: NDArray[np.floating],
    scales: NDArray[np.floating],
) -> SplatBinding:
    """Express splats (world means, w-x-y-z rotations and scales) in their triangles' frames."""
    vertices64 = np.asarray(vertices, np.float64)
    frames, size, corners = triangle_frames(vertices64, faces, triangles)
    bary = np.asarray(barycentrics, np.float64)
    on_surface = np.einsum("nk,nkc->nc", bary, corners)
    offsets = np.einsum("nc,nc->n", np.asarray(means, np.float64) - on_surface, frames[..., 2])
    local = np.einsum("nji,njk->nik", frames, quaternion_to_matrix(np.asarray(rotations, np.float64)))
    return SplatBinding(
        triangles=np.asarray(triangles, np.int32),
        barycentrics=bary.astype(np.float32),
        offsets=offsets.astype(np.float32),
        rotations=matrix_to_quaternion(local).astype(np.float32),
        scales=(np.asarray(scales, np.float64) / np.maximum(size, 1e-30)[:, None]).astype(np.float32),
    )


@dataclass
class PosedSplats:
    """Splats posed on a deformed mesh (leading batch axes as the vertices had)."""

    means: NDArray[Any]  # (..., N, 3)
    normals: NDArray[Any]  # (..., N, 3)
    rotations: NDArray[Any]  # (..., N, 4) w, x, y, z
    scales: NDArray[Any]  # (..., N, 3)


class SplatDeformer:
    """Poses bound splats on deformed copies of their mesh; precomputes what does not change.

    The math runs on one contiguous float32 array per coordinate (structure of arrays), which is
    several times faster in NumPy than (N, 3)-shaped temporaries."""

    def __init__(self, binding: SplatBinding, faces: NDArray[np.integer]) -> None:
        self.binding = binding
        self.faces = np.asarray(faces, np.int64)
        self.corner_ids = np.ascontiguousarray(self.faces[binding.triangles].T)  # (3 corners, N)
        self.bary = np.ascontiguousarray(binding.barycentrics.astype(np.float32).T)  # (3, N)
        self.offsets = binding.offsets.astype(np.float32)
        local = quaternion_to_matrix(binding.rotations.astype(np.float64)).astype(np.float32)
        self.local = np.ascontiguousarray(local.transpose(1, 2, 0))  # (3, 3, N)
        # Splats sampled by the splat stage lie in their triangle's frame: then the frame is the rotation.
        self.identity = bool(np.abs(local - np.eye(3, dtype=np.float32)).max(initial=0.0) < 1e-6)
        self.local_scales = binding.scales.astype(np.float32)

    def pose(self, vertices: NDArray[np.floating]) -> PosedSplats:
        """Splats on `vertices` (..., V, 3) (the mesh's vertex order; float32 math)."""
        coords = np.moveaxis(np.asarray(vertices, np.float32), -1, 0)  # (3, ..., V)
        corners = [[np.take(coords[axis], ids, axis=-1) for axis in range(3)] for ids in self.corner_ids]
        (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = corners
        ax, ay, az = x1 - x0, y1 - y0, z1 - z0
        bx, by, bz = x2 - x0, y2 - y0, z2 - z0
        nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
        double_area = np.sqrt(nx * nx + ny * ny + nz * nz)
        inverse = 1.0 / np.maximum(double_area, np.float32(1e-30))
        nx, ny, nz = nx * inverse, ny * inverse, nz * inverse
        inverse = 1.0 / np.maximum(np.sqrt(ax * ax + ay * ay + az * az), np.float32(1e-30))
        tx, ty, tz = ax * inverse, ay * inverse, az * inverse
        sx, sy, sz = ny * tz - nz * ty, nz * tx - nx * tz, nx * ty - ny * tx  # bitangent n × t
        w0, w1, w2 = self.bary
        offsets = self.offsets
        means = np.stack(
            [
                w0 * x0 + w1 * x1 + w2 * x2 + offsets * nx,
                w0 * y0 + w1 * y1 + w2 * y2 + offsets * ny,
                w0 * z0 + w1 * z1 + w2 * z2 + offsets * nz,
            ],
            axis=-1,
        )
        frame = ((tx, sx, nx), (ty, sy, ny), (tz, sz, nz))  # frame[i][j]: row i, column j
        local = self.local
        rotation = (
            [[frame[i][j] for j in range(3)] for i in range(3)]
            if self.identity
            else [
                [
                    frame[i][0] * local[0, j] + frame[i][1] * local[1, j] + frame[i][2] * local[2, j]
                    for j in range(3)
                ]
                for i in range(3)
            ]
        )
        return PosedSplats(
            means=means,
            normals=np.stack([nx, ny, nz], axis=-1),
            rotations=_shepperd(rotation),
            scales=self.local_scales * np.sqrt(double_area)[..., None],
        )


def _shepperd(m: list[list[NDArray[Any]]]) -> NDArray[Any]:
    """Quaternions (..., 4), w first and w ≥ 0, of rotation matrices given as 3 × 3 nested lists of
    arrays (structure of arrays); each element uses the best-conditioned of four formulas."""
    trace = m[0][0] + m[1][1] + m[2][2]
    candidates = [
        (1 + trace, m[2][1] - m[1][2], m[0][2] - m[2][0], m[1][0] - m[0][1]),
        (m[2][1] - m[1][2], 1 + m[0][0] - m[1][1] - m[2][2], m[0][1] + m[1][0], m[0][2] + m[2][0]),
        (m[0][2] - m[2][0], m[0][1] + m[1][0], 1 - m[0][0] + m[1][1] - m[2][2], m[1][2] + m[2][1]),
        (m[1][0] - m[0][1], m[0][2] + m[2][0], m[1][2] + m[2][1], 1 - m[0][0] - m[1][1] + m[2][2]),
    ]
    diagonal = np.maximum(np.maximum(m[0][0], m[1][1]), m[2][2])
    first = trace >= diagonal
    second = ~first & (m[0][0] >= m[1][1]) & (m[0][0] >= m[2][2])
    third = ~first & ~second & (m[1][1] >= m[2][2])
    parts = [
        np.where(
            first,
            candidates[0][c],
            np.where(second, candidates[1][c], np.where(third, candidates[2][c], candidates[3][c])),
        )
        for c in range(4)
    ]
    inverse = 1.0 / np.sqrt(
        parts[0] * parts[0] + parts[1] * parts[1] + parts[2] * parts[2] + parts[3] * parts[3]
    )
    inverse = np.where(parts[0] < 0, -inverse, inverse)
    return np.stack([part * inverse for part in parts], axis=-1)


def binding_npz_bytes(binding: SplatBinding, faces: NDArray[np.integer], vertex_count: int) -> bytes:
    """The binding file (`h<i>_splats_binding.npz`, uncompressed NumPy archive; docs/artifacts.md)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format=np.array(BINDING_FORMAT),
        triangle=binding.triangles.astype("<i4"),
        barycentric=binding.barycentrics.astype("<f4"),
        normal_offset=binding.offsets.astype("<f4"),
        rotation=binding.rotations.astype("<f4"),
        scale=binding.scales.astype("<f4"),
        faces=np.asarray(faces).astype("<i4"),
        vertex_count=np.array(vertex_count, "<i4"),
    )
    return buffer.getvalue()


def read_binding(data: bytes) -> tuple[SplatBinding, NDArray[np.int32], int]:
    """Parse a binding file: (binding, faces, vertex count). Raises ValueError when malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if str(archive["format"]) != BINDING_FORMAT:
                raise ValueError(f"not a {BINDING_FORMAT} file")
            binding = SplatBinding(
                triangles=archive["triangle"].astype(np.int32),
                barycentrics=archive["barycentric"].astype(np.float32),
                offsets=archive["normal_offset"].astype(np.float32),
                rotations=archive["rotation"].astype(np.float32),
                scales=archive["scale"].astype(np.float32),
            )
            faces = archive["faces"].astype(np.int32)
            vertex_count = int(archive["vertex_count"])
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"unreadable splat binding: {error}") from error
    count = len(binding.triangles)
    shapes = {
        "barycentric": (binding.barycentrics.shape, (count, 3)),
        "normal_offset": (binding.offsets.shape, (count,)),
        "rotation": (binding.rotations.shape, (count, 4)),
        "scale": (binding.scales.shape, (count, 3)),
    }
    for name, (actual, expected) in shapes.items():
        if actual != expected:
            raise ValueError(f"splat binding {name} has shape {actual}, expected {expected}")
    if (
        faces.ndim != 2
        or faces.shape[1] != 3
        or (count and not 0 <= binding.triangles.min() <= binding.triangles.max() < len(faces))
    ):
        raise ValueError("splat binding triangles do not index its faces")
    return binding, faces, vertex_count

"""A synthetic studio head template for tests and the registration benchmark.

MetaHuman's head cannot be used in tests (license), so this builds a look-alike at its size:
a closed, head-sized (about 0.2 m tall) star-shaped surface with a nose, brows and a chin, meshed as
139 rings of 173 vertices plus two poles (24,049 vertices, like MetaHuman's head), with a UV layout
cut along a seam at the back of the head (seam vertices and poles carry several UVs) and a `face`
vertex group. The same analytic surface can be sampled with another topology (a subdivided
icosahedron) and deformed by a known smooth field, for the accuracy cases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

RINGS = 139
SEGMENTS = 173
NUM_VERTICES = RINGS * SEGMENTS + 2  # 24,049


@dataclass
class SyntheticTemplate:
    vertices: np.ndarray  # (V, 3) meters, +Y up, face toward +Z
    faces: np.ndarray  # (F, 3) counter-clockwise from outside
    uvs: np.ndarray  # (T, 2)
    uv_faces: np.ndarray  # (F, 3)
    face_region: np.ndarray  # (V,) bool


def radius(directions: np.ndarray) -> np.ndarray:
    """Distance from the head's center to its surface along unit `directions` (…, 3)."""
    x, y, z = directions[..., 0], directions[..., 1], directions[..., 2]
    ellipsoid = 1.0 / np.sqrt((x / 0.079) ** 2 + (y / 0.104) ** 2 + (z / 0.094) ** 2)

    def bump(center: tuple[float, float, float], width: float, height: float) -> np.ndarray:
        c = np.asarray(center) / np.linalg.norm(center)
        cosine = np.clip(directions @ c, -1.0, 1.0)
        return height * np.exp(-(1.0 - cosine) / width)

    nose = bump((0.0, -0.05, 1.0), 0.006, 0.024)
    brows = bump((0.3, 0.28, 1.0), 0.01, 0.006) + bump((-0.3, 0.28, 1.0), 0.01, 0.006)
    chin = bump((0.0, -0.8, 1.0), 0.02, 0.008)
    cheeks = bump((0.55, -0.2, 1.0), 0.03, 0.004) + bump((-0.55, -0.2, 1.0), 0.03, 0.004)
    return np.asarray(ellipsoid + nose + brows + chin + cheeks)


def on_surface(directions: np.ndarray) -> np.ndarray:
    unit = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    return unit * radius(unit)[..., None]


def make_template() -> SyntheticTemplate:
    """The 24,049-vertex template with a UV seam at the back and a face region."""
    thetas = np.pi * (np.arange(RINGS) + 1) / (RINGS + 1)  # from the crown (+Y) down
    phis = -np.pi + 2 * np.pi * np.arange(SEGMENTS) / SEGMENTS  # 0 = the face (+Z); seam at the back
    theta, phi = np.meshgrid(thetas, phis, indexing="ij")
    directions = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], axis=-1)
    rings = on_surface(directions.reshape(-1, 3))
    top, bottom = on_surface(np.array([[0.0, 1.0, 0.0]])), on_surface(np.array([[0.0, -1.0, 0.0]]))
    vertices = np.concatenate([top, rings, bottom])
    bottom_id = len(vertices) - 1

    def vid(r: np.ndarray, s: np.ndarray) -> np.ndarray:
        return 1 + r * SEGMENTS + s % SEGMENTS

    # UVs: a (SEGMENTS + 1)-wide grid per ring (the seam column twice), then one pole UV per segment.
    ring_uv = np.stack(
        np.meshgrid(np.arange(SEGMENTS + 1) / SEGMENTS, 1.0 - thetas / np.pi, indexing="xy"), axis=-1
    ).reshape(-1, 2)
    pole_u = (np.arange(SEGMENTS) + 0.5) / SEGMENTS
    top_uv = np.stack([pole_u, np.ones(SEGMENTS)], axis=1)
    bottom_uv = np.stack([pole_u, np.zeros(SEGMENTS)], axis=1)
    uvs = np.concatenate([ring_uv, top_uv, bottom_uv]) * 0.96 + 0.02
    top_uv_base = len(ring_uv)
    bottom_uv_base = top_uv_base + SEGMENTS

    def tid(r: np.ndarray, s: np.ndarray) -> np.ndarray:
        return r * (SEGMENTS + 1) + s

    s = np.arange(SEGMENTS)
    faces = [np.stack([np.zeros(SEGMENTS, int), vid(np.zeros_like(s), s + 1), vid(np.zeros_like(s), s)], 1)]
    uv_faces = [np.stack([top_uv_base + s, tid(np.zeros_like(s), s + 1), tid(np.zeros_like(s), s)], 1)]
    ring_grid, segment_grid = np.meshgrid(np.arange(RINGS - 1), s, indexing="ij")
    r, s2 = ring_grid.reshape(-1), segment_grid.reshape(-1)
    a, b, c, d = vid(r, s2), vid(r, s2 + 1), vid(r + 1, s2 + 1), vid(r + 1, s2)
    ta, tb, tc, td = tid(r, s2), tid(r, s2 + 1), tid(r + 1, s2 + 1), tid(r + 1, s2)
    faces += [np.stack([a, b, c], 1), np.stack([a, c, d], 1)]
    uv_faces += [np.stack([ta, tb, tc], 1), np.stack([ta, tc, td], 1)]
    last = np.full(SEGMENTS, RINGS - 1)
    faces.append(np.stack([np.full(SEGMENTS, bottom_id), vid(last, s), vid(last, s + 1)], 1))
    uv_faces.append(np.stack([bottom_uv_base + s, tid(last, s), tid(last, s + 1)], 1))
    faces_array: np.ndarray = np.concatenate(faces).astype(np.int64)
    uv_faces_array = np.concatenate(uv_faces).astype(np.int64)
    # Wind counter-clockwise from outside (positive signed volume).
    mesh = trimesh.Trimesh(vertices, faces_array, process=False)
    if mesh.volume < 0:
        faces_array = faces_array[:, ::-1].copy()
        uv_faces_array = uv_faces_array[:, ::-1].copy()
    unit = vertices / np.linalg.norm(vertices, axis=1, keepdims=True)
    face_region = (unit[:, 2] > 0.5) & (unit[:, 1] > -0.75) & (unit[:, 1] < 0.55)
    return SyntheticTemplate(vertices, faces_array, uvs, uv_faces_array, face_region)


def icosphere_target(subdivisions: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """The same surface meshed from a subdivided icosahedron (another topology and density)."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    return on_surface(np.asarray(sphere.vertices)), np.asarray(sphere.faces, dtype=np.int64)


def deform(points: np.ndarray) -> np.ndarray:
    """A known smooth deformation at head scale (up to about 1.5 cm): anisotropic scale, a sideways
    bend with height, a wider jaw and two broad bumps."""
    x, y = points[:, 0], points[:, 1]
    out = points * np.array([1.05, 0.96, 1.03])
    out[:, 0] += 0.012 * np.sin(y / 0.09)
    out[:, 2] += 0.006 * np.cos(x / 0.07)
    jaw = np.exp(-((y + 0.07) ** 2) / 0.002)
    out[:, 0] += 0.08 * x * jaw
    for center, amplitude in (((0.05, 0.05, 0.05), 0.006), ((-0.04, -0.03, -0.06), -0.005)):
        weight = np.exp(-np.sum((points - np.asarray(center)) ** 2, axis=1) / (2 * 0.035**2))
        out += amplitude * weight[:, None] * points / np.linalg.norm(points, axis=1, keepdims=True)
    return out


def landmark_vertices(template: SyntheticTemplate, count: int = 60, seed: int = 0) -> np.ndarray:
    """`count` template vertex ids spread over the head (farthest-point sampling)."""
    rng = np.random.default_rng(seed)
    vertices = template.vertices
    chosen = [int(rng.integers(len(vertices)))]
    distance = np.linalg.norm(vertices - vertices[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(vertices - vertices[chosen[-1]], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def write_obj(template: SyntheticTemplate, path: Path) -> Path:
    """The template as an OBJ with `v`, `vt` and `f v/vt` (positions shared across UV seams)."""
    lines = ["# synthetic head template"]
    lines += [f"v {x:.7f} {y:.7f} {z:.7f}" for x, y, z in template.vertices]
    lines += [f"vt {u:.7f} {v:.7f}" for u, v in template.uvs]
    for face, uv_face in zip(template.faces + 1, template.uv_faces + 1, strict=True):
        lines.append("f " + " ".join(f"{a}/{b}" for a, b in zip(face, uv_face, strict=True)))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_landmarks(
    path: Path, entries: list[dict[str, object]], groups: dict[str, list[int]] | None = None
) -> Path:
    document: dict[str, object] = {
        "format": "headforge-template-landmarks",
        "version": 1,
        "landmarks": entries,
    }
    if groups is not None:
        document["groups"] = groups
    path.write_text(json.dumps(document))
    return path


def spread(points: np.ndarray, count: int) -> np.ndarray:
    """`count` indices into `points` spread by farthest-point sampling (deterministic)."""
    chosen = [0]
    distance = np.linalg.norm(points - points[0], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def correspondences(
    template: SyntheticTemplate, points: np.ndarray, center: np.ndarray, kind: str, count: int = 40
) -> list[dict[str, object]]:
    """Landmark entries tying `count` of `points` (ids of a FLAME head or the face mesh, in a head-like
    frame around `center`) to the template vertex in the same direction from the head's center."""
    ids = spread(points, count)
    directions = points[ids] - center
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    unit = template.vertices / np.linalg.norm(template.vertices, axis=1, keepdims=True)
    nearest = np.argmax(directions @ unit.T, axis=1)
    return [{"vertex": int(v), kind: int(i)} for v, i in zip(nearest, ids, strict=True)]


def write_studio_template(directory: Path, *, landmarks: bool = True) -> tuple[Path, Path | None]:
    """The template's OBJ and (optionally) a correspondence file with FLAME ids (from the synthetic
    FLAME head of tests/flame_synthetic.py), MediaPipe ids (from the face mesh's canonical face) and
    the `face` group."""
    from flame_synthetic import make_synthetic_flame

    from headforge.pipeline.topology import load_topology

    template = make_template()
    mesh_path = write_obj(template, directory / "studio.obj")
    if not landmarks:
        return mesh_path, None
    flame = np.asarray(make_synthetic_flame().v_template)
    flame_center = 0.5 * (flame.min(0) + flame.max(0))
    face = load_topology().template
    entries = correspondences(template, flame, flame_center, "flame", 40)
    entries += correspondences(template, face, np.array([0.0, 0.0, -0.06]), "mediapipe", 30)
    groups = {"face": np.flatnonzero(template.face_region).tolist()}
    return mesh_path, write_landmarks(directory / "studio_landmarks.json", entries, groups)

"""The face-mesh topology asset: triangles built from MediaPipe's edge list, UV layout, mirror map."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from needs import missing
from numpy.typing import NDArray

from headforge.errors import InvalidLandmarksError
from headforge.pipeline.geometry import (
    boundary_loops,
    directed_edge_counts,
    face_normals,
    signed_areas_2d,
    triangle_areas,
    vertex_normals,
)
from headforge.pipeline.topology import build_image_mesh, load_topology

ROOT = Path(__file__).resolve().parents[1]
# MediaPipe's named contours (face_mesh_connections.py), for checking what the boundary loops are.
FACE_OVAL = {
    10,
    338,
    297,
    332,
    284,
    251,
    389,
    356,
    454,
    323,
    361,
    288,
    397,
    365,
    379,
    378,
    400,
    377,
    152,
    148,
    176,
    149,
    150,
    136,
    172,
    58,
    132,
    93,
    234,
    127,
    162,
    21,
    54,
    103,
    67,
    109,
}
RIGHT_EYE = {33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173}
LEFT_EYE = {263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398}
INNER_LIPS = {78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311, 310, 415}


def undirected_edges(faces: NDArray[np.int32]) -> Counter[tuple[int, int]]:
    return Counter(tuple(sorted(e)) for tri in faces.tolist() for e in itertools.combinations(tri, 2))


def test_asset_shapes_and_ranges() -> None:
    topology = load_topology()
    assert topology.faces.shape == (852, 3) and topology.faces.dtype == np.int32
    assert topology.uvs.shape == (468, 2)
    assert topology.template.shape == (468, 3)
    assert set(np.unique(topology.faces)) == set(range(468))
    assert (topology.uvs > 0).all() and (topology.uvs < 1).all()


def test_edge_manifold_and_consistently_oriented() -> None:
    faces = load_topology().faces
    assert len({tuple(sorted(t)) for t in faces.tolist()}) == len(faces), "duplicate triangles"
    edges = undirected_edges(faces)
    assert max(edges.values()) == 2, "an edge is shared by more than two triangles"
    directed = directed_edge_counts(faces)
    # Consistent winding: every directed edge is used once; interior edges run both ways.
    assert max(directed.values()) == 1
    interior = [e for e, n in edges.items() if n == 2]
    assert all((a, b) in directed and (b, a) in directed for a, b in interior)
    # Vertex-manifold: each vertex's faces form one fan (its link is one path or cycle).
    for vertex in range(468):
        around = [t for t in faces.tolist() if vertex in t]
        link = Counter(v for t in around for v in t if v != vertex)
        ends = [v for v, n in link.items() if n == 1]
        assert len(ends) in (0, 2), f"vertex {vertex} is not manifold"


def test_boundary_loops_are_outer_oval_eyes_and_mouth() -> None:
    loops = [set(loop) for loop in boundary_loops(load_topology().faces)]
    assert sorted(len(loop) for loop in loops) == [16, 16, 20, 36]
    assert FACE_OVAL in loops
    assert RIGHT_EYE in loops and LEFT_EYE in loops
    assert INNER_LIPS in loops
    # Euler characteristic of a sphere with four holes.
    faces = load_topology().faces
    assert 468 - len(undirected_edges(faces)) + len(faces) == 2 - 4


def test_no_degenerate_triangles() -> None:
    topology = load_topology()
    areas = triangle_areas(topology.template, topology.faces)
    assert areas.min() > 1e-3 * np.median(areas)
    v = topology.template[topology.faces]
    for k in range(3):
        a = v[:, (k + 1) % 3] - v[:, k]
        b = v[:, (k + 2) % 3] - v[:, k]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert np.degrees(np.arccos(np.clip(cos, -1, 1))).min() > 1.0


def test_no_flipped_triangles_on_frontal_template() -> None:
    """Frontal template (head frame, +Z toward the viewer): faces look forward, and none is folded over
    against its neighbours. A few legitimately turn sideways or down (cheek sides, inner upper lip)."""
    topology = load_topology()
    normals = face_normals(topology.template, topology.faces)
    assert (normals[:, 2] > 0).mean() > 0.95
    assert normals[:, 2].min() > -0.4
    smooth = vertex_normals(topology.template, topology.faces)[topology.faces].mean(1)
    assert ((normals * smooth).sum(1) > 0.3).all()


def test_faces_toward_camera_on_a_real_photo(astronaut_landmarks: NDArray[np.float32]) -> None:
    """On the astronaut's landmarks (image frame: camera looks along +z), faces wind toward the camera."""
    mesh = build_image_mesh(astronaut_landmarks)
    normals = face_normals(mesh.vertices, mesh.faces)
    toward_camera = normals[:, 2] < 0
    assert toward_camera.mean() > 0.95
    smooth = vertex_normals(mesh.vertices, mesh.faces)[mesh.faces].mean(1)
    assert ((normals * smooth).sum(1) > 0).all(), "a triangle is folded over on a real face"


def test_uv_layout_has_no_flips_or_overlaps() -> None:
    topology = load_topology()
    signed = signed_areas_2d(topology.uvs, topology.faces)
    assert (signed > 0).all(), "UV triangles must all wind counter-clockwise"
    # Overlap check: count strictly-interior texel centers per triangle at 1024²; with no overlap, every
    # covered texel is claimed once.
    size = 1024
    px = topology.uvs.astype(np.float64) * [size, -size] + [-0.5, size - 0.5]
    claimed = 0
    covered = np.zeros((size, size), dtype=bool)
    for a, b, c in px[topology.faces]:
        x0, x1 = int(np.ceil(min(a[0], b[0], c[0]))), int(np.floor(max(a[0], b[0], c[0])))
        y0, y1 = int(np.ceil(min(a[1], b[1], c[1]))), int(np.floor(max(a[1], b[1], c[1])))
        xs, ys = np.meshgrid(np.arange(x0, x1 + 1), np.arange(y0, y1 + 1))
        d = (b[1] - c[1]) * (a[0] - c[0]) + (c[0] - b[0]) * (a[1] - c[1])
        w0 = ((b[1] - c[1]) * (xs - c[0]) + (c[0] - b[0]) * (ys - c[1])) / d
        w1 = ((c[1] - a[1]) * (xs - c[0]) + (a[0] - c[0]) * (ys - c[1])) / d
        inside = (w0 > 1e-9) & (w1 > 1e-9) & (1 - w0 - w1 > 1e-9)
        claimed += int(inside.sum())
        covered[ys[inside], xs[inside]] = True
    assert claimed == int(covered.sum()), f"{claimed - int(covered.sum())} texels claimed twice"
    assert covered.mean() > 0.4  # the layout uses the square reasonably


def test_uv_area_distortion_is_bounded(record_property: pytest.RecordProperty) -> None:
    """Ratio of a triangle's share of UV area to its share of 3D area (1 = no distortion)."""
    topology = load_topology()
    area_3d = triangle_areas(topology.template, topology.faces)
    area_uv = triangle_areas(topology.uvs, topology.faces)
    ratio = (area_uv / area_uv.sum()) / (area_3d / area_3d.sum())
    p5, p50, p95 = np.percentile(ratio, [5, 50, 95])
    record_property("uv_area_ratio_p5_p50_p95", f"{p5:.2f} {p50:.2f} {p95:.2f}")
    print(
        f"UV/3D area share ratio: p5 {p5:.2f}, median {p50:.2f}, p95 {p95:.2f}, min {ratio.min():.2f}, max {ratio.max():.2f}"
    )
    assert p5 > 0.2 and p95 < 1.5 and 0.7 < p50 < 1.3
    assert ratio.min() > 0.1 and ratio.max() < 2.0
    # Conformal map: angles are nearly kept, so the two singular values per triangle stay close.
    assert np.percentile(_stretch_anisotropy(topology.template, topology.uvs, topology.faces), 95) < 1.5


def _stretch_anisotropy(
    vertices: NDArray[np.float64], uvs: NDArray[np.float32], faces: NDArray[np.int32]
) -> NDArray[np.float64]:
    """Per triangle: ratio of the larger to the smaller singular value of the 3D -> UV map."""
    v = vertices[faces]
    e1, e2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
    x = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    n = np.cross(e1, e2)
    y = np.cross(n / np.linalg.norm(n, axis=1, keepdims=True), x)
    local = np.stack(
        [np.stack([(e1 * x).sum(1), (e1 * y).sum(1)], 1), np.stack([(e2 * x).sum(1), (e2 * y).sum(1)], 1)], 2
    )
    u = uvs.astype(np.float64)[faces]
    uv = np.stack([u[:, 1] - u[:, 0], u[:, 2] - u[:, 0]], 2)
    jacobian = uv @ np.linalg.inv(local)
    singular = np.linalg.svd(jacobian, compute_uv=False)
    return singular[:, 0] / singular[:, 1]


def test_mirror_map_is_a_symmetry() -> None:
    topology = load_topology()
    mirror = topology.mirror
    assert np.array_equal(mirror[mirror], np.arange(468)), "mirror map must be an involution"
    midline = np.flatnonzero(mirror == np.arange(468))
    assert 20 <= len(midline) <= 40
    assert set(midline.tolist()) >= {1, 4, 6, 10, 13, 14, 152, 168}
    assert mirror[33] == 263 and mirror[133] == 362 and mirror[61] == 291
    # The template is symmetric under the map, and the map is (nearly) a graph automorphism.
    reflected = topology.template[mirror] * [-1.0, 1.0, 1.0]
    assert np.abs(reflected - topology.template).max() < 1e-6
    edges = set(undirected_edges(topology.faces))
    kept = sum(tuple(sorted((int(mirror[a]), int(mirror[b])))) in edges for a, b in edges)
    assert kept / len(edges) > 0.99
    # Mirrored UVs mirror across the layout's vertical midline.
    assert np.abs(topology.uvs[mirror, 0] - (1.0 - topology.uvs[:, 0])).max() < 0.01
    assert np.abs(topology.uvs[mirror, 1] - topology.uvs[:, 1]).max() < 0.01


def test_template_is_a_plausible_head_in_meters() -> None:
    template = load_topology().template
    width, height, depth = template.max(0) - template.min(0)
    assert 0.10 < width < 0.20 and 0.12 < height < 0.25 and 0.05 < depth < 0.15
    assert (
        template[1, 2] == template[:, 2].max() or template[4, 2] == template[:, 2].max()
    )  # nose tip in front
    assert (
        template[10, 1] > template[168, 1] > template[1, 1] > template[152, 1]
    )  # forehead, bridge, nose, chin


def _wheel_or_skip(script: ModuleType) -> Path:
    """The mediapipe wheel the build script would use (`headforge models pull` keeps one), or skip."""
    try:
        return Path(script.default_source())
    except SystemExit:
        missing("no mediapipe wheel cached; run `headforge models pull`")


def test_triangles_rebuild_from_the_wheel_edge_list(repo_script: Callable[[str], ModuleType]) -> None:
    """The committed triangles are exactly what the build script derives from FACEMESH_TESSELATION, and
    every tessellation edge belongs to a triangle."""
    script = repo_script("scripts/build_facemesh_topology.py")
    edges = script.read_tessellation(_wheel_or_skip(script))
    faces = script.real_faces(script.edge_cliques(edges))
    committed = load_topology().faces
    assert {tuple(sorted(t)) for t in faces} == {tuple(sorted(t)) for t in committed.tolist()}
    assert {tuple(sorted(e)) for e in edges} == set(undirected_edges(committed))


def test_asset_rebuilds_exactly_from_wheel_and_reference(repo_script: Callable[[str], ModuleType]) -> None:
    """The whole asset is reproducible: the build script, given the wheel's edge list and the committed
    reference landmarks, gives back the committed arrays."""
    script = repo_script("scripts/build_facemesh_topology.py")
    committed = np.load(ROOT / "headforge" / "assets" / "facemesh_topology.npz")
    rebuilt = script.build_asset(
        script.read_tessellation(_wheel_or_skip(script)), committed["reference"].astype(np.float64)
    )
    assert np.array_equal(rebuilt["faces"], committed["faces"])
    assert np.array_equal(rebuilt["mirror"], committed["mirror"])
    assert np.allclose(rebuilt["template"], committed["template"], atol=1e-6)
    assert np.allclose(rebuilt["uvs"], committed["uvs"], atol=1e-5)
    assert str(rebuilt["tessellation_sha256"]) == str(committed["tessellation_sha256"])


def test_build_image_mesh_validates_landmarks(astronaut_landmarks: NDArray[np.float32]) -> None:
    mesh = build_image_mesh(astronaut_landmarks)
    assert mesh.vertices.shape == (468, 3) and mesh.faces.shape == (852, 3) and mesh.uv_faces is None
    with pytest.raises(InvalidLandmarksError) as bad_shape:
        build_image_mesh(astronaut_landmarks[:400])
    assert bad_shape.value.code == "invalid_landmarks"
    broken = astronaut_landmarks.copy()
    broken[5, 0] = np.nan
    with pytest.raises(InvalidLandmarksError):
        build_image_mesh(broken)

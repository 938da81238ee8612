#!/usr/bin/env python
"""Build the fixed face-mesh topology asset: triangles, UVs, mirror map and frontal template.

MediaPipe ships `FACEMESH_TESSELATION` as an edge list meant for drawing. This script turns it into
triangles once, reproducibly, and writes `headforge/assets/facemesh_topology.npz`:

- `faces` (F, 3) int32: the 3-cliques of the edge graph that are real faces (the two "separating"
  cliques around a vertex of degree 3 are dropped), wound counter-clockwise seen from in front;
  eyes and mouth stay open because the tessellation has no edges across them.
- `mirror` (468,) int32: vertex i <-> its mirror image across the face's midline.
- `template` (468, 3) float32: a symmetric frontal face in the head frame (meters, +Y up, face
  toward +Z, origin at the centre of the face mesh's bounding box), the target of the pose fit.
- `uvs` (468, 2) float32: least-squares conformal map of the template, in [0, 1], v up.
- `reference` (468, 3) float32: the raw landmarks the template came from (MediaPipe's landmark
  network on `skimage.data.astronaut()`), so the asset can be rebuilt without the networks.

Usage: python scripts/build_facemesh_topology.py [--source WHEEL_OR_PY] [--reuse-reference] [--out PATH]
The source defaults to the mediapipe wheel `headforge models pull` keeps (see `default_source`).
Nothing imports mediapipe: the connections module is parsed with `ast`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import os
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from scipy.sparse.linalg import lsqr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headforge.config import PACKAGE_ASSETS, headforge_home, tflite_source_dir  # noqa: E402
from headforge.pipeline.geometry import (  # noqa: E402
    boundary_loops,
    directed_edge_counts,
    face_normals,
    signed_areas_2d,
    triangle_areas,
    triangle_cross,
    vertex_normals,
)

CONNECTIONS_MEMBER = "mediapipe/python/solutions/face_mesh_connections.py"
NUM_VERTICES = 468
# Outer eye corners (subject's right, left): the template is scaled so they sit this far apart.
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
EYE_CORNER_DISTANCE_M = 0.090
FOREHEAD_TOP, CHIN_BOTTOM = 10, 152
# After levelling the face oval, turn the template about +x by this angle so that its frontal pose is
# AFLW2000's (the Basel Face Model frame). Measured once: fitting the oval-levelled template to the
# ground-truth 3D landmarks (`pt3d_68`) of the 8 AFLW2000 sample photos, the mean rotation between
# fitted and labelled poses was 3.7° about x (yaw and roll parts under 0.3°). Check with
# `python bench/pose_error.py --label-landmarks`.
AFLW_PITCH_OFFSET_DEG = 3.7


def default_source() -> Path:
    """The mediapipe wheel: `$HEADFORGE_MEDIAPIPE_WHEEL`, the copy `headforge models pull` keeps in
    `$HEADFORGE_HOME/downloads/`, else a development copy in /tmp/mpw."""
    override = os.environ.get("HEADFORGE_MEDIAPIPE_WHEEL")
    candidates = [Path(override)] if override else []
    candidates += sorted((headforge_home() / "downloads").glob("mediapipe-*.whl"))
    candidates += sorted(Path("/tmp/mpw").glob("mediapipe-*.whl"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise SystemExit("no mediapipe wheel found; pass --source (the wheel or face_mesh_connections.py)")


def read_tessellation(source: Path) -> list[tuple[int, int]]:
    """`FACEMESH_TESSELATION` from the wheel (or the .py file), parsed with `ast`, never imported."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            text = wheel.read(CONNECTIONS_MEMBER).decode()
    else:
        text = source.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "FACEMESH_TESSELATION" for t in node.targets
        ):
            call = node.value
            assert isinstance(call, ast.Call), "FACEMESH_TESSELATION is expected to be frozenset([...])"
            return [tuple(edge) for edge in ast.literal_eval(call.args[0])]
    raise SystemExit(f"FACEMESH_TESSELATION not found in {source}")


def edge_cliques(edges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Every triangle (3-clique) of the undirected edge graph, sorted."""
    neighbours: dict[int, set[int]] = defaultdict(set)
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    cliques = set()
    for a, b in edges:
        for c in neighbours[a] & neighbours[b]:
            cliques.add(tuple(sorted((a, b, c))))
    return sorted(cliques)  # type: ignore[arg-type]


def real_faces(cliques: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Drop separating cliques: where an edge is in three cliques, the clique whose edges are all over-used
    is the outline of a fan around a degree-3 vertex, not a face."""
    use: dict[tuple[int, int], int] = defaultdict(int)
    for tri in cliques:
        for e in itertools.combinations(tri, 2):
            use[e] += 1
    faces = [tri for tri in cliques if not all(use[e] > 2 for e in itertools.combinations(tri, 2))]
    use = defaultdict(int)
    for tri in faces:
        for e in itertools.combinations(tri, 2):
            use[e] += 1
    if max(use.values()) > 2:
        raise SystemExit("tessellation is ambiguous beyond separating triangles")
    return faces


def orient(faces: list[tuple[int, int, int]], points: NDArray[np.float64]) -> NDArray[np.int32]:
    """Wind all faces consistently (neighbours traverse shared edges in opposite directions), then pick
    the global sign so the faces turn counter-clockwise toward the camera (image frame: normal -z)."""
    by_edge: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, tri in enumerate(faces):
        for e in itertools.combinations(tri, 2):
            by_edge[e].append(index)
    wound: list[list[int] | None] = [None] * len(faces)
    wound[0] = list(faces[0])
    stack = [0]
    while stack:
        current = stack.pop()
        tri = wound[current]
        assert tri is not None
        for k in range(3):
            a, b = tri[k], tri[(k + 1) % 3]
            for other in by_edge[tuple(sorted((a, b)))]:  # type: ignore[index]
                if other == current or wound[other] is not None:
                    continue
                c = next(v for v in faces[other] if v not in (a, b))
                wound[other] = [b, a, c]  # shared edge reversed
                stack.append(other)
    if any(w is None for w in wound):
        raise SystemExit("face mesh is not connected")
    result = np.array(wound, dtype=np.int32)
    if (triangle_cross(points, result)[:, 2] > 0).sum() > len(result) / 2:
        result = result[:, ::-1].copy()
    return result


def astronaut_landmarks() -> NDArray[np.float64]:
    """468 landmarks (image pixels) of the astronaut photo, by MediaPipe's landmark network via LiteRT.

    The crop is refined from the previous prediction three times, as the tracking graph does.
    """
    import cv2
    from skimage import data

    from headforge.models.litert import load_litert_networks

    network = load_litert_networks(tflite_source_dir()).face_landmark
    rgb = data.astronaut()
    center, side = np.array([220.0, 120.0]), 160.0
    points = np.zeros((NUM_VERTICES, 3))
    for _ in range(4):
        corner = center - side / 2
        src = np.float32([corner, corner + np.array([side, 0.0]), corner + np.array([0.0, side])])
        dst = np.float32([[0, 0], [192, 0], [0, 192]])
        crop = cv2.warpAffine(
            rgb, cv2.getAffineTransform(src, dst), (192, 192), borderMode=cv2.BORDER_REPLICATE
        )
        outputs = network.run(crop[None].astype(np.float32) / 255.0)
        raw = (
            next(o for o in outputs if o.size == NUM_VERTICES * 3).reshape(NUM_VERTICES, 3).astype(np.float64)
        )
        points = raw * (side / 192.0)
        points[:, :2] += corner
        low, high = points[:, :2].min(0), points[:, :2].max(0)
        center, side = (low + high) / 2, float((high - low).max() * 1.5)
    return points


def mirror_map(
    points: NDArray[np.float64], faces: NDArray[np.int32]
) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    """Pair each vertex with its mirror image, and the rotation that makes the midline plane x = 0.

    Alternates between an optimal assignment against the x-reflected shape and re-fitting the
    symmetry plane from the pairs. The result must be an involution, and nearly a graph automorphism:
    MediaPipe's tessellation flips a handful of quad diagonals on one side only (6 of 1322 edges).
    """
    centered = points - points.mean(0)
    # Start with the eye line as x: good enough for a near-frontal reference.
    axis_x = centered[LEFT_EYE_OUTER] - centered[RIGHT_EYE_OUTER]
    rotation = np.eye(3)
    for _ in range(5):
        x_axis = axis_x / np.linalg.norm(axis_x)
        helper = np.array([0.0, 1.0, 0.0])
        z_axis = np.cross(x_axis, helper)
        z_axis /= np.linalg.norm(z_axis)
        rotation = np.stack([x_axis, np.cross(z_axis, x_axis), z_axis])
        aligned = centered @ rotation.T
        aligned[:, 0] -= np.median(aligned[:, 0])
        reflected = aligned * [-1.0, 1.0, 1.0]
        cost = ((aligned[:, None, :] - reflected[None, :, :]) ** 2).sum(-1)
        _, mirror = linear_sum_assignment(cost)
        diffs = centered - centered[mirror]
        axis_x = np.linalg.eigh(diffs.T @ diffs)[1][:, -1]
        if axis_x @ (centered[LEFT_EYE_OUTER] - centered[RIGHT_EYE_OUTER]) < 0:
            axis_x = -axis_x
    mirror = mirror.astype(np.int32)
    if not np.array_equal(mirror[mirror], np.arange(NUM_VERTICES)):
        raise SystemExit("mirror map is not an involution")
    edges = {tuple(sorted(e)) for tri in faces.tolist() for e in itertools.combinations(tri, 2)}
    broken = [e for e in edges if tuple(sorted((mirror[e[0]], mirror[e[1]]))) not in edges]
    if len(broken) > 0.01 * len(edges):
        raise SystemExit(f"mirror map breaks {len(broken)} edges, e.g. {broken[:5]}")
    return mirror, rotation


def frontal_template(
    points: NDArray[np.float64], mirror: NDArray[np.int32], faces: NDArray[np.int32]
) -> NDArray[np.float64]:
    """A symmetric frontal face in the head frame (meters, +Y up, +Z toward the viewer).

    Yaw and roll come from the symmetry plane. Pitch is fixed by the face oval (the outer boundary
    loop): its best-fit plane faces +Z, i.e. the oval is upright; then `AFLW_PITCH_OFFSET_DEG`.
    """
    head = points * [1.0, -1.0, -1.0]  # image frame (y down, z away) -> y up, z toward viewer
    head = head - head.mean(0)
    diffs = head - head[mirror]
    normal = np.linalg.eigh(diffs.T @ diffs)[1][:, -1]
    if normal @ (head[LEFT_EYE_OUTER] - head[RIGHT_EYE_OUTER]) < 0:
        normal = -normal
    up_guess = head[FOREHEAD_TOP] - head[CHIN_BOTTOM]
    y_axis = up_guess - (up_guess @ normal) * normal
    y_axis /= np.linalg.norm(y_axis)
    rotation = np.stack([normal, y_axis, np.cross(normal, y_axis)])
    head = head @ rotation.T
    symmetric = 0.5 * (head + head[mirror] * [-1.0, 1.0, 1.0])
    # Pitch: rotate about x so the oval's plane is vertical (its normal has no y component).
    outer = max(boundary_loops(faces), key=len)
    oval = symmetric[outer]
    oval_normal = np.linalg.eigh(np.cov((oval - oval.mean(0)).T))[1][:, 0]
    if oval_normal[2] < 0:
        oval_normal = -oval_normal
    angle = np.arctan2(oval_normal[1], oval_normal[2])
    c, s = np.cos(angle), np.sin(angle)
    level = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    symmetric = symmetric @ level
    offset = np.radians(AFLW_PITCH_OFFSET_DEG)
    c, s = np.cos(offset), np.sin(offset)
    symmetric = symmetric @ np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]).T  # v -> Rx(offset) v
    scale = EYE_CORNER_DISTANCE_M / np.linalg.norm(symmetric[LEFT_EYE_OUTER] - symmetric[RIGHT_EYE_OUTER])
    symmetric *= scale
    low, high = symmetric.min(0), symmetric.max(0)
    symmetric -= (low + high) / 2
    symmetric[:, 0] = 0.5 * (symmetric[:, 0] - symmetric[mirror, 0])  # exact mirror symmetry
    return symmetric


def conformal_uvs(
    vertices: NDArray[np.float64], faces: NDArray[np.int32], pin_a: int, pin_b: int
) -> NDArray[np.float64]:
    """Least-squares conformal map (Lévy et al. 2002) with two pinned vertices, solved with scipy.sparse."""
    v0, v1, v2 = (vertices[faces[:, k]] for k in range(3))
    e1 = v1 - v0
    e2 = v2 - v0
    x_axis = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    normal = np.cross(e1, e2)
    double_area = np.linalg.norm(normal, axis=1)
    y_axis = np.cross(normal / double_area[:, None], x_axis)
    local = np.zeros((len(faces), 3, 2))
    local[:, 1, 0] = np.linalg.norm(e1, axis=1)
    local[:, 2, 0] = (e2 * x_axis).sum(1)
    local[:, 2, 1] = (e2 * y_axis).sum(1)
    # Complex weights W_k = p_{k+2} - p_{k+1} (local 2D coordinates), scaled by 1/sqrt(2A).
    weights = np.stack([local[:, (k + 2) % 3] - local[:, (k + 1) % 3] for k in range(3)], axis=1)
    weights /= np.sqrt(double_area)[:, None, None]
    n = len(vertices)
    rows = np.repeat(np.arange(len(faces)), 3)
    cols = faces.reshape(-1)
    w_re, w_im = weights[..., 0].reshape(-1), weights[..., 1].reshape(-1)
    m_re = sp.csr_matrix((w_re, (rows, cols)), shape=(len(faces), n))
    m_im = sp.csr_matrix((w_im, (rows, cols)), shape=(len(faces), n))
    system = sp.bmat([[m_re, -m_im], [m_im, m_re]]).tocsc()
    pinned_index = [pin_a, pin_b, n + pin_a, n + pin_b]
    pinned_value = np.array([0.0, 0.0, 1.0, -1.0])  # pin_a at (0, 1), pin_b at (0, -1)
    free = np.setdiff1d(np.arange(2 * n), pinned_index)
    rhs = -system[:, pinned_index] @ pinned_value
    solution = lsqr(system[:, free], rhs, atol=1e-14, btol=1e-14, iter_lim=100000)[0]
    uv = np.zeros(2 * n)
    uv[free] = solution
    uv[pinned_index] = pinned_value
    return np.stack([uv[:n], uv[n:]], axis=1)


def fit_unit_square(uv: NDArray[np.float64], margin: float = 0.02) -> NDArray[np.float64]:
    """Scale uniformly and center into [margin, 1 - margin]²."""
    low, high = uv.min(0), uv.max(0)
    scale = (1.0 - 2 * margin) / float((high - low).max())
    return (uv - (low + high) / 2) * scale + 0.5


def build_asset(edges: list[tuple[int, int]], reference: NDArray[np.float64]) -> dict[str, NDArray]:
    """Every array of the asset, from the tessellation edges and the 468 reference landmarks."""
    faces = orient(real_faces(edge_cliques(edges)), reference)
    mirror, _ = mirror_map(reference, faces)
    template = frontal_template(reference, mirror, faces)
    # The head frame is a rotation of the image frame (y and z flipped), so the winding carries over.
    # A few faces legitimately turn sideways or down (cheek sides, the inner upper lip); a fold would
    # show as a face whose normal opposes the smooth normals at its corners.
    normals = face_normals(template, faces)
    if (normals[:, 2] <= 0).mean() > 0.05 or (
        (normals * vertex_normals(template, faces)[faces].mean(1)).sum(1) <= 0
    ).any():
        raise SystemExit("template has faces turned away from the front, or folds")
    uv = conformal_uvs(template, faces, FOREHEAD_TOP, CHIN_BOTTOM)
    # The pins sit on the midline with forehead up; make u grow toward +x like the template.
    if np.corrcoef(uv[:, 0], template[:, 0])[0, 1] < 0:
        uv[:, 0] = -uv[:, 0]
    uv = fit_unit_square(uv)
    if (signed_areas_2d(uv, faces) <= 0).any():
        raise SystemExit("UV layout has flipped triangles")
    return {
        "faces": faces.astype(np.int32),
        "uvs": uv.astype(np.float32),
        "mirror": mirror.astype(np.int32),
        "template": template.astype(np.float32),
        "reference": np.asarray(reference, dtype=np.float32),
        "tessellation_sha256": np.array(hashlib.sha256(repr(sorted(edges)).encode()).hexdigest()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, help="mediapipe wheel or face_mesh_connections.py")
    parser.add_argument(
        "--reuse-reference", action="store_true", help="take the reference landmarks from --out"
    )
    parser.add_argument("--out", type=Path, default=PACKAGE_ASSETS / "facemesh_topology.npz")
    args = parser.parse_args()

    source = args.source or default_source()
    edges = read_tessellation(source)
    if args.reuse_reference:
        reference = np.load(args.out)["reference"].astype(np.float64)
    else:
        reference = astronaut_landmarks()
    asset = build_asset(edges, reference)
    faces, uv, template, mirror = asset["faces"], asset["uvs"], asset["template"], asset["mirror"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **asset)

    loops = boundary_loops(faces)
    area_3d = triangle_areas(template, faces)
    area_uv = triangle_areas(uv, faces)
    ratio = (area_uv / area_uv.sum()) / (area_3d / area_3d.sum())
    print(
        f"{args.out}: {len(faces)} faces, {len({tuple(sorted(e)) for e in edges})} edges, "
        f"boundary loops {sorted(len(loop) for loop in loops)}, "
        f"midline vertices {(mirror == np.arange(NUM_VERTICES)).sum()}, "
        f"UV/3D area ratio p5 {np.percentile(ratio, 5):.2f} p95 {np.percentile(ratio, 95):.2f}, "
        f"directed edges used twice {sum(c > 1 for c in directed_edge_counts(faces).values())}"
    )


if __name__ == "__main__":
    main()

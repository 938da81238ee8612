"""Synthetic FLAME-format files at FLAME's real sizes, for tests and the benchmark.

Real FLAME files cannot be used in tests (license), so this writes look-alikes:
- a head-shaped template: an ellipsoid with a nose, narrowing into an open neck, with exactly
  5023 vertices and 9976 triangles (one 68-vertex neck hole, like a sphere cut open);
- random orthogonal PCA bases (300 shape + 100 expression, 36 pose correctives);
- FLAME's kinematic tree (global, neck, jaw, left eye, right eye), smooth skinning weights and a
  sparse joint regressor;
- a pickle written the way FLAME's are: protocol 2, `shapedirs` as a `chumpy.ch.Ch` object and
  `J_regressor` as a `scipy.sparse.csc.csc_matrix` (stand-in classes registered in `sys.modules`
  only while pickling, so loading needs the restricted unpickler's mapping);
- a MediaPipe-format landmark embedding (`.npz`), a 68-point embedding (`.npy` pickled dict),
  and a `head_template.obj` with 5118 texture coordinates.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

NUM_VERTICES = 5023
NUM_FACES = 9976
NUM_UVS = 5118
SEGMENTS = 68  # vertices around each ring; the bottom ring is the open neck boundary
RINGS = 73  # rings below the top pole: 1 + 68 * 73 = 4965 vertices, 58 more are face centers
MEDIAPIPE_POINTS = 105


@dataclass
class SyntheticFlame:
    v_template: np.ndarray
    faces: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    j_regressor: sp.csc_matrix
    weights: np.ndarray
    kintree_table: np.ndarray
    uvs: np.ndarray
    uv_faces: np.ndarray
    lmk_face_idx: np.ndarray
    lmk_b_coords: np.ndarray
    landmark_indices: np.ndarray


def _head_surface(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """A head-like surface: theta from the crown (0) down to the neck, phi around +Y, 0 = face (+Z)."""
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    radius_x, radius_y, radius_z = 0.078, 0.115, 0.095
    neck_blend = np.clip((theta - 0.62 * np.pi) / (0.18 * np.pi), 0.0, 1.0)
    squeeze = 1.0 - 0.45 * neck_blend
    x = radius_x * sin_t * np.sin(phi) * squeeze
    z = radius_z * sin_t * np.cos(phi) * squeeze
    y = radius_y * cos_t - 0.06 * neck_blend
    nose = 0.022 * np.exp(-((theta - 0.56 * np.pi) ** 2 / 0.012 + phi**2 / 0.02))
    z = z + nose * np.cos(phi)
    return np.stack([x, y + 0.02, z], axis=-1)


def _template_mesh() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vertices, faces, uvs and uv_faces of the synthetic head (exact FLAME counts)."""
    thetas = np.linspace(0.035, 0.86, RINGS) * np.pi
    phis = np.arange(SEGMENTS) * (2 * np.pi / SEGMENTS)
    theta_grid, phi_grid = np.meshgrid(thetas, phis, indexing="ij")
    phi_wrapped = np.where(phi_grid > np.pi, phi_grid - 2 * np.pi, phi_grid)
    ring_vertices = _head_surface(theta_grid, phi_wrapped).reshape(-1, 3)
    top = _head_surface(np.array(0.0), np.array(0.0))[None]
    vertices = np.concatenate([top, ring_vertices])

    def ring(r: int, s: int) -> int:
        return 1 + r * SEGMENTS + s % SEGMENTS

    faces: list[list[int]] = []
    for s in range(SEGMENTS):  # counter-clockwise seen from outside (+Y at the crown)
        faces.append([0, ring(0, s), ring(0, s + 1)])
    for r in range(RINGS - 1):
        for s in range(SEGMENTS):
            a, b, c, d = ring(r, s), ring(r + 1, s), ring(r + 1, s + 1), ring(r, s + 1)
            faces.extend([[a, b, c], [a, c, d]])
    face_array = np.asarray(faces, dtype=np.int64)

    # UVs: cylindrical unwrap with the face (phi = 0) in the middle and the seam at the back of the
    # head (segment SEAM, u = 0 and its duplicate u = 1): one extra texture coordinate per ring.
    seam = SEGMENTS // 2
    uvs = [[0.5, 1.0]]
    for r in range(RINGS):
        for s in range(SEGMENTS):
            uvs.append([((s - seam) % SEGMENTS) / SEGMENTS, 1.0 - (r + 1) / (RINGS + 1)])
    seam_base = len(uvs)
    for r in range(RINGS):
        uvs.append([1.0, 1.0 - (r + 1) / (RINGS + 1)])
    uv_faces = face_array.copy()
    for index, face in enumerate(face_array):
        segments = [(int(v) - 1) % SEGMENTS if v > 0 else -1 for v in face]
        if seam - 1 in segments and seam in segments:  # a triangle across the seam
            for corner, v in enumerate(face):
                if v > 0 and (int(v) - 1) % SEGMENTS == seam:
                    uv_faces[index, corner] = seam_base + (int(v) - 1) // SEGMENTS

    # Split 58 triangles at their centroids to reach 5023 vertices and 9976 faces.
    extra = NUM_VERTICES - len(vertices)
    chosen = np.linspace(SEGMENTS * 10, len(face_array) - SEGMENTS * 12, extra).astype(int)
    new_vertices, new_faces, new_uv_faces = [vertices], [], []
    uv_array = np.asarray(uvs, dtype=np.float64)
    new_uvs = [uv_array]
    keep = np.ones(len(face_array), dtype=bool)
    for offset, face_index in enumerate(chosen):
        a, b, c = face_array[face_index]
        ta, tb, tc = uv_faces[face_index]
        center = len(vertices) + offset
        center_uv = len(uv_array) + offset
        new_vertices.append(vertices[[a, b, c]].mean(axis=0, keepdims=True))
        new_uvs.append(uv_array[[ta, tb, tc]].mean(axis=0, keepdims=True))
        new_faces.extend([[a, b, center], [b, c, center], [c, a, center]])
        new_uv_faces.extend([[ta, tb, center_uv], [tb, tc, center_uv], [tc, ta, center_uv]])
        keep[face_index] = False
    vertices = np.concatenate(new_vertices)
    faces_out = np.concatenate([face_array[keep], np.asarray(new_faces)])
    uv_faces_out = np.concatenate([uv_faces[keep], np.asarray(new_uv_faces)])
    uv_out = np.concatenate(new_uvs)
    # Pad with duplicated texture coordinates (as FLAME's islands do) to reach 5118.
    missing = NUM_UVS - len(uv_out)
    duplicates = uv_faces_out[:missing, 0].copy()
    uv_faces_out[np.arange(missing), 0] = len(uv_out) + np.arange(missing)
    uv_out = np.concatenate([uv_out, uv_out[duplicates]])
    assert vertices.shape == (NUM_VERTICES, 3) and faces_out.shape == (NUM_FACES, 3)
    assert uv_out.shape == (NUM_UVS, 2)
    return vertices, faces_out, np.clip(uv_out, 0.0, 1.0), uv_faces_out


def _orthogonal_basis(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, columns)))
    return q


def _nearest(vertices: np.ndarray, point: np.ndarray, count: int) -> np.ndarray:
    return np.argsort(np.linalg.norm(vertices - point, axis=1))[:count]


def _mediapipe_embedding(
    vertices: np.ndarray, faces: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A MediaPipe-format embedding that means something: 105 face-mesh points, spread by farthest
    point sampling over headforge's frontal face-mesh template (meters, +Y up, face toward +Z),
    placed on the synthetic head (eyes on its eye joints) and projected onto its surface."""
    import trimesh

    from headforge.pipeline.topology import load_topology

    template = np.asarray(load_topology().template, dtype=np.float64)[:468]
    chosen = [1]  # nose tip
    distance = np.linalg.norm(template - template[1], axis=1)
    while len(chosen) < MEDIAPIPE_POINTS:
        chosen.append(int(distance.argmax()))
        distance = np.minimum(distance, np.linalg.norm(template - template[chosen[-1]], axis=1))
    indices = np.sort(np.asarray(chosen))
    eye_center = (template[33] + template[263]) / 2
    placed = (template[indices] - eye_center) * 0.75 + np.array([0.0, 0.035, 0.09])
    corners = vertices[faces]
    centers = corners.mean(axis=1)
    triangle = np.linalg.norm(centers[None] - placed[:, None], axis=2).argmin(axis=1)  # nearest face
    bary = trimesh.triangles.points_to_barycentric(corners[triangle], placed)  # of the projection
    bary = np.clip(bary, 0.0, 1.0)
    return indices, np.asarray(triangle, dtype=np.int64), bary / bary.sum(axis=1, keepdims=True)


def make_synthetic_flame(seed: int = 0) -> SyntheticFlame:
    """Build all the synthetic FLAME arrays (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    vertices, faces, uvs, uv_faces = _template_mesh()
    n = NUM_VERTICES
    # PCA bases: orthonormal columns over the 15069 coordinates, scaled so one unit moves a
    # vertex by about a millimeter on average (FLAME's components are in standard deviations).
    basis = _orthogonal_basis(rng, 3 * n, 400)
    scales = np.concatenate([np.linspace(2.0, 0.6, 300), np.linspace(1.6, 0.6, 100)]) * 1e-3 * np.sqrt(3 * n)
    shapedirs = (basis * scales).reshape(n, 3, 400)
    posedirs = (_orthogonal_basis(rng, 3 * n, 36) * 2e-3 * np.sqrt(3 * n) * 0.3).reshape(n, 3, 36)

    # Joints: global at the neck base, neck, jaw, eyes (subject's left eye at +X).
    y = vertices[:, 1]
    neck_base = np.argsort(y)[:SEGMENTS]
    neck_top = np.argsort(np.abs(y - (y.min() + 0.05)))[:SEGMENTS]
    jaw_level = np.argsort(np.abs(y - (y.min() + 0.09)))[:SEGMENTS]
    left_eye = _nearest(vertices, np.array([0.033, 0.035, 0.085]), 6)
    right_eye = _nearest(vertices, np.array([-0.033, 0.035, 0.085]), 6)
    rows, cols, vals = [], [], []
    for joint, members in enumerate([neck_base, neck_top, jaw_level, left_eye, right_eye]):
        rows += [joint] * len(members)
        cols += members.tolist()
        vals += [1.0 / len(members)] * len(members)
    j_regressor = sp.csc_matrix((vals, (rows, cols)), shape=(5, n))
    joints = j_regressor @ vertices

    # Skinning: the neck base follows the root, the lower face the jaw, the eye regions the eyes,
    # everything else the neck (the head turns about it).
    weights = np.zeros((n, 5))
    weights[:, 0] = np.clip((joints[1, 1] - y) / 0.04, 0.0, 1.0)
    front = vertices[:, 2] > 0.02
    weights[:, 2] = (
        front
        * np.clip((joints[2, 1] + 0.035 - y) / 0.02, 0.0, 1.0)
        * np.clip((y - joints[1, 1]) / 0.02, 0, 1)
    )
    for joint in (3, 4):
        distance = np.linalg.norm(vertices - joints[joint], axis=1)
        weights[:, joint] = np.clip(1.0 - distance / 0.02, 0.0, 1.0)
    weights[:, 1] = np.clip(1.0 - weights[:, [0, 2, 3, 4]].sum(axis=1), 0.0, None)
    weights /= weights.sum(axis=1, keepdims=True)

    kintree_table = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)

    landmark_indices, lmk_face_idx, lmk_b_coords = _mediapipe_embedding(vertices, faces)
    return SyntheticFlame(
        v_template=vertices,
        faces=faces.astype(np.uint32),
        shapedirs=shapedirs,
        posedirs=posedirs,
        j_regressor=j_regressor,
        weights=weights,
        kintree_table=kintree_table,
        uvs=uvs,
        uv_faces=uv_faces,
        lmk_face_idx=lmk_face_idx.astype(np.int64),
        lmk_b_coords=lmk_b_coords,
        landmark_indices=landmark_indices.astype(np.int64),
    )


# --- pickling the way FLAME does -------------------------------------------------------------


class Ch:
    """Stand-in for `chumpy.ch.Ch`: pickles like it (new-style object, state dict with `x`)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self._dirty_vars: set[str] = set()
        self._itr = None
        self._depends_on_deps: dict[str, Any] = {}
        self._make_dense = False
        self._make_sparse = False


class csc_matrix:  # named like the scipy class it stands in for
    """Stand-in for scipy's pre-1.8 `scipy.sparse.csc.csc_matrix` (state dict of arrays)."""

    def __init__(self, matrix: sp.csc_matrix) -> None:
        self._shape = matrix.shape
        self.data = matrix.data
        self.indices = matrix.indices
        self.indptr = matrix.indptr
        self.maxprint = 50
        self.format = "csc"


@contextlib.contextmanager
def _fake_modules(classes: dict[str, type]) -> Iterator[None]:
    """Register `module.Class` names in sys.modules only while pickling."""
    saved: dict[str, types.ModuleType | None] = {}
    for dotted, cls in classes.items():
        module_name, class_name = dotted.rsplit(".", 1)
        parts = module_name.split(".")
        for depth in range(1, len(parts)):  # parent packages (e.g. `chumpy`) must import too
            parent = ".".join(parts[:depth])
            if parent not in sys.modules:
                saved[parent] = None
                sys.modules[parent] = types.ModuleType(parent)
        saved[module_name] = sys.modules.get(module_name)
        module = types.ModuleType(module_name)
        setattr(module, class_name, cls)
        cls.__module__ = module_name
        cls.__qualname__ = class_name
        sys.modules[module_name] = module
    try:
        yield
    finally:
        for module_name, previous in saved.items():
            if previous is None:
                sys.modules.pop(module_name, None)
            else:
                sys.modules[module_name] = previous


def flame_model_dict(model: SyntheticFlame, chumpy: bool = True) -> dict[str, Any]:
    """The pickled dict as FLAME 2020 lays it out."""
    return {
        "f": model.faces,
        "v_template": model.v_template,
        "shapedirs": Ch(model.shapedirs) if chumpy else model.shapedirs,
        "posedirs": model.posedirs,
        "J_regressor": csc_matrix(model.j_regressor) if chumpy else model.j_regressor,
        "weights": model.weights,
        "kintree_table": model.kintree_table,
        "J": np.asarray(model.j_regressor @ model.v_template),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def dump_flame_pickle(payload: Any, path: Path, protocol: int = 2) -> None:
    """Pickle with protocol 2 (as FLAME's Python 2 files are; 0 was Python 2's default), with the
    chumpy/scipy stand-ins registered."""
    with (
        _fake_modules({"chumpy.ch.Ch": Ch, "scipy.sparse.csc.csc_matrix": csc_matrix}),
        path.open("wb") as stream,
    ):
        pickle.dump(payload, stream, protocol=protocol)


def write_obj(model: SyntheticFlame, path: Path) -> None:
    """`head_template.obj`: v, vt and f v/vt lines (1-based)."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in model.v_template]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in model.uvs]
    lines += [
        "f " + " ".join(f"{v + 1}/{t + 1}" for v, t in zip(face, uv_face, strict=True))
        for face, uv_face in zip(model.faces, model.uv_faces, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class SyntheticFiles:
    model: Path
    mediapipe_embedding: Path
    ibug_embedding: Path
    head_template: Path
    arrays: SyntheticFlame


def write_synthetic_flame(directory: Path, seed: int = 0) -> SyntheticFiles:
    """Write generic_model.pkl, mediapipe_landmark_embedding.npz, landmark_embedding.npy and
    head_template.obj into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    model = make_synthetic_flame(seed)
    model_path = directory / "generic_model.pkl"
    dump_flame_pickle(flame_model_dict(model), model_path)
    mediapipe_path = directory / "mediapipe_landmark_embedding.npz"
    np.savez(
        mediapipe_path,
        lmk_face_idx=model.lmk_face_idx,
        lmk_b_coords=model.lmk_b_coords,
        landmark_indices=model.landmark_indices,
    )
    rng = np.random.default_rng(seed + 1)
    static_faces = rng.choice(NUM_FACES, 51, replace=False)
    static_bary = rng.dirichlet(np.ones(3), 51)
    ibug = {
        "static_lmk_faces_idx": static_faces.astype(np.int64),
        "static_lmk_bary_coords": static_bary,
        "dynamic_lmk_faces_idx": rng.choice(NUM_FACES, (79, 17)).astype(np.int64),
        "dynamic_lmk_bary_coords": rng.dirichlet(np.ones(3), (79, 17)),
    }
    ibug_path = directory / "landmark_embedding.npy"
    np.save(ibug_path, np.array(ibug, dtype=object), allow_pickle=True)
    obj_path = directory / "head_template.obj"
    write_obj(model, obj_path)
    return SyntheticFiles(model_path, mediapipe_path, ibug_path, obj_path, model)


def main() -> None:
    """`python tests/flame_synthetic.py DIR`: write the synthetic files into DIR."""
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("synthetic-flame")
    files = write_synthetic_flame(target)
    print(files.model, files.mediapipe_embedding, files.ibug_embedding, files.head_template)


# --- one imported synthetic asset per test session ---------------------------------------------


@lru_cache(maxsize=1)
def _imported(directory: str) -> tuple[SyntheticFiles, Path]:
    from headforge.models.flame_import import import_flame

    root = Path(directory)
    files = write_synthetic_flame(root / "source")
    asset_path = import_flame(
        files.model, [files.mediapipe_embedding], files.head_template, root / "flame.npz"
    )
    return files, asset_path


def imported_synthetic_flame(base: Path) -> tuple[SyntheticFiles, Path]:
    """Synthetic FLAME source files and their imported `.npz`, generated once per process under `base`
    (pass pytest's `tmp_path_factory.getbasetemp()`)."""
    return _imported(str(base / "flame-synthetic"))


if __name__ == "__main__":
    main()

"""Studio head templates: import, check, store and load the operator's template meshes.

A template is a triangle or polygon mesh with UVs (MetaHuman's head, a studio's own base mesh),
optional vertex groups (a `face` region) and optional landmark correspondences to FLAME vertex ids
and MediaPipe face-mesh landmark ids. `import_template` reads an OBJ or a GLB, checks it, and writes
one `.npz` into `HEADFORGE_HOME/assets/templates/` atomically (a failed import leaves the store as it
was). The correspondence file format is described in docs/topology.md.

Geometry is kept welded (one vertex per position, as registration needs) next to the UV layout
(`uvs` indexed by `uv_faces`, so seams keep their several UVs). An OBJ's `v` list is already welded and
is kept in its order; a GLB splits vertices at seams, so its positions are welded on import and the
landmark ids of a GLB template refer to the GLB's own vertex order (mapped through `source_to_welded`).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from headforge.config import asset_dir
from headforge.errors import (
    InvalidOptionError,
    TemplateEmptyError,
    TemplateError,
    TemplateLandmarkRangeError,
    TemplateLandmarksMissingError,
    TemplateNonManifoldError,
    TemplateNotFoundError,
    TemplateNoUVsError,
)
from headforge.files import atomic_writer, sha256_file

TEMPLATE_FORMAT_VERSION = 1
LANDMARKS_FORMAT = "headforge-template-landmarks"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MAX_TEMPLATE_VERTICES = 500_000
MAX_TEMPLATE_FACES = 1_000_000
MAX_TEMPLATE_BYTES = 512 << 20
FLAME_VERTICES = 5023
MEDIAPIPE_LANDMARKS = 468  # the face mesh's vertices (the iris points are not mesh vertices)
TARGET_KINDS = {"flame": FLAME_VERTICES, "mediapipe": MEDIAPIPE_LANDMARKS}
FACE_GROUP = "face"
MIN_LANDMARKS = 4


@dataclass(frozen=True)
class TemplateLandmarks:
    """Template points (vertex k or a barycentric point on a triangle) and their ids on FLAME or on
    the MediaPipe face mesh (-1 where the entry has none)."""

    vertices: NDArray[np.int64]  # (K, 3) welded template vertex ids
    weights: NDArray[np.float64]  # (K, 3) barycentric weights (a vertex landmark is (1, 0, 0))
    flame: NDArray[np.int64]  # (K,)
    mediapipe: NDArray[np.int64]  # (K,)
    names: tuple[str, ...]

    def for_kind(self, kind: str) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.int64]]:
        """(vertices, weights, target ids) of the entries that name a `kind` ("flame"/"mediapipe") id."""
        ids = self.flame if kind == "flame" else self.mediapipe
        keep = ids >= 0
        return self.vertices[keep], self.weights[keep], ids[keep]

    def count(self, kind: str) -> int:
        return int(np.count_nonzero((self.flame if kind == "flame" else self.mediapipe) >= 0))


@dataclass(frozen=True)
class HeadTemplate:
    """A checked template, as stored."""

    name: str
    vertices: NDArray[np.float64]  # (V, 3) welded positions, the template's own units and frame
    faces: NDArray[np.int64]  # (F, 3) triangles over the welded vertices
    uvs: NDArray[np.float32]  # (T, 2), v up
    uv_faces: NDArray[np.int64]  # (F, 3) into uvs
    groups: dict[str, NDArray[np.bool_]] = field(default_factory=dict)  # name -> (V,) mask
    landmarks: TemplateLandmarks | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    polygon_sizes: NDArray[np.int64] | None = None  # (P,) corners per source polygon (OBJ), for re-export

    def describe(self) -> dict[str, Any]:
        """The listing entry: name, sizes, groups and landmark counts per target kind."""
        return {
            "name": self.name,
            "vertices": len(self.vertices),
            "faces": len(self.faces),
            "uvs": len(self.uvs),
            "groups": {name: int(mask.sum()) for name, mask in sorted(self.groups.items())},
            "landmarks": {
                kind: (0 if self.landmarks is None else self.landmarks.count(kind)) for kind in TARGET_KINDS
            },
            "source": self.metadata.get("source"),
        }


def templates_dir() -> Path:
    """Where templates are stored: `HEADFORGE_TEMPLATES`, else `HEADFORGE_HOME/assets/templates`."""
    override = os.environ.get("HEADFORGE_TEMPLATES")
    return Path(override).expanduser() if override else asset_dir() / "templates"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidOptionError(
            f"template names are 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter or "
            f"digit; got {name!r}",
            details={"option": "template", "value": str(name)},
        )
    return name


def template_path(name: str) -> Path:
    return templates_dir() / f"{check_name(name)}.npz"


# --------------------------------------------------------------------------- reading meshes


@dataclass
class SourceMesh:
    """A mesh as read from a file: welded triangles plus UVs, and how its vertices map."""

    vertices: NDArray[np.float64]
    faces: NDArray[np.int64]
    uvs: NDArray[np.float32] | None
    uv_faces: NDArray[np.int64] | None
    source_to_welded: NDArray[np.int64]  # file vertex id -> welded vertex id
    polygon_sizes: NDArray[np.int64] | None = None
    groups: dict[str, NDArray[np.int64]] = field(default_factory=dict)  # OBJ `g` name -> face ids


def read_obj(data: bytes) -> SourceMesh:
    """`v`, `vt` and `f` of a Wavefront OBJ (polygons fan-triangulated, negative indices allowed,
    `g`/`o` face groups kept). Faces without texture indices leave the mesh without UVs."""
    vertices: list[list[float]] = []
    uvs: list[list[float]] = []
    faces: list[list[int]] = []
    uv_faces: list[list[int]] = []
    sizes: list[int] = []
    groups: dict[str, list[int]] = {}
    current_group: str | None = None
    missing_uv = False
    try:
        text = data.decode("utf-8", errors="replace")
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            tag = parts[0]
            if tag == "v":
                vertices.append([float(value) for value in parts[1:4]])
            elif tag == "vt":
                uvs.append([float(value) for value in parts[1:3]])
            elif tag in ("g", "o"):
                current_group = " ".join(parts[1:]) or None
            elif tag == "f":
                corners = [corner.split("/") for corner in parts[1:]]
                if len(corners) < 3:
                    raise ValueError("a face with fewer than 3 corners")
                position = [_obj_index(corner[0], len(vertices)) for corner in corners]
                if all(len(corner) > 1 and corner[1] for corner in corners):
                    texture = [_obj_index(corner[1], len(uvs)) for corner in corners]
                else:
                    missing_uv = True
                    texture = [0] * len(corners)
                sizes.append(len(corners))
                for k in range(1, len(corners) - 1):
                    if current_group is not None:
                        groups.setdefault(current_group, []).append(len(faces))
                    faces.append([position[0], position[k], position[k + 1]])
                    uv_faces.append([texture[0], texture[k], texture[k + 1]])
    except (ValueError, IndexError) as error:
        raise TemplateError(f"not a readable OBJ: {error}", code="invalid_mesh") from error
    vertex_array = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    face_array = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    has_uvs = bool(uvs) and not missing_uv
    return SourceMesh(
        vertices=vertex_array,
        faces=face_array,
        uvs=np.asarray(uvs, dtype=np.float32).reshape(-1, 2) if has_uvs else None,
        uv_faces=np.asarray(uv_faces, dtype=np.int64).reshape(-1, 3) if has_uvs else None,
        source_to_welded=np.arange(len(vertex_array), dtype=np.int64),
        polygon_sizes=np.asarray(sizes, dtype=np.int64),
        groups={name: np.asarray(ids, dtype=np.int64) for name, ids in groups.items()},
    )


def _obj_index(token: str, count: int) -> int:
    index = int(token)
    if index == 0:
        raise ValueError("OBJ indices start at 1")
    return index - 1 if index > 0 else count + index


def read_glb(data: bytes) -> SourceMesh:
    """The triangles of a glTF binary (all primitives, scene transforms applied) with TEXCOORD_0;
    positions split at UV seams are welded back by exact position."""
    import trimesh

    try:
        loaded = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh", process=False)
    except Exception as error:  # trimesh raises many types for broken files
        raise TemplateError(f"not a readable GLB: {error}", code="invalid_mesh") from error
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    uv = getattr(getattr(loaded, "visual", None), "uv", None)
    welded, source_to_welded = weld(vertices)
    return SourceMesh(
        vertices=welded,
        faces=source_to_welded[faces] if len(faces) else faces,
        uvs=None if uv is None or len(uv) != len(vertices) else np.asarray(uv, dtype=np.float32),
        uv_faces=None if uv is None or len(uv) != len(vertices) else faces,
        source_to_welded=source_to_welded,
    )


def weld(vertices: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Merge vertices at exactly the same position, keeping first-occurrence order."""
    if len(vertices) == 0:
        return vertices.reshape(0, 3), np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(vertices, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return vertices[first[order]], rank[inverse.reshape(-1)].astype(np.int64)


def read_mesh_file(path: Path) -> SourceMesh:
    """An OBJ or GLB template file."""
    suffix = path.suffix.lower()
    if suffix not in (".obj", ".glb"):
        raise TemplateError(
            f"templates are .obj or .glb files, got {path.name!r}",
            code="invalid_mesh",
            details={"file": path.name},
        )
    try:
        size = path.stat().st_size
        if size > MAX_TEMPLATE_BYTES:
            raise TemplateError(
                f"{path.name} is larger than {MAX_TEMPLATE_BYTES >> 20} MiB", code="mesh_too_large"
            )
        data = path.read_bytes()
    except OSError as error:
        raise TemplateError(f"cannot read {path}: {error.strerror}", code="unreadable_file") from error
    return read_obj(data) if suffix == ".obj" else read_glb(data)


# --------------------------------------------------------------------------- checks


def check_geometry(mesh: SourceMesh) -> None:
    """Refuse empty, oversized, non-finite, non-manifold and UV-less templates (stable codes)."""
    if len(mesh.vertices) == 0 or len(mesh.faces) == 0:
        raise TemplateEmptyError("the template has no vertices or no faces")
    if len(mesh.vertices) > MAX_TEMPLATE_VERTICES or len(mesh.faces) > MAX_TEMPLATE_FACES:
        raise TemplateError(
            f"the template has {len(mesh.vertices)} vertices and {len(mesh.faces)} triangles; the limits are "
            f"{MAX_TEMPLATE_VERTICES} and {MAX_TEMPLATE_FACES}",
            code="mesh_too_large",
        )
    if not np.isfinite(mesh.vertices).all():
        raise TemplateError("the template has NaN or infinite vertex positions")
    faces = mesh.faces
    if faces.min() < 0 or faces.max() >= len(mesh.vertices):
        raise TemplateError("a face refers to a vertex that does not exist")
    degenerate = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 2] == faces[:, 0])
    if degenerate.any():
        raise TemplateNonManifoldError(
            f"{int(degenerate.sum())} faces repeat a vertex (first: face {int(np.flatnonzero(degenerate)[0])})",
            details={"degenerate_faces": int(degenerate.sum())},
        )
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    undirected = np.sort(directed, axis=1)
    key = undirected[:, 0] * len(mesh.vertices) + undirected[:, 1]
    _, counts = np.unique(key, return_counts=True)
    shared = int((counts > 2).sum())
    if shared:
        raise TemplateNonManifoldError(
            f"{shared} edges are shared by more than two faces; a template must be an edge-manifold surface",
            details={"non_manifold_edges": shared},
        )
    directed_key = directed[:, 0] * len(mesh.vertices) + directed[:, 1]
    _, directed_counts = np.unique(directed_key, return_counts=True)
    flipped = int((directed_counts > 1).sum())
    if flipped:
        raise TemplateNonManifoldError(
            f"{flipped} edges run the same way in both of their faces: the faces are not consistently oriented",
            details={"inconsistent_edges": flipped},
        )
    used = np.zeros(len(mesh.vertices), dtype=bool)
    used[faces.reshape(-1)] = True
    if not used.all():
        raise TemplateNonManifoldError(
            f"{int((~used).sum())} vertices belong to no face",
            details={"unused_vertices": int((~used).sum())},
        )
    if mesh.uvs is None or mesh.uv_faces is None or len(mesh.uvs) == 0:
        raise TemplateNoUVsError("the template has no UVs (every face needs texture coordinates)")
    if not np.isfinite(mesh.uvs).all() or mesh.uv_faces.min() < 0 or mesh.uv_faces.max() >= len(mesh.uvs):
        raise TemplateNoUVsError("the template's UVs are broken (NaN, or faces refer to missing UVs)")
    tolerance = 1e-3
    if mesh.uvs.min() < -tolerance or mesh.uvs.max() > 1 + tolerance:
        raise TemplateError(
            "the template's UVs leave the unit square (UDIM tiles are not supported: textures are baked "
            "into one [0, 1] layout)",
            code="template_uvs_out_of_range",
        )


def parse_landmarks(
    document: Any, mesh: SourceMesh
) -> tuple[TemplateLandmarks | None, dict[str, NDArray[np.bool_]]]:
    """The correspondence file (docs/topology.md): landmarks and vertex groups, ids checked."""
    if not isinstance(document, dict) or document.get("format") != LANDMARKS_FORMAT:
        raise TemplateError(f'the landmark file must be a JSON object with "format": "{LANDMARKS_FORMAT}"')
    if document.get("version", 1) != 1:
        raise TemplateError(f"unsupported landmark file version {document.get('version')!r}")
    source_count = len(mesh.source_to_welded)
    entries = document.get("landmarks", [])
    if not isinstance(entries, list):
        raise TemplateError('"landmarks" must be a list')

    def template_id(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TemplateError(f"{where}: vertex ids are integers, got {value!r}")
        if not 0 <= value < source_count:
            raise TemplateLandmarkRangeError(
                f"{where}: template vertex {value} is out of range (the template has {source_count} vertices)",
                details={"where": where, "id": value, "count": source_count},
            )
        return int(mesh.source_to_welded[value])

    vertices, weights, flame, mediapipe, names = [], [], [], [], []
    for index, entry in enumerate(entries):
        where = f"landmarks[{index}]"
        if not isinstance(entry, dict):
            raise TemplateError(f"{where} must be an object")
        if "vertex" in entry:
            corner = template_id(entry["vertex"], where)
            vertices.append([corner] * 3)
            weights.append([1.0, 0.0, 0.0])
        elif "triangle" in entry and "barycentric" in entry:
            triangle, bary = entry["triangle"], entry["barycentric"]
            if not (
                isinstance(triangle, list)
                and len(triangle) == 3
                and isinstance(bary, list)
                and len(bary) == 3
            ):
                raise TemplateError(f'{where}: "triangle" and "barycentric" are lists of three')
            bary_array = np.asarray(bary, dtype=np.float64)
            if (
                not np.isfinite(bary_array).all()
                or abs(bary_array.sum() - 1.0) > 1e-3
                or bary_array.min() < -1e-6
            ):
                raise TemplateError(f"{where}: barycentric weights must be non-negative and sum to 1")
            vertices.append([template_id(value, where) for value in triangle])
            weights.append((bary_array / bary_array.sum()).tolist())
        else:
            raise TemplateError(f'{where} needs "vertex", or "triangle" with "barycentric"')
        ids = {}
        for kind, limit in TARGET_KINDS.items():
            value = entry.get(kind)
            if value is None:
                ids[kind] = -1
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
                raise TemplateLandmarkRangeError(
                    f"{where}: {kind} id {value!r} is out of range (0 to {limit - 1})",
                    details={
                        "where": where,
                        "kind": kind,
                        "id": value if isinstance(value, int) else str(value),
                    },
                )
            ids[kind] = value
        if ids["flame"] < 0 and ids["mediapipe"] < 0:
            raise TemplateError(f'{where} names neither a "flame" nor a "mediapipe" id')
        flame.append(ids["flame"])
        mediapipe.append(ids["mediapipe"])
        names.append(str(entry.get("name", f"landmark{index}")))
    landmarks = (
        TemplateLandmarks(
            vertices=np.asarray(vertices, dtype=np.int64).reshape(-1, 3),
            weights=np.asarray(weights, dtype=np.float64).reshape(-1, 3),
            flame=np.asarray(flame, dtype=np.int64),
            mediapipe=np.asarray(mediapipe, dtype=np.int64),
            names=tuple(names),
        )
        if entries
        else None
    )
    groups: dict[str, NDArray[np.bool_]] = {}
    raw_groups = document.get("groups", {})
    if not isinstance(raw_groups, dict):
        raise TemplateError('"groups" must map group names to lists of vertex ids')
    for name, ids in raw_groups.items():
        if not isinstance(ids, list):
            raise TemplateError(f"groups[{name!r}] must be a list of vertex ids")
        mask = np.zeros(len(mesh.vertices), dtype=bool)
        mask[[template_id(value, f"groups[{name!r}]") for value in ids]] = True
        groups[str(name)] = mask
    return landmarks, groups


# --------------------------------------------------------------------------- store


def import_template(name: str, mesh_path: Path, landmarks_path: Path | None = None) -> Path:
    """Check `mesh_path` (and the correspondence file) and store template `name`; returns its path.
    Replaces an earlier template of that name only when everything checks out."""
    check_name(name)
    mesh = read_mesh_file(mesh_path)
    check_geometry(mesh)
    landmarks: TemplateLandmarks | None = None
    groups: dict[str, NDArray[np.bool_]] = {}
    for group_name, face_ids in mesh.groups.items():  # OBJ face groups become vertex groups
        mask = np.zeros(len(mesh.vertices), dtype=bool)
        mask[mesh.faces[face_ids].reshape(-1)] = True
        groups[group_name] = mask
    sources: dict[str, Any] = {"mesh": {"file": mesh_path.name, "sha256": sha256_file(mesh_path)}}
    if landmarks_path is not None:
        try:
            document = json.loads(landmarks_path.read_bytes())
        except OSError as error:
            raise TemplateError(
                f"cannot read {landmarks_path}: {error.strerror}", code="unreadable_file"
            ) from error
        except ValueError as error:
            raise TemplateError(f"{landmarks_path.name} is not valid JSON: {error}") from error
        landmarks, file_groups = parse_landmarks(document, mesh)
        groups.update(file_groups)
        sources["landmarks"] = {"file": landmarks_path.name, "sha256": sha256_file(landmarks_path)}
    assert mesh.uvs is not None and mesh.uv_faces is not None
    template = HeadTemplate(
        name=name,
        vertices=mesh.vertices,
        faces=mesh.faces,
        uvs=mesh.uvs,
        uv_faces=mesh.uv_faces,
        groups=groups,
        landmarks=landmarks,
        metadata={"format_version": TEMPLATE_FORMAT_VERSION, "source": sources},
        polygon_sizes=mesh.polygon_sizes,
    )
    path = template_path(name)
    save_template(template, path)
    return path


def save_template(template: HeadTemplate, path: Path) -> None:
    """Write the template's `.npz` atomically."""
    arrays: dict[str, Any] = {
        "vertices": template.vertices.astype(np.float64),
        "faces": template.faces.astype(np.int32),
        "uvs": template.uvs.astype(np.float32),
        "uv_faces": template.uv_faces.astype(np.int32),
        "group_names": np.asarray(sorted(template.groups), dtype=np.str_),
        "groups": np.stack([template.groups[name] for name in sorted(template.groups)])
        if template.groups
        else np.zeros((0, len(template.vertices)), dtype=bool),
        "metadata": np.asarray(json.dumps({**template.metadata, "name": template.name})),
    }
    if template.polygon_sizes is not None:
        arrays["polygon_sizes"] = template.polygon_sizes.astype(np.int32)
    if template.landmarks is not None:
        lm = template.landmarks
        arrays.update(
            landmark_vertices=lm.vertices.astype(np.int32),
            landmark_weights=lm.weights,
            landmark_flame=lm.flame.astype(np.int32),
            landmark_mediapipe=lm.mediapipe.astype(np.int32),
            landmark_names=np.asarray(lm.names, dtype=np.str_),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, mode=0o644) as stream:
        np.savez(stream, **arrays)


def load_template(name: str) -> HeadTemplate:
    """The stored template `name` (cached per process until the file changes)."""
    path = template_path(name)
    try:
        stat = path.stat()
    except OSError:
        raise TemplateNotFoundError(
            f"no template named {name!r}; import one with `headforge template import {name} mesh.obj` "
            f"(available: {', '.join(list_template_names()) or 'none'})",
            details={"template": name, "available": list_template_names()},
        ) from None
    return _cached_template(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _cached_template(path: str, mtime_ns: int, size: int) -> HeadTemplate:
    try:
        with np.load(path, allow_pickle=False) as data:
            metadata = json.loads(str(data["metadata"]))
            names = [str(value) for value in data["group_names"]]
            landmarks = None
            if "landmark_vertices" in data:
                landmarks = TemplateLandmarks(
                    vertices=data["landmark_vertices"].astype(np.int64),
                    weights=data["landmark_weights"].astype(np.float64),
                    flame=data["landmark_flame"].astype(np.int64),
                    mediapipe=data["landmark_mediapipe"].astype(np.int64),
                    names=tuple(str(value) for value in data["landmark_names"]),
                )
            template = HeadTemplate(
                name=str(metadata.get("name", Path(path).stem)),
                vertices=data["vertices"].astype(np.float64),
                faces=data["faces"].astype(np.int64),
                uvs=data["uvs"].astype(np.float32),
                uv_faces=data["uv_faces"].astype(np.int64),
                groups={name: data["groups"][index].astype(bool) for index, name in enumerate(names)},
                landmarks=landmarks,
                metadata=metadata,
                polygon_sizes=data["polygon_sizes"].astype(np.int64) if "polygon_sizes" in data else None,
            )
    except (OSError, KeyError, ValueError) as error:
        raise TemplateError(f"the stored template {path} is unreadable ({error}); import it again") from error
    return template


def list_template_names() -> list[str]:
    folder = templates_dir()
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.npz") if NAME_PATTERN.match(path.stem))


def list_templates() -> list[dict[str, Any]]:
    """Every stored template's listing entry (an unreadable one says so instead of failing the list)."""
    entries = []
    for name in list_template_names():
        try:
            entries.append(load_template(name).describe())
        except TemplateError as error:
            entries.append({"name": name, "error": {"code": error.code, "message": error.message}})
    return entries


def require_landmarks(template: HeadTemplate, kind: str) -> TemplateLandmarks:
    """The template's landmarks, with at least `MIN_LANDMARKS` for `kind`, or a clear refusal."""
    have = 0 if template.landmarks is None else template.landmarks.count(kind)
    if template.landmarks is None or have < MIN_LANDMARKS:
        label = "FLAME vertex ids" if kind == "flame" else "MediaPipe landmark ids"
        raise TemplateLandmarksMissingError(
            f"template {template.name!r} has {have} landmarks with {label}; a pipeline needs at least "
            f"{MIN_LANDMARKS} to place it on a head. Re-import it with --landmarks points.json "
            "(docs/topology.md), or fit it with `headforge topology fit` to a target in its own frame.",
            details={"template": template.name, "kind": kind, "landmarks": have, "required": MIN_LANDMARKS},
        )
    return template.landmarks

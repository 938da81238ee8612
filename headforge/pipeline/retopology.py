"""Retopology: an operator's template fitted onto a head mesh, as a tool and as a pipeline stage.

- `fit_template_to_mesh`: the template (any stored one) registered onto a target mesh; the output
  has the template's vertices, faces and UV layout, in the target's frame.
- `read_target_mesh`: OBJ, GLB or PLY bytes → welded triangles, within documented size limits.
- `register_heads`: the `topology=NAME` stage of every pipeline. On a FLAME head the whole template
  follows the data; on the face-mesh face only the template's `face` group does and the rest of the
  head deforms smoothly with it. The head's meshes (head frame and image frame) are replaced by the
  registered template, so texture and splats are then built on it, in the template's UVs.

Landmarks put the template onto the head first (template points ↔ FLAME vertex ids or MediaPipe
landmark ids, see docs/topology.md). Registration itself is `headforge.pipeline.registration`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from headforge.errors import InvalidMeshError, InvalidOptionError, MeshTooLargeError, TemplateError
from headforge.pipeline.geometry import umeyama
from headforge.pipeline.registration import (
    Landmarks,
    RegistrationResult,
    TemplateGeometry,
    prepare_template,
    register,
)
from headforge.pipeline.types import Head, Mesh
from headforge.templates import (
    FACE_GROUP,
    FLAME_VERTICES,
    MEDIAPIPE_LANDMARKS,
    HeadTemplate,
    load_template,
    read_glb,
    read_obj,
    require_landmarks,
    template_path,
    weld,
)

# Target meshes past these sizes are refused before they are fitted (docs/topology.md).
MAX_TARGET_BYTES = 256 << 20
MAX_TARGET_VERTICES = 1_000_000
MAX_TARGET_FACES = 2_000_000
TARGET_SUFFIXES = (".obj", ".glb", ".ply")
UNITS_PER_MM = {"m": 1e-3, "cm": 0.1, "mm": 1.0}


@dataclass
class FitOutcome:
    """A fitted template and how it went."""

    mesh: Mesh  # template faces and UVs, registered vertices in the target's frame
    result: RegistrationResult
    target_kind: str | None  # "flame", "mediapipe" or None (no landmarks: target in the template frame)
    landmarks: int

    def report(self, units_per_mm: float) -> dict[str, Any]:
        """The fit as JSON-ready numbers (distances in mm)."""
        result = self.result
        return {
            "template": self.mesh.topology.removeprefix("template:"),
            "target_landmarks": self.target_kind,
            "landmarks": self.landmarks,
            "residual_mm": _mm(result.residual, units_per_mm),
            "residual_p95_mm": _mm(result.residual_p95, units_per_mm),
            "landmark_error_mm": _mm(result.landmark_error, units_per_mm),
            "driven_share": round(result.driven_share, 4),
            "steps": result.steps,
            "fit_ms": round(result.timings_ms.get("total_ms", 0.0), 2),
        }


def _mm(value: float, units_per_mm: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value) / units_per_mm, 4)


@lru_cache(maxsize=4)
def _cached_geometry(path: str, mtime_ns: int, size: int, name: str) -> TemplateGeometry:
    template = load_template(name)
    return prepare_template(template.vertices, template.faces)


def template_geometry(template: HeadTemplate) -> TemplateGeometry:
    """The template's deformation graph, built once per process and template file."""
    path = template_path(template.name)
    stat = path.stat()
    return _cached_geometry(str(path), stat.st_mtime_ns, stat.st_size, template.name)


def template_mesh(template: HeadTemplate, vertices: NDArray[np.floating]) -> Mesh:
    """The template's faces and UV layout on `vertices`."""
    return Mesh(
        vertices=np.asarray(vertices, dtype=np.float32),
        faces=template.faces.astype(np.int32),
        uvs=template.uvs,
        uv_faces=template.uv_faces.astype(np.int32),
        topology=f"template:{template.name}",
    )


def fit_template_to_mesh(
    template: HeadTemplate,
    target_vertices: NDArray[np.floating],
    target_faces: NDArray[np.integer],
    *,
    target_kind: str | None = None,
    data_mask: NDArray[np.bool_] | None = None,
    geometry: TemplateGeometry | None = None,
) -> FitOutcome:
    """Register `template` onto the target mesh. `target_kind` says whose ids the target's vertices
    carry ("flame": a 5023-vertex FLAME-topology head; "mediapipe": the 468-vertex face mesh), so that
    the template's landmarks place it first; None fits a target already in the template's frame."""
    vertices = np.asarray(target_vertices, dtype=np.float64)
    faces = np.asarray(target_faces, dtype=np.int64)
    landmarks = None
    count = 0
    if target_kind is not None:
        needed = FLAME_VERTICES if target_kind == "flame" else MEDIAPIPE_LANDMARKS
        if (target_kind == "flame" and len(vertices) != FLAME_VERTICES) or len(vertices) < needed:
            raise InvalidOptionError(
                f"a {target_kind} target needs {needed} vertices in that topology, got {len(vertices)}",
                details={"target_landmarks": target_kind, "vertices": len(vertices)},
            )
        correspondences = require_landmarks(template, target_kind)
        template_vertices, weights, ids = correspondences.for_kind(target_kind)
        landmarks = Landmarks(template_vertices, weights, vertices[ids])
        count = len(ids)
    geometry = geometry or template_geometry(template)
    result = register(geometry, vertices, faces, landmarks, data_mask)
    return FitOutcome(template_mesh(template, result.vertices), result, target_kind, count)


def guess_target_kind(vertex_count: int, template: HeadTemplate) -> str | None:
    """ "flame" for a 5023-vertex target, "mediapipe" for a 468-vertex one, when the template has
    landmarks of that kind; otherwise None (the target must be in the template's frame)."""
    landmarks = template.landmarks
    if landmarks is None:
        return None
    if vertex_count == FLAME_VERTICES and landmarks.count("flame") >= 4:
        return "flame"
    if vertex_count == MEDIAPIPE_LANDMARKS and landmarks.count("mediapipe") >= 4:
        return "mediapipe"
    return None


# --------------------------------------------------------------------------- target meshes


def read_target_mesh(data: bytes, filename: str) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Welded vertices and triangles of an OBJ, GLB or PLY target; `InvalidMeshError` for anything
    unreadable or empty, `MeshTooLargeError` past the size limits."""
    suffix = Path(filename).suffix.lower()
    if suffix not in TARGET_SUFFIXES:
        raise InvalidMeshError(
            f"target meshes are .obj, .glb or .ply files, got {filename!r}",
            details={"filename": filename, "allowed": list(TARGET_SUFFIXES)},
        )
    if len(data) > MAX_TARGET_BYTES:
        raise MeshTooLargeError(
            f"{filename} is {len(data)} bytes; the limit is {MAX_TARGET_BYTES} bytes",
            details={"bytes": len(data), "max_bytes": MAX_TARGET_BYTES},
        )
    _check_declared_size(data, suffix, filename)
    try:
        if suffix == ".obj":
            source = read_obj(data)
            vertices, faces = source.vertices, source.faces
        elif suffix == ".glb":
            source = read_glb(data)
            vertices, faces = source.vertices, source.faces
        else:
            vertices, faces = _read_ply(data)
    except TemplateError as error:
        raise InvalidMeshError(f"{filename}: {error.message}", details={"filename": filename}) from error
    _check_counts(len(vertices), len(faces), filename)
    if len(vertices) == 0 or len(faces) == 0:
        raise InvalidMeshError(f"{filename} has no triangles", details={"filename": filename})
    if not np.isfinite(vertices).all():
        raise InvalidMeshError(
            f"{filename} has NaN or infinite vertex positions", details={"filename": filename}
        )
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise InvalidMeshError(
            f"{filename} has faces that refer to missing vertices", details={"filename": filename}
        )
    return vertices, faces


def _read_ply(data: bytes) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    import trimesh

    try:
        loaded = trimesh.load(io.BytesIO(data), file_type="ply", force="mesh", process=False)
        vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)
        faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    except Exception as error:  # trimesh raises many types for broken files
        raise TemplateError(f"not a readable PLY mesh: {error}") from error
    welded, mapping = weld(vertices)
    return welded, mapping[faces] if len(faces) else faces


def check_declared_size(data: bytes, filename: str, suffixes: tuple[str, ...] = TARGET_SUFFIXES) -> None:
    """The gateway's checks of a target upload, without parsing it: a known suffix, and the vertex
    and face counts the file declares (PLY) or that its lines show (OBJ) within the limits."""
    suffix = Path(filename).suffix.lower()
    if suffix not in suffixes:
        raise InvalidMeshError(
            f"target meshes are {', '.join(suffixes)} files, got {filename!r}",
            details={"filename": filename, "allowed": list(suffixes)},
        )
    _check_declared_size(data, suffix, filename)


def _check_declared_size(data: bytes, suffix: str, filename: str) -> None:
    """Refuse oversized meshes before parsing them, from what the file declares or counts cheaply."""
    if suffix == ".obj":
        vertices = data.count(b"\nv ") + int(data.startswith(b"v "))
        faces = data.count(b"\nf ") + int(data.startswith(b"f "))
        _check_counts(vertices, faces, filename)
    elif suffix == ".ply":
        header = data[:4096].split(b"end_header", 1)[0].decode("ascii", errors="replace")
        counts = {}
        for line in header.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "element" and parts[2].isdigit():
                counts[parts[1]] = int(parts[2])
        _check_counts(counts.get("vertex", 0), counts.get("face", 0), filename)


def _check_counts(vertices: int, faces: int, filename: str) -> None:
    if vertices > MAX_TARGET_VERTICES or faces > MAX_TARGET_FACES:
        raise MeshTooLargeError(
            f"{filename} has {vertices} vertices and {faces} faces; the limits are {MAX_TARGET_VERTICES} "
            f"vertices and {MAX_TARGET_FACES} faces (decimate the scan first)",
            details={
                "vertices": vertices,
                "faces": faces,
                "max_vertices": MAX_TARGET_VERTICES,
                "max_faces": MAX_TARGET_FACES,
            },
        )


# --------------------------------------------------------------------------- outputs


def template_obj_bytes(
    template: HeadTemplate, vertices: NDArray[np.floating], mtl_name: str | None = None
) -> bytes:
    """An OBJ in the template's own layout: its `v` order, its `vt` list, and its polygons (an OBJ
    template's quads come back as quads; the triangles are the fans they were split into)."""
    out = io.StringIO()
    out.write(f"# headforge: template {template.name} fitted by registration\n")
    if mtl_name:
        out.write(f"mtllib {mtl_name}\n")
    out.write(f"o {template.name}\n")
    points = np.asarray(vertices, dtype=np.float64)
    out.write(("v %.6f %.6f %.6f\n" * len(points)) % tuple(points.reshape(-1).tolist()))
    uvs = np.asarray(template.uvs, dtype=np.float64)
    out.write(("vt %.6f %.6f\n" * len(uvs)) % tuple(uvs.reshape(-1).tolist()))
    if mtl_name:
        out.write(f"usemtl {template.name}\n")
    faces, uv_faces = template.faces + 1, template.uv_faces + 1
    sizes = template.polygon_sizes
    if sizes is None or int((sizes - 2).sum()) != len(faces):
        sizes = np.full(len(faces), 3, dtype=np.int64)
    lines = []
    start = 0
    for size in sizes.tolist():
        fan = slice(start, start + size - 2)
        corners = [(faces[start, 0], uv_faces[start, 0])] + [
            (face[1], uv_face[1]) for face, uv_face in zip(faces[fan], uv_faces[fan], strict=True)
        ]
        corners.append((faces[start + size - 3, 2], uv_faces[start + size - 3, 2]))
        lines.append("f " + " ".join(f"{v}/{t}" for v, t in corners))
        start += size - 2
    out.write("\n".join(lines) + "\n")
    return out.getvalue().encode("ascii")


# --------------------------------------------------------------------------- the pipeline stage


def head_target_kind(mesh: Mesh) -> str:
    """Which landmark ids a pipeline's head mesh carries: FLAME heads, or the MediaPipe face mesh."""
    if len(mesh.vertices) == FLAME_VERTICES and mesh.topology.startswith("flame"):
        return "flame"
    if len(mesh.vertices) == MEDIAPIPE_LANDMARKS:
        return "mediapipe"
    raise InvalidOptionError(
        f"topology= cannot place a template on a {mesh.topology!r} mesh ({len(mesh.vertices)} vertices): it "
        "needs a FLAME head or the face mesh",
        details={"topology": mesh.topology},
    )


def register_heads(heads: list[Head], template_name: str) -> None:
    """The `topology=NAME` stage: replace every head's mesh with the template registered onto it.

    The head-frame mesh is the target; the image-frame mesh follows by the similarity between the
    head's two frames (exact for the face-mesh and FLAME pipelines), so the texture is unwrapped from
    the photo straight into the template's UVs. `params["registration"]` records the fit."""
    template = load_template(template_name)
    geometry: TemplateGeometry | None = None
    for head in heads:
        if head.mesh is None or head.mesh_image is None:
            raise InvalidOptionError(f"head {head.index} has no mesh to register the template onto")
        kind = head_target_kind(head.mesh)
        require_landmarks(template, kind)
        geometry = geometry or template_geometry(template)
        mask = template.groups.get(FACE_GROUP) if kind == "mediapipe" else None
        outcome = fit_template_to_mesh(
            template, head.mesh.vertices, head.mesh.faces, target_kind=kind, data_mask=mask, geometry=geometry
        )
        scale, rotation, translation = umeyama(
            np.asarray(head.mesh.vertices, np.float64), np.asarray(head.mesh_image.vertices, np.float64)
        )
        registered = np.asarray(outcome.mesh.vertices, dtype=np.float64)
        head.mesh = outcome.mesh
        head.mesh_image = template_mesh(template, scale * registered @ rotation.T + translation)
        report = outcome.report(UNITS_PER_MM["m"])
        report["face_region_only"] = mask is not None
        head.registration = report


# The landmark ids each pipeline's heads carry (FLAME pipelines: FLAME vertex ids).
PIPELINE_TARGET_KIND = {"facemesh": "mediapipe", "flame": "flame", "vggheads": "flame", "kaolrm": "flame"}


def topology_stage(template_name: str, pipeline: str) -> Any:
    """The registration `Stage` for `topology=NAME`, checked up front: the template exists and has
    landmarks for the pipeline's heads (`unknown_template`, `template_landmarks_missing`)."""
    from headforge.pipeline.registry import Stage
    from headforge.pipeline.types import StageContext

    template = load_template(template_name)
    kind = PIPELINE_TARGET_KIND.get(pipeline)
    if kind is not None:
        require_landmarks(template, kind)

    def run(_ctx: StageContext, heads: list[Head]) -> None:
        register_heads(heads, template_name)

    return Stage("topology", run)


# --------------------------------------------------------------------------- the retopology job

RETOPOLOGY_TASK = "retopology"
RETOPOLOGY_OUTPUTS = ("glb", "obj")
TARGET_LANDMARK_CHOICES = ("auto", "flame", "mediapipe", "none")


def retopology_options(values: dict[str, Any]) -> dict[str, Any]:
    """The options of a retopology job (`POST /v1/retopology`), checked: `template` (stored),
    `target_landmarks` (auto | flame | mediapipe | none), `units` (m | cm | mm), `outputs` (glb, obj)."""
    from headforge.templates import check_name

    unknown = sorted(set(values) - {"task", "template", "target_landmarks", "units", "outputs"})
    if unknown:
        raise InvalidOptionError(f"unknown options {unknown}", details={"unknown": unknown})
    template = check_name(str(values.get("template", "")).strip())
    load_template(template)  # unknown_template now, not in the worker
    target_landmarks = str(values.get("target_landmarks") or "auto")
    if target_landmarks not in TARGET_LANDMARK_CHOICES:
        raise InvalidOptionError(
            f"target_landmarks must be one of {list(TARGET_LANDMARK_CHOICES)}, got {target_landmarks!r}",
            details={"option": "target_landmarks", "value": target_landmarks},
        )
    units = str(values.get("units") or "m")
    if units not in UNITS_PER_MM:
        raise InvalidOptionError(
            f"units must be one of {sorted(UNITS_PER_MM)}, got {units!r}",
            details={"option": "units", "value": units},
        )
    outputs = values.get("outputs") or list(RETOPOLOGY_OUTPUTS)
    if isinstance(outputs, str):
        outputs = [part.strip() for part in outputs.split(",") if part.strip()]
    bad = sorted(set(outputs) - set(RETOPOLOGY_OUTPUTS))
    if bad or not outputs:
        raise InvalidOptionError(
            f"outputs must be among {list(RETOPOLOGY_OUTPUTS)}, got {outputs!r}",
            details={"option": "outputs", "allowed": list(RETOPOLOGY_OUTPUTS)},
        )
    return {
        "task": RETOPOLOGY_TASK,
        "template": template,
        "target_landmarks": target_landmarks,
        "units": units,
        "outputs": sorted(set(outputs)),
    }


def retopologize(data: bytes, filename: str, options: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Fit the job's template onto the uploaded mesh and write `fitted.glb` / `fitted.obj` (+ `.mtl`)
    and `result.json` into `out_dir`, each atomically; returns the result document."""
    import hashlib
    import time

    from headforge.files import write_atomic
    from headforge.pipeline.package import glb_bytes, json_bytes

    started = time.perf_counter()
    checked = retopology_options(options)
    template = load_template(checked["template"])
    vertices, faces = read_target_mesh(data, filename)
    choice = checked["target_landmarks"]
    kind = (
        guess_target_kind(len(vertices), template)
        if choice == "auto"
        else (None if choice == "none" else choice)
    )
    outcome = fit_template_to_mesh(template, vertices, faces, target_kind=kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    if "glb" in checked["outputs"]:
        files["fitted.glb"] = glb_bytes(outcome.mesh, None, "fitted")
    if "obj" in checked["outputs"]:
        files["fitted.mtl"] = f"newmtl {template.name}\nKd 1.000000 1.000000 1.000000\nillum 1\n".encode(
            "ascii"
        )
        files["fitted.obj"] = template_obj_bytes(template, outcome.mesh.vertices, "fitted.mtl")
    artifacts = []
    for name, payload in files.items():
        write_atomic(out_dir / name, payload)
        artifacts.append({"name": name, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})
    document = {
        "task": RETOPOLOGY_TASK,
        "options": checked,
        "source": {"filename": filename, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "target": {"vertices": len(vertices), "faces": len(faces)},
        "template": {
            "name": template.name,
            "vertices": len(template.vertices),
            "faces": len(template.faces),
            "uvs": len(template.uvs),
        },
        "fit": outcome.report(UNITS_PER_MM[checked["units"]]),
        "artifacts": artifacts,
        "timings_ms": {"total": round((time.perf_counter() - started) * 1000, 2)},
    }
    write_atomic(out_dir / "result.json", json_bytes(document))
    return document

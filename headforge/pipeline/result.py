"""The `result.json` document: built from the heads a run kept, the files it wrote, its timings and
the models it ran. `headforge.schemas.models` describes the same document as Pydantic models, from
which the JSON Schema is generated."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import headforge
from headforge.files import sha256_file
from headforge.models.runtime import ModelSet
from headforge.pipeline.package import WrittenFile
from headforge.pipeline.types import DecodedImage, Head, StageContext, View

if TYPE_CHECKING:
    from headforge.pipeline.registry import Pipeline
    from headforge.pipeline.texturing import SubjectTexture, TextureStats

RESULT_SCHEMA_VERSION = 1

# One written file: the file, the head it belongs to (None for a view's preview) and the view.
Written = tuple[WrittenFile, Head | None, int]

# Files the runner writes; stale ones from an earlier run into the same folder are removed.
_ARTIFACT_NAME = re.compile(
    r"^((v\d+_)?h\d+(\.glb|\.obj|\.mtl|_texture\.png|_splats\.ply|_splats_binding\.npz)|(v\d+_)?preview\.png|result\.json)$"
)


def build_document(
    pipeline: Pipeline,
    ctx: StageContext,
    heads: Sequence[Head],
    textures: Sequence[TextureStats | None],
    written: Sequence[Written],
    timings: dict[str, float],
    records: list[dict[str, Any]],
    subject_texture: SubjectTexture | None = None,
) -> dict[str, Any]:
    """The `result.json` document. A capture of several views also lists them (`views`), and its
    `source` and `image` describe the first view; a subject's fused texture is `subject_texture`."""
    views = ctx.capture.views
    multiview = len(views) > 1
    document: dict[str, Any] = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "headforge_version": headforge.__version__,
        "pipeline": pipeline.name,
        "options": ctx.options.to_dict(),
        "source": _source_document(views[0]),
        "image": _image_document(views[0].image),
        "heads": [_head_document(head, shares) for head, shares in zip(heads, textures, strict=True)],
        "artifacts": [_artifact_document(file, head, view, multiview) for file, head, view in written],
        "notes": ctx.notes,
        "timings_ms": timings,
        "models": describe_networks(ctx.models) + records,
    }
    if multiview:
        document["views"] = [
            {"index": view.index, "source": _source_document(view), "image": _image_document(view.image)}
            for view in views
        ]
    if subject_texture is not None:
        document["subject_texture"] = subject_texture.document()
    return document


def remove_stale_artifacts(out_dir: Path, keep: set[str]) -> None:
    """Delete artifact files an earlier run left in `out_dir` that this run did not write."""
    for path in out_dir.iterdir():
        if path.is_file() and _ARTIFACT_NAME.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def _artifact_document(file: WrittenFile, head: Head | None, view: int, multiview: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": file.name,
        "kind": file.kind,
        "head": None if head is None else head.index,
        "bytes": file.size,
        "sha256": file.sha256,
    }
    if multiview:
        entry["view"] = view
    return entry


def _source_document(view: View) -> dict[str, Any]:
    return {
        "filename": view.filename,
        "bytes": len(view.data),
        "sha256": hashlib.sha256(view.data).hexdigest(),
    }


def _rounded(array: Any, decimals: int) -> list[Any]:
    values: list[Any] = np.round(np.asarray(array, dtype=np.float64), decimals).tolist()
    return values


def _image_document(decoded: DecodedImage) -> dict[str, Any]:
    return {
        "width": decoded.width,
        "height": decoded.height,
        "format": decoded.source_format,
        "mode": decoded.source_mode,
        "exif_orientation": decoded.exif_orientation,
    }


def _head_document(head: Head, texture: TextureStats | None) -> dict[str, Any]:
    pose = head.pose
    mesh = head.mesh
    splats = head.splats
    return {
        "index": head.index,
        "view": head.view,
        "box": _rounded(head.detection.box, 2),
        "score": round(float(head.detection.score), 5),
        "keypoints": _rounded(head.detection.keypoints, 2),
        "landmark_score": None if head.landmark_score is None else round(float(head.landmark_score), 5),
        "pose": None
        if pose is None
        else {
            "yaw": round(float(pose.yaw), 3),
            "pitch": round(float(pose.pitch), 3),
            "roll": round(float(pose.roll), 3),
            "rotation": _rounded(pose.rotation, 6),
            "translation": _rounded(pose.translation, 3),
            "scale": round(float(pose.scale), 4),
        },
        "landmarks_2d": _rounded(head.landmarks_2d if head.landmarks_2d is not None else np.zeros((0, 2)), 2),
        "landmarks_3d": _rounded(head.landmarks_3d if head.landmarks_3d is not None else np.zeros((0, 3)), 2),
        "params": _jsonable(head.params),
        "mesh": None
        if mesh is None
        else {"topology": mesh.topology, "vertices": len(mesh.vertices), "faces": len(mesh.faces)},
        "texture_size": None if head.texture is None else int(head.texture.shape[0]),
        "texture_coverage": None if texture is None else round(texture.coverage, 4),
        "texture_seen": None if texture is None else round(texture.seen, 4),
        "splats": 0 if splats is None else len(splats.means),
        "splat_source": None if splats is None else splats.source,
        "sh_degree": None if splats is None else splats.sh_degree,
        "artifacts": dict(sorted(head.artifacts.items())),
        **({} if head.registration is None else {"registration": _jsonable(head.registration)}),
    }


def _jsonable(value: Any) -> Any:
    """numpy arrays and scalars → plain JSON values (floats rounded to 6 decimals)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return _rounded(value, 6)
        return value.tolist()
    if isinstance(value, np.floating | float):
        return round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def describe_networks(models: ModelSet, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Name, version and sha256 of each network in `names` (default: those `models` handed out),
    from the model repository manifests (ONNX Runtime backends) or the model files themselves."""
    described = []
    for name in models.handed_out if names is None else names:
        network = models[name]
        path = getattr(network, "path", None)
        described.append(_describe_model_file(str(network.name), str(path) if path is not None else None))
    return described


@lru_cache(maxsize=32)
def _describe_model_file(name: str, path_text: str | None) -> dict[str, Any]:
    if path_text is None:
        return {"name": name, "version": "unknown", "sha256": None, "format": "unknown"}
    path = Path(path_text)
    manifest_path = path.parent / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict):
        return {
            "name": str(manifest.get("name", name)),
            "version": path.parent.name,
            "sha256": manifest.get("model_sha256"),
            "format": str(manifest.get("format", path.suffix.lstrip("."))),
        }
    digest = sha256_file(path) if path.is_file() else None
    return {"name": name, "version": "file", "sha256": digest, "format": path.suffix.lstrip(".")}

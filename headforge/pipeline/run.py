"""The pipeline runner: image bytes → every artifact on disk, plus the `result.json` document.

decode ► detect + landmarks ► fit (pipeline-specific: pose, mesh) ► texture ► splats ► package ►
preview ► result. The CLI, the Celery worker and the benchmarks all call `reconstruct_image`.

Pipelines are rows of `PIPELINES`: a name and the `"module:function"` that turns a `Head` with
landmarks into a posed mesh, `(head, rgb) -> None`, filling `pose`, `mesh_image`, `mesh` and
`params`. Optional hooks fit all heads of an image in one call (`fit_batch`, run before the per-head
loop; the per-head `fit` then only runs when the batch refuses a head), say why the pipeline cannot
run here (`missing`), give a mirror-vertex map for texture filling (`symmetry`), and list extra model
records for `result.json` (`models`). Texture, splats, packaging and preview are shared and work on
any topology.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import headforge
from headforge.errors import (
    HeadforgeError,
    InvalidImageError,
    InvalidOptionError,
    PipelineUnavailableError,
    UnknownPipelineError,
)
from headforge.files import sha256_file
from headforge.models.runtime import DefaultNetworks
from headforge.pipeline.package import WrittenFile, encode_png, json_bytes, write_atomic, write_head_files
from headforge.pipeline.splats import MAX_SPLATS
from headforge.pipeline.texture import MAX_TEXTURE_SIZE, MIN_TEXTURE_SIZE
from headforge.pipeline.types import DecodedImage, Head

RESULT_SCHEMA_VERSION = 1
ALL_OUTPUTS = frozenset({"glb", "obj", "splats", "preview"})
MAX_HEADS_LIMIT = 64

Progress = Callable[[str, float], None]
FitFunction = Callable[[Head, NDArray[np.uint8]], None]
BatchFitFunction = Callable[[list[Head], NDArray[np.uint8]], None]

# The networks the shared detect + landmarks stage runs (`find_heads` with its defaults: the tiled
# full-range detector and FaceMesh, without Iris), as `DefaultNetworks` fields. result.json lists these.
LANDMARK_STAGE_NETWORKS = ("full_range", "face_landmark")

# Files this runner writes; stale ones from an earlier run into the same folder are removed.
_ARTIFACT_NAME = re.compile(
    r"^(h\d+(\.glb|\.obj|\.mtl|_texture\.png|_splats\.ply|_splats_binding\.npz)|preview\.png|result\.json)$"
)


@dataclass(frozen=True)
class PipelineEntry:
    """One named pipeline: `fit` ("module:function") fills `pose`, `mesh_image`, `mesh` and `params`
    of a `Head` that has landmarks; `missing` ("module:function", optional) returns why the
    pipeline cannot run here (e.g. FLAME files absent), or None when it can."""

    name: str
    fit: str
    description: str
    fit_batch: str | None = None  # "module:function" (heads, rgb) -> None: `fit` for all heads in one call
    missing: str | None = None
    symmetry: str | None = None  # "module:function" () -> (V,) mirror vertex map, for texture filling
    models: str | None = None  # "module:function" () -> [{name, version, sha256, format, ...}] after the networks


PIPELINES: dict[str, PipelineEntry] = {
    "facemesh": PipelineEntry(
        name="facemesh",
        fit="headforge.pipeline.run:fit_facemesh",
        description="MediaPipe face detection and 468-point face mesh, fixed triangulation and UVs",
        symmetry="headforge.pipeline.run:facemesh_symmetry",
    ),
    "flame": PipelineEntry(
        name="flame",
        fit="headforge.pipeline.flame_stage:fit_flame_head",
        description="FLAME full head with FLAME UVs, fitted to the face-mesh landmarks (needs FLAME files)",
        fit_batch="headforge.pipeline.flame_stage:fit_flame_image",
        missing="headforge.models.flame_import:flame_unavailable_reason",
        models="headforge.pipeline.flame_stage:describe_flame_asset",
    ),
}


@dataclass(frozen=True)
class ReconstructOptions:
    """What to build. `outputs` picks artifacts among glb, obj (+ mtl + texture png), splats, preview."""

    pipeline: str = "facemesh"
    texture_size: int = 1024
    splats: int = 8192
    max_heads: int | None = None
    outputs: frozenset[str] = ALL_OUTPUTS
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", frozenset(self.outputs))

    def validate(self) -> None:
        """Raise `InvalidOptionError` / `UnknownPipelineError` for out-of-range values."""
        if self.pipeline not in PIPELINES:
            raise UnknownPipelineError(
                f"unknown pipeline {self.pipeline!r}; available: {', '.join(sorted(PIPELINES))}",
                details={"pipeline": self.pipeline, "available": sorted(PIPELINES)},
            )
        _check_int("texture_size", self.texture_size, MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE)
        _check_int("splats", self.splats, 0, MAX_SPLATS)
        if self.max_heads is not None:
            _check_int("max_heads", self.max_heads, 1, MAX_HEADS_LIMIT)
        _check_int("seed", self.seed, 0, 2**32 - 1)
        unknown = sorted(set(self.outputs) - ALL_OUTPUTS)
        if unknown:
            raise InvalidOptionError(
                f"unknown outputs {unknown}; choose among {sorted(ALL_OUTPUTS)}",
                details={"outputs": unknown, "allowed": sorted(ALL_OUTPUTS)},
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "texture_size": self.texture_size,
            "splats": self.splats,
            "max_heads": self.max_heads,
            "outputs": sorted(self.outputs),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReconstructOptions:
        """Options from JSON-like input (API form fields, Celery payloads); unknown keys are refused."""
        known = {"pipeline", "texture_size", "splats", "max_heads", "outputs", "seed"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidOptionError(f"unknown options {unknown}", details={"unknown": unknown})
        arguments = dict(values)
        if "outputs" in arguments:
            outputs = arguments["outputs"]
            if isinstance(outputs, str):
                outputs = [part.strip() for part in outputs.split(",") if part.strip()]
            arguments["outputs"] = frozenset(outputs)
        options = cls(**arguments)
        options.validate()
        return options


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidOptionError(
            f"{name} must be an integer from {low} to {high}, got {value!r}",
            details={"option": name, "value": value if isinstance(value, int | float | str) else repr(value)},
        )


def pipeline_missing_reason(name: str) -> str | None:
    """Why pipeline `name` cannot run in this deployment, or None when it can."""
    entry = PIPELINES.get(name)
    if entry is None:
        return f"unknown pipeline {name!r}"
    if entry.missing is None:
        return None
    reason: str | None = _resolve(entry.missing)()
    return reason


def _resolve(reference: str) -> Callable[..., Any]:
    module_name, _, attribute = reference.partition(":")
    function: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
    return function


def facemesh_symmetry() -> NDArray[np.int32]:
    """The face mesh's vertex -> mirror-vertex map."""
    from headforge.pipeline.topology import load_topology

    return load_topology().mirror


def fit_facemesh(head: Head, rgb: NDArray[np.uint8]) -> None:
    """The default pipeline's fit: the 468 landmarks are the mesh; pose from a rigid fit."""
    from headforge.pipeline.pose import estimate_pose, to_head_frame
    from headforge.pipeline.topology import NUM_VERTICES, build_image_mesh

    if head.landmarks_3d is None:
        raise ValueError("fit_facemesh needs landmarks_3d")
    landmarks = head.landmarks_3d[:NUM_VERTICES]
    head.mesh_image = build_image_mesh(landmarks)
    head.pose = estimate_pose(landmarks)
    head.mesh = to_head_frame(head.mesh_image, head.pose)


@dataclass
class _Timer:
    """Accumulates wall time per stage, in milliseconds, in first-seen order."""

    timings_ms: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            with self._lock:
                self.timings_ms[name] = self.timings_ms.get(name, 0.0) + elapsed


def reconstruct_image(
    data: bytes,
    filename: str,
    options: ReconstructOptions,
    out_dir: Path,
    progress: Progress | None = None,
    *,
    networks: DefaultNetworks | None = None,
) -> dict[str, Any]:
    """Decode `data`, reconstruct every head, write all artifacts atomically into `out_dir`, and
    return the `result.json` document (also written there, last). Raises `HeadforgeError`s."""
    from headforge.pipeline.decode import decode_image
    from headforge.pipeline.landmarks import find_heads

    options.validate()
    _keep_freed_memory()
    report = progress or (lambda _stage, _fraction: None)
    timer = _Timer()
    started = time.perf_counter()
    entry = PIPELINES[options.pipeline]
    reason = pipeline_missing_reason(options.pipeline)
    if reason is not None:
        raise PipelineUnavailableError(
            f"pipeline {options.pipeline!r} is unavailable: {reason}", details={"pipeline": options.pipeline}
        )
    fit: FitFunction = _resolve(entry.fit)
    fit_batch: BatchFitFunction | None = _resolve(entry.fit_batch) if entry.fit_batch else None
    symmetry = np.asarray(_resolve(entry.symmetry)(), dtype=np.int32) if entry.symmetry else None

    report("decode", 0.0)
    with timer.stage("decode"):
        decoded = decode_image(data)
    report("models", 0.05)
    with timer.stage("models"):
        if networks is None:
            from headforge.models.runtime import load_default_networks

            networks = load_default_networks()
    report("detect_landmarks", 0.1)
    notes: list[str] = []
    with timer.stage("detect_landmarks"):
        try:
            heads = find_heads(decoded.rgb, networks, max_heads=options.max_heads)
        except InvalidImageError as error:  # decodable, but too small to hold a face
            heads = []
            notes.append(f"{error.message}; nothing to reconstruct")
    if not heads and not notes:
        notes.append("no face found in the image; nothing to reconstruct")
    out_dir.mkdir(parents=True, exist_ok=True)
    kept: list[Head] = []
    coverages: list[float] = []
    per_head = 0.75 / max(len(heads), 1)
    batch_fitted = False
    if fit_batch is not None and heads:
        report("fit", 0.15)
        with timer.stage("fit"):
            batch_fitted = _fit_all_heads(fit_batch, heads, decoded.rgb)
    # Encoding PNGs and writing files runs on worker threads (zlib and OpenCV release the GIL) while
    # the next head or the preview is computed; the stage timings are each job's own wall time.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="headforge-package") as pool:
        jobs: list[Future[list[tuple[WrittenFile, int | None]]]] = []
        for position, head in enumerate(heads):
            base = 0.15 + position * per_head
            try:
                if not batch_fitted:
                    report("fit", base)
                    with timer.stage("fit"):
                        fit(head, decoded.rgb)
                report("texture", base + 0.25 * per_head)
                with timer.stage("texture"):
                    head.texture, coverage = _build_texture(decoded.rgb, head, options.texture_size, symmetry)
                # Start the PNG now: it encodes while splats and the preview are computed.
                texture_png = pool.submit(_encode_texture, head.texture, options.outputs, timer)
                if options.splats > 0:
                    report("splats", base + 0.5 * per_head)
                    with timer.stage("splats"):
                        head.splats = _build_splats(
                            head, options.splats, _head_seed(options.seed, head.index)
                        )
            except HeadforgeError as error:
                if _fails_the_image(error):
                    raise
                notes.append(f"head {head.index} skipped: [{error.code}] {error.message}")
                continue
            report("package", base + 0.7 * per_head)
            head.index = len(kept)
            kept.append(head)
            coverages.append(coverage)
            jobs.append(pool.submit(_package_head, head, texture_png, out_dir, options.outputs, timer))

        if "preview" in options.outputs:
            report("preview", 0.9)
            with timer.stage("preview"):
                from headforge.pipeline.preview import MAX_RENDERED_HEADS, compose_preview

                if len(kept) > MAX_RENDERED_HEADS:
                    notes.append(f"preview.png renders the first {MAX_RENDERED_HEADS} of {len(kept)} heads")

                preview = compose_preview(decoded.rgb, kept)
            jobs.append(pool.submit(_write_preview, preview, out_dir, timer))
        written = [item for job in jobs for item in job.result()]

    report("result", 0.97)
    with timer.stage("result"):
        _remove_stale_artifacts(out_dir, {file.name for file, _ in written} | {"result.json"})
        timings = {name: round(value, 3) for name, value in timer.timings_ms.items()}
        timings["total"] = round((time.perf_counter() - started) * 1000.0, 3)
        document = {
            "schema_version": RESULT_SCHEMA_VERSION,
            "headforge_version": headforge.__version__,
            "pipeline": options.pipeline,
            "options": options.to_dict(),
            "source": {
                "filename": filename,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            "image": _image_document(decoded),
            "heads": [_head_document(head, coverage) for head, coverage in zip(kept, coverages, strict=True)],
            "artifacts": [
                {
                    "name": file.name,
                    "kind": file.kind,
                    "head": index,
                    "bytes": file.size,
                    "sha256": file.sha256,
                }
                for file, index in written
            ],
            "notes": notes,
            "timings_ms": timings,
            "models": describe_models(entry, networks),
        }
        write_atomic(out_dir / "result.json", json_bytes(document))
    report("done", 1.0)
    return document


def _fails_the_image(error: HeadforgeError) -> bool:
    """Whether a stage's error stops the whole image (server-side or unavailable) rather than
    skipping just the head it concerns."""
    return error.http_status >= 500 or isinstance(error, PipelineUnavailableError)


def _fit_all_heads(fit_batch: BatchFitFunction, heads: list[Head], rgb: NDArray[np.uint8]) -> bool:
    """Run the pipeline's batch fit over every head. False when it refused some head's input (a
    client-side error): the per-head fits then run instead, so only the heads at fault are skipped."""
    try:
        fit_batch(heads, rgb)
    except HeadforgeError as error:
        if _fails_the_image(error):
            raise
        return False
    return True


# glibc malloc settings (mallopt parameters): blocks up to 32 MiB come from the heap, and the heap
# is returned to the system only past 128 MiB free at its top.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCK_LIMIT, _HEAP_TRIM_THRESHOLD = 32 << 20, 128 << 20


@lru_cache(maxsize=1)
def _keep_freed_memory() -> None:
    """Let the process reuse the memory the stages free instead of giving it back after every photo.

    Each photo allocates and frees tens of MiB of arrays (texels, maps, images); with glibc's
    defaults much of it goes back to the system and comes back as fresh pages, about 8,000 page
    faults per photo at texture 1024 (more than 10 % of the pipeline's time on 2 cores). Skipped
    where the MALLOC_* environment variables already tune malloc, and outside glibc."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows)
        return
    mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_LIMIT)
    mallopt(_M_TRIM_THRESHOLD, _HEAP_TRIM_THRESHOLD)


def _encode_texture(
    texture: NDArray[np.uint8] | None, outputs: frozenset[str], timer: _Timer
) -> bytes | None:
    """The texture as PNG bytes, once, for both the GLB and the OBJ (None when neither is wanted)."""
    if texture is None or not outputs & {"glb", "obj"}:
        return None
    with timer.stage("texture_encode"):
        return encode_png(texture)


def _package_head(
    head: Head, texture_png: Future[bytes | None], out_dir: Path, outputs: frozenset[str], timer: _Timer
) -> list[tuple[WrittenFile, int | None]]:
    """Write the head's GLB, OBJ + MTL + PNG and splat PLY (after its PNG job, submitted earlier)."""
    png = texture_png.result()
    with timer.stage("package"):
        files = write_head_files(head.mesh, png, head.splats, f"h{head.index}", out_dir, outputs)
    head.artifacts = {file.kind: file.name for file in files}
    return [(file, head.index) for file in files]


def _write_preview(
    preview: NDArray[np.uint8], out_dir: Path, timer: _Timer
) -> list[tuple[WrittenFile, int | None]]:
    with timer.stage("preview_encode"):
        return [(write_atomic(out_dir / "preview.png", encode_png(preview)), None)]


def _head_seed(seed: int, index: int) -> int:
    """A per-head seed derived from the job seed, stable across runs."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _build_texture(
    rgb: NDArray[np.uint8], head: Head, size: int, symmetry: NDArray[np.int32] | None
) -> tuple[NDArray[np.uint8], float]:
    """The head's texture and the share of its UV-island texels seen in the photo (directly or mirrored)."""
    from headforge.pipeline.geometry import cached_uv_raster
    from headforge.pipeline.texture import unwrap_texture

    mesh = head.mesh_image
    if mesh is None:
        raise ValueError("texture needs head.mesh_image")
    if symmetry is not None and len(symmetry) != len(mesh.vertices):
        symmetry = None
    texture, coverage = unwrap_texture(rgb, mesh, size, symmetry=symmetry)
    uv_faces = mesh.faces if mesh.uv_faces is None else mesh.uv_faces
    islands = cached_uv_raster(mesh.uvs, uv_faces, size).island_mask
    island_texels = np.count_nonzero(islands)
    seen = np.count_nonzero(coverage & islands) / island_texels if island_texels else 0.0
    return texture, float(seen)


def _build_splats(head: Head, count: int, seed: int) -> Any:
    from headforge.pipeline.splats import sample_splats

    if head.mesh is None or head.texture is None:
        raise ValueError("splats need head.mesh and head.texture")
    return sample_splats(head.mesh, head.texture, count, seed=seed)


def _remove_stale_artifacts(out_dir: Path, keep: set[str]) -> None:
    """Delete artifact files an earlier run left in `out_dir` that this run did not write."""
    for path in out_dir.iterdir():
        if path.is_file() and _ARTIFACT_NAME.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


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


def _head_document(head: Head, texture_coverage: float) -> dict[str, Any]:
    pose = head.pose
    mesh = head.mesh
    return {
        "index": head.index,
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
        "texture_coverage": round(texture_coverage, 4),
        "splats": 0 if head.splats is None else len(head.splats.means),
        "artifacts": dict(sorted(head.artifacts.items())),
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


def describe_models(entry: PipelineEntry, networks: DefaultNetworks) -> list[dict[str, Any]]:
    """result.json's `models`: the networks the landmark stage ran, then the pipeline's own models
    (e.g. the imported FLAME asset)."""
    extra: list[dict[str, Any]] = _resolve(entry.models)() if entry.models else []
    return describe_networks(networks) + extra


def describe_networks(
    networks: DefaultNetworks, used: Sequence[str] = LANDMARK_STAGE_NETWORKS
) -> list[dict[str, Any]]:
    """Name, version and sha256 of each network in `used` (`DefaultNetworks` fields), from the model
    repository manifests (ONNX Runtime backends) or the model files themselves (other backends)."""
    described = []
    for field_name in used:
        network = getattr(networks, field_name)
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

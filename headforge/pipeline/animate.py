"""Animate a FLAME head: morph targets for the GLB, and frames driven by a sequence of FLAME
expression and jaw parameters (`headforge animate`, and the API's animate job).

A sequence file (JSON) is
    {"fps": 30, "frames": [{"expression": [ψ_0, …, ψ_{K-1}], "jaw": [ax, ay, az]}, …]}
with K the head's number of animated expression components (result.json's
`params.morph_targets`, default 16): absolute FLAME expression values in standard deviations (the
components beyond K are zero), and the jaw as an axis-angle in radians (optional, default at rest).
Each frame writes `f<frame>_<stem>_mesh.ply` (the head's vertices in the OBJ's vertex order, with
its faces; head frame, meters) and `f<frame>_<stem>_splats.ply` (the head's bound splats posed on
that mesh, 3DGS layout), for every FLAME head of the result; `<stem>` is the stem of the head's own
files (`h0`, or `v1_h0` in a subject's result).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from plyfile import PlyData, PlyElement

from headforge.errors import InvalidOptionError, InvalidSequenceError, NotAnimatableError, TooManyFramesError
from headforge.pipeline.flame_fit import JAW, JAW_FEATURES, FlameFit, FlameLandmarkModel, rodrigues
from headforge.pipeline.package import SH_C0, splats_ply_bytes, write_atomic
from headforge.pipeline.rig import (
    JAW_OPEN_RAD,
    JAW_TARGET,
    MAX_EXPRESSIONS,
    MorphTargets,
    SplatDeformer,
    expression_target_names,
    read_binding,
)
from headforge.pipeline.types import Splats

MAX_FRAMES = 10_000  # `headforge animate`; the API's cap is service/animate.py's MAX_API_FRAMES


def check_expressions(count: object) -> int:
    """The `expressions` option: how many FLAME expression components become morph targets."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_EXPRESSIONS:
        raise InvalidOptionError(
            f"expressions must be an integer from 1 to {MAX_EXPRESSIONS}, got {count!r}",
            details={"option": "expressions", "value": repr(count)},
        )
    return count


def flame_morph_targets(model: FlameLandmarkModel, fit: FlameFit, count: int) -> MorphTargets:
    """The head's first `count` expression components and jaw opening as morph targets, relative to
    the fitted head (`model.vertices` at the fit), with its identity and fitted jaw baked in."""
    check_expressions(count)
    base = np.concatenate([fit.shape, fit.expression]).astype(np.float64)
    coefficients = np.tile(base, (count + 2, 1))
    coefficients[1 + np.arange(count), model.num_shape + np.arange(count)] += 1.0
    jaws = np.tile(np.asarray(fit.jaw_pose, np.float64), (count + 2, 1))
    jaws[-1, 0] += JAW_OPEN_RAD
    vertices = model.vertices(coefficients, jaws)
    return MorphTargets(expression_target_names(count), (vertices[1:] - vertices[0]).astype(np.float32))


class FlameDriver:
    """One head's FLAME with its identity precomputed: expression (B, K) and jaw (B, 3) → vertices
    (B, V, 3) float32, the same as `FlameLandmarkModel.vertices` with ψ beyond K at zero, but reading
    only the K expression directions per frame (the identity's shape offsets are summed once)."""

    def __init__(self, model: FlameLandmarkModel, shape: NDArray[np.floating], expressions: int) -> None:
        asset = model.asset
        count = len(asset.v_template)
        shape64 = np.asarray(shape, np.float64)
        identity = asset.v_template.astype(np.float64) + np.einsum(
            "vcl,l->vc", asset.shapedirs[:, :, : model.num_shape].astype(np.float64), shape64
        )
        self.count = count
        self.identity = identity.reshape(-1).astype(np.float32)  # (V*3,)
        self.expression_dirs = np.ascontiguousarray(
            asset.exprdirs[:, :, :expressions].reshape(-1, expressions).T, dtype=np.float32
        )  # (K, V*3)
        self.pose_dirs = np.ascontiguousarray(
            asset.posedirs[..., JAW_FEATURES].reshape(-1, 9).T, dtype=np.float32
        )  # (9, V*3)
        self.joint = (model.jaw_const + shape64 @ model.jaw_dirs[:, : model.num_shape].T).astype(np.float32)
        self.joint_dirs = np.ascontiguousarray(
            model.jaw_dirs[:, model.num_shape : model.num_shape + expressions].T, dtype=np.float32
        )  # (K, 3)
        self.jaw_weight = asset.weights[:, JAW].astype(np.float32)[:, None]  # (V, 1)
        self.expressions = expressions

    def vertices(self, expression: NDArray[np.floating], jaw: NDArray[np.floating]) -> NDArray[np.float32]:
        """Posed vertices (B, V, 3) for expression (B, K) and jaw axis-angles (B, 3)."""
        expression = np.asarray(expression, np.float32)
        batch = len(expression)
        delta = (rodrigues(np.asarray(jaw, np.float64)) - np.eye(3)).astype(np.float32)  # (B, 3, 3)
        posed = self.identity + expression @ self.expression_dirs + delta.reshape(batch, 9) @ self.pose_dirs
        posed = posed.reshape(batch, self.count, 3)
        joint = self.joint + expression @ self.joint_dirs  # (B, 3)
        lever = posed - joint[:, None, :]
        return np.asarray(posed + self.jaw_weight * np.matmul(lever, delta.transpose(0, 2, 1)), np.float32)


@dataclass
class ExpressionSequence:
    """Frames of absolute FLAME expression (F, K) and jaw axis-angle (F, 3) values."""

    expression: NDArray[np.float64]
    jaw: NDArray[np.float64]
    fps: float = 30.0


def parse_sequence(document: object, expressions: int, max_frames: int = MAX_FRAMES) -> ExpressionSequence:
    """Validate a sequence document (see the module docstring): `TooManyFramesError` (413) over
    `max_frames`, else `InvalidSequenceError` (422) naming the first bad frame and what is wrong."""
    if not isinstance(document, dict) or not isinstance(document.get("frames"), list):
        raise InvalidSequenceError('the expression sequence must be an object with a "frames" list')
    frames = document["frames"]
    if len(frames) > max_frames:
        raise TooManyFramesError(
            f"the expression sequence has {len(frames)} frames, over the limit of {max_frames}",
            details={"frames": len(frames), "max_frames": max_frames},
        )
    if not frames:
        raise InvalidSequenceError("the expression sequence has no frames", details={"frames": 0})
    unknown = sorted(set(document) - {"fps", "frames"})
    if unknown:
        raise InvalidSequenceError(f"the expression sequence has unknown keys {unknown}")
    fps = document.get("fps", 30.0)
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps <= 1000:
        raise InvalidSequenceError(f"fps must be a number in (0, 1000], got {fps!r}")
    expression = np.zeros((len(frames), expressions))
    jaw = np.zeros((len(frames), 3))
    for index, frame in enumerate(frames):
        if not isinstance(frame, dict) or "expression" not in frame:
            raise InvalidSequenceError(
                f'frame {index} must be an object with an "expression" array', details={"frame": index}
            )
        unknown = sorted(set(frame) - {"expression", "jaw"})
        if unknown:
            raise InvalidSequenceError(f"frame {index} has unknown keys {unknown}", details={"frame": index})
        expression[index] = _numbers(frame["expression"], expressions, f"frame {index} expression", index)
        if "jaw" in frame:
            jaw[index] = _numbers(frame["jaw"], 3, f"frame {index} jaw", index)
    return ExpressionSequence(expression, jaw, float(fps))


def _numbers(values: object, length: int, what: str, frame: int) -> NDArray[np.float64]:
    if not isinstance(values, list) or len(values) != length:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise InvalidSequenceError(
            f"{what} must be an array of {length} numbers, got {got}",
            details={"frame": frame, "expected_length": length, "got": got},
        )
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise InvalidSequenceError(f"{what} must hold finite numbers", details={"frame": frame})
    array = np.asarray(values, np.float64)
    if np.abs(array).max(initial=0.0) > 10.0:
        raise InvalidSequenceError(f"{what} values must lie within ±10", details={"frame": frame})
    return array


def head_expressions(head: dict[str, Any]) -> int | None:
    """K of a result.json head: its expression morph targets, or None for a head that cannot animate."""
    params = head.get("params") or {}
    names = params.get("morph_targets")
    if params.get("model") != "flame" or not isinstance(names, list):
        return None
    return sum(1 for name in names if name != JAW_TARGET)


def head_stem(head: dict[str, Any]) -> str:
    """The stem of a head's files (`h0`, or `v1_h0` in a subject's result), from its artifacts."""
    names = head.get("artifacts") or {}
    for kind, suffix in (
        ("glb", ".glb"),
        ("obj", ".obj"),
        ("splats", "_splats.ply"),
        ("binding", "_splats_binding.npz"),
    ):
        name = names.get(kind)
        if isinstance(name, str) and name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return f"h{int(head['index'])}"


def head_splat_files(head: dict[str, Any]) -> tuple[str, str] | None:
    """The names of a head's splat PLY and binding file, or None when it has no bound splats."""
    names = head.get("artifacts") or {}
    splats, binding = names.get("splats"), names.get("binding")
    if isinstance(splats, str) and isinstance(binding, str):
        return splats, binding
    return None


def mesh_ply_bytes(vertices: NDArray[np.floating], faces: NDArray[np.integer]) -> bytes:
    """Binary little-endian PLY of a triangle mesh (vertex x, y, z; face vertex_indices)."""
    vertex = np.empty(len(vertices), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    vertex["x"], vertex["y"], vertex["z"] = np.asarray(vertices, np.float32).T
    face = np.empty(len(faces), dtype=[("vertex_indices", "<i4", (3,))])
    face["vertex_indices"] = np.asarray(faces, np.int32)
    buffer = io.BytesIO()
    PlyData(
        [PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")], text=False, byte_order="<"
    ).write(buffer)
    return buffer.getvalue()


def read_splat_appearance(data: bytes) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Colours (N, 3) in [0, 1] and opacities (N,) of a 3DGS PLY written by the package stage."""
    vertex = PlyData.read(io.BytesIO(data))["vertex"]
    dc = np.stack([np.asarray(vertex[f"f_dc_{c}"], np.float64) for c in range(3)], axis=1)
    opacity = 1.0 / (1.0 + np.exp(-np.asarray(vertex["opacity"], np.float64)))
    return (dc * SH_C0 + 0.5).astype(np.float32), opacity.astype(np.float32)


def animate_result(
    result_dir: Path,
    sequence_document: object,
    out_dir: Path,
    model: FlameLandmarkModel | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Write the frames of `sequence_document` for every animatable head of `result_dir` into
    `out_dir`; returns a summary document (also written as `animation.json`)."""
    from headforge.pipeline.flame_stage import load_model

    try:
        result = json.loads((result_dir / "result.json").read_text())
    except (OSError, ValueError) as error:
        raise InvalidOptionError(f"{result_dir} holds no readable result.json: {error}") from error
    heads = [head for head in result.get("heads", []) if head_expressions(head) is not None]
    if not heads:
        raise NotAnimatableError(
            "the result has no animatable head: animation needs the flame pipeline "
            "(its heads carry FLAME parameters and morph targets)",
            details={"pipeline": result.get("pipeline")},
        )
    counts = {head_expressions(head) for head in heads}
    if len(counts) != 1:
        raise InvalidOptionError("the result's heads animate different expression counts")
    expressions = int(counts.pop() or 0)
    sequence = parse_sequence(sequence_document, expressions)
    model = model or load_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    frames = len(sequence.expression)
    for position, head in enumerate(heads):
        stem = head_stem(head)
        params = head["params"]
        shape = np.asarray(params["shape"], np.float64)
        if len(shape) != model.num_shape:
            raise InvalidOptionError("the result's FLAME shape does not match the imported FLAME asset")
        driver = FlameDriver(model, shape, expressions)
        faces = np.asarray(model.asset.faces, np.int64)
        deformer = None
        appearance = None
        splat_files = head_splat_files(head)
        if splat_files is not None and all((result_dir / name).is_file() for name in splat_files):
            splats_name, binding_name = splat_files
            try:
                binding, binding_faces, vertex_count = read_binding((result_dir / binding_name).read_bytes())
            except ValueError as error:
                raise InvalidOptionError(f"{binding_name}: {error}") from error
            if vertex_count != driver.count or not np.array_equal(binding_faces, faces):
                raise InvalidOptionError(f"{binding_name} was made for a different mesh")
            deformer = SplatDeformer(binding, faces)
            appearance = read_splat_appearance((result_dir / splats_name).read_bytes())
        for frame in range(frames):
            # One frame per call: faster per frame than batches (headforge bench --animation), and
            # memory stays bounded for long sequences.
            span = slice(frame, frame + 1)
            posed_vertices = driver.vertices(sequence.expression[span], sequence.jaw[span])[0]
            frame_stem = f"f{frame:04d}_{stem}"
            write_atomic(out_dir / f"{frame_stem}_mesh.ply", mesh_ply_bytes(posed_vertices, faces))
            written.append(f"{frame_stem}_mesh.ply")
            if deformer is not None and appearance is not None:
                posed = deformer.pose(posed_vertices)
                splats = Splats(
                    means=posed.means,
                    normals=posed.normals,
                    colors=appearance[0],
                    opacities=appearance[1],
                    scales=posed.scales,
                    rotations=posed.rotations,
                )
                write_atomic(out_dir / f"{frame_stem}_splats.ply", splats_ply_bytes(splats))
                written.append(f"{frame_stem}_splats.ply")
            if progress is not None:
                progress((position * frames + frame + 1) / (len(heads) * frames))
    summary = {
        "frames": frames,
        "fps": sequence.fps,
        "expressions": expressions,
        "heads": [head_stem(head) for head in heads],
        "files": written,
    }
    write_atomic(out_dir / "animation.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary

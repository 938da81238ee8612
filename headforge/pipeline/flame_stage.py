"""The `flame` pipeline's fit stage: FLAME fitted to the face-mesh landmarks, as `Head` fields.

Fills, for each head: `mesh_image` (FLAME's 5023 vertices in image pixels, z on the x scale, with
FLAME's UVs and seams), `mesh` (head frame: meters, +Y up, face toward +Z, FLAME's own origin),
`pose` (from the fitted rotation) and `params` (FLAME shape, expression, jaw/neck/eye poses, the
similarity to the image and the fit's residual in pixels). Texture and splats are the default
pipeline's stages, which take any topology.

The registry's `flame` row runs `fit_flame_stage` once per capture, so all of its heads are fitted
in one batch; the runner retries each head alone when the batch refuses some head's landmarks.
In a subject capture (`subject=true`, one head per view) the heads share one identity:
`fit_subject_heads` fits β once for all views, with each view's own pose, expression and jaw
(docs/subjects.md).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from headforge.errors import InvalidLandmarksError, PipelineUnavailableError
from headforge.files import sha256_file
from headforge.models.flame_import import (
    FlameAsset,
    flame_asset_path,
    flame_available,
    flame_unavailable_reason,
    load_flame_asset,
)
from headforge.pipeline.flame_fit import (
    FitSettings,
    FlameFit,
    FlameLandmarkModel,
    fit_flame,
    fit_flame_subject,
)
from headforge.pipeline.rig import DEFAULT_EXPRESSIONS
from headforge.pipeline.types import Head, Mesh, Pose, StageContext, SubjectIdentity

__all__ = [
    "describe_flame_asset",
    "fit_flame_heads",
    "fit_flame_stage",
    "fit_subject_heads",
    "flame_available",
    "flame_unavailable_reason",
    "load_model",
]

TOPOLOGY = "flame5023"


@lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int, size: int) -> FlameLandmarkModel:
    return FlameLandmarkModel(load_flame_asset(Path(path)))


def load_model(path: Path | None = None) -> FlameLandmarkModel:
    """The imported asset, ready to fit; cached per process until the file changes."""
    path = path or flame_asset_path()
    reason = flame_unavailable_reason(path)
    if reason is not None:
        raise PipelineUnavailableError(
            f"pipeline 'flame' is unavailable: {reason}", details={"pipeline": "flame"}
        )
    stat = path.stat()
    return _cached_model(str(path), stat.st_mtime_ns, stat.st_size)


def _model(asset: FlameAsset | FlameLandmarkModel | None) -> FlameLandmarkModel:
    """The model to fit: the imported asset by default; it must have UVs."""
    if asset is None:
        model = load_model()
    elif isinstance(asset, FlameLandmarkModel):
        model = asset
    else:
        model = FlameLandmarkModel(asset)
    if model.asset.uvs is None or model.asset.uv_faces is None:
        raise PipelineUnavailableError(
            "the FLAME asset has no UVs; re-import it with --uv (see docs/flame.md)"
        )
    return model


def fit_flame_heads(
    heads: list[Head],
    rgb_shape: tuple[int, ...],
    asset: FlameAsset | FlameLandmarkModel | None = None,
    settings: FitSettings | None = None,
    expressions: int = DEFAULT_EXPRESSIONS,
) -> None:
    """Fit FLAME to every head's `landmarks_3d` in one batch and fill their meshes, pose and params;
    each head mesh carries its first `expressions` expression components and jaw as morph targets."""
    if not heads:
        return
    model = _model(asset)
    for head in heads:
        if head.landmarks_3d is None:
            raise InvalidLandmarksError(f"head {head.index} has no 3D landmarks to fit FLAME to")
    fits = fit_flame(model, np.stack([np.asarray(head.landmarks_3d, np.float64) for head in heads]), settings)
    coefficients = np.stack([np.concatenate([fit.shape, fit.expression]) for fit in fits])
    vertices = model.vertices(coefficients, np.stack([fit.jaw_pose for fit in fits]))
    for head, fit, head_vertices in zip(heads, fits, vertices, strict=True):
        _fill_head(head, fit, head_vertices, model.asset, rgb_shape)
        _add_morph_targets(head, model, fit, expressions)


def fit_flame_stage(ctx: StageContext, heads: list[Head]) -> None:
    """The `flame` pipeline's fit stage: every head of the capture in one batch; in a subject
    capture, one identity shared by the views (`fit_subject_heads`)."""
    if not heads:
        return
    if ctx.capture.subject:
        fit_subject_heads(ctx, heads)
        return
    shapes = {ctx.image(head).shape for head in heads}
    if len(shapes) == 1:
        fit_flame_heads(heads, shapes.pop())
        return
    # Views of different sizes: one batch per size (the params record each head's image size).
    for shape in sorted(shapes):
        fit_flame_heads([head for head in heads if ctx.image(head).shape == shape], shape)


def fit_subject_heads(
    ctx: StageContext,
    heads: list[Head],
    asset: FlameAsset | FlameLandmarkModel | None = None,
    settings: FitSettings | None = None,
    expressions: int = DEFAULT_EXPRESSIONS,
) -> None:
    """One person's heads (one per view, `subject.pick_subject_heads`): FLAME fitted with one β
    shared by all of them and each view's own pose, expression and jaw, in one batched fit. Fills
    every head as `fit_flame_heads` does (its params carry the shared β) and records the identity
    in `ctx.subject`."""
    ctx.subject = None
    model = _model(asset)
    for head in heads:
        if head.landmarks_3d is None:
            raise InvalidLandmarksError(f"view {head.view} has no 3D landmarks to fit FLAME to")
    subject = fit_flame_subject(
        model, np.stack([np.asarray(head.landmarks_3d, np.float64) for head in heads]), settings
    )
    coefficients = np.stack([np.concatenate([fit.shape, fit.expression]) for fit in subject.views])
    vertices = model.vertices(coefficients, np.stack([fit.jaw_pose for fit in subject.views]))
    for head, fit, head_vertices in zip(heads, subject.views, vertices, strict=True):
        _fill_head(head, fit, head_vertices, model.asset, ctx.image(head).shape)
        _add_morph_targets(head, model, fit, expressions)
    ctx.subject = SubjectIdentity(
        model="flame",
        shape=subject.shape,
        views=sorted(head.view for head in heads),
        residual_px=subject.residual_px,
        iterations=subject.iterations,
    )


def describe_flame_asset(path: Path | None = None) -> list[dict[str, Any]]:
    """result.json's record of the FLAME asset the fit used: name, version (the FLAME model file it
    was imported from), sha256 of the imported `.npz`, format, and the source files with their sha256."""
    path = path or flame_asset_path()
    stat = path.stat()
    return [copy.deepcopy(_describe_asset(str(path), stat.st_mtime_ns, stat.st_size))]


@lru_cache(maxsize=2)
def _describe_asset(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    metadata = load_model(Path(path)).asset.metadata
    sources = metadata.get("sources", {})
    model_file = sources.get("model", {}).get("file")
    return {
        "name": "flame",
        "version": str(model_file) if model_file else "unknown",
        "sha256": sha256_file(Path(path)),
        "format": "npz",
        "sources": sources,
    }


def _fill_head(
    head: Head, fit: FlameFit, vertices: NDArray[np.float64], asset: FlameAsset, rgb_shape: tuple[int, ...]
) -> None:
    from headforge.pipeline.pose import rotation_to_angles

    assert asset.uvs is not None and asset.uv_faces is not None
    image_vertices = fit.scale * vertices @ fit.rotation.T + fit.translation
    if not np.all(np.isfinite(image_vertices)):
        raise InvalidLandmarksError(f"the FLAME fit diverged for head {head.index}")
    head.mesh_image = Mesh(
        vertices=image_vertices.astype(np.float32),
        faces=asset.faces,
        uvs=asset.uvs,
        uv_faces=asset.uv_faces,
        topology=TOPOLOGY,
    )
    head.mesh = replace(head.mesh_image, vertices=vertices.astype(np.float32))
    yaw, pitch, roll = rotation_to_angles(fit.rotation)
    head.pose = Pose(
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        rotation=fit.rotation.astype(np.float32),
        translation=fit.translation.astype(np.float32),
        scale=float(fit.scale),
    )
    head.params = flame_params_document(fit, rgb_shape)


def _add_morph_targets(head: Head, model: FlameLandmarkModel, fit: FlameFit, expressions: int) -> None:
    """FLAME's expression space (first `expressions` components) and jaw opening as morph targets
    of the head-frame mesh, recorded by name in the params."""
    from headforge.pipeline.animate import flame_morph_targets

    assert head.mesh is not None
    head.mesh.morph_targets = flame_morph_targets(model, fit, expressions)
    head.params["morph_targets"] = list(head.mesh.morph_targets.names)


def flame_params_document(fit: FlameFit, rgb_shape: tuple[int, ...]) -> dict[str, Any]:
    """`result.json`'s `params` for a FLAME head (plain lists and floats)."""
    return {
        "image_size": [int(rgb_shape[1]), int(rgb_shape[0])],
        "model": "flame",
        "shape": fit.shape.astype(np.float32).tolist(),
        "expression": fit.expression.astype(np.float32).tolist(),
        "jaw_pose": fit.jaw_pose.astype(np.float32).tolist(),
        "neck_pose": [0.0, 0.0, 0.0],
        "eye_pose": [0.0] * 6,
        "rotation": fit.rotation.astype(np.float32).tolist(),
        "translation_px": fit.translation.astype(np.float32).tolist(),
        "scale_px_per_m": float(fit.scale),
        "fit_residual_px": float(fit.residual_px),
        "fit_iterations": int(fit.iterations),
    }

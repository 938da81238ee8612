"""The `vggheads` pipeline's head source and FLAME stage, over `headforge.pipeline.vggheads`.

Head source (`vggheads_heads`): the imported network (model set name `vggheads`, the newest
imported entry) runs once over every photo of the capture in one batch (on the first view asked
for; the other views take their share), then NMS per photo. Each head gets its box, score, pose
(AFLW2000 convention) and FLAME parameters in image pixels (`params`, model `vggheads-flame`).

FLAME stage (`vggheads_flame_stage`): with the operator's FLAME imported, the predicted parameters
drive FLAME (300 shape + 100 expression components as the network predicts them; jaw; global,
neck and eyes at rest), the mesh is placed in image pixels with s·R·(v + 0.05 ẑ) + t, and the
runner's texture and splat steps follow as for `flame`. Without FLAME the heads keep boxes,
scores, poses and parameters, no meshes, and a note says so.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import numpy as np

from headforge.pipeline.types import Detection, Head, Mesh, Pose, StageContext, View
from headforge.pipeline.vggheads import VGGHead, detect_batch

NETWORK = "vggheads"
DEFAULT_MAX_HEADS = 100  # the package's NMS limit, when the options set none
TOPOLOGY = "flame5023"
NO_FLAME_NOTE = (
    "vggheads: no FLAME model is imported, so heads have boxes, scores, poses and FLAME parameters "
    "but no meshes, textures or splats (see docs/flame.md)"
)

_pending: dict[int, tuple[StageContext, dict[int, list[VGGHead]]]] = {}
_lock = threading.Lock()


def _max_heads(ctx: StageContext) -> int:
    return ctx.options.max_heads or DEFAULT_MAX_HEADS


def _capture_detections(ctx: StageContext, view: View) -> list[VGGHead]:
    """This view's detections; the whole capture's photos go through the network in one batch."""
    key = id(ctx)
    with _lock:
        pending = _pending.get(key)
        if pending is None or pending[0] is not ctx:
            views = ctx.capture.views
            found = detect_batch(
                ctx.models[NETWORK], [v.rgb for v in views], max_heads=_max_heads(ctx), notes=ctx.notes
            )
            pending = (ctx, {v.index: heads for v, heads in zip(views, found, strict=True)})
            _pending[key] = pending
        heads = pending[1].pop(view.index, None)
        if not pending[1]:
            _pending.pop(key, None)
    if heads is None:  # asked twice for one view: run it alone
        heads = detect_batch(ctx.models[NETWORK], [view.rgb], max_heads=_max_heads(ctx), notes=ctx.notes)[0]
    return heads


def params_document(found: VGGHead, image_size: tuple[int, int]) -> dict[str, Any]:
    """`Head.params` for a VGGHeads head (plain lists and floats)."""
    return {
        "model": "vggheads-flame",
        "image_size": [int(image_size[0]), int(image_size[1])],
        "shape": found.shape.tolist(),
        "expression": found.expression.tolist(),
        "jaw_pose": found.jaw.tolist(),
        "rotation": found.rotation.tolist(),
        "translation_px": found.translation.tolist(),
        "scale_px_per_m": float(found.scale),
    }


def vggheads_heads(ctx: StageContext, view: View) -> list[Head]:
    """The head source: `Head`s with detection, pose and params, best first."""
    heads = []
    for index, found in enumerate(_capture_detections(ctx, view)[: _max_heads(ctx)]):
        head = Head(
            index=index,
            detection=Detection(box=found.box, score=found.score, keypoints=np.zeros((0, 2), np.float32)),
            view=view.index,
        )
        head.pose = Pose(
            yaw=found.yaw,
            pitch=found.pitch,
            roll=found.roll,
            rotation=found.rotation,
            translation=found.translation,
            scale=found.scale,
        )
        head.params = params_document(found, (view.rgb.shape[1], view.rgb.shape[0]))
        heads.append(head)
    return heads


def _vgghead(head: Head) -> VGGHead:
    """Back from `Head.params` to the arrays the mesh needs."""
    p = head.params
    assert head.pose is not None
    return VGGHead(
        box=head.detection.box,
        score=head.detection.score,
        shape=np.asarray(p["shape"], np.float32),
        expression=np.asarray(p["expression"], np.float32),
        jaw=np.asarray(p["jaw_pose"], np.float32),
        rotation=np.asarray(p["rotation"], np.float32),
        translation=np.asarray(p["translation_px"], np.float32),
        scale=float(p["scale_px_per_m"]),
        yaw=head.pose.yaw,
        pitch=head.pose.pitch,
        roll=head.pose.roll,
    )


def flame_vertices(asset: Any, heads: list[VGGHead]) -> np.ndarray:
    """FLAME vertices (metres, FLAME frame) for each head: all 300 + 100 components, jaw pose,
    global/neck/eyes at rest."""
    import torch

    from headforge.models.flame import FlameConfig, FlameLayer

    layer = FlameLayer(asset, FlameConfig(num_shape=300, num_expression=100))
    shape = torch.from_numpy(np.stack([h.shape for h in heads]).astype(np.float32))
    expression = torch.from_numpy(np.stack([h.expression for h in heads]).astype(np.float32))
    pose = torch.zeros(len(heads), 15)
    pose[:, 6:9] = torch.from_numpy(np.stack([h.jaw for h in heads]).astype(np.float32))
    with torch.no_grad():
        vertices = layer(shape, expression, pose, torch.zeros(len(heads), 3))
    return vertices.numpy().astype(np.float64)


def vggheads_flame_stage(ctx: StageContext, heads: list[Head]) -> None:
    """FLAME meshes in image pixels from the predicted parameters, when FLAME is imported."""
    from headforge.models.flame_import import flame_unavailable_reason, load_flame_asset

    if not heads:
        return
    if flame_unavailable_reason() is not None:
        if NO_FLAME_NOTE not in ctx.notes:
            ctx.notes.append(NO_FLAME_NOTE)
        return
    asset = load_flame_asset()
    if asset.uvs is None or asset.uv_faces is None:
        if NO_FLAME_NOTE not in ctx.notes:
            ctx.notes.append(NO_FLAME_NOTE + " (the imported FLAME has no UVs; re-import it with --uv)")
        return
    found = [_vgghead(head) for head in heads]
    vertices = flame_vertices(asset, found)
    for head, one, local in zip(heads, found, vertices, strict=True):
        head.mesh_image = Mesh(
            vertices=one.place(local),
            faces=asset.faces.astype(np.int32),
            uvs=asset.uvs,
            uv_faces=asset.uv_faces,
            topology=TOPOLOGY,
        )
        shifted = (local + np.array([0.0, 0.0, 0.05])).astype(np.float32)
        head.mesh = replace(head.mesh_image, vertices=shifted)

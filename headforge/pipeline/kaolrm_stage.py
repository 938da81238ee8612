"""The `kaolrm` pipeline's stage: per head, a KaoLRM crop → FLAME parameters, the mesh placed in the
photo, and the learned 2D Gaussians decoded from the triplane.

For every head of the capture (MediaPipe's head source by default):

1. **Crop** (`kaolrm_crop.make_crops`): a square around the face from its landmarks, background
   removed with the selfie-segmentation network, on white, bicubic to 224².
2. **Image graph** (`kaolrm-<variant>-image`, the newest import): crop → triplane and the 160 FLAME
   numbers: β 100, ψ 50, global and jaw axis-angles, scale s (≥ 0.1) and translation t. They are
   recorded in `Head.params` as predicted, with the checkpoint that ran (`mono` or `multiview`,
   option `kaolrm_checkpoint`, default mono when imported).
3. **Mesh**, when a FLAME model with UVs is imported (`headforge flame import ... --uv`): FLAME with
   β, ψ, the global and jaw poses gives vertices v in FLAME's frame (metres); KaoLRM places them
   at p = s · v + t, with t_z = 0 for the mono checkpoint (its weak-perspective focal). The
   geometry comes from the FLAME tensors the checkpoint carried (`flame_model.npz`, kept by the
   import: the model KaoLRM was trained with) when present, else from the imported FLAME; the UVs
   always come from the import (so the checkpoint's triangles must be the imported FLAME's, else
   the imported FLAME builds the mesh). `params.flame_model` records which (`checkpoint` or
   `imported`).
4. **Placement in the photo**, with f the checkpoint's focal (KaoLRM's inference configs: mono 20,
   multiview 0.75; normalised by the image side, principal point at the centre): KaoLRM renders
   the placed mesh and Gaussians from a pinhole at p = (0, 0, 2) looking along −z with y up (its
   source camera c2w, at (0, −2, 0) in the triplane frame whose axes are (x, −z, y) of p, after its
   LLFF → OpenGL change of axes), the view its training compares with the input crop. So a point
   lands in the crop at u = 0.5 + f · p_x / (2 − p_z), v = 0.5 − f · p_y / (2 − p_z) (v down), then
   in photo pixels at crop origin + (u, v) · crop side; image z = −p_z · side · f / 2 (farther is
   larger, on the x scale at the head's depth). docs/models.md states the same mapping.
5. **Learned splats** (when `splats` > 0): 8000 area-weighted points on the placed mesh drawn with
   the head's seed (from the job seed, as the default splat step derives it), or FLAME's 5023
   vertices (`kaolrm_points=vertices`); the Gaussian graph reads the triplane at them (it scales
   the points by f / 0.75 and remaps them to the triplane's axes itself) and gives opacity, three
   scales, a rotation and RGB per point. The mono checkpoint keeps the int(N / 1.8) points with the
   largest p_z (back-face culling, 8000 → 4444, 5023 → 2790), as KaoLRM does before rendering.
   KaoLRM renders the Gaussians at the placed points p, so their scales and rotations are in that
   frame; they are written in the head frame (FLAME's, metres, global pose removed, as `Head.mesh`):
   positions at the same surface point of the mesh without the global pose, rotations turned back by
   R(global)ᵀ, the two tangent scales divided by s, the normal-axis scale an epsilon
   (`NORMAL_SCALE_RATIO` of the larger tangent scale: 2D Gaussians; KaoLRM's renderer drops the third
   scale), colour clipped to [0, 1]. The PLY writer stores the SH DC term (c − 0.5) / C0, logit
   opacity and log scales; `source: learned`.

Without an imported FLAME with UVs the heads keep their parameters and pose (no meshes), and a note
says so. The pose: rotation = diag(1, −1, −1) · R(global) (FLAME frame → image frame), translation
= where t lands in the photo, scale = s · side · f / (2 − t_z) pixels per FLAME metre.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from headforge.errors import PipelineUnavailableError
from headforge.pipeline.types import Head, Mesh, Pose, Splats, StageContext

if TYPE_CHECKING:
    from headforge.pipeline.kaolrm_crop import HeadCrop

TOPOLOGY = "flame5023"
SAMPLED_POINTS = 8000
GRAPH_BATCH = 16  # the graphs' export batch limit
CAMERA_DISTANCE = 2.0
FLAME_TO_IMAGE = np.diag([1.0, -1.0, -1.0])
NO_FLAME_NOTE = (
    "kaolrm: no FLAME model with UVs is imported, so heads have KaoLRM's FLAME parameters and poses but "
    "no meshes, textures or splats (see docs/flame.md)"
)

FloatArray = NDArray[np.float64]


def choose_variant(requested: str | None) -> str:
    """The checkpoint to run: the one asked for, else mono when imported, else multiview."""
    from headforge.models.kaolrm_import import imported_variants, unavailable_reason

    available = imported_variants()
    if not available:
        raise PipelineUnavailableError(
            f"pipeline 'kaolrm' is unavailable: {unavailable_reason()}", details={"pipeline": "kaolrm"}
        )
    if requested is None:
        return available[0]
    if requested not in available:
        raise PipelineUnavailableError(
            f"the KaoLRM {requested} checkpoint is not imported (imported: {', '.join(available)}); run "
            f"`headforge models import kaolrm DIR --name {requested}`",
            details={"pipeline": "kaolrm", "checkpoint": requested},
        )
    return requested


def project(points: FloatArray, focal: float, origin: tuple[float, float], side: float) -> FloatArray:
    """KaoLRM-frame points (N, 3) → photo pixels (N, 3) through the crop (see the module docstring)."""
    depth = CAMERA_DISTANCE - points[:, 2]
    u = 0.5 + focal * points[:, 0] / depth
    v = 0.5 - focal * points[:, 1] / depth
    return np.stack(
        [
            origin[0] + side * u,
            origin[1] + side * v,
            -points[:, 2] * side * focal / CAMERA_DISTANCE,
        ],
        axis=1,
    )


@dataclass(frozen=True)
class KaoLRMHead:
    """One head's network output, split."""

    raw: NDArray[np.float32]  # (160,)
    planes: NDArray[np.float32]  # (3, C, H, W)
    origin: tuple[float, float]
    side: float

    @property
    def shape(self) -> NDArray[np.float32]:
        return self.raw[:100]

    @property
    def expression(self) -> NDArray[np.float32]:
        return self.raw[100:150]

    @property
    def global_pose(self) -> NDArray[np.float32]:
        return self.raw[150:153]

    @property
    def jaw_pose(self) -> NDArray[np.float32]:
        return self.raw[153:156]

    @property
    def scale(self) -> float:
        return float(self.raw[156])

    def placement(self, variant: str) -> FloatArray:
        """The translation as placed: t, with t_z = 0 for the mono checkpoint."""
        t = self.raw[157:160].astype(np.float64).copy()
        if variant == "mono":
            t[2] = 0.0
        return t


def params_document(
    found: KaoLRMHead, variant: str, focal: float, image_size: tuple[int, int], flame_model: str | None
) -> dict[str, Any]:
    """`Head.params` for a KaoLRM head (plain lists and floats)."""
    return {
        "model": "kaolrm",
        "checkpoint": variant,
        "synth_focal": focal,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "shape": found.shape.astype(np.float32).tolist(),
        "expression": found.expression.astype(np.float32).tolist(),
        "global_pose": found.global_pose.astype(np.float32).tolist(),
        "jaw_pose": found.jaw_pose.astype(np.float32).tolist(),
        "scale": found.scale,
        "translation": found.raw[157:160].astype(np.float32).tolist(),
        "crop_origin_px": [float(found.origin[0]), float(found.origin[1])],
        "crop_side_px": float(found.side),
        "flame_model": flame_model,
    }


def head_pose(found: KaoLRMHead, variant: str, focal: float) -> Pose:
    from headforge.models.rotations import rodrigues
    from headforge.pipeline.pose import rotation_to_angles

    rotation = FLAME_TO_IMAGE @ rodrigues(found.global_pose.astype(np.float64))
    t = found.placement(variant)
    translation = project(t[None], focal, found.origin, found.side)[0]
    scale = found.scale * found.side * focal / (CAMERA_DISTANCE - t[2])
    yaw, pitch, roll = rotation_to_angles(rotation)
    return Pose(
        yaw=yaw,
        pitch=pitch,
        roll=roll,
        rotation=rotation.astype(np.float32),
        translation=translation.astype(np.float32),
        scale=float(scale),
    )


@dataclass(frozen=True)
class FlameSource:
    asset: Any  # FlameAsset with UVs
    name: str  # "checkpoint" or "imported"


def flame_source(image_entry: Path) -> FlameSource | None:
    """The FLAME model for the meshes (module docstring, step 3), or None without imported UVs."""
    from headforge.models.flame_import import FlameAsset, flame_unavailable_reason, load_flame_asset
    from headforge.models.kaolrm_import import FLAME_FILE

    if flame_unavailable_reason() is not None:
        return None
    imported = load_flame_asset()
    if imported.uvs is None or imported.uv_faces is None:
        return None
    bundled = image_entry / FLAME_FILE
    if not bundled.is_file():
        return FlameSource(imported, "imported")
    with np.load(bundled, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    if not np.array_equal(arrays["faces"], imported.faces):
        # The imported UVs are laid out per face of the imported FLAME: another triangle list
        # (not FLAME 2020's) cannot borrow them, so the imported model builds the mesh.
        return FlameSource(imported, "imported")
    asset = FlameAsset(
        v_template=arrays["v_template"].astype(np.float32),
        faces=arrays["faces"].astype(np.int32),
        shapedirs=arrays["shapedirs"].astype(np.float32),
        exprdirs=arrays["exprdirs"].astype(np.float32),
        posedirs=arrays["posedirs"].astype(np.float32),
        j_regressor=arrays["j_regressor"].astype(np.float32),
        weights=arrays["weights"].astype(np.float32),
        parents=arrays["parents"].astype(np.int32),
        metadata={"source": "kaolrm checkpoint"},
        uvs=imported.uvs,
        uv_faces=imported.uv_faces,
    )
    return FlameSource(asset, "checkpoint")


def flame_vertices(asset: Any, heads: list[KaoLRMHead]) -> tuple[FloatArray, FloatArray]:
    """(posed, unposed) FLAME vertices (B, 5023, 3) in metres: with the global and jaw poses, and
    with the jaw pose only (the head frame)."""
    import torch

    from headforge.models.flame import FlameConfig, FlameLayer

    layer = FlameLayer(asset, FlameConfig(num_shape=100, num_expression=50))
    shape = torch.from_numpy(np.stack([h.shape for h in heads]).astype(np.float32))
    expression = torch.from_numpy(np.stack([h.expression for h in heads]).astype(np.float32))
    pose = torch.zeros(len(heads), 15)
    pose[:, 6:9] = torch.from_numpy(np.stack([h.jaw_pose for h in heads]).astype(np.float32))
    rest = pose.clone()
    pose[:, 0:3] = torch.from_numpy(np.stack([h.global_pose for h in heads]).astype(np.float32))
    zeros = torch.zeros(len(heads), 3)
    with torch.no_grad():
        posed = layer(shape, expression, pose, zeros)
        unposed = layer(shape, expression, rest, zeros)
    return posed.numpy().astype(np.float64), unposed.numpy().astype(np.float64)


@dataclass
class _Points:
    """Where one head's Gaussians are decoded: KaoLRM-frame points and the same surface points on
    the head-frame mesh (triangles and barycentrics for sampled points, None for vertices)."""

    placed: FloatArray  # (M, 3)
    head: FloatArray  # (M, 3)
    triangles: NDArray[np.int64] | None
    barycentrics: FloatArray | None


def surface_points(
    placed: FloatArray, unposed: FloatArray, faces: NDArray[np.int32], mode: str, seed: int, uvs: Any
) -> _Points:
    from headforge.pipeline.splats import sample_surface

    if mode == "vertices":
        return _Points(placed, unposed, None, None)
    mesh = Mesh(vertices=placed.astype(np.float32), faces=faces, uvs=uvs)
    triangles, bary, points = sample_surface(mesh, SAMPLED_POINTS, seed)
    on_head = np.einsum("nk,nkc->nc", bary, unposed[faces[triangles]])
    return _Points(points, on_head, triangles, bary)


def learned_splats(
    gaussians: NDArray[np.float32],
    points: _Points,
    found: KaoLRMHead,
    variant: str,
    unposed: FloatArray,
    faces: NDArray[np.int32],
) -> Splats:
    """The Gaussian graph's rows (M, 11) for `points` → head-frame `Splats` (module docstring, step 5)."""
    from headforge.models.kaolrm import CULL_DIVISOR
    from headforge.models.rotations import rodrigues
    from headforge.pipeline.rig import bind_splats, matrix_to_quaternion, quaternion_to_matrix
    from headforge.pipeline.splats import NORMAL_SCALE_RATIO

    rows = np.asarray(gaussians, np.float64)
    keep = np.arange(len(rows))
    if variant == "mono":
        count = int(len(rows) / CULL_DIVISOR)
        keep = np.sort(np.argsort(-points.placed[:, 2], kind="stable")[:count])
    rows = rows[keep]
    # KaoLRM's Gaussians live in the placed frame p = s · FLAME(global pose) + t: undo R(global) and s.
    global_rotation = rodrigues(found.global_pose.astype(np.float64))
    placed_rotation = quaternion_to_matrix(rows[:, 4:8])
    in_head = np.einsum("ji,njk->nik", global_rotation, placed_rotation)
    rotations = matrix_to_quaternion(in_head)
    tangent = rows[:, 1:3] / found.scale
    normal_scale = np.maximum(NORMAL_SCALE_RATIO * tangent.max(axis=1), 1e-12)
    scales = np.column_stack([tangent, normal_scale])
    means = points.head[keep]
    binding = None
    if points.triangles is not None and points.barycentrics is not None:
        binding = bind_splats(
            unposed, faces, points.triangles[keep], points.barycentrics[keep], means, rotations, scales
        )
    return Splats(
        means=means.astype(np.float32),
        normals=in_head[:, :, 2].astype(np.float32),
        colors=np.clip(rows[:, 8:11], 0.0, 1.0).astype(np.float32),
        opacities=rows[:, 0].astype(np.float32),
        scales=scales.astype(np.float32),
        rotations=rotations.astype(np.float32),
        binding=binding,
        source="learned",
    )


def _entry_folder(network: Any, variant: str) -> Path:
    """The image entry's folder (where the import keeps the checkpoint's FLAME tensors)."""
    from headforge.models.kaolrm_import import latest_entries

    path = getattr(network, "path", None)
    if path is not None:
        return Path(path).parent
    entries = latest_entries(variant)
    if entries is None:
        raise PipelineUnavailableError(f"the KaoLRM {variant} checkpoint is not imported")
    return entries[0]


def _chunks(count: int) -> list[slice]:
    return [slice(start, min(start + GRAPH_BATCH, count)) for start in range(0, count, GRAPH_BATCH)]


def kaolrm_stage(ctx: StageContext, heads: list[Head]) -> None:
    """The `kaolrm` row's stage: every head of the capture, batched through both graphs."""
    from headforge.models.kaolrm import SYNTH_FOCAL
    from headforge.models.kaolrm_import import GAUSSIAN_POINTS, gaussian_entry_name, image_entry_name
    from headforge.pipeline.kaolrm_crop import make_crops
    from headforge.pipeline.runner import _head_seed

    if not heads:
        return
    variant = choose_variant(ctx.options.kaolrm_checkpoint)
    focal = SYNTH_FOCAL[variant]
    by_position: dict[int, HeadCrop] = {}
    for view in ctx.capture.views:
        positions = [i for i, head in enumerate(heads) if head.view == view.index]
        made = make_crops(view.rgb, [heads[i] for i in positions], ctx.models)
        by_position.update(zip(positions, made, strict=True))
    crops = [by_position[i] for i in range(len(heads))]
    image_network = ctx.models[image_entry_name(variant)]
    images = np.stack([crop.image for crop in crops])
    planes_parts, raw_parts = [], []
    for part in _chunks(len(images)):
        planes, raw = image_network.run(images[part])[:2]
        planes_parts.append(planes)
        raw_parts.append(raw)
    all_planes, all_raw = np.concatenate(planes_parts), np.concatenate(raw_parts)
    found = [
        KaoLRMHead(raw=all_raw[i], planes=all_planes[i], origin=crop.origin, side=crop.side)
        for i, crop in enumerate(crops)
    ]
    source = flame_source(_entry_folder(image_network, variant))
    flame_model = None if source is None else source.name
    for head, one in zip(heads, found, strict=True):
        rgb = ctx.image(head)
        head.pose = head_pose(one, variant, focal)
        head.params = params_document(one, variant, focal, (rgb.shape[1], rgb.shape[0]), flame_model)
    if source is None:
        if NO_FLAME_NOTE not in ctx.notes:
            ctx.notes.append(NO_FLAME_NOTE)
        return
    asset = source.asset
    faces = asset.faces.astype(np.int32)
    posed, unposed = flame_vertices(asset, found)
    points: list[_Points] = []
    for head, one, posed_one, unposed_one in zip(heads, found, posed, unposed, strict=True):
        placed = one.scale * posed_one + one.placement(variant)
        head.mesh_image = Mesh(
            vertices=project(placed, focal, one.origin, one.side).astype(np.float32),
            faces=faces,
            uvs=asset.uvs,
            uv_faces=asset.uv_faces,
            topology=TOPOLOGY,
        )
        head.mesh = replace(head.mesh_image, vertices=unposed_one.astype(np.float32))
        seed = _head_seed(ctx.options.seed, head)
        points.append(surface_points(placed, unposed_one, faces, ctx.options.kaolrm_points, seed, asset.uvs))
    if ctx.options.splats <= 0:
        return
    gaussian_network = ctx.models[gaussian_entry_name(variant)]
    run_feeds = getattr(gaussian_network, "run_feeds")  # noqa: B009 (OrtNetwork's several-input call)
    padded = np.zeros((len(found), GAUSSIAN_POINTS, 3), np.float32)
    for row, point_set in enumerate(points):
        padded[row, : len(point_set.placed)] = point_set.placed
    decoded = np.concatenate(
        [run_feeds({"planes": all_planes[part], "points": padded[part]})[0] for part in _chunks(len(found))]
    )
    for head, one, point_set, rows, unposed_one in zip(heads, found, points, decoded, unposed, strict=True):
        head.splats = learned_splats(
            rows[: len(point_set.placed)], point_set, one, variant, unposed_one, faces
        )

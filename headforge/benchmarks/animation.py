"""Benchmark section `animation` (`headforge bench --animation`, `bench/animation_speed.py`): frames
per second for driving a FLAME head and its bound splats on the CPU, against the unoptimised paths
measured in the same run.

One frame = the head's 5023 vertices for new expression (K = 16) and jaw parameters, then N bound
splats (default 8,192) posed on that mesh (centres, rotations, scales, normals), as `headforge
animate` and the animation jobs run them:

- headforge: `animate.FlameDriver.vertices` (expression blendshapes on the head's precomputed
  identity, jaw pose correctives and skinning, float32) and `rig.SplatDeformer.pose` (one contiguous
  array per coordinate).
- reference: `FlameLandmarkModel.vertices` (the general FLAME over all 150 shape and expression
  components, as the fit uses it) and the direct (N, 3)-array NumPy path over the same binding
  (`rig.triangle_frames`, einsum, matmul, `rig.matrix_to_quaternion`).

Timed one frame per call (an interactive driver) and in batches of frames (an offline sequence).
Also timed: the morph-target path a glTF player uses (base + weights · targets). Both paths must
agree (`animation_parity_*`). The asset is the operator's imported FLAME when present, else a random
one at FLAME's sizes with a sphere's triangles (`timing_asset`; cost depends on sizes, not values); `animation_asset` says which. Threads:
what OMP_NUM_THREADS / OPENBLAS_NUM_THREADS allow (the documented run sets 2).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from headforge.models.flame_import import FlameAsset, flame_available, load_flame_asset
from headforge.pipeline.animate import FlameDriver, flame_morph_targets
from headforge.pipeline.flame_fit import FlameFit, FlameLandmarkModel
from headforge.pipeline.rig import (
    PosedSplats,
    SplatBinding,
    SplatDeformer,
    matrix_to_quaternion,
    quaternion_to_matrix,
    triangle_frames,
)
from headforge.pipeline.splats import sample_splats
from headforge.pipeline.types import Mesh

EXPRESSIONS = 16


def _per_call(function: Callable[[], object], seconds: float) -> float:
    """Median seconds per call over repeated calls lasting about `seconds` (at least 5)."""
    function()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def reference_pose(binding: SplatBinding, faces: np.ndarray, vertices: np.ndarray) -> PosedSplats:
    """The splats posed with plain (N, 3)-shaped NumPy: what `SplatDeformer.pose` computes."""
    frames, size, corners = triangle_frames(np.asarray(vertices, np.float32), faces, binding.triangles)
    normal = frames[..., 2]
    means = np.einsum("nk,...nkc->...nc", binding.barycentrics, corners) + binding.offsets[:, None] * normal
    rotation = np.matmul(frames, quaternion_to_matrix(binding.rotations).astype(np.float32))
    return PosedSplats(means, normal, matrix_to_quaternion(rotation), binding.scales * size[..., None])


def timing_asset() -> FlameAsset:
    """`flame.random_flame_asset` (FLAME's sizes, random values) with real triangles: the convex
    hull of its 5023 template points on a sphere (10,042 triangles against FLAME's 9,976)."""
    from scipy.spatial import ConvexHull

    from headforge.benchmarks.flame import random_flame_asset

    asset = random_flame_asset()
    hull = ConvexHull(asset.v_template.astype(np.float64))
    faces = hull.simplices.astype(np.int32)
    centre = asset.v_template[faces].mean(axis=1)
    normal = np.cross(asset.v_template[faces[:, 1]] - asset.v_template[faces[:, 0]],
                      asset.v_template[faces[:, 2]] - asset.v_template[faces[:, 0]])  # fmt: skip
    outward = np.einsum("fc,fc->f", normal, centre) > 0
    faces[~outward] = faces[~outward][:, ::-1]
    uvs = np.random.default_rng(1).uniform(0, 1, (len(asset.v_template), 2)).astype(np.float32)
    return dataclasses.replace(asset, faces=faces, uvs=uvs, uv_faces=faces.copy())


def run(quick: bool, splats: int = 8192, batch: int = 32) -> dict[str, Any]:
    seconds = 0.4 if quick else 1.5
    imported = flame_available()
    model = FlameLandmarkModel(load_flame_asset() if imported else timing_asset())
    rng = np.random.default_rng(0)
    fit = FlameFit(
        shape=rng.normal(0, 1, model.num_shape), expression=np.zeros(model.num_expression), jaw_pose=np.zeros(3),
        rotation=np.eye(3), translation=np.zeros(3), scale=1.0, residual_px=0.0, iterations=0,
    )  # fmt: skip
    z = np.concatenate([fit.shape, fit.expression])
    rest = model.vertices(z[None], fit.jaw_pose[None])[0].astype(np.float32)
    asset = model.asset
    assert asset.uvs is not None and asset.uv_faces is not None
    mesh = Mesh(rest, asset.faces, asset.uvs, asset.uv_faces, "flame5023")
    sampled = sample_splats(mesh, np.full((64, 64, 3), 128, np.uint8), splats, seed=0)
    assert sampled.binding is not None
    binding, faces = sampled.binding, np.asarray(mesh.faces, np.int64)
    deformer = SplatDeformer(binding, faces)
    driver = FlameDriver(model, fit.shape, EXPRESSIONS)
    targets = flame_morph_targets(model, fit, EXPRESSIONS).deltas.reshape(EXPRESSIONS + 1, -1)
    base = rest.reshape(-1)

    def parameters(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        expression = rng.normal(0, 1, (count, EXPRESSIONS))
        coefficients = np.tile(z, (count, 1))
        coefficients[:, model.num_shape : model.num_shape + EXPRESSIONS] = expression
        jaw = np.zeros((count, 3))
        jaw[:, 0] = rng.uniform(0, 0.3, count)
        return expression, jaw, coefficients

    one, many = parameters(1), parameters(batch)
    vertices_one = driver.vertices(one[0], one[1])
    vertices_many = driver.vertices(many[0], many[1])
    weights_one = rng.normal(0, 1, (1, EXPRESSIONS + 1)).astype(np.float32)
    weights_many = rng.normal(0, 1, (batch, EXPRESSIONS + 1)).astype(np.float32)

    # Parity: both paths give the same head and the same splats.
    general = model.vertices(many[2], many[1])
    posed, reference = deformer.pose(vertices_many), reference_pose(binding, faces, vertices_many)
    rotation_gap = np.abs(np.abs(np.einsum("...c,...c->...", posed.rotations, reference.rotations)) - 1).max()

    timings = {
        "flame_general": _per_call(lambda: model.vertices(one[2], one[1]), seconds),
        "flame": _per_call(lambda: driver.vertices(one[0], one[1]), seconds),
        "flame_batched": _per_call(lambda: driver.vertices(many[0], many[1]), seconds) / batch,
        "flame_general_batched": _per_call(lambda: model.vertices(many[2], many[1]), seconds) / batch,
        "morph": _per_call(lambda: base + weights_one @ targets, seconds),
        "morph_batched": _per_call(lambda: base + weights_many @ targets, seconds) / batch,
        "splats": _per_call(lambda: deformer.pose(vertices_one[0]), seconds),
        "splats_reference": _per_call(lambda: reference_pose(binding, faces, vertices_one[0]), seconds),
        "splats_batched": _per_call(lambda: deformer.pose(vertices_many), seconds) / batch,
        "splats_reference_batched": _per_call(lambda: reference_pose(binding, faces, vertices_many), seconds)
        / batch,
    }
    fps = 1.0 / (timings["flame"] + timings["splats"])
    fps_reference = 1.0 / (timings["flame_general"] + timings["splats_reference"])
    fps_batched = 1.0 / (timings["flame_batched"] + timings["splats_batched"])
    fps_reference_batched = 1.0 / (timings["flame_general_batched"] + timings["splats_reference_batched"])
    return {
        "animation_asset": "imported" if imported else "random",
        "animation_splats": splats,
        "animation_batch": batch,
        "animation_threads": os.environ.get("OMP_NUM_THREADS"),
        **{f"animation_ms_{name}": round(value * 1e3, 4) for name, value in timings.items()},
        "animation_fps": round(fps, 1),
        "animation_fps_reference": round(fps_reference, 1),
        "animation_speedup": round(fps / fps_reference, 2),
        "animation_fps_batched": round(fps_batched, 1),
        "animation_fps_reference_batched": round(fps_reference_batched, 1),
        "animation_speedup_batched": round(fps_batched / fps_reference_batched, 2),
        "animation_fps_morph_and_splats": round(1.0 / (timings["morph"] + timings["splats"]), 1),
        "animation_parity_vertices_m": float(np.abs(vertices_many - general).max()),
        "animation_parity_means_m": float(np.abs(posed.means - reference.means).max()),
        "animation_parity_rotation": float(rotation_gap),
        "animation_parity_scales": float(np.abs(posed.scales - reference.scales).max()),
        "animation_load_average_1min": round(os.getloadavg()[0], 2),
        "animation_cpus": os.cpu_count(),
    }

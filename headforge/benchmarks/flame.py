"""Benchmark section `flame`: fitting FLAME to MediaPipe landmarks, Levenberg–Marquardt (headforge)
against Adam (the usual PyTorch recipe) on the same objective, same heads, same thread count.

Heads: known shape, expression, jaw and similarity → the 105 embedded landmarks in pixels, plus
1 px of noise. Besides `fit_flame` alone (batched, and one head per call), the `flame` pipeline's
fit stage is timed as the runner calls it: `fit_flame_heads` on all heads at once, which adds the
full 5023-vertex meshes and the heads' fields. The asset is the operator's imported FLAME when
present, otherwise a random one at FLAME's sizes built here (fit cost depends on the sizes, not the
values), and `flame_asset` says which.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from headforge.benchmarks.timing import median_ms
from headforge.models.flame_import import (
    NUM_EXPRESSION_TOTAL,
    NUM_FACES,
    NUM_JOINTS,
    NUM_POSE_FEATURES,
    NUM_SHAPE_TOTAL,
    NUM_UVS,
    NUM_VERTICES,
    FlameAsset,
    flame_available,
    load_flame_asset,
)
from headforge.pipeline.flame_fit import FitSettings, FlameLandmarkModel, fit_flame, rodrigues, umeyama
from headforge.pipeline.flame_stage import fit_flame_heads
from headforge.pipeline.types import Detection, Head

THREADS = 1
ADAM_STEPS = 300


def random_flame_asset(seed: int = 0, landmarks: int = 105) -> FlameAsset:
    """A FLAME-sized asset of random values on a sphere (not a head): for timing only."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(NUM_VERTICES, 3))
    template = 0.1 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    faces = rng.integers(0, NUM_VERTICES, (NUM_FACES, 3)).astype(np.int32)
    basis = rng.normal(0, 1e-3, (NUM_VERTICES, 3, NUM_SHAPE_TOTAL + NUM_EXPRESSION_TOTAL)).astype(np.float32)
    weights = rng.dirichlet(np.ones(NUM_JOINTS), NUM_VERTICES).astype(np.float32)
    regressor = rng.dirichlet(np.ones(NUM_VERTICES), NUM_JOINTS).astype(np.float32)
    return FlameAsset(
        v_template=template.astype(np.float32),
        faces=faces,
        shapedirs=basis[:, :, :NUM_SHAPE_TOTAL],
        exprdirs=basis[:, :, NUM_SHAPE_TOTAL:],
        posedirs=rng.normal(0, 1e-4, (NUM_VERTICES, 3, NUM_POSE_FEATURES)).astype(np.float32),
        j_regressor=regressor,
        weights=weights,
        parents=np.array([-1, 0, 1, 1, 1], dtype=np.int32),
        metadata={"synthetic": True},
        uvs=rng.uniform(0, 1, (NUM_UVS, 2)).astype(np.float32),
        uv_faces=rng.integers(0, NUM_UVS, (NUM_FACES, 3)).astype(np.int32),
        mp_face_idx=rng.choice(NUM_FACES, landmarks, replace=False).astype(np.int32),
        mp_bary=rng.dirichlet(np.ones(3), landmarks).astype(np.float32),
        mp_landmark_indices=np.sort(rng.choice(468, landmarks, replace=False)).astype(np.int32),
    )


def _heads(model: FlameLandmarkModel, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks (count, 468, 3) in pixels with 1 px noise, and the true vertices."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (count, model.num_linear))
    jaw = np.c_[rng.uniform(0.0, 0.3, count), rng.normal(0, 0.05, (count, 2))]
    rotation = rodrigues(rng.uniform(-0.5, 0.5, (count, 3))) @ np.diag([1.0, -1.0, -1.0])
    scale = rng.uniform(1200, 2500, count)
    translation = np.c_[rng.uniform(200, 800, (count, 2)), np.zeros(count)]
    points = (
        scale[:, None, None] * np.einsum("bij,bkj->bki", rotation, model.landmarks(z, jaw))
        + translation[:, None]
    )
    landmarks = np.zeros((count, 468, 3))
    landmarks[:, model.landmark_indices] = points + rng.normal(0, 1.0, points.shape)
    return landmarks, model.vertices(z, jaw)


def _adam_fit(
    model: FlameLandmarkModel, landmarks: np.ndarray, settings: FitSettings, steps: int
) -> np.ndarray:
    """Adam on the same objective as `fit_flame` (same init, residuals and priors); returns the
    mean 2D landmark residual per head in pixels."""
    import torch

    targets_np = landmarks[:, model.landmark_indices]
    neutral = model.landmarks(np.zeros((1, model.num_linear)), np.zeros((1, 3)))[0]
    inits = [umeyama(neutral, target) for target in targets_np]
    t = torch.tensor
    scale0 = t([init[0] for init in inits], dtype=torch.float64)
    rotation0 = t(np.stack([init[1] for init in inits]))
    translation = t(np.stack([init[2] for init in inits]), requires_grad=True)
    log_scale = torch.log(scale0).clone().requires_grad_(True)
    omega = torch.zeros(len(landmarks), 3, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(len(landmarks), model.num_linear, dtype=torch.float64, requires_grad=True)
    jaw = torch.zeros(len(landmarks), 3, dtype=torch.float64, requires_grad=True)
    a_const, a_dirs, a_pose = t(model.a_const), t(model.a_dirs), t(model.a_pose)
    b_const, b_dirs, b_pose = t(model.b_const), t(model.b_dirs), t(model.b_pose)
    omega_w, jaw_const, jaw_dirs = t(model.omega), t(model.jaw_const), t(model.jaw_dirs)
    targets = t(targets_np)
    weights = t([1.0, 1.0, settings.depth_weight])

    def image_points() -> torch.Tensor:
        jaw_rotation = rodrigues(jaw)
        feature = (jaw_rotation - torch.eye(3, dtype=torch.float64)).reshape(-1, 9)
        a = a_const + torch.einsum("kdz,bz->bkd", a_dirs, z) + torch.einsum("kdf,bf->bkd", a_pose, feature)
        b = b_const + torch.einsum("kdz,bz->bkd", b_dirs, z) + torch.einsum("kdf,bf->bkd", b_pose, feature)
        joint = jaw_const + z @ jaw_dirs.T
        lever = b - omega_w[None, :, None] * joint[:, None, :]
        points = a + torch.einsum("bij,bkj->bki", jaw_rotation - torch.eye(3, dtype=torch.float64), lever)
        rotation = rodrigues(omega) @ rotation0
        return (
            torch.exp(log_scale)[:, None, None] * torch.einsum("bij,bkj->bki", rotation, points)
            + translation[:, None]
        )

    optimizer = torch.optim.Adam([translation, log_scale, omega, z, jaw], lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        data = ((image_points() - targets) * weights) / (scale0[:, None, None] * settings.landmark_sigma_m)
        loss = data.square().sum() + z.square().sum() + (jaw / settings.jaw_sigma_rad).square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        residual = torch.linalg.vector_norm(image_points()[..., :2] - targets[..., :2], dim=-1).mean(dim=1)
    return np.asarray(residual.numpy())


def _stage_heads(landmarks: np.ndarray) -> list[Head]:
    """Fresh `Head` records holding `landmarks`, as the landmark stage hands them to the fit."""
    detection = Detection(box=np.zeros(4, np.float32), score=1.0, keypoints=np.zeros((6, 2), np.float32))
    return [
        Head(index=index, detection=detection, landmarks_3d=points, landmarks_2d=points[:, :2])
        for index, points in enumerate(landmarks.astype(np.float32))
    ]


def run(quick: bool) -> dict[str, Any]:
    """Fit ms per head (batched, one at a time, and the pipeline's batched fit stage), residuals and
    vertex error; Adam as reference."""
    import torch

    torch.set_num_threads(THREADS)  # numpy's BLAS threads follow OMP_NUM_THREADS
    imported = flame_available()
    asset = load_flame_asset() if imported else random_flame_asset()
    model = FlameLandmarkModel(asset)
    count, repeats = (8, 3) if quick else (32, 5)
    landmarks, true_vertices = _heads(model, count, seed=1)
    settings = FitSettings(landmark_sigma_m=0.001)
    fit_flame(model, landmarks[:2], settings)  # warm-up
    batched_ms = median_ms(lambda: fit_flame(model, landmarks, settings), repeats, warmup=False) / count
    single_ms = (
        median_ms(
            lambda: [fit_flame(model, landmarks[i : i + 1], settings) for i in range(count)],
            repeats,
            warmup=False,
        )
        / count
    )
    heads = _stage_heads(landmarks)  # refilled by each repeat
    stage_ms = (
        median_ms(lambda: fit_flame_heads(heads, (1024, 1024, 3), model, settings), repeats, warmup=False)
        / count
    )
    fits = fit_flame(model, landmarks, settings)
    z = np.stack([np.concatenate([fit.shape, fit.expression]) for fit in fits])
    vertices = model.vertices(z, np.stack([fit.jaw_pose for fit in fits]))
    steps = ADAM_STEPS // 2 if quick else ADAM_STEPS
    adam_residuals: list[np.ndarray] = []
    adam_ms = (
        median_ms(
            lambda: adam_residuals.append(_adam_fit(model, landmarks, settings, steps)), 1, warmup=False
        )
        / count
    )
    return {
        "flame_fit_ms_per_head": round(batched_ms, 2),
        "flame_fit_ms_per_head_unbatched": round(single_ms, 2),
        "flame_stage_ms_per_head": round(stage_ms, 2),
        "flame_fit_residual_px": round(float(np.mean([fit.residual_px for fit in fits])), 3),
        "flame_fit_vertex_error_mm": round(
            float(np.linalg.norm(vertices - true_vertices, axis=2).mean() * 1000), 3
        ),
        "flame_fit_iterations": round(float(np.mean([fit.iterations for fit in fits])), 1),
        "flame_adam_ms_per_head": round(adam_ms, 2),
        "flame_adam_residual_px": round(float(adam_residuals[-1].mean()), 3),
        "flame_adam_steps": steps,
        "flame_heads": count,
        "flame_torch_threads": THREADS,
        "flame_asset": "imported" if imported else "random (FLAME sizes)",
    }

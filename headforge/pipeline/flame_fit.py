"""Fit FLAME to the landmark stage's 3D landmarks (image pixels, z on the x scale).

Model of one head, with FLAME's neck and eyes at rest:
    X_k(β, ψ, a)  FLAME landmark k (barycentric on the mesh) with shape β, expression ψ, jaw a
    y_k           = s · R · X_k + t                          (scaled orthographic, image frame)
Steps:
1. Umeyama: the closed-form similarity (s, R, t) from the neutral head's landmarks to the targets.
2. Levenberg–Marquardt over (δR, t, log s, β, ψ, a), all heads at once (batched normal equations),
   minimising Σ_k ‖W (y_k − target_k)‖² / (s₀ σ)² + ‖β‖² + ‖ψ‖² + ‖a‖² / σ_jaw²
   (σ: landmark noise in meters on the head; W down-weights MediaPipe's less reliable depth).
The Jacobian is exact for the rigid part, β and ψ (the landmarks are linear in them once the
jaw rotation is fixed) and uses central differences for the 3 jaw angles.
Only the ~300 vertices under the landmarks are evaluated while fitting; the full mesh is built once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from headforge.errors import InvalidLandmarksError, PipelineUnavailableError
from headforge.models.flame_import import FlameAsset
from headforge.models.rotations import rodrigues  # re-exported: the one Rodrigues
from headforge.pipeline.geometry import umeyama  # re-exported: callers import it from here too

F64 = NDArray[np.float64]
JAW = 2  # FLAME joint index of the jaw
JAW_FEATURES = slice(9 * (JAW - 1), 9 * JAW)  # its 9 pose-corrective features


@dataclass(frozen=True)
class FitSettings:
    num_shape: int = 100
    num_expression: int = 50
    landmark_sigma_m: float = 0.002  # landmark noise, meters on the head
    jaw_sigma_rad: float = 0.3
    depth_weight: float = 0.5  # weight of the z residual relative to x and y
    max_iterations: int = 12
    tolerance: float = 1e-7  # relative cost decrease that ends the fit


@dataclass
class FlameFit:
    """One head's fit. `rotation`, `translation`, `scale` map FLAME's frame (meters) to the image
    frame (pixels, z on the x scale): image = scale · rotation · X + translation."""

    shape: F64  # (num_shape,)
    expression: F64  # (num_expression,)
    jaw_pose: F64  # (3,) axis-angle
    rotation: F64  # (3, 3)
    translation: F64  # (3,)
    scale: float
    residual_px: float  # mean 2D distance between fitted and target landmarks
    iterations: int


def _skew(v: F64) -> F64:
    """Cross-product matrices [v]× (..., 3, 3)."""
    zeros = np.zeros_like(v[..., 0])
    return np.stack(
        [zeros, -v[..., 2], v[..., 1], v[..., 2], zeros, -v[..., 0], -v[..., 1], v[..., 0], zeros], axis=-1
    ).reshape(*v.shape[:-1], 3, 3)


class FlameLandmarkModel:
    """FLAME restricted to the MediaPipe landmark embedding, plus the full-mesh evaluation."""

    def __init__(self, asset: FlameAsset, num_shape: int = 100, num_expression: int = 50) -> None:
        if asset.mp_face_idx is None or asset.mp_bary is None or asset.mp_landmark_indices is None:
            raise PipelineUnavailableError(
                "the FLAME asset has no MediaPipe landmark embedding; re-import it with --landmarks (see docs/flame.md)"
            )
        self.asset = asset
        self.num_shape, self.num_expression = num_shape, num_expression
        self.landmark_indices = asset.mp_landmark_indices.astype(np.int64)
        corners = asset.faces[asset.mp_face_idx].astype(np.int64)  # (K, 3)
        bary = asset.mp_bary.astype(np.float64)  # (K, 3)
        dirs = self._linear_dirs(corners)  # (K, 3 corners, 3, nz)
        jaw_weight = asset.weights[corners, JAW].astype(np.float64)  # (K, 3)
        template = asset.v_template[corners].astype(np.float64)
        pose_dirs = asset.posedirs[corners][..., JAW_FEATURES].astype(np.float64)  # (K, 3, 3, 9)
        weighted = bary * jaw_weight
        # A_k = Σ b v_posed and B_k = Σ b w v_posed, each affine in z = [β, ψ] and f = vec(R − I).
        self.a_const = np.einsum("kc,kcd->kd", bary, template)
        self.a_dirs = np.einsum("kc,kcdz->kdz", bary, dirs)
        self.a_pose = np.einsum("kc,kcdf->kdf", bary, pose_dirs)
        self.b_const = np.einsum("kc,kcd->kd", weighted, template)
        self.b_dirs = np.einsum("kc,kcdz->kdz", weighted, dirs)
        self.b_pose = np.einsum("kc,kcdf->kdf", weighted, pose_dirs)
        self.omega = weighted.sum(axis=1)  # (K,)
        jaw_row = asset.j_regressor[JAW].astype(np.float64)
        self.jaw_const = jaw_row @ asset.v_template.astype(np.float64)
        full_dirs = np.concatenate(
            [asset.shapedirs[:, :, :num_shape], asset.exprdirs[:, :, :num_expression]], axis=2
        ).astype(np.float64)
        self.jaw_dirs = np.einsum("v,vdz->dz", jaw_row, full_dirs)  # (3, nz)
        self._full_dirs: NDArray[np.float32] | None = None
        self._jaw_posedirs: NDArray[np.float32] | None = None

    def _linear_dirs(self, vertex_ids: NDArray[np.int64]) -> F64:
        shape = self.asset.shapedirs[vertex_ids][..., : self.num_shape]
        expression = self.asset.exprdirs[vertex_ids][..., : self.num_expression]
        return np.concatenate([shape, expression], axis=-1).astype(np.float64)

    @property
    def num_linear(self) -> int:
        return self.num_shape + self.num_expression

    def landmarks(self, z: F64, jaw: F64) -> F64:
        """FLAME-frame landmarks (B, K, 3) for linear coefficients z (B, nz) and jaw (B, 3)."""
        rotation = rodrigues(jaw)  # (B, 3, 3)
        feature = (rotation - np.eye(3)).reshape(-1, 9)
        a = (
            self.a_const
            + np.einsum("kdz,bz->bkd", self.a_dirs, z)
            + np.einsum("kdf,bf->bkd", self.a_pose, feature)
        )
        b = (
            self.b_const
            + np.einsum("kdz,bz->bkd", self.b_dirs, z)
            + np.einsum("kdf,bf->bkd", self.b_pose, feature)
        )
        joint = self.jaw_const + z @ self.jaw_dirs.T  # (B, 3)
        lever = b - self.omega[None, :, None] * joint[:, None, :]
        return a + np.einsum("bij,bkj->bki", rotation - np.eye(3), lever)

    def landmark_dirs(self, jaw: F64) -> F64:
        """∂X/∂z (B, K, 3, nz) at the given jaw rotation."""
        delta = rodrigues(jaw) - np.eye(3)
        lever = self.b_dirs[None] - self.omega[None, :, None, None] * self.jaw_dirs[None, None]
        return self.a_dirs[None] + np.einsum("bij,bkjz->bkiz", delta, lever)

    def vertices(self, z: F64, jaw: F64) -> F64:
        """Full FLAME-frame vertices (B, 5023, 3), neck and eyes at rest."""
        if self._full_dirs is None or self._jaw_posedirs is None:  # (V*3, nz), (V*3, 9), built on first use
            asset = self.asset
            self._full_dirs = np.ascontiguousarray(
                np.concatenate(
                    [asset.shapedirs[:, :, : self.num_shape], asset.exprdirs[:, :, : self.num_expression]],
                    axis=2,
                ).reshape(-1, self.num_linear)
            )
            self._jaw_posedirs = np.ascontiguousarray(asset.posedirs[..., JAW_FEATURES].reshape(-1, 9))
        full_dirs, jaw_posedirs = self._full_dirs, self._jaw_posedirs
        count = len(self.asset.v_template)
        # float32 products (sub-micrometer error) keep the 15069 × 150 basis from being copied to float64.
        offsets = (z.astype(np.float32) @ full_dirs.T).reshape(len(z), count, 3)
        v_shaped = self.asset.v_template[None].astype(np.float64) + offsets
        delta = rodrigues(jaw) - np.eye(3)
        v_posed = v_shaped + (delta.reshape(-1, 9).astype(np.float32) @ jaw_posedirs.T).reshape(
            len(z), count, 3
        )
        joint = self.jaw_const + z @ self.jaw_dirs.T  # = J_regressor[jaw] · v_shaped
        lever = v_posed - joint[:, None, :]
        jaw_weight = self.asset.weights[None, :, JAW, None]
        return np.asarray(v_posed + jaw_weight * (lever @ delta.transpose(0, 2, 1)), dtype=np.float64)


def _residuals(
    model: FlameLandmarkModel,
    targets: F64,
    scale0: F64,
    settings: FitSettings,
    rotation: F64,
    translation: F64,
    log_scale: F64,
    z: F64,
    jaw: F64,
) -> tuple[F64, F64]:
    """Stacked residuals (B, 3K + nz + 3) and the FLAME-frame landmarks (B, K, 3)."""
    points = model.landmarks(z, jaw)
    image = (
        np.exp(log_scale)[:, None, None] * np.einsum("bij,bkj->bki", rotation, points) + translation[:, None]
    )
    weights = np.array([1.0, 1.0, settings.depth_weight])
    data = ((image - targets) * weights).reshape(len(z), -1) / (scale0[:, None] * settings.landmark_sigma_m)
    prior = np.concatenate([z, jaw / settings.jaw_sigma_rad], axis=1)
    return np.concatenate([data, prior], axis=1), points


def _jacobian(
    model: FlameLandmarkModel,
    scale0: F64,
    settings: FitSettings,
    rotation: F64,
    log_scale: F64,
    z: F64,
    jaw: F64,
    points: F64,
) -> F64:
    """∂residuals/∂(δω, t, log s, z, jaw): (B, 3K + nz + 3, 7 + nz + 3)."""
    batch, count = points.shape[:2]
    nz = model.num_linear
    scale = np.exp(log_scale)
    rotated = np.einsum("bij,bkj->bki", rotation, points)  # (B, K, 3)
    blocks = np.zeros((batch, count, 3, 10 + nz))
    blocks[..., 0:3] = -scale[:, None, None, None] * _skew(rotated)
    blocks[..., 3:6] = np.eye(3)
    blocks[..., 6] = scale[:, None, None] * rotated
    blocks[..., 7 : 7 + nz] = scale[:, None, None, None] * np.einsum(
        "bij,bkjz->bkiz", rotation, model.landmark_dirs(jaw)
    )
    step = 1e-5
    for axis in range(3):
        offset = np.zeros(3)
        offset[axis] = step
        difference = model.landmarks(z, jaw + offset) - model.landmarks(z, jaw - offset)
        blocks[..., 7 + nz + axis] = (
            scale[:, None, None] * np.einsum("bij,bkj->bki", rotation, difference) / (2 * step)
        )
    weights = np.array([1.0, 1.0, settings.depth_weight])
    blocks *= weights[None, None, :, None] / (scale0[:, None, None, None] * settings.landmark_sigma_m)
    prior = np.zeros((batch, nz + 3, 10 + nz))
    prior[:, np.arange(nz), 7 + np.arange(nz)] = 1.0
    prior[:, nz + np.arange(3), 7 + nz + np.arange(3)] = 1.0 / settings.jaw_sigma_rad
    return np.concatenate([blocks.reshape(batch, count * 3, -1), prior], axis=1)


def _targets(model: FlameLandmarkModel, landmarks_3d: F64) -> F64:
    """The embedded landmarks (B, K, 3) of MediaPipe landmarks (B, 468 or 478, 3), checked."""
    landmarks_3d = np.asarray(landmarks_3d, dtype=np.float64)
    if (
        landmarks_3d.ndim != 3
        or landmarks_3d.shape[2] != 3
        or landmarks_3d.shape[1] <= model.landmark_indices.max()
    ):
        raise InvalidLandmarksError(
            f"expected MediaPipe landmarks of shape (B, 468, 3), got {landmarks_3d.shape}"
        )
    if not np.all(np.isfinite(landmarks_3d)):
        raise InvalidLandmarksError("landmarks contain NaN or infinite values")
    return landmarks_3d[:, model.landmark_indices]


def _start(model: FlameLandmarkModel, targets: F64) -> tuple[F64, F64, F64]:
    """Each head's Umeyama similarity from the neutral head: rotations, translations, scales."""
    batch = len(targets)
    neutral = model.landmarks(np.zeros((1, model.num_linear)), np.zeros((1, 3)))[0]
    rotation = np.empty((batch, 3, 3))
    translation = np.empty((batch, 3))
    scale0 = np.empty(batch)
    for head in range(batch):
        scale0[head], rotation[head], translation[head] = umeyama(neutral, targets[head])
    if np.any(scale0 <= 0):
        raise InvalidLandmarksError("the landmarks are degenerate (they collapse to a point)")
    return rotation, translation, scale0


def _residual_px(rotation: F64, translation: F64, log_scale: F64, points: F64, targets: F64) -> F64:
    """Mean 2D distance (B,) between the fitted and the target landmarks, pixels."""
    scale = np.exp(log_scale)
    fitted = scale[:, None, None] * np.einsum("bij,bkj->bki", rotation, points) + translation[:, None]
    residual: F64 = np.linalg.norm(fitted[..., :2] - targets[..., :2], axis=-1).mean(axis=1)
    return residual


def fit_flame(
    model: FlameLandmarkModel, landmarks_3d: F64, settings: FitSettings | None = None
) -> list[FlameFit]:
    """Fit every head at once. `landmarks_3d` is (B, 468 or 478, 3) in image pixels."""
    settings = settings or FitSettings(num_shape=model.num_shape, num_expression=model.num_expression)
    targets = _targets(model, landmarks_3d)
    batch, nz = len(targets), model.num_linear
    if batch == 0:
        return []
    z = np.zeros((batch, nz))
    jaw = np.zeros((batch, 3))
    rotation, translation, scale0 = _start(model, targets)
    log_scale = np.log(scale0)
    damping = np.full(batch, 1e-3)
    residuals, points = _residuals(model, targets, scale0, settings, rotation, translation, log_scale, z, jaw)
    cost = (residuals**2).sum(axis=1)
    active = np.ones(batch, dtype=bool)
    iterations = np.zeros(batch, dtype=int)
    for _ in range(settings.max_iterations):
        if not active.any():
            break
        jacobian = _jacobian(model, scale0, settings, rotation, log_scale, z, jaw, points)
        transposed = jacobian.transpose(0, 2, 1)
        hessian = transposed @ jacobian
        gradient = (transposed @ residuals[..., None])[..., 0]
        diagonal = np.einsum("bii->bi", hessian)
        damped = hessian + (damping[:, None] * (diagonal + 1e-9))[:, :, None] * np.eye(hessian.shape[1])
        step = -np.linalg.solve(damped, gradient[..., None])[..., 0]
        step[~active] = 0.0
        new_rotation = rodrigues(step[:, 0:3]) @ rotation
        new_translation = translation + step[:, 3:6]
        new_log_scale = log_scale + step[:, 6]
        new_z = z + step[:, 7 : 7 + nz]
        new_jaw = jaw + step[:, 7 + nz :]
        new_residuals, new_points = _residuals(
            model, targets, scale0, settings, new_rotation, new_translation, new_log_scale, new_z, new_jaw
        )
        new_cost = (new_residuals**2).sum(axis=1)
        better = (new_cost < cost) & active
        converged = better & ((cost - new_cost) < settings.tolerance * cost)
        rotation[better], translation[better], log_scale[better] = (
            new_rotation[better],
            new_translation[better],
            new_log_scale[better],
        )
        z[better], jaw[better], points[better], residuals[better] = (
            new_z[better],
            new_jaw[better],
            new_points[better],
            new_residuals[better],
        )
        cost[better] = new_cost[better]
        iterations[active] += 1
        damping = np.where(better, damping / 3.0, damping * 4.0)
        active &= ~converged & (damping < 1e8)

    residual_px = _residual_px(rotation, translation, log_scale, points, targets)
    scale = np.exp(log_scale)
    return [
        FlameFit(
            shape=z[head, : model.num_shape].copy(),
            expression=z[head, model.num_shape :].copy(),
            jaw_pose=jaw[head].copy(),
            rotation=rotation[head].copy(),
            translation=translation[head].copy(),
            scale=float(scale[head]),
            residual_px=float(residual_px[head]),
            iterations=int(iterations[head]),
        )
        for head in range(batch)
    ]


@dataclass
class SubjectFlameFit:
    """One person's fit over several photos: the identity β they share, and each photo's fit (its
    `shape` is that β; expression, jaw and similarity are the photo's own)."""

    shape: F64  # (num_shape,)
    views: list[FlameFit]
    residual_px: float  # mean 2D landmark distance over every photo's landmarks
    iterations: int


def fit_flame_subject(
    model: FlameLandmarkModel, landmarks_3d: F64, settings: FitSettings | None = None
) -> SubjectFlameFit:
    """Fit one identity to V photos of one person in one batched Levenberg–Marquardt solve.

    Unknowns: β (shared) and, per photo, (δR, t, log s, ψ, jaw). The cost is every photo's data term
    plus ‖β‖² once and each photo's ‖ψ‖² + ‖a‖²/σ_jaw², so one photo gives exactly `fit_flame`'s
    fit. The normal equations have an arrow shape (per-photo blocks coupled through β only); each
    step eliminates the per-photo blocks (batched solves) and solves the β block's Schur complement.
    """
    settings = settings or FitSettings(num_shape=model.num_shape, num_expression=model.num_expression)
    targets = _targets(model, landmarks_3d)
    views, ns, nz = len(targets), model.num_shape, model.num_linear
    if views == 0:
        raise InvalidLandmarksError("a subject fit needs at least one photo's landmarks")
    rows = 3 * targets.shape[1]
    beta_prior = slice(rows, rows + ns)  # each photo's β prior rows: replaced by one shared prior
    shared = np.arange(7, 7 + ns)  # β columns of the per-photo Jacobian
    local = np.r_[0:7, 7 + ns : 10 + nz]  # rigid, ψ, jaw columns

    beta = np.zeros(ns)
    expression = np.zeros((views, nz - ns))
    jaw = np.zeros((views, 3))
    rotation, translation, scale0 = _start(model, targets)
    log_scale = np.log(scale0)

    def evaluate(
        rotation: F64, translation: F64, log_scale: F64, beta: F64, expression: F64, jaw: F64
    ) -> tuple[F64, F64, float]:
        z = np.concatenate([np.broadcast_to(beta, (views, ns)), expression], axis=1)
        residuals, points = _residuals(
            model, targets, scale0, settings, rotation, translation, log_scale, z, jaw
        )
        residuals = np.delete(residuals, beta_prior, axis=1)
        return residuals, points, float((residuals**2).sum() + beta @ beta)

    residuals, points, cost = evaluate(rotation, translation, log_scale, beta, expression, jaw)
    damping = 1e-3
    iterations = 0
    for _ in range(settings.max_iterations):
        z = np.concatenate([np.broadcast_to(beta, (views, ns)), expression], axis=1)
        jacobian = np.delete(
            _jacobian(model, scale0, settings, rotation, log_scale, z, jaw, points), beta_prior, axis=1
        )
        j_local, j_shared = jacobian[..., local], jacobian[..., shared]
        h_local = j_local.transpose(0, 2, 1) @ j_local  # (V, L, L)
        h_cross = j_local.transpose(0, 2, 1) @ j_shared  # (V, L, ns)
        h_shared = np.einsum("vri,vrj->ij", j_shared, j_shared) + np.eye(ns)  # + the β prior
        g_local = np.einsum("vri,vr->vi", j_local, residuals)
        g_shared = np.einsum("vri,vr->i", j_shared, residuals) + beta
        diagonal = np.einsum("vii->vi", h_local)
        a_local = h_local + (damping * (diagonal + 1e-9))[:, :, None] * np.eye(len(local))
        a_shared = h_shared + damping * np.diag(np.diag(h_shared) + 1e-9)
        solved = np.linalg.solve(a_local, np.concatenate([h_cross, g_local[..., None]], axis=2))
        inv_cross, inv_gradient = solved[..., :ns], solved[..., ns]
        schur = a_shared - np.einsum("vli,vlj->ij", h_cross, inv_cross)
        rhs = g_shared - np.einsum("vli,vl->i", h_cross, inv_gradient)
        beta_step = -np.linalg.solve(schur, rhs)
        local_step = -(inv_gradient + inv_cross @ beta_step)
        candidate = (
            rodrigues(local_step[:, 0:3]) @ rotation,
            translation + local_step[:, 3:6],
            log_scale + local_step[:, 6],
            beta + beta_step,
            expression + local_step[:, 7 : 7 + nz - ns],
            jaw + local_step[:, 7 + nz - ns :],
        )
        new_residuals, new_points, new_cost = evaluate(*candidate)
        iterations += 1
        if new_cost < cost:
            converged = (cost - new_cost) < settings.tolerance * cost
            rotation, translation, log_scale, beta, expression, jaw = candidate
            residuals, points, cost = new_residuals, new_points, new_cost
            damping /= 3.0
            if converged:
                break
        else:
            damping *= 4.0
            if damping >= 1e8:
                break

    residual_px = _residual_px(rotation, translation, log_scale, points, targets)
    scale = np.exp(log_scale)
    fits = [
        FlameFit(
            shape=beta.copy(),
            expression=expression[view].copy(),
            jaw_pose=jaw[view].copy(),
            rotation=rotation[view].copy(),
            translation=translation[view].copy(),
            scale=float(scale[view]),
            residual_px=float(residual_px[view]),
            iterations=iterations,
        )
        for view in range(views)
    ]
    return SubjectFlameFit(
        shape=beta.copy(), views=fits, residual_px=float(residual_px.mean()), iterations=iterations
    )

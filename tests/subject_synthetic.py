"""A known subject seen at several yaws: MediaPipe-layout landmarks of one FLAME identity, for the
subject-fusion tests and `bench/subject_fusion.py`.

Each view gets its own expression, jaw, head rotation (the given yaw plus a little pitch and roll),
scale and position, then Gaussian landmark noise: `noise_px` on x and y (growing with the turn,
as landmarks on the far side of a turned face are less certain) and `depth_ratio` times that on z
(MediaPipe's depth is its least reliable axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headforge.pipeline.flame_fit import FlameLandmarkModel, rodrigues

FLAME_TO_IMAGE = np.diag([1.0, -1.0, -1.0])  # FLAME +Y up, face +Z  →  image y down, z away


@dataclass
class SubjectViews:
    shape: np.ndarray  # (num_shape,) the true β
    expression: np.ndarray  # (V, num_expression)
    jaw: np.ndarray  # (V, 3)
    rotation: np.ndarray  # (V, 3, 3) FLAME frame → image frame
    yaws_deg: list[float]
    landmarks: np.ndarray  # (V, 468, 3) image pixels, noisy


def subject_views(
    model: FlameLandmarkModel,
    shape: np.ndarray,
    yaws_deg: list[float],
    rng: np.random.Generator,
    noise_px: float = 1.0,
    depth_ratio: float = 3.0,
    expression_sigma: float = 0.5,
) -> SubjectViews:
    """Landmarks of identity `shape` in one view per yaw (degrees, positive turns to the image's left)."""
    views = len(yaws_deg)
    expression = rng.normal(0.0, expression_sigma, (views, model.num_expression))
    jaw = np.stack(
        [rng.uniform(0.0, 0.2, views), rng.normal(0, 0.03, views), rng.normal(0, 0.03, views)], axis=1
    )
    axes = np.stack(
        [rng.normal(0, 0.08, views), np.radians(np.asarray(yaws_deg, float)), rng.normal(0, 0.05, views)],
        axis=1,
    )
    rotation = FLAME_TO_IMAGE @ rodrigues(axes)
    scale = rng.uniform(1500, 2200, views)
    translation = np.c_[rng.uniform(300, 700, (views, 2)), rng.uniform(-30, 30, views)]
    z = np.concatenate([np.broadcast_to(shape, (views, len(shape))), expression], axis=1)
    points = model.landmarks(z, jaw)
    image = scale[:, None, None] * np.einsum("bij,bkj->bki", rotation, points) + translation[:, None]
    sigma = noise_px * (1.0 + np.abs(np.asarray(yaws_deg, float)) / 45.0)
    noise = rng.normal(0.0, 1.0, image.shape) * sigma[:, None, None] * np.array([1.0, 1.0, depth_ratio])
    landmarks = np.zeros((views, 468, 3))
    landmarks[:, model.landmark_indices] = image + noise
    return SubjectViews(shape, expression, jaw, rotation, list(yaws_deg), landmarks)

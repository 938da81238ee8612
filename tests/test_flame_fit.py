"""Fit recovery: known FLAME shape, expression, jaw and similarity → MediaPipe-layout landmarks →
fit → the parameters and vertices come back within stated tolerances, with and without noise.

Units: the synthetic bases move a vertex by about 1 mm per unit coefficient; heads are 1200–2500 px
per meter (a face 170–350 px tall), so 1 px of landmark noise is 0.4–0.8 mm on the head.
"""

from __future__ import annotations

import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame

from headforge.errors import InvalidLandmarksError, PipelineUnavailableError
from headforge.models.flame_import import load_flame_asset
from headforge.pipeline.flame_fit import FitSettings, FlameLandmarkModel, fit_flame, rodrigues, umeyama

HEADS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> FlameLandmarkModel:
    return FlameLandmarkModel(load_flame_asset(imported_synthetic_flame(tmp_path_factory.getbasetemp())[1]))


@pytest.fixture(scope="module")
def truth(model: FlameLandmarkModel) -> dict[str, np.ndarray]:
    """Known parameters for HEADS heads and their 468 landmarks in image pixels."""
    rng = np.random.default_rng(7)
    z = rng.normal(0, 1, (HEADS, 150))
    jaw = np.stack([rng.uniform(0.05, 0.3, HEADS), rng.normal(0, 0.05, HEADS), rng.normal(0, 0.05, HEADS)], 1)
    # Head turned by up to ~30° about each axis, facing the camera (FLAME +Z → image −z, +Y → −y).
    rotation = rodrigues(rng.uniform(-0.5, 0.5, (HEADS, 3))) @ np.diag([1.0, -1.0, -1.0])
    scale = rng.uniform(1200, 2500, HEADS)
    translation = np.c_[rng.uniform(200, 800, (HEADS, 2)), rng.uniform(-50, 50, HEADS)]
    points = model.landmarks(z, jaw)
    image = scale[:, None, None] * np.einsum("bij,bkj->bki", rotation, points) + translation[:, None]
    landmarks = np.zeros((HEADS, 468, 3))
    landmarks[:, model.landmark_indices] = image
    # Landmarks the embedding does not use get unrelated values: the fit must ignore them.
    unused = np.setdiff1d(np.arange(468), model.landmark_indices)
    landmarks[:, unused] = rng.uniform(-1000, 1000, (HEADS, len(unused), 3))
    return {
        "z": z,
        "jaw": jaw,
        "rotation": rotation,
        "scale": scale,
        "translation": translation,
        "landmarks": landmarks,
        "vertices": model.vertices(z, jaw),
    }


def _errors(
    model: FlameLandmarkModel, truth: dict[str, np.ndarray], landmarks: np.ndarray, settings: FitSettings
) -> list[dict[str, float]]:
    fits = fit_flame(model, landmarks, settings)
    assert len(fits) == HEADS
    errors = []
    for head, fit in enumerate(fits):
        z = np.concatenate([fit.shape, fit.expression])
        assert fit.shape.shape == (100,) and fit.expression.shape == (50,)
        vertices = model.vertices(z[None], fit.jaw_pose[None])[0]
        cos = (np.trace(fit.rotation.T @ truth["rotation"][head]) - 1) / 2
        errors.append(
            {
                "coef_rms": float(np.sqrt(np.mean((z - truth["z"][head]) ** 2))),
                "coef_max": float(np.abs(z - truth["z"][head]).max()),
                "jaw": float(np.abs(fit.jaw_pose - truth["jaw"][head]).max()),
                "rotation_deg": float(np.degrees(np.arccos(np.clip(cos, -1, 1)))),
                "scale_rel": abs(fit.scale / truth["scale"][head] - 1),
                "translation_px": float(np.abs(fit.translation - truth["translation"][head]).max()),
                "vertex_mm": float(np.linalg.norm(vertices - truth["vertices"][head], axis=1).mean() * 1000),
                "baseline_mm": float(
                    np.linalg.norm(
                        model.vertices(np.zeros((1, 150)), np.zeros((1, 3)))[0] - truth["vertices"][head],
                        axis=1,
                    ).mean()
                    * 1000
                ),
                "residual_px": fit.residual_px,
            }
        )
    return errors


def test_recovers_parameters_without_noise(model: FlameLandmarkModel, truth: dict[str, np.ndarray]) -> None:
    settings = FitSettings(landmark_sigma_m=0.0005)  # weak priors: exact landmarks
    for error in _errors(model, truth, truth["landmarks"], settings):
        assert error["coef_rms"] < 0.02 and error["coef_max"] < 0.05, error
        assert error["jaw"] < 0.005, error  # radians
        assert error["rotation_deg"] < 0.1 and error["scale_rel"] < 0.002 and error["translation_px"] < 0.5, (
            error
        )
        assert error["vertex_mm"] < 0.5, error
        assert error["residual_px"] < 0.2, error


def test_recovers_parameters_with_pixel_noise(
    model: FlameLandmarkModel, truth: dict[str, np.ndarray]
) -> None:
    noisy = truth["landmarks"] + np.random.default_rng(9).normal(0, 1.0, truth["landmarks"].shape)
    settings = FitSettings(landmark_sigma_m=0.001)  # ≈ the noise on the head
    for error in _errors(model, truth, noisy, settings):
        assert error["coef_rms"] < 0.12 and error["coef_max"] < 0.4, error
        assert error["jaw"] < 0.03, error
        assert error["rotation_deg"] < 0.6 and error["scale_rel"] < 0.01 and error["translation_px"] < 2.0, (
            error
        )
        assert error["vertex_mm"] < 3.0 and error["vertex_mm"] < error["baseline_mm"] / 4, error
        # σ = 1 px per axis: the fit cannot explain the noise away, nor leave much more than it.
        assert 0.3 < error["residual_px"] < 1.5, error


def test_batched_fit_equals_single_fits(model: FlameLandmarkModel, truth: dict[str, np.ndarray]) -> None:
    batched = fit_flame(model, truth["landmarks"])
    for head in (0, 3):
        single = fit_flame(model, truth["landmarks"][head : head + 1])[0]
        np.testing.assert_allclose(single.shape, batched[head].shape, atol=1e-6)
        np.testing.assert_allclose(single.translation, batched[head].translation, atol=1e-5)


def test_umeyama_recovers_a_similarity() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(0, 1, (30, 3))
    rotation = rodrigues(np.array([0.3, -1.2, 2.0]))
    target = 3.5 * source @ rotation.T + np.array([10.0, -4.0, 2.0])
    scale, found_rotation, translation = umeyama(source, target)
    assert abs(scale - 3.5) < 1e-9
    np.testing.assert_allclose(found_rotation, rotation, atol=1e-9)
    np.testing.assert_allclose(translation, [10.0, -4.0, 2.0], atol=1e-9)


def test_bad_landmarks_fail_with_a_code(model: FlameLandmarkModel, truth: dict[str, np.ndarray]) -> None:
    broken = truth["landmarks"][:1].copy()
    broken[0, model.landmark_indices[0], 0] = np.nan
    with pytest.raises(InvalidLandmarksError):
        fit_flame(model, broken)
    with pytest.raises(InvalidLandmarksError):
        fit_flame(model, truth["landmarks"][:1, :100])
    collapsed = np.zeros((1, 468, 3))
    with pytest.raises(InvalidLandmarksError):
        fit_flame(model, collapsed)
    assert fit_flame(model, np.zeros((0, 468, 3))) == []


def test_asset_without_mediapipe_embedding_is_unavailable(model: FlameLandmarkModel) -> None:
    from dataclasses import replace

    bare = replace(model.asset, mp_face_idx=None, mp_bary=None, mp_landmark_indices=None)
    with pytest.raises(PipelineUnavailableError, match=r"docs/flame\.md"):
        FlameLandmarkModel(bare)

"""The shared-identity FLAME fit of a subject (`fit_flame_subject`) on synthetic views of a known head:
one photo gives exactly the single-photo fit, exact landmarks give the truth back, and with noise
the fused identity is closer to the truth than the worst photo fitted alone. Then the stage that
fills the heads, and result.json's `subject` section against its schema model."""

from __future__ import annotations

import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from pydantic import ValidationError
from subject_synthetic import subject_views

from headforge.errors import InvalidLandmarksError
from headforge.models.flame_import import load_flame_asset
from headforge.pipeline.decode import decode_image
from headforge.pipeline.flame_fit import FitSettings, FlameLandmarkModel, fit_flame, fit_flame_subject
from headforge.pipeline.flame_stage import fit_subject_heads
from headforge.pipeline.subject import pick_subject_heads, subject_document
from headforge.pipeline.types import Capture, Detection, Head, StageContext, View
from headforge.schemas.models import SubjectRecord

YAWS = [-60.0, -30.0, 0.0, 30.0, 60.0]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> FlameLandmarkModel:
    return FlameLandmarkModel(load_flame_asset(imported_synthetic_flame(tmp_path_factory.getbasetemp())[1]))


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def test_one_view_is_the_single_photo_fit(model: FlameLandmarkModel) -> None:
    views = subject_views(model, np.random.default_rng(1).normal(0, 1, 100), [20.0], np.random.default_rng(2))
    single = fit_flame(model, views.landmarks)[0]
    fused = fit_flame_subject(model, views.landmarks)
    np.testing.assert_allclose(fused.shape, single.shape, atol=1e-6)
    (view,) = fused.views
    np.testing.assert_allclose(view.expression, single.expression, atol=1e-6)
    np.testing.assert_allclose(view.jaw_pose, single.jaw_pose, atol=1e-7)
    np.testing.assert_allclose(view.rotation, single.rotation, atol=1e-8)
    np.testing.assert_allclose(view.translation, single.translation, atol=1e-5)
    assert view.iterations == single.iterations and abs(fused.residual_px - single.residual_px) < 1e-6


def test_exact_views_give_the_identity_back(model: FlameLandmarkModel) -> None:
    rng = np.random.default_rng(3)
    truth = rng.normal(0, 1, 100)
    views = subject_views(model, truth, YAWS, rng, noise_px=0.0)
    fused = fit_flame_subject(model, views.landmarks, FitSettings(landmark_sigma_m=0.0005))
    assert _rms(fused.shape - truth) < 0.02, _rms(fused.shape - truth)
    assert len(fused.views) == len(YAWS) and fused.residual_px < 0.2
    for index, fit in enumerate(fused.views):
        np.testing.assert_array_equal(fit.shape, fused.shape)  # every view carries the shared β
        assert _rms(fit.expression - views.expression[index]) < 0.03
        assert np.abs(fit.jaw_pose - views.jaw[index]).max() < 0.005
        cos = (np.trace(fit.rotation.T @ views.rotation[index]) - 1) / 2
        assert np.degrees(np.arccos(np.clip(cos, -1, 1))) < 0.1


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fused_identity_beats_the_worst_single_view(model: FlameLandmarkModel, seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 1, 100)
    views = subject_views(model, truth, YAWS, rng, noise_px=1.0)
    settings = FitSettings(landmark_sigma_m=0.001)
    alone = [_rms(fit.shape - truth) for fit in fit_flame(model, views.landmarks, settings)]
    fused = fit_flame_subject(model, views.landmarks, settings)
    error = _rms(fused.shape - truth)
    assert error < max(alone), (error, alone)
    assert error < float(np.mean(alone)), (error, alone)  # and than a typical one
    # The identity's neutral mesh too, in millimetres.
    neutral = np.zeros((1, 50))
    true_mesh = model.vertices(np.c_[truth[None], neutral], np.zeros((1, 3)))[0]
    fused_mesh = model.vertices(np.c_[fused.shape[None], neutral], np.zeros((1, 3)))[0]
    worst = max(alone)
    assert np.linalg.norm(fused_mesh - true_mesh, axis=1).mean() * 1000 < 3.0
    assert worst > 0  # the single fits are imperfect: the comparison means something


def test_subject_fit_refuses_bad_landmarks(model: FlameLandmarkModel) -> None:
    with pytest.raises(InvalidLandmarksError):
        fit_flame_subject(model, np.zeros((0, 468, 3)))
    views = subject_views(model, np.zeros(100), [0.0, 30.0], np.random.default_rng(4))
    broken = views.landmarks.copy()
    broken[1, model.landmark_indices[0], 2] = np.inf
    with pytest.raises(InvalidLandmarksError):
        fit_flame_subject(model, broken)
    with pytest.raises(InvalidLandmarksError):
        fit_flame_subject(model, views.landmarks[:, :50])


def _blank_view(index: int, size: int = 64) -> View:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (90, 90, 90)).save(buffer, format="PNG")
    data = buffer.getvalue()
    return View(index, f"photo{index}.png", data, decode_image(data))


def _head(view: int, box: list[float], landmarks: np.ndarray | None) -> Head:
    detection = Detection(np.asarray(box, np.float32), 0.9, np.zeros((6, 2), np.float32))
    return Head(index=0, detection=detection, view=view, landmarks_3d=landmarks)


def test_stage_fills_heads_and_the_subject_section(model: FlameLandmarkModel) -> None:
    """Four photos: two faces in view 0 (the larger is picked), none in view 2; the rest fused."""
    from headforge.pipeline.options import ReconstructOptions

    rng = np.random.default_rng(5)
    truth = rng.normal(0, 1, 100)
    views = subject_views(model, truth, [-30.0, 0.0, 40.0], rng)
    capture = Capture([_blank_view(index) for index in range(4)], subject=True)
    ctx = StageContext(ReconstructOptions(subject=True), None, capture)  # type: ignore[arg-type]
    small = _head(0, [0, 0, 10, 10], views.landmarks[1])
    heads = [
        small,
        _head(0, [0, 0, 40, 50], views.landmarks[0]),
        _head(1, [5, 5, 30, 30], views.landmarks[1]),
        _head(3, [5, 5, 30, 30], views.landmarks[2]),
    ]
    kept, picks = pick_subject_heads(ctx, heads)
    assert all(head is not small for head in kept) and [head.view for head in kept] == [0, 1, 3]
    assert [pick.faces_found for pick in picks] == [2, 1, 0, 1]
    assert any("view 2 (photo2.png): no face found" in note for note in ctx.notes)
    assert any("view 0 (photo0.png): 2 faces found; the largest" in note for note in ctx.notes)

    fit_subject_heads(ctx, kept, asset=model)
    assert ctx.subject is not None and ctx.subject.views == [0, 1, 3]
    for head in kept:
        assert head.mesh is not None and head.mesh_image is not None and head.pose is not None
        np.testing.assert_allclose(head.params["shape"], ctx.subject.shape, atol=1e-6)
    assert kept[0].params["expression"] != kept[1].params["expression"]  # each view its own

    document = subject_document(ctx, picks, kept)
    record = SubjectRecord.model_validate(document)
    assert record.used_views == [0, 1, 3] and record.identity is not None
    assert [view.status for view in record.views] == ["used", "used", "no_face", "used"]
    assert record.views[2].pose is None and record.views[2].fit_residual_px is None
    assert record.views[1].fit_residual_px == pytest.approx(kept[1].params["fit_residual_px"], abs=1e-4)
    # Views 0 and 3 are turned opposite ways.
    assert record.views[0].pose is not None and record.views[3].pose is not None
    assert record.views[0].pose.yaw * record.views[3].pose.yaw < 0
    # A head a later stage dropped reads as dropped.
    assert subject_document(ctx, picks, kept[:2])["views"][3]["status"] == "dropped"
    for broken in (
        {**document, "identity": {**document["identity"], "shape": document["identity"]["shape"][:99]}},
        {**document, "views": [{**document["views"][0], "status": "maybe"}]},
        {**document, "unknown": 1},
    ):
        with pytest.raises(ValidationError):
            SubjectRecord.model_validate(broken)

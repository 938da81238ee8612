"""The pipeline registry's rows in the runner, with the real networks on real photos: a stage runs
once over all heads of a photo (and, when it refuses the batch, on each head alone, so only the
heads at fault are skipped), the `flame` pipeline fits all heads of a photo in one batch, steps a
stage already filled are skipped, and result.json's `models` lists exactly the networks the run used."""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from numpy.typing import NDArray
from PIL import Image

from headforge.errors import InvalidLandmarksError, ModelsMissingError
from headforge.models.runtime import ModelSet
from headforge.pipeline import flame_stage
from headforge.pipeline.facemesh_stage import facemesh_symmetry, fit_facemesh
from headforge.pipeline.flame_fit import fit_flame
from headforge.pipeline.registry import PIPELINES, Pipeline, Stage, register_pipeline
from headforge.pipeline.run import ReconstructOptions, reconstruct_image
from headforge.pipeline.types import Head, Splats, StageContext
from headforge.schemas import validate_result

FAST = {"texture_size": 512, "splats": 500, "outputs": frozenset({"obj"})}


def _png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def two_faces(astronaut: NDArray[np.uint8]) -> bytes:
    """A PNG with two different faces: the astronaut, and beside her a mirrored, smaller copy."""
    crop = astronaut[0:300, 100:400]
    mirrored = cv2.resize(np.ascontiguousarray(crop[:, ::-1]), (240, 240), interpolation=cv2.INTER_AREA)
    canvas = np.full((320, 600, 3), 200, np.uint8)
    canvas[10:310, 0:300] = crop
    canvas[40:280, 340:580] = mirrored
    return _png(canvas)


# --- a test pipeline whose stage records its calls (a registry row like any other) -------------


@dataclass
class _Calls:
    batches: list[list[int]] = field(default_factory=list)  # head indices per stage call
    batch_error: Exception | None = None  # raised when the stage gets more than one head
    refuse_head: int | None = None  # the stage refuses this head alone (by detection order)


CALLS = _Calls()


def recording_fit(ctx: StageContext, heads: list[Head]) -> None:
    CALLS.batches.append([head.index for head in heads])
    if len(heads) > 1 and CALLS.batch_error is not None:
        raise CALLS.batch_error
    for head in heads:
        if head.index == CALLS.refuse_head:
            raise InvalidLandmarksError(f"head {head.index} refused by the test")
        fit_facemesh(head)


@pytest.fixture
def recording_pipeline(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    """Registers pipeline `recording` (facemesh fits behind a recording stage) for one test."""
    global CALLS
    CALLS = _Calls()
    monkeypatch.setitem(
        PIPELINES,
        "recording",
        replace(
            PIPELINES["facemesh"],
            name="recording",
            description="facemesh behind a recording stage (tests only)",
            stages=(Stage("fit", recording_fit),),
        ),
    )
    return CALLS


def test_batch_fit_runs_once_for_all_heads(
    recording_pipeline: _Calls, two_faces: bytes, networks: ModelSet, tmp_path: Path
) -> None:
    options = ReconstructOptions(pipeline="recording", **FAST)  # type: ignore[arg-type]
    document = reconstruct_image(two_faces, "two.png", options, tmp_path, networks=networks)
    assert len(document["heads"]) == 2
    assert recording_pipeline.batches == [[0, 1]]  # one call filled every head
    assert all(head["mesh"]["vertices"] == 468 for head in document["heads"])
    assert document["timings_ms"]["fit"] >= 0


def test_refused_batch_falls_back_to_per_head_fits(
    recording_pipeline: _Calls, two_faces: bytes, networks: ModelSet, tmp_path: Path
) -> None:
    recording_pipeline.batch_error = InvalidLandmarksError("the batch refuses a head")
    recording_pipeline.refuse_head = 1
    options = ReconstructOptions(pipeline="recording", **FAST)  # type: ignore[arg-type]
    document = reconstruct_image(two_faces, "two.png", options, tmp_path, networks=networks)
    assert recording_pipeline.batches == [[0, 1], [0], [1]]  # the batch, then each head alone
    # Only the head at fault is skipped, with a note naming it; the other is written.
    assert len(document["heads"]) == 1 and (tmp_path / "h0.obj").is_file()
    assert any("head 1 skipped" in note and "refused by the test" in note for note in document["notes"])


def test_batch_server_error_fails_the_image(
    recording_pipeline: _Calls, two_faces: bytes, networks: ModelSet, tmp_path: Path
) -> None:
    recording_pipeline.batch_error = ModelsMissingError("a deployment problem")
    options = ReconstructOptions(pipeline="recording", **FAST)  # type: ignore[arg-type]
    with pytest.raises(ModelsMissingError):
        reconstruct_image(two_faces, "two.png", options, tmp_path, networks=networks)
    assert recording_pipeline.batches == [[0, 1]]  # no per-head retries after a server-side error


# --- the flame pipeline fits all heads of a photo in one batch ----------------------------------


def test_flame_fits_all_heads_in_one_batch(
    two_faces: bytes,
    networks: ModelSet,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, asset_path = imported_synthetic_flame(tmp_path_factory.getbasetemp())
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(asset_path))
    calls: list[tuple[NDArray[np.float64], list[Any]]] = []

    def counting_fit_flame(model: Any, landmarks_3d: Any, settings: Any = None) -> list[Any]:
        fits = fit_flame(model, landmarks_3d, settings)
        calls.append((np.array(landmarks_3d, dtype=np.float64), fits))
        return fits

    monkeypatch.setattr(flame_stage, "fit_flame", counting_fit_flame)
    options = ReconstructOptions(pipeline="flame", **FAST)  # type: ignore[arg-type]
    document = reconstruct_image(two_faces, "two.png", options, tmp_path, networks=networks)
    validate_result(document)

    heads = document["heads"]
    assert len(heads) == 2
    assert len(calls) == 1, "fit_flame should run once for all heads of the image"
    landmarks, batch_fits = calls[0]
    assert landmarks.shape[0] == 2 and len(batch_fits) == 2
    model = flame_stage.load_model(asset_path)
    for head, batch_landmarks, batch_fit in zip(heads, landmarks, batch_fits, strict=True):
        # The batch's rows are the heads, in order.
        np.testing.assert_allclose(np.asarray(head["landmarks_3d"]), batch_landmarks, atol=0.01)
        (alone,) = fit_flame(model, batch_landmarks[None])
        for name in ("shape", "expression", "jaw_pose", "rotation", "translation"):
            np.testing.assert_allclose(
                getattr(batch_fit, name), getattr(alone, name), rtol=1e-6, atol=1e-6, err_msg=name
            )
        assert batch_fit.scale == pytest.approx(alone.scale, rel=1e-9)
        assert batch_fit.residual_px == pytest.approx(alone.residual_px, rel=1e-6, abs=1e-9)
        # result.json holds that head's own fit (float32, rounded to 6 decimals).
        params = head["params"]
        np.testing.assert_allclose(params["shape"], alone.shape, atol=1e-5)
        np.testing.assert_allclose(params["expression"], alone.expression, atol=1e-5)
        np.testing.assert_allclose(params["translation_px"], alone.translation, rtol=1e-6, atol=1e-3)
        assert params["scale_px_per_m"] == pytest.approx(alone.scale, rel=1e-6)
    # Two different faces were fitted, not one twice.
    assert not np.allclose(heads[0]["params"]["translation_px"], heads[1]["params"]["translation_px"])


# --- result.json lists the networks the run used ----------------------------------------------------


class _RecordingNetwork:
    """Passes calls to a real network and records that it ran."""

    def __init__(self, network: Any, ran: set[str]) -> None:
        self._network, self._ran = network, ran
        self.name = network.name
        self.path = getattr(network, "path", None)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self._ran.add(self.name)
        return list(self._network.run(x))


NETWORK_NAMES = ("face_detection_short_range", "face_detection_full_range", "face_landmark", "iris_landmark")


def _recording(networks: ModelSet, ran: set[str]) -> ModelSet:
    return ModelSet({name: _RecordingNetwork(networks[name], ran) for name in NETWORK_NAMES})


@pytest.mark.parametrize("pipeline", ["facemesh", "flame"])
def test_models_lists_exactly_the_networks_that_ran(
    pipeline: str,
    astronaut: NDArray[np.uint8],
    networks: ModelSet,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if pipeline == "flame":
        _, asset_path = imported_synthetic_flame(tmp_path_factory.getbasetemp())
        monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(asset_path))
    ran: set[str] = set()
    options = ReconstructOptions(pipeline=pipeline, **FAST)  # type: ignore[arg-type]
    document = reconstruct_image(
        _png(astronaut), "astronaut.png", options, tmp_path, networks=_recording(networks, ran)
    )
    validate_result(document)
    assert len(document["heads"]) == 1
    network_names = {networks[name].name for name in NETWORK_NAMES}
    listed = [model["name"] for model in document["models"] if model["name"] in network_names]
    assert sorted(listed) == sorted(ran)
    assert networks["iris_landmark"].name not in listed  # the default landmark stage runs without Iris
    others = [model["name"] for model in document["models"] if model["name"] not in network_names]
    assert others == (["flame"] if pipeline == "flame" else [])


# --- a stage that fills texture or splats itself: the default steps are skipped ---------------------


def _learned_splats(ctx: StageContext, heads: list[Head]) -> None:
    """Stands in for a network that decodes its own Gaussians (values are arbitrary, not a result)."""
    for head in heads:
        fit_facemesh(head)
        count = 7
        head.splats = Splats(
            means=np.zeros((count, 3), np.float32),
            normals=np.tile(np.float32([0, 0, 1]), (count, 1)),
            colors=np.full((count, 3), 0.5, np.float32),
            opacities=np.full(count, 0.5, np.float32),
            scales=np.full((count, 3), 0.01, np.float32),
            rotations=np.tile(np.float32([1, 0, 0, 0]), (count, 1)),
            sh_rest=np.zeros((count, 3, 3), np.float32),
            source="learned",
        )


def test_steps_a_stage_filled_are_skipped(
    astronaut: NDArray[np.uint8], networks: ModelSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = Pipeline(
        name="learned",
        description="facemesh with stand-in learned splats (tests only)",
        heads=PIPELINES["facemesh"].heads,
        stages=(Stage("regress", _learned_splats),),
        symmetry=facemesh_symmetry,
    )
    monkeypatch.setitem(PIPELINES, "learned", row)
    with pytest.raises(ValueError, match="already registered"):
        register_pipeline(row)
    options = ReconstructOptions(
        pipeline="learned", texture_size=512, splats=500, outputs=frozenset({"splats"})
    )
    document = reconstruct_image(_png(astronaut), "astronaut.png", options, tmp_path, networks=networks)
    validate_result(document)
    (head,) = document["heads"]
    assert head["splats"] == 7 and head["splat_source"] == "learned" and head["sh_degree"] == 1
    assert "splats" not in document["timings_ms"] and "regress" in document["timings_ms"]
    assert "texture" in document["timings_ms"]  # the stage left the texture to the default step

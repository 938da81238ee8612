"""The `flame` pipeline end to end on a real photo with the synthetic FLAME asset (artifacts,
result.json against its schema, the FLAME asset's record, no pickle read while serving), and its
clean failure when no usable FLAME asset is configured."""

from __future__ import annotations

import copy
import io
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from flame_synthetic import SyntheticFiles, imported_synthetic_flame
from numpy.typing import NDArray
from PIL import Image

from headforge.errors import AssetError, PipelineUnavailableError
from headforge.files import sha256_file
from headforge.models import flame_import
from headforge.models.flame_import import import_flame
from headforge.models.runtime import ModelSet
from headforge.pipeline.run import ReconstructOptions, pipeline_missing_reason, reconstruct_image
from headforge.schemas import validate_result


def _png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticFiles, Path]:
    """The synthetic FLAME source files and their imported asset (shared by the session)."""
    return imported_synthetic_flame(tmp_path_factory.getbasetemp())


def _absent_override(tmp_path: Path, synthetic: tuple[SyntheticFiles, Path]) -> dict[str, str]:
    return {"HEADFORGE_FLAME_ASSET": str(tmp_path / "absent.npz")}


def _empty_home(tmp_path: Path, synthetic: tuple[SyntheticFiles, Path]) -> dict[str, str]:
    (tmp_path / "home").mkdir()
    return {"HEADFORGE_HOME": str(tmp_path / "home")}


def _unreadable_asset(tmp_path: Path, synthetic: tuple[SyntheticFiles, Path]) -> dict[str, str]:
    (tmp_path / "flame.npz").write_bytes(b"not an npz")
    return {"HEADFORGE_FLAME_ASSET": str(tmp_path / "flame.npz")}


def _asset_without_uvs(tmp_path: Path, synthetic: tuple[SyntheticFiles, Path]) -> dict[str, str]:
    files = synthetic[0]
    path = import_flame(files.model, [files.mediapipe_embedding], None, tmp_path / "flame.npz")
    return {"HEADFORGE_FLAME_ASSET": str(path)}


def _asset_without_embedding(tmp_path: Path, synthetic: tuple[SyntheticFiles, Path]) -> dict[str, str]:
    files = synthetic[0]
    path = import_flame(files.model, None, files.head_template, tmp_path / "flame.npz")
    return {"HEADFORGE_FLAME_ASSET": str(path)}


@pytest.mark.parametrize(
    ("configure", "names"),
    [
        (_absent_override, "no FLAME model is imported"),
        (_empty_home, "no FLAME model is imported"),
        (_unreadable_asset, "unreadable"),
        (_asset_without_uvs, "--uv head_template.obj"),
        (_asset_without_embedding, "--landmarks mediapipe_landmark_embedding.npz"),
    ],
)
def test_unusable_asset_makes_flame_unavailable(
    configure: Callable[[Path, tuple[SyntheticFiles, Path]], dict[str, str]],
    names: str,
    synthetic: tuple[SyntheticFiles, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    astronaut: NDArray[np.uint8],
) -> None:
    """No service and no networks: the check runs before any model is loaded."""
    monkeypatch.delenv("HEADFORGE_FLAME_ASSET", raising=False)
    for name, value in configure(tmp_path, synthetic).items():
        monkeypatch.setenv(name, value)

    def no_networks() -> ModelSet:
        raise AssertionError("an unavailable pipeline must fail before loading networks")

    monkeypatch.setattr("headforge.models.runtime.load_default_networks", no_networks)
    reason = pipeline_missing_reason("flame")
    assert reason is not None and names in reason and "docs/flame.md" in reason
    assert pipeline_missing_reason("facemesh") is None
    with pytest.raises(PipelineUnavailableError) as caught:
        reconstruct_image(
            _png(astronaut), "astronaut.png", ReconstructOptions(pipeline="flame"), tmp_path / "out"
        )
    assert caught.value.code == "pipeline_unavailable" and caught.value.http_status == 422
    assert caught.value.message == f"pipeline 'flame' is unavailable: {reason}"
    assert caught.value.details == {"pipeline": "flame"}
    assert not (tmp_path / "out").exists()  # nothing written


def test_without_asset_the_cli_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, astronaut: NDArray[np.uint8]
) -> None:
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(tmp_path / "absent.npz"))
    # The command line names the stable code and the docs, and exits with 2.
    image = tmp_path / "astronaut.png"
    image.write_bytes(_png(astronaut))
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "headforge",
            "reconstruct",
            str(image),
            "-o",
            str(tmp_path / "cli"),
            "--pipeline",
            "flame",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 2
    assert "pipeline_unavailable" in completed.stderr and "docs/flame.md" in completed.stderr


def test_flame_pipeline_on_astronaut(
    tmp_path: Path,
    synthetic: tuple[SyntheticFiles, Path],
    monkeypatch: pytest.MonkeyPatch,
    networks: ModelSet,
    astronaut: NDArray[np.uint8],
) -> None:
    files, asset_path = synthetic
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(asset_path))
    assert pipeline_missing_reason("flame") is None
    options = ReconstructOptions(pipeline="flame", texture_size=512, splats=2000)
    out = tmp_path / "out"
    document = reconstruct_image(_png(astronaut), "astronaut.png", options, out, networks=networks)

    assert document["pipeline"] == "flame" and len(document["heads"]) == 1
    head = document["heads"][0]
    assert head["mesh"] == {"topology": "flame5023", "vertices": 5023, "faces": 9976}
    params = head["params"]
    assert params["model"] == "flame"
    assert len(params["shape"]) == 100 and len(params["expression"]) == 50 and len(params["jaw_pose"]) == 3
    assert np.isfinite(params["fit_residual_px"]) and params["fit_residual_px"] >= 0
    # The fitted head sits on the detected face: its origin projects inside the (enlarged) box.
    x0, y0, x1, y1 = head["box"]
    margin = 0.5 * max(x1 - x0, y1 - y0)
    tx, ty, _ = params["translation_px"]
    assert x0 - margin < tx < x1 + margin and y0 - margin < ty < y1 + margin
    # The synthetic embedding sits where the face-mesh points sit on a face, so the fit is sane:
    # astronaut faces the camera, the face box is ~115 px for a ~0.12 m face, the jaw is near rest.
    assert all(abs(head["pose"][angle]) < 30 for angle in ("yaw", "pitch", "roll")), head["pose"]
    assert 400 < params["scale_px_per_m"] < 2000
    assert params["fit_residual_px"] < 10
    assert np.abs(params["jaw_pose"]).max() < 0.5
    written = json.loads((out / "result.json").read_text())
    assert written == json.loads(json.dumps(document))
    validate_result(written)
    _check_flame_params_schema(written)

    # `models`: the landmark stage's networks (no Iris), the texture's person mask, then the FLAME
    # asset the fit used.
    names = [model["name"] for model in written["models"]]
    assert names == [
        networks["face_detection_full_range"].name,
        networks["face_landmark"].name,
        networks["selfie_segmentation"].name,
        "flame",
    ]
    flame = written["models"][-1]
    assert flame["sha256"] == sha256_file(asset_path)
    assert flame["version"] == "generic_model.pkl" and flame["format"] == "npz"
    assert flame["sources"]["model"] == {"file": "generic_model.pkl", "sha256": sha256_file(files.model)}
    assert flame["sources"]["uv"]["sha256"] == sha256_file(files.head_template)
    assert flame["sources"]["landmarks_mediapipe"]["sha256"] == sha256_file(files.mediapipe_embedding)

    # Artifacts: a valid glTF, an OBJ with FLAME's faces, the texture, the splats.
    from gltf_validator import validate_gltf

    (report,) = validate_gltf(out / "h0.glb")
    assert report["numErrors"] == 0, report
    import trimesh

    obj = trimesh.load(out / "h0.obj", process=False, force="mesh")
    assert isinstance(obj, trimesh.Trimesh)
    assert len(obj.faces) == 9976
    with Image.open(out / "h0_texture.png") as texture:
        assert texture.size == (512, 512)
        assert np.asarray(texture).std() > 5  # the photo was unwrapped, not a flat fill
    from plyfile import PlyData

    vertex = PlyData.read(str(out / "h0_splats.ply"))["vertex"]
    assert vertex.count == 2000
    positions = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
    assert np.isfinite(positions).all()
    # Splats cover the full FLAME head (meters, head frame), not just the face.
    extent = positions.max(axis=0) - positions.min(axis=0)
    assert 0.1 < extent[1] < 0.5 and extent[2] > 0.1
    assert (out / "preview.png").is_file()


def _check_flame_params_schema(document: dict[str, Any]) -> None:
    """The schema defines FLAME's `params`: malformed ones, or the wrong kind for the pipeline, fail."""

    def broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        copied = copy.deepcopy(document)
        change(copied)
        return copied

    def params(doc: dict[str, Any]) -> dict[str, Any]:
        value: dict[str, Any] = doc["heads"][0]["params"]
        return value

    cases: list[Callable[[dict[str, Any]], None]] = [
        lambda doc: params(doc)["shape"].pop(),
        lambda doc: params(doc)["expression"].append(0.0),
        lambda doc: params(doc).pop("fit_residual_px"),
        lambda doc: params(doc).update(jaw_pose=[0.0, 0.0]),
        lambda doc: params(doc).update(rotation=[[1.0, 0.0, 0.0]]),
        lambda doc: params(doc).update(scale_px_per_m=-1.0),
        lambda doc: params(doc).update(fit_iterations=2.5),
        lambda doc: params(doc).update(shape=["a"] * 100),
        lambda doc: params(doc).update(extra=1),
        lambda doc: doc["heads"][0].update(params={}),  # a flame head must carry FLAME parameters
        lambda doc: doc.update(pipeline="facemesh"),  # facemesh heads carry none
        lambda doc: doc["models"][-1]["sources"].update(model={"file": "x.pkl"}),
    ]
    for change in cases:
        with pytest.raises(jsonschema.ValidationError):
            validate_result(broken(change))


def test_serving_never_reads_a_pickle(
    tmp_path: Path,
    synthetic: tuple[SyntheticFiles, Path],
    monkeypatch: pytest.MonkeyPatch,
    networks: ModelSet,
    astronaut: NDArray[np.uint8],
) -> None:
    """A flame reconstruct from an imported asset, with every way to unpickle made to fail."""
    files, imported = synthetic
    served = tmp_path / "served" / "flame.npz"  # a path no cache has seen: the run must load it
    served.parent.mkdir()
    shutil.copyfile(imported, served)
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(served))
    attempts: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            attempts.append(name)
            raise AssertionError(f"{name} called while serving")

        return refused

    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", refuse("pickle.Unpickler"))
    monkeypatch.setattr(flame_import.RestrictedUnpickler, "load", refuse("RestrictedUnpickler.load"))

    options = ReconstructOptions(pipeline="flame", texture_size=512, splats=500)
    document = reconstruct_image(
        _png(astronaut), "astronaut.png", options, tmp_path / "out", networks=networks
    )
    assert len(document["heads"]) == 1 and document["heads"][0]["params"]["model"] == "flame"
    assert attempts == []

    # The traps work: unpickling, numpy's pickled arrays and importing FLAME's pickle all hit them.
    with pytest.raises(AssertionError):
        pickle.loads(pickle.dumps(1))
    np.save(tmp_path / "objects.npy", np.array({"a": 1}, dtype=object), allow_pickle=True)
    with pytest.raises(AssertionError):
        np.load(tmp_path / "objects.npy", allow_pickle=True)
    with pytest.raises(AssetError, match=r"RestrictedUnpickler\.load called while serving"):
        import_flame(files.model, destination=tmp_path / "again.npz")
    assert attempts == ["pickle.loads", "pickle.load", "RestrictedUnpickler.load"]

"""The `flame` pipeline end to end on a real photo with the synthetic FLAME asset, and its clean
failure when no FLAME asset is imported."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from numpy.typing import NDArray
from PIL import Image

from headforge.errors import PipelineUnavailableError
from headforge.models.runtime import DefaultNetworks
from headforge.pipeline.run import ReconstructOptions, pipeline_missing_reason, reconstruct_image


def _png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_without_asset_flame_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, astronaut: NDArray[np.uint8]
) -> None:
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(tmp_path / "absent.npz"))
    reason = pipeline_missing_reason("flame")
    assert reason is not None and "docs/flame.md" in reason
    with pytest.raises(PipelineUnavailableError, match=r"docs/flame\.md") as caught:
        reconstruct_image(
            _png(astronaut), "astronaut.png", ReconstructOptions(pipeline="flame"), tmp_path / "out"
        )
    assert caught.value.code == "pipeline_unavailable"
    # The command line says the same, with the stable code and a non-zero exit.
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
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    networks: DefaultNetworks,
    astronaut: NDArray[np.uint8],
) -> None:
    _, asset_path = imported_synthetic_flame(tmp_path_factory.getbasetemp())
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
    assert json.loads((out / "result.json").read_text())["heads"][0]["params"]["model"] == "flame"

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

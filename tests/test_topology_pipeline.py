"""`topology=NAME` end to end on the astronaut photo: the facemesh face and the synthetic FLAME head
come out in a generated 24,049-vertex studio template's vertices, faces and UVs, through the
pipeline call, the CLI and the checks that refuse templates a pipeline cannot use."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from numpy.typing import NDArray
from PIL import Image
from template_synthetic import NUM_VERTICES, write_studio_template

from headforge.errors import InputError, TemplateLandmarksMissingError, TemplateNotFoundError
from headforge.models.runtime import ModelSet
from headforge.pipeline.options import ReconstructOptions
from headforge.pipeline.runner import reconstruct_image
from headforge.schemas import validate_result
from headforge.templates import import_template

UVS = 24_532  # the template's UVs: seam columns and poles carry several


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A template store with `studio` (landmarks and a face group) and `bare` (no landmarks)."""
    base = tmp_path_factory.mktemp("templates")
    store = base / "store"
    previous = os.environ.get("HEADFORGE_TEMPLATES")
    os.environ["HEADFORGE_TEMPLATES"] = str(store)
    try:
        mesh, landmarks = write_studio_template(base)
        import_template("studio", mesh, landmarks)
        import_template("bare", mesh)
    finally:
        if previous is None:
            os.environ.pop("HEADFORGE_TEMPLATES")
        else:
            os.environ["HEADFORGE_TEMPLATES"] = previous
    return store


@pytest.fixture
def use_templates(templates: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HEADFORGE_TEMPLATES", str(templates))
    return templates


def _png(rgb: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_outputs(out: Path, document: dict[str, Any], *, face_only: bool) -> dict[str, Any]:
    """The head is the template: counts, registration record, glTF validity, OBJ layout, texture, splats."""
    validate_result(json.loads((out / "result.json").read_text()))
    (head,) = document["heads"]
    assert head["mesh"] == {"topology": "template:studio", "vertices": NUM_VERTICES, "faces": 48_094}
    registration = head["registration"]
    assert registration["template"] == "studio" and registration["face_region_only"] is face_only
    assert registration["residual_mm"] is not None and 0 <= registration["residual_mm"] < 3
    assert 0 < registration["driven_share"] <= 1
    from gltf_validator import validate_gltf

    (report,) = validate_gltf(out / "h0.glb")
    assert report["numErrors"] == 0, report
    lines = (out / "h0.obj").read_text().splitlines()
    assert sum(line.startswith("v ") for line in lines) == NUM_VERTICES
    assert sum(line.startswith("vt ") for line in lines) == UVS
    assert sum(line.startswith("f ") for line in lines) == 48_094
    with Image.open(out / "h0_texture.png") as texture:
        assert np.asarray(texture).std() > 5  # unwrapped from the photo into the template's UVs
    import trimesh
    from plyfile import PlyData

    mesh = trimesh.load(out / "h0.obj", process=False, force="mesh")
    assert isinstance(mesh, trimesh.Trimesh)
    vertex = PlyData.read(str(out / "h0_splats.ply"))["vertex"]
    splats = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
    from headforge.pipeline.registration import TargetSurface

    closest, _, _ = TargetSurface(np.asarray(mesh.vertices), np.asarray(mesh.faces)).closest(
        splats, neighbours=4
    )
    # The splats sit on the registered template (the query checks the faces around the 4 nearest
    # vertices, so a rare point near the 173-valence poles may find a farther face).
    assert np.quantile(np.linalg.norm(closest - splats, axis=1), 0.99) < 1e-5
    return registration


def test_facemesh_face_drives_the_template_face(
    use_templates: Path, tmp_path: Path, networks: ModelSet, astronaut: NDArray[np.uint8]
) -> None:
    options = ReconstructOptions(pipeline="facemesh", texture_size=512, splats=1000, topology="studio")
    document = reconstruct_image(_png(astronaut), "astronaut.png", options, tmp_path, networks=networks)
    registration = _check_outputs(tmp_path, document, face_only=True)
    assert registration["target_landmarks"] == "mediapipe" and registration["landmarks"] == 30
    assert registration["driven_share"] < 0.3  # only the face region followed the face mesh
    assert document["options"]["topology"] == "studio"


def test_flame_head_drives_the_whole_template(
    use_templates: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    networks: ModelSet,
    astronaut: NDArray[np.uint8],
) -> None:
    _files, asset = imported_synthetic_flame(tmp_path.parent)
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(asset))
    options = ReconstructOptions(pipeline="flame", texture_size=512, splats=1000, topology="studio")
    document = reconstruct_image(_png(astronaut), "astronaut.png", options, tmp_path, networks=networks)
    registration = _check_outputs(tmp_path, document, face_only=False)
    assert registration["target_landmarks"] == "flame" and registration["landmarks"] == 40
    assert registration["driven_share"] > 0.5


def test_cli_topology_option(use_templates: Path, tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
    completed = subprocess.run(
        [sys.executable, "-m", "headforge", "reconstruct", str(example), "-o", str(tmp_path),
         "--topology", "studio", "--texture-size", "512", "--splats", "500", "--json"],
        capture_output=True, text=True, timeout=300, check=False, env=os.environ.copy(),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    document = json.loads((tmp_path / "astronaut" / "result.json").read_text())
    assert document["heads"][0]["mesh"]["vertices"] == NUM_VERTICES
    refused = subprocess.run(
        [sys.executable, "-m", "headforge", "reconstruct", str(example), "-o", str(tmp_path / "bare"),
         "--topology", "bare"],
        capture_output=True, text=True, timeout=300, check=False, env=os.environ.copy(),
    )  # fmt: skip
    assert refused.returncode != 0
    assert "template_landmarks_missing" in refused.stderr + refused.stdout
    assert not (tmp_path / "bare" / "astronaut" / "result.json").exists()


@pytest.mark.parametrize(
    ("name", "error"),
    [("bare", TemplateLandmarksMissingError), ("nosuch", TemplateNotFoundError), ("Bad Name!", InputError)],
)
def test_templates_a_pipeline_cannot_use_are_refused(
    use_templates: Path,
    tmp_path: Path,
    networks: ModelSet,
    astronaut: NDArray[np.uint8],
    name: str,
    error: type,
) -> None:
    with pytest.raises(error):
        options = ReconstructOptions(pipeline="facemesh", topology=name)
        reconstruct_image(_png(astronaut), "astronaut.png", options, tmp_path, networks=networks)
    assert not (tmp_path / "result.json").exists()

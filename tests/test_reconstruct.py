"""`headforge reconstruct` end to end on real photos: every artifact of every head is valid.

The astronaut photo always runs; the PASCAL VOC group photos run when ../shared/data is present.
GLBs go through the Khronos validator, PLYs are read back with plyfile, result.json is checked
against its JSON Schema.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trimesh
from gltf_validator import validate_gltf
from needs import missing
from PIL import Image
from plyfile import PlyData
from skimage import data
from typer.testing import CliRunner

from headforge.cli import app
from headforge.models.runtime import ModelSet
from headforge.pipeline.package import SPLAT_PLY_PROPERTIES
from headforge.pipeline.run import PIPELINES, ReconstructOptions, reconstruct_image
from headforge.schemas import result_schema, validate_result

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HEAD_FILES = ("{}.glb", "{}.obj", "{}.mtl", "{}_texture.png", "{}_splats.ply")
FAST = ["--texture-size", "512", "--splats", "2048"]


@pytest.fixture(scope="module")
def onnx_models() -> None:
    """The CLI serves the ONNX model repository; skip when `headforge models pull` has not run (fail
    under HEADFORGE_STRICT_TESTS=1)."""
    from headforge.errors import ModelsMissingError
    from headforge.models.runtime import default_network_paths

    try:
        default_network_paths()
    except ModelsMissingError as error:
        missing(f"model repository not populated: {error.message}")


def jpeg_bytes(rgb: np.ndarray, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=92, **params)
    return buffer.getvalue()


def run_cli(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(app, ["reconstruct", *args, "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def check_image_folder(folder: Path, expect_heads: int | None = None) -> dict[str, Any]:
    """Every file result.json lists exists with its size and hash, every head has every artifact,
    and the splat PLYs have the exact 3DGS layout. Returns the document."""
    import hashlib

    document = json.loads((folder / "result.json").read_text())
    validate_result(document)
    if expect_heads is not None:
        assert len(document["heads"]) == expect_heads
    listed = {artifact["name"]: artifact for artifact in document["artifacts"]}
    for name, artifact in listed.items():
        payload = (folder / name).read_bytes()
        assert len(payload) == artifact["bytes"] and hashlib.sha256(payload).hexdigest() == artifact["sha256"]
    assert "preview.png" in listed
    on_disk = {path.name for path in folder.iterdir()}
    assert on_disk == set(listed) | {"result.json"}  # nothing stale, no temp files
    for head in document["heads"]:
        stem = f"h{head['index']}"
        expected = {pattern.format(stem) for pattern in HEAD_FILES}
        assert set(head["artifacts"].values()) == expected
        assert len(head["landmarks_2d"]) == len(head["landmarks_3d"]) >= 468
        assert head["pose"] is not None and head["mesh"]["faces"] > 0
        x0, y0, x1, y1 = head["box"]
        assert 0 <= x0 < x1 <= document["image"]["width"] and 0 <= y0 < y1 <= document["image"]["height"]
        ply = PlyData.read(str(folder / f"{stem}_splats.ply"))
        assert tuple(p.name for p in ply["vertex"].properties) == SPLAT_PLY_PROPERTIES
        assert ply["vertex"].count == head["splats"] == document["options"]["splats"]
        values = np.column_stack([ply["vertex"][name] for name in SPLAT_PLY_PROPERTIES])
        assert np.isfinite(values).all()
        quats = values[:, 13:17]
        assert np.allclose(np.linalg.norm(quats, axis=1), 1.0, atol=1e-4)
        obj: Any = trimesh.load(folder / f"{stem}.obj", process=False)
        assert len(obj.faces) == head["mesh"]["faces"]
        texture = Image.open(folder / f"{stem}_texture.png")
        assert texture.size == (document["options"]["texture_size"],) * 2 and texture.mode == "RGB"
    return document


def test_cli_astronaut_no_face_and_bad_input(tmp_path: Path, onnx_models: None) -> None:
    astronaut = tmp_path / "astronaut.jpg"
    astronaut.write_bytes(jpeg_bytes(data.astronaut()))
    empty_scene = tmp_path / "sky.png"
    Image.fromarray(np.tile(np.linspace(40, 220, 320, dtype=np.uint8)[:, None, None], (1, 480, 3))).save(
        empty_scene
    )
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(astronaut.read_bytes()[:3000])
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"

    code, summary = run_cli(
        str(astronaut), str(empty_scene), str(broken), str(missing), "-o", str(out), *FAST
    )
    assert code == 1  # some images failed, the others were still processed
    rows = {Path(row["image"]).name: row for row in summary["images"]}
    assert summary["succeeded"] == 2 and summary["failed"] == 2
    assert rows["broken.jpg"]["error"]["code"] == "truncated_image"
    assert rows["missing.png"]["error"]["code"] == "unreadable_file"
    assert rows["sky.png"]["status"] == "succeeded" and rows["sky.png"]["heads"] == 0

    sky = check_image_folder(out / "sky", expect_heads=0)
    assert sky["heads"] == [] and any("no face" in note for note in sky["notes"])

    document = check_image_folder(out / "astronaut", expect_heads=1)
    head = document["heads"][0]
    assert abs(head["pose"]["yaw"]) < 20 and abs(head["pose"]["roll"]) < 20
    assert head["texture_coverage"] > 0.5
    assert document["image"] == {
        "width": 512,
        "height": 512,
        "format": "JPEG",
        "mode": "RGB",
        "exif_orientation": 1,
    }
    for stage in ("decode", "detect_landmarks", "fit", "texture", "splats", "package", "preview", "total"):
        assert document["timings_ms"][stage] >= 0
    names = {model["name"] for model in document["models"]}
    # The networks the detect + landmarks stage ran (the tiled full-range detector and FaceMesh).
    assert {"face_detection_full_range", "face_landmark"} <= names
    assert all(model["sha256"] and len(model["sha256"]) == 64 for model in document["models"])

    (report,) = validate_gltf(out / "astronaut" / "h0.glb")
    assert report["numErrors"] == 0, report["messages"]
    glb: Any = trimesh.load(out / "astronaut" / "h0.glb", force="mesh", process=False)
    assert len(glb.faces) == head["mesh"]["faces"]
    extent = glb.vertices.max(axis=0) - glb.vertices.min(axis=0)
    assert 0.08 < extent[0] < 0.3 and 0.08 < extent[1] < 0.35  # a face in meters, head frame
    preview = Image.open(out / "astronaut" / "preview.png")
    assert preview.height == 512 and preview.width > 512  # photo plus the render panel


def test_table_output_and_option_errors(
    tmp_path: Path, onnx_models: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headforge.cli import main

    photo = tmp_path / "a.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(photo)
    wide = CliRunner(env={"COLUMNS": "250"})  # keep rich from wrapping the table cells
    result = wide.invoke(app, ["reconstruct", str(photo), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0 and "no face found" in result.stdout

    for bad in (["--texture-size", "100"], ["--splats", "-1"], ["--pipeline", "nope"], ["--max-heads", "0"]):
        monkeypatch.setattr(
            sys, "argv", ["headforge", "reconstruct", str(photo), "-o", str(tmp_path / "x"), *bad]
        )
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == 2
    assert not (tmp_path / "x").exists()


def test_progress_bar_on_a_terminal_and_summary_table(tmp_path: Path, onnx_models: None) -> None:
    """Several images without --json: a progress bar on stderr while they run, when stderr is a
    terminal (rich draws it, then erases it), and a summary table on stdout at the end. Piped or
    logged output gets the table only."""
    astronaut = tmp_path / "astronaut.jpg"
    astronaut.write_bytes(jpeg_bytes(data.astronaut()))
    sky = tmp_path / "sky.png"
    Image.fromarray(np.tile(np.linspace(40, 220, 96, dtype=np.uint8)[:, None, None], (1, 128, 3))).save(sky)
    args = ["reconstruct", str(astronaut), str(sky), "-o", str(tmp_path / "out"), *FAST]

    # rich decides from the stream; TTY_COMPATIBLE=1 tells it the stream is a terminal.
    terminal = CliRunner(env={"COLUMNS": "250", "TTY_COMPATIBLE": "1", "FORCE_COLOR": None})
    result = terminal.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # The bar: drawn at 0 of 2 when it starts, and its last frame (drawn before it is erased) shows
    # both images done and the last image's last stage.
    assert "0/2" in result.stderr and "2/2" in result.stderr
    assert "sky.png: done" in result.stderr
    assert "\x1b[" in result.stderr  # cursor control: the bar redraws in place, then disappears
    _check_summary_table(result.stdout, tmp_path / "out")

    piped = CliRunner(env={"COLUMNS": "250", "TTY_COMPATIBLE": None, "FORCE_COLOR": None})
    result = piped.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no bar (and no escape codes) in a pipe or a log file
    _check_summary_table(result.stdout, tmp_path / "out")

    # One image: no bar even on a terminal, still the table.
    result = terminal.invoke(app, [args[0], *args[2:]], catch_exceptions=False)
    assert result.exit_code == 0 and result.stderr == ""
    assert "headforge reconstruct" in result.stdout and "sky.png" in result.stdout


def _check_summary_table(stdout: str, out: Path) -> None:
    """The rich table: title, one row per image with status, head count and output folder."""
    assert "headforge reconstruct" in stdout
    lines = re.sub(r"\x1b\[[0-9;]*m", "", stdout).splitlines()  # colors, on a terminal
    header = next(line for line in lines if "image" in line and "status" in line)
    assert all(column in header for column in ("heads", "ms", "output / error"))
    astronaut_row = next(line for line in lines if "astronaut.jpg" in line)
    sky_row = next(line for line in lines if "sky.png" in line)
    assert " ok " in astronaut_row and " 1 " in astronaut_row and str(out / "astronaut") in astronaut_row
    assert " ok " in sky_row and " 0 " in sky_row and "(no face found)" in sky_row


def test_api_orientation_outputs_and_determinism(tmp_path: Path, networks: ModelSet) -> None:
    rgb = data.astronaut()
    rotated = np.ascontiguousarray(np.rot90(rgb, k=1))  # stored sideways, tag 6 turns it upright
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = jpeg_bytes(rotated, exif=exif.tobytes())
    options = ReconstructOptions(texture_size=512, splats=1024, seed=7)
    folder = tmp_path / "photo"
    stages: list[tuple[str, float]] = []
    document = reconstruct_image(
        payload,
        "photo.jpg",
        options,
        folder,
        lambda stage, done: stages.append((stage, done)),
        networks=networks,
    )
    assert document == json.loads((folder / "result.json").read_text())
    assert document["image"]["exif_orientation"] == 6
    assert (document["image"]["width"], document["image"]["height"]) == (512, 512)
    assert len(document["heads"]) == 1
    fractions = [done for _, done in stages]
    assert fractions == sorted(fractions) and stages[-1] == ("done", 1.0)
    first = {a["name"]: a["sha256"] for a in document["artifacts"]}

    again = reconstruct_image(payload, "photo.jpg", options, folder, networks=networks)
    second = {a["name"]: a["sha256"] for a in again["artifacts"]}
    assert second["h0_splats.ply"] == first["h0_splats.ply"]  # same seed, same splats
    assert second["h0_texture.png"] == first["h0_texture.png"]

    reseeded = ReconstructOptions(texture_size=512, splats=1024, seed=8, outputs=frozenset({"splats"}))
    third = reconstruct_image(payload, "photo.jpg", reseeded, folder, networks=networks)
    assert {a["name"] for a in third["artifacts"]} == {"h0_splats.ply"}
    assert third["artifacts"][0]["sha256"] != first["h0_splats.ply"]
    # Artifacts of the earlier runs that this run did not ask for are gone.
    assert sorted(p.name for p in folder.iterdir()) == ["h0_splats.ply", "result.json"]
    validate_result(third)


def test_options_validation() -> None:
    from headforge.errors import InvalidOptionError, UnknownPipelineError

    assert "facemesh" in PIPELINES
    ReconstructOptions().validate()
    for bad in (
        {"texture_size": 511},
        {"texture_size": 4097},
        {"splats": -1},
        {"max_heads": 0},
        {"seed": -1},
        {"outputs": frozenset({"fbx"})},
        {"texture_size": True},
    ):
        with pytest.raises(InvalidOptionError):
            ReconstructOptions(**bad).validate()  # type: ignore[arg-type]
    with pytest.raises(UnknownPipelineError):
        ReconstructOptions(pipeline="nope").validate()
    parsed = ReconstructOptions.from_dict({"texture_size": 2048, "outputs": "glb, splats"})
    assert parsed.texture_size == 2048 and parsed.outputs == {"glb", "splats"}
    with pytest.raises(InvalidOptionError):
        ReconstructOptions.from_dict({"colour": "red"})


def test_schema_is_valid_json_schema() -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(result_schema())


# The issue asks `headforge reconstruct` to detect and mesh at least 41 of the 43 labelled faces in
# voc-faces (IoU >= 0.3); docs/detection.md measures 43 of 43 with no false positive. So the CLI may
# lose at most two faces to a change elsewhere (a threshold, the ROI, the runner's head filtering)
# before this fails; the false-positive cap matches tests/test_detect.py and tests/test_landmarks.py.
VOC_MIN_MESHED = 41
VOC_MAX_FALSE_POSITIVES = 2


def test_group_photos(tmp_path: Path, onnx_models: None) -> None:
    from headforge.benchmarks.landmarks import match_labelled_boxes, read_voc_boxes

    folder = SHARED_DATA / "voc-faces"
    if not folder.is_dir():
        pytest.skip(f"shared test data not present: {folder}")
    labels = read_voc_boxes(folder)
    assert sum(len(boxes) for boxes in labels.values()) == 43
    photos = sorted(folder / name for name in labels)  # bald_guys.jpg has no labels
    out = tmp_path / "out"
    code, summary = run_cli(*map(str, photos), "-o", str(out), "--texture-size", "512", "--splats", "1024")
    assert code == 0 and summary["failed"] == 0
    glbs: list[Path] = []
    meshed = false_positives = 0
    for photo in photos:
        document = check_image_folder(out / photo.stem)
        boxes = np.array([head["box"] for head in document["heads"]], np.float32).reshape(-1, 4)
        hits, extra = match_labelled_boxes(labels[photo.name], boxes)
        meshed += hits
        false_positives += extra
        glbs.extend(out / photo.stem / f"h{head['index']}.glb" for head in document["heads"])
    print(f"reconstruct on voc-faces: {meshed} of 43 labelled faces, {false_positives} false positives")
    assert meshed >= VOC_MIN_MESHED
    assert false_positives <= VOC_MAX_FALSE_POSITIVES
    reports = validate_gltf(*glbs)
    assert len(reports) == len(glbs)
    assert all(report["numErrors"] == 0 for report in reports), [r for r in reports if r["numErrors"]]


def test_tiny_and_faceless_images_succeed_without_heads(tmp_path: Path, networks: ModelSet) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (90, 90, 90)).save(buffer, "PNG")
    document = reconstruct_image(
        buffer.getvalue(), "dot.png", ReconstructOptions(), tmp_path / "dot", networks=networks
    )
    assert document["heads"] == [] and document["notes"]
    validate_result(document)
    assert sorted(p.name for p in (tmp_path / "dot").iterdir()) == ["preview.png", "result.json"]

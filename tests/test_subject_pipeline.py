"""Subject jobs end to end on real photos of one person (../shared/data/subjects) with the synthetic
FLAME asset: one identity shared by the views, result.json's `subject` section against the schema,
and the bad inputs (a photo without a face, a photo with several faces, more than 8 photos)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from needs import shared_data
from PIL import Image

from headforge.errors import TooManySubjectPhotosError
from headforge.models.runtime import ModelSet
from headforge.pipeline.run import ReconstructOptions, reconstruct_capture
from headforge.schemas import validate_result

FAST: dict[str, Any] = {"texture_size": 512, "splats": 300, "outputs": "glb,splats"}


def _photos(*names: str) -> list[tuple[str, bytes]]:
    folder = shared_data("subjects", "obama")
    return [(name, (folder / name).read_bytes()) for name in names]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def flame_asset(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    asset = imported_synthetic_flame(tmp_path_factory.getbasetemp())[1]
    monkeypatch.setenv("HEADFORGE_FLAME_ASSET", str(asset))
    return asset


def test_flame_subject_shares_one_identity(flame_asset: Path, networks: ModelSet, tmp_path: Path) -> None:
    photos = _photos("obama.jpg", "obama1.jpg", "obama2.jpg")
    options = ReconstructOptions(pipeline="flame", subject=True, **FAST)
    document = reconstruct_capture(photos, options, tmp_path, networks=networks)
    validate_result(document)
    subject = document["subject"]
    assert subject["used_views"] == [0, 1, 2]
    assert [view["status"] for view in subject["views"]] == ["used"] * 3
    assert [view["filename"] for view in subject["views"]] == ["obama.jpg", "obama1.jpg", "obama2.jpg"]
    identity = subject["identity"]
    assert identity["model"] == "flame" and identity["views"] == [0, 1, 2] and len(identity["shape"]) == 100
    residuals = [view["fit_residual_px"] for view in subject["views"]]
    assert identity["fit_residual_px"] == pytest.approx(np.mean(residuals), abs=1e-3)
    heads = document["heads"]
    assert [(head["view"], head["index"]) for head in heads] == [(0, 0), (1, 0), (2, 0)]
    for head, view in zip(heads, subject["views"], strict=True):
        np.testing.assert_allclose(head["params"]["shape"], identity["shape"], atol=1e-5)
        assert view["pose"] == {angle: head["pose"][angle] for angle in ("yaw", "pitch", "roll")}
        assert view["fit_residual_px"] == pytest.approx(head["params"]["fit_residual_px"], abs=1e-4)
    assert len({tuple(head["params"]["expression"]) for head in heads}) == 3  # each view its own
    names = {path.name for path in tmp_path.iterdir()}
    assert {f"v{view}_h0{suffix}" for view in range(3) for suffix in (".glb", "_splats.ply")} <= names

    # The photos fitted alone disagree on the identity; the subject's is one of neither.
    alone = reconstruct_capture(
        photos[:1], ReconstructOptions(pipeline="flame", **FAST), tmp_path / "alone", networks=networks
    )
    assert "subject" not in alone and alone["heads"][0]["params"]["shape"] != identity["shape"]

    # The schema holds the section to its shape.
    from headforge.schemas.models import generate_result_schema

    schema = generate_result_schema()
    for change in (
        lambda d: d["subject"]["identity"].update(shape=d["subject"]["identity"]["shape"][:10]),
        lambda d: d["subject"]["views"][0].update(status="fused?"),
        lambda d: d["subject"].pop("used_views"),
    ):
        broken = {**document, "subject": _deep_copy(document["subject"])}
        change(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def _deep_copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def test_photo_without_a_face_is_named_and_the_rest_fused(
    flame_asset: Path, networks: ModelSet, tmp_path: Path
) -> None:
    ramp = np.tile(np.linspace(0, 255, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    photos = [*_photos("obama.jpg"), ("wall.png", _png(Image.fromarray(ramp))), *_photos("obama1.jpg")]
    document = reconstruct_capture(
        photos, ReconstructOptions(pipeline="flame", subject=True, **FAST), tmp_path, networks=networks
    )
    validate_result(document)
    subject = document["subject"]
    assert [view["status"] for view in subject["views"]] == ["used", "no_face", "used"]
    assert subject["views"][1] == {
        "view": 1,
        "filename": "wall.png",
        "faces_found": 0,
        "status": "no_face",
        "head": None,
        "pose": None,
        "fit_residual_px": None,
    }
    assert subject["used_views"] == [0, 2] and subject["identity"]["views"] == [0, 2]
    assert any("view 1 (wall.png): no face found" in note for note in document["notes"])
    assert [head["view"] for head in document["heads"]] == [0, 2]
    assert not any(path.name.startswith("v1_") for path in tmp_path.iterdir())


def test_photo_with_several_faces_uses_the_largest(networks: ModelSet, tmp_path: Path) -> None:
    """A photo holding the subject twice, at full and at half size: the full-size face is the subject."""
    (_, data), second = _photos("obama.jpg", "obama1.jpg")
    with Image.open(io.BytesIO(data)) as opened:
        photo = opened.convert("RGB")
    width, height = photo.size
    canvas = Image.new("RGB", (width + width // 2, height), (128, 128, 128))
    canvas.paste(photo, (0, 0))
    canvas.paste(photo.resize((width // 2, height // 2)), (width, height // 4))
    photos = [("two.png", _png(canvas)), second]
    options = ReconstructOptions(subject=True, **FAST)
    document = reconstruct_capture(photos, options, tmp_path, networks=networks)
    validate_result(document)
    view = document["subject"]["views"][0]
    assert view["faces_found"] == 2 and view["status"] == "used"
    assert document["subject"]["identity"] is None  # facemesh fits no identity
    (head,) = [head for head in document["heads"] if head["view"] == 0]
    x0, _, x1, _ = head["box"]
    assert x1 <= width + 5 and (x1 - x0) > width / 8  # the full-size face, left of the paste line
    assert any("view 0 (two.png): 2 faces found; the largest is the subject" in n for n in document["notes"])


def _tiny_pngs(count: int) -> list[tuple[str, bytes]]:
    return [(f"p{index}.png", _png(Image.new("RGB", (32, 32), (index, 0, 0)))) for index in range(count)]


def test_more_than_eight_photos_is_413(tmp_path: Path) -> None:
    with pytest.raises(TooManySubjectPhotosError) as refused:
        reconstruct_capture(_tiny_pngs(9), ReconstructOptions(subject=True), tmp_path / "out")
    assert refused.value.http_status == 413 and refused.value.code == "too_many_subject_photos"
    assert refused.value.details == {"files": 9, "max_files": 8}
    assert not (tmp_path / "out").exists()


def test_more_than_eight_photos_from_the_cli(tmp_path: Path) -> None:
    paths = []
    for name, data in _tiny_pngs(9):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    completed = subprocess.run(
        [sys.executable, "-m", "headforge", "reconstruct", *paths, "--subject", "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode != 0
    assert "too_many_subject_photos" in completed.stdout + completed.stderr

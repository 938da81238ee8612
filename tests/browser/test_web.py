"""The web app at `/`, driven in headless Chromium against a real `headforge serve` with API keys.

One reconstruction of scikit-image's astronaut photo is shared by the first tests; each checks one
thing the page must do with it. The others upload things that must fail and check what the page
says. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.service]

Drive = Callable[..., dict[str, Any]]

# Share of the viewer's pixels that must differ from the background. A head that fills a useful part
# of the view covers far more; an empty or failed render covers none.
MIN_DRAWN_FRACTION = 0.03


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def astronaut_png(astronaut: NDArray[np.uint8], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    return path


@pytest.fixture
def not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / "not-a-photo.png"
    path.write_text("this is a text file with a .png name\n")
    return path


@pytest.fixture(scope="session")
def run(server: str, astronaut_png: Path, api_keys: dict[str, str], drive: Drive) -> dict[str, Any]:
    """Enter the key, upload the astronaut, wait for the job, then measure everything on screen."""
    report = drive("reconstruct", server, astronaut_png, apiKey=api_keys["main"])
    status = report.get("status") or {}
    assert status.get("state") == "succeeded", (
        f"job did not succeed in the page: {status} / {report.get('errorText')}"
    )
    return report


@pytest.fixture(scope="session")
def job(server: str, run: dict[str, Any], api_keys: dict[str, str]) -> dict[str, Any]:
    """The same job, as the API reports it."""
    assert run.get("jobId"), "the page does not expose the job id it submitted"
    response = httpx.get(f"{server}v1/jobs/{run['jobId']}", headers=auth(api_keys["main"]), timeout=30)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    assert document["status"] == "succeeded"
    return document


def _drawn(measure: dict[str, Any]) -> float:
    return float(measure["differing"]) / float(measure["width"] * measure["height"])


def ply_vertex_count(data: bytes) -> int:
    """The `element vertex N` count from a PLY file's header."""
    header = data[: data.index(b"end_header")].decode("ascii")
    return next(int(line.split()[2]) for line in header.splitlines() if line.startswith("element vertex"))


def test_page_shows_progress_and_success(run: dict[str, Any], job: dict[str, Any]) -> None:
    assert run["pageErrors"] == [], run["pageErrors"]
    assert run["stages"], "no per-stage progress was shown"
    assert set(job["progress"]) - {"overall"} <= set(run["stages"]), (job["progress"], run["stages"])
    heads = len(job["result"]["heads"])
    assert heads >= 1
    assert f"{heads} head" in run["status"]["text"]


def test_api_key_lives_in_session_storage_only(run: dict[str, Any], api_keys: dict[str, str]) -> None:
    storage = run["keyStorage"]
    assert storage["session"] == api_keys["main"]
    assert storage["localKeys"] == [] and storage["cookies"] == "", storage


def test_viewer_draws_textured_mesh(run: dict[str, Any]) -> None:
    assert run["meshViewer"]["state"] == "ready", run["meshViewer"]
    mesh = run["mesh"]
    assert _drawn(mesh) > MIN_DRAWN_FRACTION, mesh
    # A textured face has many colours; an untextured or flat-shaded blob has few.
    assert mesh["distinctColors"] > 200, mesh


def test_viewer_draws_splats(
    server: str, run: dict[str, Any], job: dict[str, Any], api_keys: dict[str, str]
) -> None:
    assert run["splatsViewer"]["state"] == "ready", run["splatsViewer"]
    assert _drawn(run["splats"]) > MIN_DRAWN_FRACTION, run["splats"]
    assert run["splats"]["distinctColors"] > 200, run["splats"]
    # Still drawn after orbiting with the mouse (sorting and projection from another angle).
    assert _drawn(run["splatsOrbited"]) > MIN_DRAWN_FRACTION, run["splatsOrbited"]
    # The viewer says how many splats it drew: the PLY's vertex count.
    ply = next(a for a in job["artifacts"] if a["name"].endswith("_splats.ply"))
    data = httpx.get(urljoin(server, ply["url"]), headers=auth(api_keys["main"]), timeout=30).content
    count = ply_vertex_count(data)
    assert f"{count:,} splats" in run["splatsViewer"]["text"], (count, run["splatsViewer"]["text"])


def test_landmarks_overlay_on_photo(run: dict[str, Any], job: dict[str, Any]) -> None:
    result = job["result"]
    expected = sum(len(head["landmarks_2d"]) for head in result["heads"])
    overlay = run["overlay"]
    assert overlay["points"] == expected > 0, (overlay, expected)
    assert (overlay["width"], overlay["height"]) == (result["image"]["width"], result["image"]["height"])
    assert overlay["painted"] > expected, overlay  # dots and box outlines actually reached the canvas


def test_every_artifact_downloads(run: dict[str, Any], job: dict[str, Any]) -> None:
    expected = {a["name"]: a for a in job["artifacts"]}
    links = {d["name"]: d for d in run["downloads"]}
    assert set(links) == set(expected), (sorted(links), sorted(expected))
    for i in range(len(job["result"]["heads"])):
        assert {f"h{i}.glb", f"h{i}_splats.ply"} <= set(expected), sorted(expected)
    for name, link in links.items():
        artifact = expected[name]
        assert link["failure"] is None, link
        assert link["suggested"] == name
        assert link["httpStatus"] == 200, link
        # The files need the key, so the page must have sent it (a plain link cannot).
        assert link["httpStatusWithoutKey"] == 401, link
        assert link["downloadedBytes"] == link["httpBytes"] == artifact["size"] > 0, (link, artifact)
        assert link["downloadedSha256"] == artifact["sha256"], (link, artifact)


def test_controls_are_labelled_and_fit_a_laptop(run: dict[str, Any]) -> None:
    assert run["unlabeled"] == [], run["unlabeled"]
    assert run["overflowLaptop"] <= 0


def test_results_fit_a_phone(run: dict[str, Any]) -> None:
    assert run["overflowPhone"] <= 0
    phone = run["meshPhone"]
    assert phone["width"] < 400  # the viewer followed the narrower layout
    assert _drawn(phone) > MIN_DRAWN_FRACTION, phone


def test_several_photos_in_one_job(
    server: str, astronaut_png: Path, api_keys: dict[str, str], drive: Drive, tmp_path: Path
) -> None:
    # The astronaut and her mirror image, as one job: one tab per photo, each with its own head.
    mirrored = tmp_path / "mirrored.png"
    Image.open(astronaut_png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    report = drive("multi", server, [astronaut_png, mirrored], apiKey=api_keys["main"])
    assert report["status"]["state"] == "succeeded", report["status"]
    assert report["pageErrors"] == [], report["pageErrors"]
    job = httpx.get(
        f"{server}v1/jobs/{report['status']['jobId']}", headers=auth(api_keys["main"]), timeout=30
    ).json()
    documents = job["result"]["images"]
    assert len(report["photos"]) == len(documents) == 2
    for i, (photo, document) in enumerate(zip(report["photos"], documents, strict=True)):
        assert photo["pressed"] == ["true" if j == i else "false" for j in range(2)]
        assert photo["points"] == sum(len(h["landmarks_2d"]) for h in document["heads"]) > 0
        assert photo["viewer"]["state"] == "ready"
        assert _drawn(photo["canvas"]) > MIN_DRAWN_FRACTION, photo["canvas"]
    # Both heads were shown (the second photo's head is mirrored, so the renders differ).
    assert report["photos"][0]["canvas"] != report["photos"][1]["canvas"]
    assert report["photos"][0]["photoSrc"] != report["photos"][1]["photoSrc"]
    # Files of photo i are listed as "i/..." and save without the slash.
    names = {link["name"]: link["download"] for link in report["links"]}
    assert set(names) == {a["name"] for a in job["artifacts"]}
    assert {"0/h0.glb", "1/h0.glb", "0/h0_splats.ply", "1/h0_splats.ply"} <= set(names)
    assert names["1/h0.glb"] == "1-h0.glb"


# What the options scenario picks in the form; each differs from the form's and the API's default.
CHOSEN = {"textureSize": 512, "splats": 1000, "maxHeads": 1}


@pytest.fixture(scope="session")
def two_faces(astronaut_png: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The astronaut beside her mirror image, in one photo: two faces."""
    photo = Image.open(astronaut_png).convert("RGB")
    pair = Image.new("RGB", (photo.width * 2, photo.height))
    pair.paste(photo, (0, 0))
    pair.paste(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (photo.width, 0))
    path = tmp_path_factory.mktemp("photos") / "two-faces.png"
    pair.save(path)
    return path


@pytest.fixture(scope="session")
def options_run(server: str, two_faces: Path, api_keys: dict[str, str], drive: Drive) -> dict[str, Any]:
    """Pick CHOSEN in the form, submit the two-face photo, wait for the job (drive.mjs `options`)."""
    report = drive("options", server, two_faces, apiKey=api_keys["main"], options=CHOSEN)
    assert report["pageErrors"] == [], report["pageErrors"]
    assert report["status"]["state"] == "succeeded", report["status"]
    return report


def test_chosen_options_reach_the_job(
    server: str, options_run: dict[str, Any], two_faces: Path, api_keys: dict[str, str]
) -> None:
    assert options_run["form"] == {key: str(value) for key, value in CHOSEN.items()}
    job = httpx.get(
        f"{server}v1/jobs/{options_run['status']['jobId']}", headers=auth(api_keys["main"]), timeout=30
    ).json()
    assert job["status"] == "succeeded"
    options = job["options"]
    assert (options["pipeline"], options["texture_size"], options["splats"], options["max_heads"]) == (
        "facemesh",
        CHOSEN["textureSize"],
        CHOSEN["splats"],
        CHOSEN["maxHeads"],
    ), options

    # The options took effect: one head of the two, a 512² texture, 1000 splats in the PLY (and in
    # what the viewer says it drew).
    assert len(job["result"]["heads"]) == CHOSEN["maxHeads"]
    files = {a["name"]: a for a in job["artifacts"]}

    def fetch(name: str) -> bytes:
        response = httpx.get(urljoin(server, files[name]["url"]), headers=auth(api_keys["main"]), timeout=30)
        assert response.status_code == 200, response.text
        return response.content

    assert ply_vertex_count(fetch("h0_splats.ply")) == CHOSEN["splats"]
    assert "h1_splats.ply" not in files
    with Image.open(io.BytesIO(fetch("h0_texture.png"))) as texture:
        assert texture.size == (CHOSEN["textureSize"], CHOSEN["textureSize"])
    assert f"{CHOSEN['splats']:,} splats" in options_run["splatsViewer"]["text"], options_run["splatsViewer"]

    # Without max_heads the same photo gives two heads, so the limit is what dropped one.
    with two_faces.open("rb") as handle:
        response = httpx.post(
            f"{server}v1/jobs",
            params={"wait": 60},
            files={"images": (two_faces.name, handle, "image/png")},
            data={"splats": "0", "texture_size": "512"},
            headers=auth(api_keys["main"]),
            timeout=90,
        )
    assert response.status_code in (200, 201, 202), response.text
    control = response.json()
    assert control["status"] == "succeeded", control
    assert len(control["result"]["heads"]) == 2


def test_unavailable_pipeline_is_disabled(
    server: str, options_run: dict[str, Any], api_keys: dict[str, str]
) -> None:
    # The test server has no FLAME asset (conftest points HEADFORGE_FLAME_ASSET at a missing file).
    models = httpx.get(f"{server}v1/models", headers=auth(api_keys["main"]), timeout=30).json()
    listed = {p["name"]: p for p in models["pipelines"]}
    assert listed["flame"]["available"] is False and listed["facemesh"]["available"] is True

    shown = {o["value"]: o for o in options_run["pipeline"]["options"]}
    assert set(shown) == set(listed)
    flame = shown["flame"]
    assert flame["disabled"] is True
    assert flame["text"] == "flame (unavailable)"
    assert flame["title"] == listed["flame"]["reason"]
    assert shown["facemesh"] == {"value": "facemesh", "text": "facemesh", "disabled": False, "title": ""}
    assert options_run["pipeline"]["value"] == "facemesh"
    assert options_run["pipeline"]["note"] == listed["facemesh"]["description"]


def test_pipeline_list_reloads_without_piling_up_listeners(options_run: dict[str, Any]) -> None:
    # The key was saved twice, so the page loaded GET /v1/models twice with it; the <select> still
    # has one `change` listener.
    assert options_run["pipelineChangeListeners"] == 1


def test_invalid_upload_shows_the_api_error(
    server: str, not_an_image: Path, api_keys: dict[str, str], drive: Drive
) -> None:
    # What the API itself answers for this file.
    with not_an_image.open("rb") as handle:
        response = httpx.post(
            f"{server}v1/jobs",
            files={"images": (not_an_image.name, handle, "image/png")},
            headers=auth(api_keys["main"]),
            timeout=30,
        )
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]

    report = drive("upload-error", server, not_an_image, name="not-an-image", apiKey=api_keys["main"])
    assert report["pageErrors"] == [], report["pageErrors"]
    assert report["errorRole"] == "alert"
    assert report["errorCode"] == error["code"]
    assert error["message"] in report["errorText"], (error, report["errorText"])
    # Phone-sized layout: nothing wider than the screen, and every control labelled.
    assert report["overflowPhone"] <= 0
    assert report["unlabeled"] == [], report["unlabeled"]


def test_photo_without_a_face_says_so(
    server: str, tmp_path: Path, api_keys: dict[str, str], drive: Drive
) -> None:
    # A plain sky-blue picture: a valid image in which the detector finds no face.
    blank = tmp_path / "sky.png"
    Image.new("RGB", (320, 240), (120, 170, 220)).save(blank)
    report = drive("upload-error", server, blank, name="no-face", apiKey=api_keys["main"])
    assert report["pageErrors"] == [], report["pageErrors"]
    assert report["errorCode"] == "no_face", report
    assert "no face" in report["status"].lower(), report["status"]
    # The note shown is the one the pipeline wrote into result.json.
    job = httpx.get(f"{server}v1/jobs/{report['jobId']}", headers=auth(api_keys["main"]), timeout=30).json()
    assert job["status"] == "succeeded" and job["result"]["heads"] == []
    assert job["result"]["notes"][0] in report["errorText"], (job["result"]["notes"], report["errorText"])


def test_missing_api_key_is_explained(server: str, astronaut_png: Path, drive: Drive) -> None:
    report = drive("upload-error", server, astronaut_png, name="no-key")
    assert report["errorCode"] == "unauthorized", report
    assert "API key" in report["errorText"]


def test_rate_limit_shows_when_to_retry(
    server: str, not_an_image: Path, api_keys: dict[str, str], drive: Drive
) -> None:
    # The `limited` key may submit once a minute: the first upload is refused as not an image, the
    # second one by the rate limit, and the page says how long to wait.
    report = drive(
        "upload-error", server, not_an_image, name="rate-limited", apiKey=api_keys["limited"], submits=2
    )
    assert report["errors"] == [report["errors"][0], "rate_limited"], report["errors"]
    assert report["errors"][0] != "rate_limited"
    assert "Try again in" in report["errorText"], report["errorText"]


def _glb_geometry(data: bytes) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Positions (V, 3), triangles (F, 3) and morph target POSITION deltas of a one-primitive GLB."""
    import json
    import struct

    json_length = struct.unpack_from("<I", data, 12)[0]
    tree = json.loads(data[20 : 20 + json_length])
    offset = 20 + json_length
    binary = data[offset + 8 : offset + 8 + struct.unpack_from("<I", data, offset)[0]]
    types = {5126: "<f4", 5125: "<u4", 5123: "<u2"}
    widths = {"VEC3": 3, "SCALAR": 1}

    def accessor(index: int) -> np.ndarray:
        item = tree["accessors"][index]
        view = tree["bufferViews"][item["bufferView"]]
        start = view.get("byteOffset", 0) + item.get("byteOffset", 0)
        width = widths[item["type"]]
        return np.frombuffer(binary, types[item["componentType"]], item["count"] * width, start).reshape(
            -1, width
        )

    (primitive,) = tree["meshes"][0]["primitives"]
    positions = accessor(primitive["attributes"]["POSITION"]).astype(np.float32)
    faces = accessor(primitive["indices"]).reshape(-1, 3).astype(np.int64)
    return positions, faces, [accessor(target["POSITION"]) for target in primitive["targets"]]


def test_viewer_plays_expressions_on_mesh_and_splats(
    flame_server: str, astronaut_png: Path, api_keys: dict[str, str], drive: Drive
) -> None:
    from plyfile import PlyData

    from headforge.pipeline.rig import SplatDeformer, read_binding

    report = drive("animate", flame_server, astronaut_png, apiKey=api_keys["main"], times=[0, 1.6])
    assert report["status"]["state"] == "succeeded", report["status"]
    assert report["pageErrors"] == [], report["pageErrors"]
    assert report["playVisible"] and report["animatedSplats"] == "bound", report
    playing = report["playing"]
    assert playing["state"] == "playing" and playing["pressed"] == "true", playing
    assert playing["times"][0] < playing["times"][1] < playing["times"][2], playing  # the clock ran
    frames = report["frames"]
    for mode in ("mesh", "splats"):
        still, moved = frames[f"{mode}@0"], frames[f"{mode}@1.6"]
        for frame in (still, moved):
            assert _drawn(frame["canvas"]) > MIN_DRAWN_FRACTION, (mode, frame["canvas"])
            assert frame["canvas"]["distinctColors"] > 200, (mode, frame["canvas"])
        assert still["pixelHash"] != moved["pixelHash"], mode  # the picture changed with the expression
        assert max(abs(w) for w in moved["sample"]["weights"]) > 0.5 and not any(still["sample"]["weights"])

    # What the page posed is what rig.py computes from the GLB's morph targets and the binding file.
    job = httpx.get(
        f"{flame_server}v1/jobs/{report['jobId']}", headers=auth(api_keys["main"]), timeout=30
    ).json()
    files = {a["name"]: a["url"] for a in job["artifacts"]}

    def fetch(name: str) -> bytes:
        response = httpx.get(urljoin(flame_server, files[name]), headers=auth(api_keys["main"]), timeout=30)
        assert response.status_code == 200, response.text
        return response.content

    positions, faces, deltas = _glb_geometry(fetch("h0.glb"))
    binding, _, _ = read_binding(fetch("h0_splats_binding.npz"))
    deformer = SplatDeformer(binding, faces)  # the GLB keeps the binding's triangles, in order
    rest = PlyData.read(io.BytesIO(fetch("h0_splats.ply")))["vertex"]
    rest_centres = np.stack([rest[axis] for axis in "xyz"], axis=1)
    for t in ("0", "1.6"):
        sample = frames[f"splats@{t}"]["sample"]
        weights = np.asarray(sample["weights"], np.float32)
        assert sample["names"][-1] == "jaw_open" and len(weights) == len(deltas) == 17
        morphed = positions + np.einsum("k,kvc->vc", weights, np.stack(deltas))
        expected = deformer.pose(morphed).means[:64]
        centres = np.asarray(sample["centers"], np.float64).reshape(-1, 3)
        np.testing.assert_allclose(centres, expected, atol=2e-5)
        # Spark holds centres as float16: within its rounding of what was posed.
        np.testing.assert_allclose(np.asarray(sample["storedCenters"]).reshape(-1, 3), centres, atol=2e-4)
        if t == "0":  # at rest the bound splats are the PLY's own
            np.testing.assert_allclose(centres, rest_centres[:64], atol=2e-5)
    still = np.asarray(frames["splats@0"]["sample"]["centers"]).reshape(-1, 3)
    moved = np.asarray(frames["splats@1.6"]["sample"]["centers"]).reshape(-1, 3)
    assert np.linalg.norm(moved - still, axis=1).max() > 1e-3  # splats moved by millimetres

"""The web app at `/`, driven in headless Chromium against a real `headforge serve`.

One reconstruction of scikit-image's astronaut photo is shared by the tests below; each test checks
one thing the page must do with it. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

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

# The viewer canvas is about 800×600 CSS pixels on the 1366-wide page; a head that fills a useful part
# of it covers far more than this many pixels, an empty or failed render covers none.
MIN_DRAWN_FRACTION = 0.03


@pytest.fixture(scope="session")
def astronaut_png(astronaut: NDArray[np.uint8], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    return path


@pytest.fixture(scope="session")
def run(server: str, astronaut_png: Path, drive: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Upload the astronaut in the page, wait for the job, then measure everything on screen."""
    report = drive("reconstruct", server, astronaut_png)
    status = report.get("status") or {}
    assert status.get("state") == "succeeded", (
        f"job did not succeed in the page: {status} / {report.get('errorText')}"
    )
    return report


@pytest.fixture(scope="session")
def job(server: str, run: dict[str, Any]) -> dict[str, Any]:
    """The same job, as the API reports it."""
    assert run.get("jobId"), "the page does not expose the job id it submitted"
    response = httpx.get(f"{server}v1/jobs/{run['jobId']}", timeout=30)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    assert document["status"] == "succeeded"
    return document


def test_page_shows_progress_and_success(run: dict[str, Any], job: dict[str, Any]) -> None:
    assert run["pageErrors"] == [], run["pageErrors"]
    # The stages the API reported were shown.
    assert set(job["progress"]) - {"overall"} <= set(run["stages"]), (job["progress"], run["stages"])
    assert run["stages"], "no per-stage progress was shown"
    heads = len(job["result"]["heads"])
    assert heads >= 1
    assert f"{heads} head" in run["status"]["text"]


def _drawn(measure: dict[str, Any]) -> float:
    return float(measure["differing"]) / float(measure["width"] * measure["height"])


def test_viewer_draws_textured_mesh(run: dict[str, Any]) -> None:
    assert run["meshViewer"]["state"] == "ready", run["meshViewer"]
    mesh = run["mesh"]
    assert _drawn(mesh) > MIN_DRAWN_FRACTION, mesh
    # A textured face has many colours; an untextured or flat-shaded blob has few.
    assert mesh["distinctColors"] > 200, mesh


def test_viewer_draws_splats(server: str, run: dict[str, Any], job: dict[str, Any]) -> None:
    assert run["splatsViewer"]["state"] == "ready", run["splatsViewer"]
    assert _drawn(run["splats"]) > MIN_DRAWN_FRACTION, run["splats"]
    assert run["splats"]["distinctColors"] > 200, run["splats"]
    # Still drawn after orbiting with the mouse (sorting and projection from another angle).
    assert _drawn(run["splatsOrbited"]) > MIN_DRAWN_FRACTION, run["splatsOrbited"]
    # The viewer says how many splats it drew; that is the PLY's vertex count.
    ply = next(a for a in job["artifacts"] if a["name"].endswith("_splats.ply"))
    data = httpx.get(urljoin(server, ply["url"]), timeout=30).content
    header = data[: data.index(b"end_header")].decode("ascii")
    count = next(int(line.split()[2]) for line in header.splitlines() if line.startswith("element vertex"))
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
    names = set(expected)
    heads = job["result"]["heads"]
    for i in range(len(heads)):
        assert {f"h{i}.glb", f"h{i}_splats.ply"} <= names, names
    for name, link in links.items():
        artifact = expected[name]
        assert link["failure"] is None, link
        assert link["suggested"] == name
        assert link["httpStatus"] == 200, link
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


def test_invalid_upload_shows_the_api_error(
    server: str, tmp_path: Path, drive: Callable[..., dict[str, Any]]
) -> None:
    fake = tmp_path / "not-a-photo.png"
    fake.write_text("this is a text file with a .png name\n")
    # What the API itself answers for this file.
    with fake.open("rb") as handle:
        response = httpx.post(
            f"{server}v1/jobs", files={"images": (fake.name, handle, "image/png")}, timeout=30
        )
    assert response.status_code >= 400, response.text
    body = response.json()
    error = body.get("error", body)

    report = drive("upload-error", server, fake, name="not-an-image")
    assert report["pageErrors"] == [], report["pageErrors"]
    assert report["errorRole"] == "alert"
    assert report["errorCode"] == error["code"]
    assert error["message"] in report["errorText"], (error, report["errorText"])
    # Phone-sized layout: nothing wider than the screen, and every control labelled.
    assert report["overflowPhone"] <= 0
    assert report["unlabeled"] == [], report["unlabeled"]


def test_photo_without_a_face_says_so(
    server: str, tmp_path: Path, drive: Callable[..., dict[str, Any]]
) -> None:
    # A plain sky-blue picture: a valid image in which the detector finds no face.
    blank = tmp_path / "sky.png"
    Image.new("RGB", (320, 240), (120, 170, 220)).save(blank)
    report = drive("upload-error", server, blank, name="no-face")
    assert report["pageErrors"] == [], report["pageErrors"]
    assert report["errorCode"] == "no_face", report
    assert "no face" in report["status"].lower(), report["status"]
    # The note shown is the one the pipeline wrote into result.json.
    job = httpx.get(f"{server}v1/jobs/{report['jobId']}", timeout=30).json()
    assert job["status"] == "succeeded" and job["result"]["heads"] == []
    assert job["result"]["notes"][0] in report["errorText"], (job["result"]["notes"], report["errorText"])

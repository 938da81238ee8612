"""Studio templates through the real stack (Redis, a Celery worker, uvicorn): `POST /v1/retopology`
as a job like any other, `topology=` on `POST /v1/jobs`, templates in `GET /v1/models`, and the
gateway's refusals with stable codes."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import trimesh
from flame_synthetic import imported_synthetic_flame
from stacklib import FAST_OPTIONS, KEYS, Stack, astronaut_jpeg, running_stack, wait_job
from template_synthetic import NUM_VERTICES, deform, icosphere_target, write_studio_template

from headforge.templates import import_template


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("retopology-stack")
    store = root / "templates"
    mesh, landmarks = write_studio_template(root)
    previous = os.environ.get("HEADFORGE_TEMPLATES")
    os.environ["HEADFORGE_TEMPLATES"] = str(store)
    try:
        import_template("studio", mesh, landmarks)
    finally:
        if previous is None:
            os.environ.pop("HEADFORGE_TEMPLATES")
        else:
            os.environ["HEADFORGE_TEMPLATES"] = previous
    _files, flame_asset = imported_synthetic_flame(root)
    with running_stack(
        root / "stack",
        redis=True,
        worker_concurrency=1,
        HEADFORGE_TEMPLATES=str(store),
        HEADFORGE_FLAME_ASSET=str(flame_asset),
    ) as running:
        yield running


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS['alice']}"}


def _target_ply() -> bytes:
    vertices, faces = icosphere_target(5)
    exported = trimesh.Trimesh(deform(vertices), faces, process=False).export(file_type="ply")
    assert isinstance(exported, bytes)
    return exported


def test_retopology_job_returns_the_fitted_template(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base_url, headers=_auth(), timeout=180) as http:
        response = http.post(
            "/v1/retopology",
            params={"wait": 120},
            files={"mesh": ("scan.ply", _target_ply(), "application/octet-stream")},
            data={"template": "studio", "target_landmarks": "none"},
        )
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded", job["error"]
        fit = job["result"]["fit"]
        assert fit["template"] == "studio" and fit["residual_mm"] < 0.5 and fit["driven_share"] > 0.95
        names = {artifact["name"] for artifact in job["artifacts"]}
        assert {"fitted.glb", "fitted.obj", "fitted.mtl", "result.json"} <= names
        glb = http.get(f"/v1/jobs/{job['id']}/artifacts/fitted.glb")
        assert glb.status_code == 200
        mesh = trimesh.load(io.BytesIO(glb.content), file_type="glb", force="mesh", process=False)
        assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) == 48_094
        obj = http.get(f"/v1/jobs/{job['id']}/artifacts/fitted.obj").text.splitlines()
        assert sum(line.startswith("v ") for line in obj) == NUM_VERTICES


def test_unreadable_mesh_fails_the_job_with_a_code(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base_url, headers=_auth(), timeout=180) as http:
        response = http.post(
            "/v1/retopology",
            params={"wait": 60},
            files={"mesh": ("scan.ply", b"ply\nformat nonsense\n", "application/octet-stream")},
            data={"template": "studio"},
        )
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_mesh"


@pytest.mark.parametrize(
    ("filename", "payload", "form", "status", "code"),
    [
        ("scan.ply", b"ply\n", {"template": "nosuch"}, 422, "unknown_template"),
        ("scan.stl", b"solid x\n", {"template": "studio"}, 422, "invalid_mesh"),
        ("scan.ply", b"", {"template": "studio"}, 400, "empty_file"),
        (
            "scan.ply",
            b"ply\nformat binary_little_endian 1.0\nelement vertex 5000000\nproperty float x\nend_header\n",
            {"template": "studio"},
            413,
            "mesh_too_large",
        ),
        ("scan.ply", b"ply\n", {"template": "studio", "units": "inch"}, 422, "invalid_option"),
    ],
)
def test_gateway_refusals(
    stack: Stack, filename: str, payload: bytes, form: dict[str, str], status: int, code: str
) -> None:
    with httpx.Client(base_url=stack.base_url, headers=_auth(), timeout=60) as http:
        response = http.post("/v1/retopology", files={"mesh": (filename, payload)}, data=form)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code


def test_models_lists_templates_and_jobs_take_topology(stack: Stack) -> None:
    with stack.client() as client:
        listing = httpx.get(f"{stack.base_url}/v1/models", headers=_auth(), timeout=30).json()
        (studio,) = [entry for entry in listing["templates"] if entry["name"] == "studio"]
        assert studio["vertices"] == NUM_VERTICES and studio["landmarks"]["mediapipe"] == 30
        for pipeline, kind in (("facemesh", "mediapipe"), ("flame", "flame")):
            job = wait_job(client, client.submit([("astronaut.jpg", astronaut_jpeg())], pipeline=pipeline,
                                                 topology="studio", **FAST_OPTIONS)["id"])  # fmt: skip
            assert job["status"] == "succeeded", job["error"]
            head = job["result"]["heads"][0]
            assert head["mesh"]["vertices"] == NUM_VERTICES and head["registration"]["template"] == "studio"
            assert head["registration"]["target_landmarks"] == kind
            assert {"h0.glb", "h0.obj", "h0_texture.png", "h0_splats.ply"} <= {
                a["name"] for a in job["artifacts"]
            }
        refused = httpx.post(f"{stack.base_url}/v1/jobs", headers=_auth(), timeout=30,
                             files={"images": ("a.jpg", astronaut_jpeg())}, data={"topology": "nosuch"})  # fmt: skip
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_template"
    assert np.isfinite(head["registration"]["residual_mm"])

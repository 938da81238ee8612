"""`POST /v1/jobs/{id}/animate` through the real stack (Redis, a Celery worker, uvicorn): a flame job
on a real photo (synthetic FLAME asset), then an animation job whose per-frame mesh and splat PLYs
are the FLAME head and its bound splats, byte for byte what `animate_result` writes from the same
files; and every refusal with its stable code."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from flame_synthetic import imported_synthetic_flame
from plyfile import PlyData
from stacklib import FAST_OPTIONS, KEYS, Stack, astronaut_jpeg, running_stack, wait_job

from headforge.models.flame_import import load_flame_asset
from headforge.pipeline.animate import animate_result
from headforge.pipeline.flame_fit import FlameLandmarkModel
from headforge.pipeline.rig import read_binding
from headforge.service.animate import MAX_API_FRAMES

pytestmark = pytest.mark.service

RNG = np.random.default_rng(3)
FRAMES = [
    {"expression": [0.0] * 16},
    {"expression": RNG.normal(0, 1.5, 16).round(4).tolist(), "jaw": [0.25, 0.0, 0.0]},
    {"expression": RNG.normal(0, 1.5, 16).round(4).tolist(), "jaw": [0.1, 0.05, 0.0]},
]


@pytest.fixture(scope="module")
def flame_asset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return imported_synthetic_flame(tmp_path_factory.mktemp("animate-flame"))[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, flame_asset: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("animate-stack")
    with running_stack(
        root, redis=True, worker_concurrency=1, HEADFORGE_FLAME_ASSET=str(flame_asset), OMP_NUM_THREADS="1"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def flame_job(stack: Stack) -> dict[str, Any]:
    with stack.client() as client:
        job = wait_job(
            client,
            client.submit([("astronaut.jpg", astronaut_jpeg())], pipeline="flame", **FAST_OPTIONS)["id"],
        )
    assert job["status"] == "succeeded", job["error"]
    assert {"h0.glb", "h0_splats.ply", "h0_splats_binding.npz"} <= {a["name"] for a in job["artifacts"]}
    return job


def _http(stack: Stack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=180
    )


def _animate(http: httpx.Client, job_id: str, body: object, wait: int = 0) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(f"/v1/jobs/{job_id}/animate", params={"wait": wait} if wait else None, content=content,
                     headers={"Content-Type": "application/json"})  # fmt: skip


def _vertices(data: bytes) -> np.ndarray:
    vertex = PlyData.read(io.BytesIO(data))["vertex"]
    return np.stack([vertex[axis] for axis in "xyz"], axis=1).astype(np.float64)


def test_animation_job_writes_bound_frames(
    stack: Stack, flame_job: dict[str, Any], flame_asset: Path, tmp_path: Path
) -> None:
    with _http(stack) as http:
        response = _animate(http, flame_job["id"], {"fps": 25, "frames": FRAMES}, wait=150)
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded", job["error"]
        assert job["options"]["task"] == "animate" and job["options"]["source_job"] == flame_job["id"]
        summary = job["result"]
        assert summary["frames"] == 3 and summary["fps"] == 25 and summary["heads"] == ["h0"]
        names = {a["name"]: a for a in job["artifacts"]}
        expected = {f"f{i:04d}_h0_{kind}.ply" for i in range(3) for kind in ("mesh", "splats")}
        assert set(names) == expected | {"animation.json"}

        def fetch(job_id: str, name: str) -> bytes:
            got = http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
            assert got.status_code == 200, got.text
            return got.content

        frames = {name: fetch(job["id"], name) for name in sorted(expected)}
        for name, data in frames.items():
            assert hashlib.sha256(data).hexdigest() == names[name]["sha256"]
        # The same files through the library (what `headforge animate` runs) give the same bytes.
        source = tmp_path / "source"
        source.mkdir()
        for name in ("result.json", "h0_splats.ply", "h0_splats_binding.npz"):
            (source / name).write_bytes(fetch(flame_job["id"], name))
        model = FlameLandmarkModel(load_flame_asset(flame_asset))
        animate_result(source, {"fps": 25, "frames": FRAMES}, tmp_path / "local", model=model)
        for name, data in frames.items():
            assert (tmp_path / "local" / name).read_bytes() == data, name

    # And they are the FLAME head with each frame's parameters, with its splats bound to it.
    head = flame_job["result"]["heads"][0]
    binding, faces, _ = read_binding((source / "h0_splats_binding.npz").read_bytes())
    for index, frame in enumerate(FRAMES):
        vertices = _vertices(frames[f"f{index:04d}_h0_mesh.ply"])
        z = np.zeros(model.num_linear)
        z[: model.num_shape] = head["params"]["shape"]
        z[model.num_shape : model.num_shape + 16] = frame["expression"]
        jaw = np.asarray([frame.get("jaw", [0.0, 0.0, 0.0])], np.float64)
        np.testing.assert_allclose(vertices, model.vertices(z[None], jaw)[0], atol=2e-6)
        corners = vertices[faces[binding.triangles]]
        normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        centres = np.einsum("nk,nkc->nc", binding.barycentrics.astype(np.float64), corners)
        means = _vertices(frames[f"f{index:04d}_h0_splats.ply"])
        np.testing.assert_allclose(means, centres + binding.offsets[:, None] * normal, atol=1e-5)
    moved = np.linalg.norm(
        _vertices(frames["f0001_h0_splats.ply"]) - _vertices(frames["f0000_h0_splats.ply"]), axis=1
    )
    assert moved.max() > 1e-3  # the expression moved the splats by millimetres


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"frames": [{"expression": [0.0] * 10}]}, 422, "invalid_sequence"),
        ({"frames": [{"expression": [0.0] * 16, "jaw": [0.1, 0.0]}]}, 422, "invalid_sequence"),
        ({"frames": [{"expression": [0.0] * 15 + [float("nan")]}]}, 422, "invalid_sequence"),
        ({"frames": [{"expression": [0.0] * 16}], "image": 2}, 422, "invalid_sequence"),
        ({"frames": []}, 422, "invalid_sequence"),
        (b"{not json", 422, "invalid_sequence"),
        ([1, 2, 3], 422, "invalid_sequence"),
        ({"frames": [{"expression": [0.0] * 16}] * (MAX_API_FRAMES + 1)}, 413, "too_many_frames"),
        (b"[" + b"0," * 3_000_000 + b"0]", 413, "file_too_large"),
    ],
)
def test_bad_sequences_are_refused(
    stack: Stack, flame_job: dict[str, Any], body: object, status: int, code: str
) -> None:
    with _http(stack) as http:
        before = len(http.get("/v1/jobs", params={"limit": 500}).json()["jobs"])
        response = _animate(http, flame_job["id"], body)  # NaN goes out as JSON's extension `NaN`
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
        assert len(http.get("/v1/jobs", params={"limit": 500}).json()["jobs"]) == before  # no job made


def test_jobs_without_flame_heads_are_refused(stack: Stack, flame_job: dict[str, Any]) -> None:
    with stack.client() as client:
        facemesh = wait_job(
            client, client.submit([("astronaut.jpg", astronaut_jpeg())], **FAST_OPTIONS)["id"]
        )
    assert facemesh["status"] == "succeeded", facemesh["error"]
    frames = {"frames": [{"expression": [0.0] * 16}]}
    with _http(stack) as http:
        response = _animate(http, facemesh["id"], frames)
        assert response.status_code == 422 and response.json()["error"]["code"] == "not_animatable", (
            response.text
        )
        missing = _animate(http, "job_000000000000000000000000", frames)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        other = httpx.post(f"{stack.base_url}/v1/jobs/{flame_job['id']}/animate", json=frames, timeout=30,
                           headers={"Authorization": f"Bearer {KEYS['bob']}"})  # fmt: skip
        assert other.status_code == 404  # another key's job does not exist for it
        # An animation job has no heads of its own to animate; the worker still takes new jobs.
        done = _animate(http, flame_job["id"], frames, wait=120).json()
        assert done["status"] == "succeeded", done["error"]
        again = _animate(http, done["id"], frames)
        assert again.status_code == 422 and again.json()["error"]["code"] == "not_animatable", again.text

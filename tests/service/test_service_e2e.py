"""End to end over HTTP: uvicorn + redis-server + Celery worker processes running the real pipeline."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trimesh
from PIL import Image
from stacklib import (
    FAST_OPTIONS,
    KEYS,
    SHARED_DATA,
    Process,
    Stack,
    WebhookReceiver,
    astronaut,
    astronaut_jpeg,
    jpeg_bytes,
    running_stack,
    wait_job,
    wait_until,
)

from headforge.client import ApiError
from headforge.service import webhooks

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def idle_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis and the API with no worker: what a test submits here stays queued until that test starts
    a worker itself, with `Stack.worker`, which stops it again when its block ends."""
    with running_stack(tmp_path_factory.mktemp("idle-stack"), redis=True) as stack:
        yield stack


def _headers(delivery: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in delivery["headers"].items()}


def _signed(delivery: dict[str, Any], secret: str) -> bool:
    """Check the documented signature header: `sha256=` + hex HMAC-SHA256 of the raw body."""
    expected = "sha256=" + hmac.new(secret.encode(), delivery["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, _headers(delivery)["x-headforge-signature"])


def _stored_files(stack: Stack, job_id: str) -> list[Path]:
    root = stack.root / "data" / "artifacts" / "jobs" / job_id
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _log_records(process: Process) -> list[dict[str, Any]]:
    """The JSON log lines a process wrote (other lines skipped)."""
    records = []
    for line in process.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return dict(body["error"])


def test_submit_poll_download_and_verify(
    redis_stack: Stack, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    with redis_stack.client() as client:
        accepted = client.submit(
            [("astronaut.jpg", astronaut_jpeg())], webhook_url=receiver.url, **FAST_OPTIONS
        )
        assert set(accepted) == {"id", "status", "status_url"}
        assert accepted["status"] in ("queued", "running", "succeeded")
        seen: list[dict[str, Any]] = []
        job = client.wait(accepted["id"], timeout=240, poll=0.05, on_update=seen.append)
        assert job["status"] == "succeeded", job["error"]
        assert job["error"] is None and job["attempts"] == 1
        assert job["queue_position"] is None
        for doc in seen:
            if doc["status"] == "queued":
                assert isinstance(doc["queue_position"], int) and doc["queue_position"] >= 0
        assert {"queue_wait", "pipeline", "upload", "total"} <= set(job["timings_ms"])
        assert len(job["timings_ms"]) >= 8  # the pipeline's own stage timings are merged in
        assert len(job["progress"]) >= 4 and all(value == 1.0 for value in job["progress"].values())

        names = {a["name"] for a in job["artifacts"]}
        assert {
            "h0.glb",
            "h0.obj",
            "h0.mtl",
            "h0_texture.png",
            "h0_splats.ply",
            "preview.png",
            "result.json",
        } <= names
        media = {a["name"]: a["media_type"] for a in job["artifacts"]}
        assert media["h0.glb"] == "model/gltf-binary" and media["preview.png"] == "image/png"

        saved = client.download_artifacts(job, tmp_path)  # checks size and sha256 of each file
        assert len(saved) == len(job["artifacts"])
        mesh = trimesh.load(tmp_path / "h0.glb", force="mesh")
        assert len(mesh.vertices) >= 468 and len(mesh.faces) > 800
        assert json.loads((tmp_path / "result.json").read_text()) == job["result"]
        assert len(job["result"]["heads"]) == 1

        response = client.http.get(f"/v1/jobs/{job['id']}/artifacts/h0.glb")
        assert response.headers["content-type"] == "model/gltf-binary"
        glb = next(a for a in job["artifacts"] if a["name"] == "h0.glb")
        assert hashlib.sha256(response.content).hexdigest() == glb["sha256"]
        missing = client.http.get(f"/v1/jobs/{job['id']}/artifacts/nope.glb")
        assert missing.status_code == 404 and _error(missing)["code"] == "not_found"

    deliveries = wait_until(lambda: receiver.for_job(job["id"]), 30, "the webhook")
    assert len(deliveries) == 1
    headers = {k.lower(): v for k, v in deliveries[0]["headers"].items()}
    assert webhooks.verify(deliveries[0]["body"], "test-webhook-secret", headers["x-headforge-signature"])
    assert not webhooks.verify(
        deliveries[0]["body"] + b" ", "test-webhook-secret", headers["x-headforge-signature"]
    )
    assert headers["x-headforge-event"] == "job.succeeded"
    assert json.loads(deliveries[0]["body"])["job"]["status"] == "succeeded"


def test_wait_returns_the_finished_job_inline(redis_stack: Stack) -> None:
    with redis_stack.client() as client:
        response = client.http.post(
            "/v1/jobs",
            params={"wait": 60},
            files=[("images", ("a.jpg", astronaut_jpeg(256), "image/jpeg"))],
            data={k: str(v) for k, v in FAST_OPTIONS.items()},
        )
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "succeeded" and job["result"]["heads"]


def _batch_images() -> list[tuple[str, bytes]]:
    """20 small real photos: AFLW2000 samples when present, and crops/flips of the astronaut."""
    images: list[tuple[str, bytes]] = []
    aflw = SHARED_DATA / "aflw2000-sample"
    if aflw.is_dir():
        for path in sorted(aflw.glob("*.jpg"))[:8]:
            rgb = np.asarray(Image.open(path).convert("RGB").resize((256, 256)))
            images.append((path.name, jpeg_bytes(rgb)))
    base = astronaut(400)
    variant = 0
    while len(images) < 20:
        top, left = (variant * 7) % 60, (variant * 11) % 60
        crop = base[top : top + 320, left : left + 320]
        if variant % 2:
            crop = crop[:, ::-1]
        size = 224 + 16 * (variant % 4)
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size)))
        images.append((f"astronaut_{variant:02d}.jpg", jpeg_bytes(rgb)))
        variant += 1
    return images


def test_batch_of_twenty_photos(redis_stack: Stack) -> None:
    images = _batch_images()
    with redis_stack.client() as client:
        accepted = client.submit_batch(images, outputs="glb,obj", splats=0, texture_size=512)
        assert len(accepted["jobs"]) == 20
        early = client.http.get(f"/v1/batches/{accepted['id']}/archive")
        batch = client.batch(accepted["id"])
        assert batch["total"] == 20 and sum(batch["counts"].values()) == 20
        if batch["status"] != "finished":
            assert early.status_code == 409 and _error(early)["code"] == "job_not_finished"
        batch = wait_until(
            lambda: (b := client.batch(accepted["id"]))["status"] == "finished" and b, 400, "the batch", 0.5
        )
        assert batch["counts"]["succeeded"] == 20, batch
        assert batch["progress"] == 1.0
        archive = zipfile.ZipFile(io.BytesIO(client.batch_archive(accepted["id"])))
        names = archive.namelist()
        assert "batch.json" in names
        for number, entry in enumerate(batch["jobs"]):
            job = client.job(entry["id"])
            assert job["batch_id"] == accepted["id"]
            folder = f"{number:03d}_{Path(entry['filename']).stem}"
            for artifact in job["artifacts"]:
                data = archive.read(f"{folder}/{artifact['name']}")
                assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        faces = sum(len(client.job(e["id"])["result"]["heads"]) for e in batch["jobs"])
        assert faces >= 18  # every photo shows one face; allow the detector two misses


def test_batch_from_a_zip(redis_stack: Stack) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photos/one.jpg", astronaut_jpeg(224))
        archive.writestr("photos/two.png", _png(astronaut(240)))
        archive.writestr("notes.txt", b"not an image, ignored")
        archive.writestr("__MACOSX/._one.jpg", b"resource fork, ignored")
    with redis_stack.client() as client:
        accepted = client.submit_batch(
            archive=("photos.zip", buffer.getvalue()), outputs="glb", splats=0, texture_size=512
        )
        assert len(accepted["jobs"]) == 2
        batch = wait_until(
            lambda: (b := client.batch(accepted["id"]))["status"] == "finished" and b,
            240,
            "the zip batch",
            0.5,
        )
        assert batch["counts"]["succeeded"] == 2
        assert sorted(j["filename"] for j in batch["jobs"]) == ["one.jpg", "two.png"]


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def test_idempotency_key(redis_stack: Stack) -> None:
    image = astronaut_jpeg(232)
    with redis_stack.client() as client:
        first = client.submit([("a.jpg", image)], idempotency_key="key-1", **FAST_OPTIONS)
        again = client.submit([("a.jpg", image)], idempotency_key="key-1", **FAST_OPTIONS)
        assert again["id"] == first["id"]
        with pytest.raises(ApiError) as conflict:
            client.submit([("a.jpg", astronaut_jpeg(240))], idempotency_key="key-1", **FAST_OPTIONS)
        assert conflict.value.code == "idempotency_conflict" and conflict.value.http_status == 409
        other = client.submit([("a.jpg", image)], idempotency_key="key-2", **FAST_OPTIONS)
        assert other["id"] != first["id"]
        assert wait_job(client, first["id"])["status"] == "succeeded"
        finished = client.submit([("a.jpg", image)], idempotency_key="key-1", **FAST_OPTIONS)
        assert finished["id"] == first["id"]
        assert wait_job(client, other["id"])["status"] == "succeeded"
    with redis_stack.client("bob") as bob:  # keys are scoped per API key
        assert bob.submit([("a.jpg", image)], idempotency_key="key-1", **FAST_OPTIONS)["id"] != first["id"]


def test_auth_and_isolation(redis_stack: Stack) -> None:
    url = redis_stack.base_url
    files = [("images", ("a.jpg", astronaut_jpeg(224), "image/jpeg"))]
    anonymous = httpx.post(f"{url}/v1/jobs", files=files)
    assert anonymous.status_code == 401 and _error(anonymous)["code"] == "unauthorized"
    assert anonymous.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer hf_not_a_key"})
    assert wrong.status_code == 401 and _error(wrong)["code"] == "unauthorized"
    basic = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Basic {KEYS['alice']}"})
    assert basic.status_code == 401

    with redis_stack.client("alice") as alice, redis_stack.client("bob") as bob:
        job = wait_job(alice, alice.submit([("a.jpg", astronaut_jpeg(224))], **FAST_OPTIONS)["id"])
        batch = alice.submit_batch(
            [("b.jpg", astronaut_jpeg(240))], splats=0, outputs="glb", texture_size=512
        )
        for path in (
            f"/v1/jobs/{job['id']}",
            f"/v1/jobs/{job['id']}/artifacts/h0.glb",
            f"/v1/batches/{batch['id']}",
            f"/v1/batches/{batch['id']}/archive",
        ):
            response = bob.http.get(path)
            assert response.status_code == 404, path
            assert _error(response)["code"] == "not_found"
        assert bob.http.delete(f"/v1/jobs/{job['id']}").status_code == 404
        assert bob.http.delete(f"/v1/batches/{batch['id']}").status_code == 404
        assert job["id"] not in {j["id"] for j in bob.jobs(limit=500)}
        assert job["id"] in {j["id"] for j in alice.jobs(limit=500)}
        assert alice.job(job["id"])["status"] == "succeeded"  # untouched by bob's delete
        wait_until(lambda: alice.batch(batch["id"])["status"] == "finished", 240, "alice's batch", 0.5)


def test_rate_limit_and_queued_cap(redis_stack: Stack) -> None:
    with redis_stack.client("limited") as limited:
        statuses = []
        for _ in range(4):
            response = limited.http.post(
                "/v1/jobs", files=[("images", ("x.txt", b"not an image", "text/plain"))]
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                error = _error(response)
                assert error["code"] == "rate_limited"
                assert int(response.headers["retry-after"]) >= 1
                assert error["details"]["retry_after"] >= 1
        assert statuses[:2] == [415, 415] and 429 in statuses[2:]
    with redis_stack.client("capped") as capped:
        with pytest.raises(ApiError) as too_many:
            capped.submit_batch([("a.jpg", astronaut_jpeg(224)), ("b.jpg", astronaut_jpeg(232))], splats=0)
        assert too_many.value.code == "too_many_queued" and too_many.value.http_status == 429
        assert too_many.value.retry_after is not None
        assert capped.jobs() == []  # nothing was stored


def _truncated_jpeg() -> bytes:
    data = astronaut_jpeg(320)
    return data[: len(data) // 2]


def _huge_pixels_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (3000, 2500)).save(buffer, "PNG")  # 7.5 MP, over the stack's 6 MP limit; small file
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    """A complete PNG whose image data no longer matches its CRC."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(astronaut_jpeg(224))).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    return bytes(data)


BAD_UPLOADS = {
    "not_an_image": ([("images", ("notes.txt", b"hello, this is text", "text/plain"))], {}, 415),
    "truncated_image": ([("images", ("cut.jpg", _truncated_jpeg(), "image/jpeg"))], {}, 400),
    "corrupt_image": ([("images", ("bad.png", _corrupt_png(), "image/png"))], {}, 400),
    "empty_file": ([("images", ("empty.jpg", b"", "image/jpeg"))], {}, 400),
    "file_too_large": ([("images", ("big.jpg", b"\xff\xd8\xff" + bytes(3_000_100), "image/jpeg"))], {}, 413),
    "too_many_pixels": ([("images", ("wide.png", _huge_pixels_png(), "image/png"))], {}, 413),
    "too_many_files": ([("images", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(5)], {}, 413),
    "unknown_pipeline": (None, {"pipeline": "nosuch"}, 422),
    "invalid_option": (None, {"texture_size": "7"}, 422),
}


@pytest.mark.parametrize("code", sorted(BAD_UPLOADS))
def test_bad_inputs_are_refused_at_the_gateway(redis_stack: Stack, code: str) -> None:
    files, data, status = BAD_UPLOADS[code]
    files = files or [("images", ("a.jpg", astronaut_jpeg(224), "image/jpeg"))]
    with redis_stack.client("bob") as bob:
        before = {j["id"] for j in bob.jobs(limit=500)}
        response = bob.http.post("/v1/jobs", files=files, data=data)
        assert response.status_code == status, response.text
        assert _error(response)["code"] == code
        assert {j["id"] for j in bob.jobs(limit=500)} == before  # never reached a worker


def test_request_shape_errors_use_the_same_error_body(redis_stack: Stack) -> None:
    with redis_stack.client() as client:
        no_images = client.http.post("/v1/jobs", data={"pipeline": "facemesh"})
        assert no_images.status_code == 422 and _error(no_images)["code"] == "invalid_option"
        not_int = client.http.post(
            "/v1/jobs", files=[("images", ("a.jpg", b"x", "image/jpeg"))], data={"texture_size": "big"}
        )
        assert not_int.status_code == 422 and _error(not_int)["code"] == "invalid_option"
        long_wait = client.http.post("/v1/jobs?wait=999", files=[("images", ("a.jpg", b"x", "image/jpeg"))])
        assert long_wait.status_code == 422
        assert _error(client.http.get("/v1/nothing-here"))["code"] == "not_found"
        put = client.http.put("/v1/jobs")
        assert put.status_code == 405 and _error(put)["code"] == "method_not_allowed"
        unknown = client.http.get("/v1/jobs/job_doesnotexist")
        assert unknown.status_code == 404 and _error(unknown)["code"] == "not_found"


def test_pipeline_unavailable(redis_stack: Stack) -> None:
    with redis_stack.client() as client:
        unavailable = [p["name"] for p in client.models()["pipelines"] if not p["available"]]
        if not unavailable:
            pytest.skip("every registered pipeline is available on this machine")
        response = client.http.post(
            "/v1/jobs",
            files=[("images", ("a.jpg", astronaut_jpeg(224), "image/jpeg"))],
            data={"pipeline": unavailable[0]},
        )
        assert response.status_code == 422 and _error(response)["code"] == "pipeline_unavailable"


def test_delete_removes_a_finished_job(redis_stack: Stack) -> None:
    with redis_stack.client() as client:
        job = wait_job(client, client.submit([("a.jpg", astronaut_jpeg(224))], **FAST_OPTIONS)["id"])
        artifacts_dir = redis_stack.root / "data" / "artifacts" / "jobs" / job["id"]
        assert artifacts_dir.is_dir()
        assert client.http.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert client.http.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert not artifacts_dir.exists()
        assert not (redis_stack.root / "data" / "artifacts" / "inputs" / job["id"]).exists()


def test_cancel_a_queued_job(idle_stack: Stack, receiver: WebhookReceiver) -> None:
    """With no worker running, the jobs are certainly queued when one of them is canceled. A worker
    started afterwards skips it and runs the others; the canceled one sends one `job.canceled` webhook."""
    stack = idle_stack
    secret = stack.env["HEADFORGE_WEBHOOK_SECRET"]
    with stack.client() as client:
        ids = [
            client.submit(
                [(f"{i}.jpg", astronaut_jpeg(224 + 8 * i))], webhook_url=receiver.url, **FAST_OPTIONS
            )["id"]
            for i in range(3)
        ]
        before = [client.job(i) for i in ids]
        assert [j["status"] for j in before] == ["queued"] * 3
        positions = [j["queue_position"] for j in before]
        assert positions == sorted(positions) and len(set(positions)) == 3  # in submission order

        doomed = ids[1]
        response = client.http.delete(f"/v1/jobs/{doomed}")
        assert response.status_code == 200, response.text
        canceled = response.json()
        assert canceled["id"] == doomed and canceled["status"] == "canceled"
        assert canceled["finished_at"] is not None and canceled["queue_position"] is None
        assert client.job(ids[2])["queue_position"] == positions[2] - 1  # the job behind moved up
        assert client.job(ids[0])["queue_position"] == positions[0]

        with stack.worker() as worker:
            finished = [wait_job(client, i) for i in (ids[0], ids[2])]
            assert [j["status"] for j in finished] == ["succeeded", "succeeded"], [
                j["error"] for j in finished
            ]
            wait_until(lambda: all(receiver.for_job(i) for i in ids), 60, "a webhook for every job")
        # Messages are consumed in order, one at a time: the worker met the canceled job's message
        # before it ran the job after it, and refused it.
        skipped = [r for r in _log_records(worker) if r.get("job_id") == doomed]
        assert any(r.get("reason") == "canceled" for r in skipped), skipped
        assert not any(r.get("message") == "job started" for r in skipped)

        job = client.job(doomed)
        assert job["status"] == "canceled" and job["attempts"] == 0 and job["started_at"] is None
        assert job["artifacts"] == [] and job["result"] is None
        assert _stored_files(stack, doomed) == []
        assert client.http.get(f"/v1/jobs/{doomed}/artifacts/result.json").status_code == 404

    # One job.canceled notification, signed, sent before the others (so a duplicate would be here too).
    notices = receiver.for_job(doomed)
    assert len(notices) == 1
    headers = _headers(notices[0])
    assert headers["x-headforge-event"] == "job.canceled"
    assert headers["x-headforge-delivery"] == f"{doomed}.job.canceled"
    assert _signed(notices[0], secret)
    body = json.loads(notices[0]["body"])
    assert body["event"] == "job.canceled" and body["job"]["status"] == "canceled"
    for other in (ids[0], ids[2]):
        assert [_headers(d)["x-headforge-event"] for d in receiver.for_job(other)] == ["job.succeeded"]

    with stack.client() as client:  # a canceled job is finished: DELETE now removes it
        assert client.http.delete(f"/v1/jobs/{doomed}").status_code == 204
        assert client.http.get(f"/v1/jobs/{doomed}").status_code == 404
        assert not (stack.root / "data" / "artifacts" / "inputs" / doomed).exists()


def test_wait_answers_202_when_the_job_is_not_done_in_time(idle_stack: Stack) -> None:
    """No worker runs, so `?wait=1` certainly runs out: the answer is the usual 202, after the wait."""
    with idle_stack.client() as client:
        started = time.monotonic()
        response = client.http.post(
            "/v1/jobs",
            params={"wait": 1},
            files=[("images", ("a.jpg", astronaut_jpeg(224), "image/jpeg"))],
            data={k: str(v) for k, v in FAST_OPTIONS.items()},
        )
        waited = time.monotonic() - started
        assert response.status_code == 202, response.text
        body = response.json()
        assert set(body) == {"id", "status", "status_url"}
        assert body["status"] == "queued"
        assert body["status_url"] == f"/v1/jobs/{body['id']}" == response.headers["location"]
        assert waited >= 1.0
        assert client.job(body["id"])["status"] == "queued"
        # Cancel it, so a worker that a later test starts here has nothing of ours to run.
        assert client.http.delete(f"/v1/jobs/{body['id']}").status_code == 200


# Heavy enough that no CPU finishes it within the 1 s soft limit below (about 30 s on the 2-core CI).
TIMEOUT_JOB = {"texture_size": 4096, "splats": 1_000_000}


def test_a_job_past_the_soft_time_limit_fails_with_job_timeout(
    idle_stack: Stack, receiver: WebhookReceiver
) -> None:
    """The gateway cannot know how long a job will run: a worker whose soft time limit is 1 s fails it
    with the stable code `job_timeout`, and the webhook reports `job.failed`."""
    stack = idle_stack
    images = [(f"big{i}.jpg", astronaut_jpeg(1024 - 16 * i)) for i in range(4)]
    with stack.client() as client:
        job_id = client.submit(images, webhook_url=receiver.url, **TIMEOUT_JOB)["id"]
        with stack.worker(HEADFORGE_TASK_SOFT_TIME_LIMIT="1", HEADFORGE_TASK_TIME_LIMIT="60"):
            job = wait_job(client, job_id, timeout=120)
            deliveries = wait_until(lambda: receiver.for_job(job_id), 60, "the failure webhook")
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "job_timeout"
        assert "time limit" in job["error"]["message"]
        assert job["error"]["details"] == {"soft_time_limit": 1}
        assert job["attempts"] == 1 and job["artifacts"] == [] and job["result"] is None
        assert job["finished_at"] is not None
        assert _stored_files(stack, job_id) == []  # the attempt's partial outputs are gone

    assert len(deliveries) == 1
    assert _headers(deliveries[0])["x-headforge-event"] == "job.failed"
    assert _signed(deliveries[0], stack.env["HEADFORGE_WEBHOOK_SECRET"])
    body = json.loads(deliveries[0]["body"])
    assert body["event"] == "job.failed"
    assert body["job"]["status"] == "failed" and body["job"]["error"]["code"] == "job_timeout"


def test_webhook_retries_with_backoff(redis_stack: Stack) -> None:
    """The receiver answers 500 twice, then 204: three deliveries of the same signed body under the same
    delivery id, spaced by at least the documented backoff (2 s, then 4 s)."""
    receiver = WebhookReceiver(fail_first=2)
    try:
        with redis_stack.client() as client:
            job = wait_job(
                client,
                client.submit([("a.jpg", astronaut_jpeg(240))], webhook_url=receiver.url, **FAST_OPTIONS)[
                    "id"
                ],
            )
        assert job["status"] == "succeeded", job["error"]
        deliveries = wait_until(
            lambda: len(d := receiver.for_job(job["id"])) >= 3 and d, 60, "the third delivery"
        )
    finally:
        receiver.close()
    assert [d["status"] for d in deliveries] == [500, 500, 204]
    headers = [_headers(d) for d in deliveries]
    assert {h["x-headforge-delivery"] for h in headers} == {f"{job['id']}.job.succeeded"}
    assert {h["x-headforge-event"] for h in headers} == {"job.succeeded"}
    assert len({d["body"] for d in deliveries}) == 1  # the same bytes every time
    assert all(_signed(d, redis_stack.env["HEADFORGE_WEBHOOK_SECRET"]) for d in deliveries)
    assert json.loads(deliveries[0]["body"])["job"]["id"] == job["id"]
    assert deliveries[1]["at"] - deliveries[0]["at"] >= 2.0
    assert deliveries[2]["at"] - deliveries[1]["at"] >= 4.0


def test_the_stack_serves_the_web_page(redis_stack: Stack) -> None:
    page = httpx.get(f"{redis_stack.base_url}/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    scripts = re.findall(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", page.text)
    assert scripts, page.text[:500]
    for src in scripts:
        bundle = httpx.get(str(httpx.URL(f"{redis_stack.base_url}/").join(src)), timeout=30)
        assert bundle.status_code == 200, src
        assert "javascript" in bundle.headers["content-type"], bundle.headers
        assert bundle.content


def test_models_health_ready_metrics(redis_stack: Stack) -> None:
    with redis_stack.client() as client:
        models = client.models()
        facemesh = next(p for p in models["pipelines"] if p["name"] == "facemesh")
        assert facemesh["available"] is True
        assert {m["name"] for m in models["models"]} >= {"face_landmark", "face_detection_short_range"}
        assert all(m["available"] for m in models["models"])
        assert client.http.get("/healthz").json() == {"status": "ok"}
        ready = client.http.get("/readyz").json()
        assert ready["status"] == "ready" and ready["workers"] >= 1
        schema = client.http.get("/v1/schemas/result")
        assert schema.status_code == 200 and "properties" in schema.json()
        wait_job(client, client.submit([("a.jpg", astronaut_jpeg(224))], **FAST_OPTIONS)["id"])
        text = client.http.get("/metrics").text
        assert 'headforge_jobs{status="succeeded"}' in text
        assert 'headforge_stage_seconds_bucket{le="+Inf",stage="pipeline"}' in text
        assert 'headforge_queue_depth{queue="cpu"}' in text
        assert "headforge_workers 1.0" in text or "headforge_workers 2.0" in text
        assert 'headforge_http_requests_total{method="GET"' in text


def test_submit_command_downloads_artifacts(redis_stack: Stack, tmp_path: Path) -> None:
    photo = tmp_path / "me.jpg"
    photo.write_bytes(astronaut_jpeg(256))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "headforge",
            "submit",
            str(photo),
            "--server",
            redis_stack.base_url,
            "--api-key",
            KEYS["alice"],
            "--wait",
            "-o",
            str(tmp_path / "out"),
            "--outputs",
            "glb,preview",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "out" / "h0.glb").is_file() and (tmp_path / "out" / "result.json").is_file()
    assert not (tmp_path / "out" / "h0.obj").exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "headforge",
            "submit",
            str(photo),
            "--server",
            redis_stack.base_url,
            "--api-key",
            "hf_wrong",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unauthorized" in bad.stderr


def test_models_load_once_per_worker_process(redis_stack: Stack) -> None:
    """Each pool process loads the networks once, after fork; jobs never load them again."""
    with redis_stack.client() as client:
        ids = [
            client.submit([(f"{i}.jpg", astronaut_jpeg(224 + 8 * i))], **FAST_OPTIONS)["id"] for i in range(5)
        ]
        assert all(wait_job(client, job_id)["status"] == "succeeded" for job_id in ids)
    (worker,) = redis_stack.workers
    loads = []
    for line in worker.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("message") == "models loaded":
                loads.append(entry["pid"])
    assert loads, "no worker process logged loading the models"
    assert len(loads) == len(set(loads)) <= 2  # the stack's worker has two pool processes, each loads once
    assert worker.popen.pid not in loads  # the parent (which forks the pool) never loads them

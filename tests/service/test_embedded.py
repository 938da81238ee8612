"""The embedded default: no Redis, SQLite broker and job store on local disk."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trimesh
from stacklib import (
    Process,
    Stack,
    astronaut_jpeg,
    base_env,
    free_port,
    require_models,
    running_stack,
    wait_until,
)

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Process]]:
    """`headforge serve` with no configuration beyond a data folder and a port."""
    require_models()
    port = free_port()
    env = base_env(tmp_path)
    env.pop("HEADFORGE_WEBHOOK_ALLOW_PRIVATE")
    server = Process(
        "serve", [sys.executable, "-m", "headforge", "serve", "--port", str(port)], env, tmp_path
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not server.alive:
            raise RuntimeError(server.tail())
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            return response.status_code == 200 and response.json()["workers"] >= 1
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 120, "headforge serve")
        yield url, server
    finally:
        server.stop()


def test_serve_without_configuration(served: tuple[str, Process], tmp_path: Path) -> None:
    url, server = served
    assert "authentication is OFF" in server.log_path.read_text()
    assert not (tmp_path / "dump.rdb").exists()
    response = httpx.post(
        f"{url}/v1/jobs?wait=60",
        files=[("images", ("me.jpg", astronaut_jpeg(320), "image/jpeg"))],
        data={"texture_size": "512", "splats": "500"},
        timeout=90,
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    glb = next(a for a in job["artifacts"] if a["name"] == "h0.glb")
    download = httpx.get(f"{url}{glb['url']}", timeout=30)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == glb["sha256"]
    (tmp_path / "h0.glb").write_bytes(download.content)
    assert len(trimesh.load(tmp_path / "h0.glb", force="mesh").vertices) >= 468
    assert (tmp_path / "data" / "broker.sqlite").is_file() and (tmp_path / "data" / "state.sqlite").is_file()

    refused = httpx.post(
        f"{url}/v1/jobs",
        files=[("images", ("me.jpg", astronaut_jpeg(224), "image/jpeg"))],
        data={"webhook_url": "http://127.0.0.1:9/hook"},
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "webhook_url_refused"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_serve_takes_its_worker_down(served: tuple[str, Process], stop_signal: signal.Signals) -> None:
    """Stopping `headforge serve` (gracefully, or by kill -9) must not leave the embedded worker behind."""
    _, server = served
    match = re.search(r"worker started \(pid (\d+)\)", server.log_path.read_text())
    assert match, server.tail()
    worker_pid = int(match.group(1))
    assert _pid_alive(worker_pid)
    os.kill(server.popen.pid, stop_signal)  # the serve process only, not its process group
    server.popen.wait(timeout=60)
    wait_until(lambda: not _pid_alive(worker_pid), 60, "the embedded worker to exit")


@pytest.fixture()
def embedded_stack(tmp_path: Path) -> Iterator[Stack]:
    with running_stack(tmp_path / "stack", redis=False) as stack:
        yield stack


def test_embedded_kill9_worker_mid_job(embedded_stack: Stack) -> None:
    """The SQLite broker forgets a message whose worker was killed; the lease sweeper brings it back."""
    stack = embedded_stack
    first = stack.start_worker()
    stack.wait_for_workers(1)
    images = [(f"p{i}.jpg", astronaut_jpeg(640 - 16 * i)) for i in range(4)]
    with stack.client() as client:
        job_id = client.submit(images, texture_size=2048, splats=20000)["id"]
        wait_until(lambda: client.job(job_id)["status"] == "running", 120, "the job to start", 0.02)
        first.kill9()
        assert client.job(job_id)["status"] == "running"
        stack.start_worker()
        job = client.wait(job_id, timeout=300, poll=0.2)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job["error"]
        for artifact in job["artifacts"]:
            data = client.http.get(artifact["url"]).content
            assert hashlib.sha256(data).hexdigest() == artifact["sha256"]

"""`headforge submit` against a real embedded server (`headforge serve --no-worker`, SQLite broker and
job store), run as a subprocess the way a user runs it. The worker is a separate `headforge worker`
that the test starts when it wants the jobs to run, so what the command prints while nothing can
run is known exactly."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from headforge.client import HeadforgeClient

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stacklib(repo_script: Callable[[str], ModuleType]) -> ModuleType:
    """The service tests' process helpers (tests/service/stacklib.py)."""
    return repo_script("tests/service/stacklib.py")


@dataclass
class Server:
    url: str
    env: dict[str, str]
    root: Path


@pytest.fixture()
def server(stacklib: ModuleType, tmp_path: Path) -> Iterator[Server]:
    """The API of an embedded deployment, with no worker: submitted jobs stay queued."""
    stacklib.require_models()
    port = stacklib.free_port()
    env = stacklib.base_env(tmp_path)
    api = stacklib.Process(
        "serve",
        [sys.executable, "-m", "headforge", "serve", "--port", str(port), "--no-worker"],
        env,
        tmp_path,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not api.alive:
            raise RuntimeError(api.tail())
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        stacklib.wait_until(ready, 120, "headforge serve")
        yield Server(url, env, tmp_path)
    finally:
        api.stop()


def _submit_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "headforge", "submit", *args]


def test_submit_waits_for_every_job_at_once_and_downloads_them(
    stacklib: ModuleType, server: Server, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "ann.jpg").write_bytes(stacklib.astronaut_jpeg(256))
    (photos / "bob.jpg").write_bytes(stacklib.astronaut_jpeg(240))
    out = tmp_path / "out"
    cli = stacklib.Process(
        "submit",
        _submit_argv(
            str(photos / "ann.jpg"),
            str(photos / "bob.jpg"),
            "--server",
            server.url,
            "--wait",
            "-o",
            str(out),
            "--outputs",
            "glb,preview",
        ),
        server.env,
        tmp_path,
    )
    worker: Any = None
    try:
        # No worker runs yet, so both jobs stay queued: a client that waited for one job before
        # looking at the next would never print a line for the second one here.
        def both_reported() -> bool:
            if not cli.alive:
                raise RuntimeError(f"headforge submit exited early:\n{cli.tail()}")
            text = cli.log_path.read_text()
            return all(
                re.search(rf"^\[{name}\] queued \(\d+ ahead\) 0%$", text, re.M) for name in ("ann", "bob")
            )

        stacklib.wait_until(both_reported, 120, "progress lines for both queued jobs")
        worker = stacklib.Process(
            "worker",
            [sys.executable, "-m", "headforge", "worker", "--queue", "cpu", "--queue", "gpu"],
            server.env,
            tmp_path,
        )
        assert cli.popen.wait(timeout=400) == 0, cli.tail(80)
    finally:
        cli.stop()
        if worker is not None:
            worker.stop()
    text = cli.log_path.read_text()
    for name in ("ann", "bob"):
        assert re.search(rf"^\[{name}\] succeeded 100%$", text, re.M), text
    ids = dict(re.findall(r"^.*/(\w+)\.jpg: job (job_\w+) queued$", text, re.M))
    assert sorted(ids) == ["ann", "bob"], text
    with HeadforgeClient(server.url) as client:
        for name, job_id in ids.items():
            job = client.job(job_id)
            assert job["status"] == "succeeded"
            folder = out / name
            names = {a["name"] for a in job["artifacts"]}
            assert {"h0.glb", "result.json"} <= names
            assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == names
            for artifact in job["artifacts"]:
                data = (folder / artifact["name"]).read_bytes()
                assert len(data) == artifact["size"]
                assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
            assert re.search(rf"^.*{name}\.jpg: {len(names)} files in .*{name}$", text, re.M), text


def test_submit_reports_bad_inputs_by_file_and_exits_non_zero(
    stacklib: ModuleType, server: Server, tmp_path: Path
) -> None:
    (tmp_path / "good.jpg").write_bytes(stacklib.astronaut_jpeg(224))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_bytes(b"shopping list: eggs, milk\n" * 10)

    def submit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _submit_argv(*args), capture_output=True, text=True, timeout=120, cwd=tmp_path, env=server.env
        )

    run = submit("good.jpg", "empty.jpg", "notes.jpg", "--server", server.url)
    assert run.returncode == 2, run.stdout + run.stderr
    assert re.search(r"^empty\.jpg: rejected \[empty_file\]: \S", run.stderr, re.M), run.stderr
    assert re.search(r"^notes\.jpg: rejected \[not_an_image\]: \S", run.stderr, re.M), run.stderr
    assert "Traceback" not in run.stderr
    assert re.search(r"^good\.jpg: job job_\w+ queued$", run.stdout, re.M), run.stdout  # the others still go

    run = submit("good.jpg", "absent.jpg", "--server", server.url)
    assert run.returncode == 2 and re.search(r"^absent\.jpg: not a file$", run.stderr, re.M), run.stderr
    assert "job_" not in run.stdout  # nothing is submitted when a path is wrong

    unused = stacklib.free_port()
    run = submit("good.jpg", "--server", f"http://127.0.0.1:{unused}")
    assert run.returncode == 2 and f"cannot talk to http://127.0.0.1:{unused}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr

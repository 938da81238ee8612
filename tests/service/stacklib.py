"""Helpers that start real service stacks for the tests: `redis-server` on a free loopback port (AOF on), Celery worker
subprocesses (`headforge worker`), and the API under uvicorn, spoken to over HTTP. Every process is
started in its own session and killed at teardown, so a hung child cannot outlive the tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from needs import missing
from PIL import Image

from headforge.client import HeadforgeClient
from headforge.service.auth import hash_key

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REDIS_SERVER = "redis-server"

# Small outputs keep the pipeline fast on 2 cores; the stages are the real ones.
FAST_OPTIONS: dict[str, Any] = {"texture_size": 512, "splats": 500}

KEYS = {
    "alice": "hf_test_alice_0123456789",
    "bob": "hf_test_bob_0123456789",
    "limited": "hf_test_limited_0123456789",
    "capped": "hf_test_capped_0123456789",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def astronaut(size: int = 320) -> np.ndarray:
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def astronaut_jpeg(size: int = 320) -> bytes:
    return jpeg_bytes(astronaut(size))


class Process:
    """A child process in its own session (so kill -9 reaches its pool children too)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(
            argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group: parent and pool children, no cleanup."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process itself, then SIGKILL to its group after `timeout`, and to whatever is
        left of the group at the end. A second call does nothing (the group id may be reused).

        Only the leader gets the SIGTERM: a Celery worker then stops its pool processes itself. When
        they got the signal too, the worker replaced each one during its warm shutdown, and waited
        for the new one to load the models before it could exit."""
        if self.stopped:
            return
        self.stopped = True
        if self.alive:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
            except ProcessLookupError:
                pass
        # Whatever is left of the group (orphaned pool children) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    """One deployment under test: data dir, optional Redis, workers, API."""

    root: Path
    env: dict[str, str]
    redis_port: int | None = None
    api_port: int = 0
    redis: Process | None = None
    api: Process | None = None
    workers: list[Process] = field(default_factory=list)
    # "uvicorn": uvicorn's own command line; "headforge": `python -m headforge.service.server`, the
    # server `headforge serve` runs (uvicorn with the read timeouts of docs/service.md).
    server: str = "uvicorn"
    _names: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_redis(self) -> None:
        assert self.redis_port is not None
        self.redis = Process(
            "redis",
            [
                REDIS_SERVER,
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.root),
                "--save",
                "",
                "--protected-mode",
                "yes",
            ],
            self.env,
            self.root,
        )
        import redis

        client = redis.Redis(port=self.redis_port, socket_connect_timeout=1)
        wait_until(lambda: _pings(client), 20, "redis-server")

    def stop_redis(self) -> None:
        """Graceful shutdown (Redis flushes the AOF), like a restart by an orchestrator."""
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def start_worker(self, concurrency: int = 1, **env: str) -> Process:
        """A `headforge worker` on both queues; `env` overrides the stack's environment for it alone."""
        self._names += 1
        worker = Process(
            f"worker{self._names}",
            [
                sys.executable,
                "-m",
                "headforge",
                "worker",
                "--queue",
                "cpu",
                "--queue",
                "gpu",
                "--concurrency",
                str(concurrency),
                "--hostname",
                f"w{self._names}@%h",
            ],
            {**self.env, **env},
            self.root,
        )
        self.workers.append(worker)
        return worker

    @contextlib.contextmanager
    def worker(self, concurrency: int = 1, **env: str) -> Iterator[Process]:
        """A worker that runs only inside the `with` block, so a stack shared by several tests is
        back to having no worker (nothing consumes its queue) when the block ends."""
        worker = self.start_worker(concurrency, **env)
        try:
            self.wait_for_workers(1)
            yield worker
        except BaseException:
            print(self.logs(), file=sys.stderr)
            raise
        finally:
            worker.stop()
            self.workers.remove(worker)

    def start_api(self) -> None:
        if self.server == "headforge":
            argv = [
                sys.executable,
                "-m",
                "headforge.service.server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
            ]
        else:
            argv = [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "headforge.service.app:app_from_env",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
            ]
        self.api = Process("api", argv, self.env, self.root)
        wait_until(self._healthy, 60, "the API to answer /healthz")

    def _healthy(self) -> bool:
        if self.api is not None and not self.api.alive:
            raise RuntimeError(f"the API exited:\n{self.api.tail()}")
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_api(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None

    def wait_for_workers(self, count: int, timeout: float = 120) -> None:
        wait_until(lambda: self.ready_workers() >= count, timeout, f"{count} workers")

    def ready_workers(self) -> int:
        try:
            response = httpx.get(f"{self.base_url}/readyz", timeout=5)
        except httpx.HTTPError:
            return 0
        return int(response.json().get("workers", 0)) if response.status_code == 200 else 0

    def client(self, key: str | None = "alice") -> HeadforgeClient:
        return HeadforgeClient(self.base_url, api_key=KEYS[key] if key else None, timeout=120)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.stop_api()
        self.stop_redis()

    def logs(self) -> str:
        parts = [p for p in [self.api, self.redis, *self.workers] if p is not None]
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in parts)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


def write_keys_file(path: Path) -> Path:
    entries = [
        {"id": "alice", "sha256": hash_key(KEYS["alice"])},
        {"id": "bob", "sha256": hash_key(KEYS["bob"])},
        {
            "id": "limited",
            "sha256": hash_key(KEYS["limited"]),
            "rate_limit_per_minute": 6,
            "rate_limit_burst": 2,
        },
        {"id": "capped", "sha256": hash_key(KEYS["capped"]), "max_queued": 1},
    ]
    path.write_text(json.dumps({"keys": entries}))
    return path


def base_env(root: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEADFORGE_") or k == "HEADFORGE_HOME"}
    env.update(
        {
            "HEADFORGE_DATA_DIR": str(root / "data"),
            "HEADFORGE_JSON_LOGS": "1",
            "HEADFORGE_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "HEADFORGE_LEASE_SECONDS": "4",
            "HEADFORGE_SWEEP_INTERVAL": "1",
            "HEADFORGE_REDISPATCH_AFTER": "120",
            "HEADFORGE_TASK_SOFT_TIME_LIMIT": "240",
            "HEADFORGE_TASK_TIME_LIMIT": "300",
            "HEADFORGE_MAX_UPLOAD_BYTES": "3000000",
            "HEADFORGE_MAX_IMAGE_PIXELS": "6000000",
            "HEADFORGE_MAX_FILES_PER_JOB": "4",
            "HEADFORGE_MAX_FILES_PER_BATCH": "40",
            "HEADFORGE_RATE_LIMIT_PER_MINUTE": "6000",
            "HEADFORGE_RATE_LIMIT_BURST": "1000",
            "HEADFORGE_WEBHOOK_SECRET": "test-webhook-secret",
            "HEADFORGE_WEBHOOK_ALLOW_PRIVATE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def make_stack(root: Path, *, redis: bool, auth: bool = True, server: str = "uvicorn", **env: str) -> Stack:
    root.mkdir(parents=True, exist_ok=True)
    overrides = dict(env)
    redis_port = free_port() if redis else None
    if redis_port is not None:
        overrides["HEADFORGE_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    if auth:
        overrides["HEADFORGE_API_KEYS_FILE"] = str(write_keys_file(root / "keys.json"))
    return Stack(
        root=root, env=base_env(root, **overrides), redis_port=redis_port, api_port=free_port(), server=server
    )


def require_redis() -> None:
    from shutil import which

    if which(REDIS_SERVER) is None:
        missing("redis-server is not installed (scripts/test.sh installs it)")


def require_models() -> None:
    from headforge.errors import ModelsMissingError
    from headforge.models.runtime import default_network_paths

    try:
        default_network_paths()
    except ModelsMissingError as error:
        missing(f"default models missing ({error.message}); run `headforge models pull`")


def wait_job(client: HeadforgeClient, job_id: str, timeout: float = 240) -> dict[str, Any]:
    return client.wait(job_id, timeout=timeout, poll=0.2)


class WebhookReceiver:
    """A local HTTP server that records every POST it gets: headers, body, the monotonic time it
    arrived and the status it was answered with. It answers 500 to the first `fail_first`
    deliveries of each job, then 204."""

    def __init__(self, fail_first: int = 0) -> None:
        received: list[dict[str, Any]] = []
        self.received = received
        seen: dict[str, int] = {}
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                at = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    job_id = str(json.loads(body)["job"]["id"])
                except (ValueError, KeyError, TypeError):
                    job_id = ""
                with lock:
                    seen[job_id] = seen.get(job_id, 0) + 1
                    status = 500 if seen[job_id] <= fail_first else 204
                    received.append({"headers": dict(self.headers), "body": body, "at": at, "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        return [r for r in self.received if json.loads(r["body"])["job"]["id"] == job_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def running_stack(
    root: Path, *, redis: bool, worker_concurrency: int = 0, server: str = "uvicorn", **env: str
) -> Iterator[Stack]:
    """A stack with Redis (if asked), a worker (if `worker_concurrency`) and the API; the logs are
    printed when starting it fails, and every process is stopped at the end."""
    if redis:
        require_redis()
    require_models()
    stack = make_stack(root, redis=redis, auth=True, server=server, **env)
    try:
        if redis:
            stack.start_redis()
        if worker_concurrency:
            stack.start_worker(concurrency=worker_concurrency)
        stack.start_api()
        if worker_concurrency:
            stack.wait_for_workers(1)
        yield stack
    except BaseException:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()


@contextlib.contextmanager
def moto_server(log_dir: Path, bucket: str) -> Iterator[str]:
    """A moto S3 server (its real HTTP server, in a subprocess) holding an empty `bucket`; yields its URL."""
    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError:
        missing("boto3 and moto[server] are needed (pip install -e '.[dev]')")
    port = free_port()
    server = Process(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        {**os.environ},
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            if not server.alive:
                raise RuntimeError(f"moto_server exited:\n{server.tail()}")
            try:
                return httpx.get(f"{url}/", timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "moto_server")
        boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket=bucket)
        yield url
    finally:
        server.stop()

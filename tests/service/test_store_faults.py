"""Artifact-store faults: S3 behind a TCP proxy we can cut (refused or reset connections, or a canned
throttling / 5xx / 403 answer), and a full local disk. Transient failures must surface as
`service_unavailable` (retried by the worker, 503 at the API); permanent ones must not.

The S3 server is moto's real HTTP server; nothing on the service path is mocked."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from stacklib import (
    KEYS,
    REPO,
    Stack,
    astronaut_jpeg,
    free_port,
    moto_server,
    running_stack,
    wait_until,
)

from headforge.errors import HeadforgeError, NotFoundError, ServiceUnavailableError
from headforge.service.store import S3ArtifactStore

SECRET = "hf-store-faults-secret-never-shown"
BUCKET = "heads"


# --------------------------------------------------------------------------- a cuttable TCP proxy


class TcpProxy:
    """Forwards connections on a fixed loopback port to `target_port`.

    `close()` stops listening and cuts every open connection, so clients get "connection refused"
    until `open()` listens on the same port again. `answer(raw)` makes each new connection get the
    bytes `raw` (a whole HTTP response) instead of being forwarded; `answer(b"")` accepts and then
    drops each connection without a reply; `answer(None)` forwards again. `close_after(n)` closes the
    proxy once `n` more bytes have gone upstream (the chunk that would pass `n` is not forwarded)."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.acceptor: threading.Thread | None = None
        self.sockets: set[socket.socket] = set()
        self.canned: bytes | None = None
        self.upstream_budget: int | None = None
        self.open()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self.lock:
            assert self.listener is None, "the proxy is already open"
            self.listener = listener
        self.acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self.acceptor.start()

    def close(self) -> None:
        """Stop listening (new connections are refused) and cut every forwarded connection."""
        with self.lock:
            listener, self.listener = self.listener, None
            open_sockets, self.sockets = self.sockets, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
            listener.close()
        if self.acceptor is not None:
            self.acceptor.join(timeout=10)
            assert not self.acceptor.is_alive(), "the proxy's accept loop did not stop"
        for sock in open_sockets:
            _drop(sock)

    def close_after(self, nbytes: int) -> None:
        """Forward `nbytes` more bytes upstream, then close (as if S3 went away mid-request)."""
        with self.lock:
            self.upstream_budget = nbytes

    def _spend(self, nbytes: int) -> bool:
        """Whether `nbytes` more may go upstream; when not, the proxy closes (from another thread)."""
        with self.lock:
            if self.upstream_budget is None:
                return True
            if nbytes <= self.upstream_budget:
                self.upstream_budget -= nbytes
                return True
            self.upstream_budget = None
        threading.Thread(target=self.close, daemon=True).start()
        return False

    def answer(self, raw: bytes | None) -> None:
        """What new connections get: `raw` bytes, a drop (b""), or forwarding (None)."""
        with self.lock:
            self.canned = raw

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _address = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(listener, client), daemon=True).start()

    def _track(self, listener: socket.socket, sock: socket.socket) -> bool:
        """Remember `sock` so `close()` can cut it; False (and `sock` closed) when the listener that
        accepted its connection was closed meanwhile."""
        with self.lock:
            if self.listener is listener:
                self.sockets.add(sock)
                return True
        _drop(sock)
        return False

    def _serve(self, listener: socket.socket, client: socket.socket) -> None:
        if not self._track(listener, client):
            return
        with self.lock:
            canned = self.canned
        if canned is not None:
            _reply(client, canned)
            with self.lock:
                self.sockets.discard(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            _drop(client)
            return
        if not self._track(listener, upstream):
            _drop(client)
            return
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream, self._spend)
        back.join()
        with self.lock:
            self.sockets.discard(client)
            self.sockets.discard(upstream)
        _drop(client)
        _drop(upstream)


def _pump(source: socket.socket, sink: socket.socket, allow: Callable[[int], bool] | None = None) -> None:
    """Copy bytes one way until either side closes (or `allow` refuses a chunk), then half-close the sink."""
    try:
        while data := source.recv(65536):
            if allow is not None and not allow(len(data)):
                # The proxy is closing (another thread drops both sockets). No half-close here: a clean
                # end of the request would let S3 answer 400 for the short body before the drop.
                return
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _reply(client: socket.socket, raw: bytes) -> None:
    """Read the request head, send `raw` (nothing when empty) and close. After a reply the rest of
    the request is drained first, so the client reads the answer instead of a reset."""
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(65536)
            if not data:
                break
            head += data
        if raw:
            client.sendall(raw)
            client.shutdown(socket.SHUT_WR)
            client.settimeout(10)
            while client.recv(65536):
                pass
    except OSError:
        pass
    finally:
        _drop(client)


def _drop(sock: socket.socket) -> None:
    """Cut a connection in both directions and close the socket."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def s3_answer(status: int, code: str) -> bytes:
    """A whole S3 error response, as a server under load or in trouble sends it."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>canned {code} from the test proxy</Message><RequestId>r1</RequestId></Error>"
    ).encode()
    reason = {
        403: "Forbidden",
        404: "Not Found",
        500: "Internal Server Error",
        501: "Not Implemented",
        503: "Service Unavailable",
    }[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server (its real HTTP server, in a subprocess) with the bucket `heads`."""
    with moto_server(tmp_path_factory.mktemp("moto"), BUCKET) as url:
        yield url


@pytest.fixture()
def proxy(moto_url: str) -> Iterator[TcpProxy]:
    port = int(moto_url.rsplit(":", 1)[1])
    relay = TcpProxy(port)
    yield relay
    relay.close()


def _s3_client(boto3: Any, url: str) -> Any:
    """A boto3 client with test credentials and one retry, so an outage is reported quickly."""
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key=SECRET,
        config=Config(retries={"mode": "standard", "total_max_attempts": 2}),
    )


def _store(url: str, prefix: str) -> S3ArtifactStore:
    import boto3

    return S3ArtifactStore(BUCKET, prefix=prefix, client=_s3_client(boto3, url))


def _assert_transient(error: HeadforgeError, operation: str, key: str | None) -> None:
    """A transient store error: 503 `service_unavailable` naming the operation and bucket, no secret."""
    assert isinstance(error, ServiceUnavailableError) and error.transient and error.http_status == 503
    assert error.code == "service_unavailable"
    assert error.details["operation"] == operation and error.details["bucket"] == BUCKET
    assert error.details.get("key") == key
    assert BUCKET in error.message and operation in error.message
    assert SECRET not in json.dumps(error.to_dict())
    assert "http://" not in json.dumps(error.to_dict())  # boto3's text names the endpoint: logs only
    assert isinstance(error.__cause__, Exception)  # the boto3 error is kept for the logs


# --------------------------------------------------------------------------- S3 store, one call at a time


def _every_call(store: S3ArtifactStore, source: Path) -> list[tuple[str, str | None, Any]]:
    """Each store method, with the operation and key its error should name."""
    return [
        ("head_bucket", None, store.ping),
        ("put_object", "jobs/j1/a/new.json", lambda: store.put_bytes("jobs/j1/a/new.json", b"{}")),
        ("upload_file", "jobs/j1/a/new.glb", lambda: store.put_file("jobs/j1/a/new.glb", source)),
        ("upload_file", "jobs/j1/b/new.glb", lambda: store.adopt_files([("jobs/j1/b/new.glb", source)])),
        ("get_object", "jobs/j1/a/result.json", lambda: store.get_bytes("jobs/j1/a/result.json")),
        ("get_object", "jobs/j1/a/result.json", lambda: list(store.iter_chunks("jobs/j1/a/result.json"))),
        ("head_object", "jobs/j1/a/result.json", lambda: store.size("jobs/j1/a/result.json")),
        ("list_objects_v2", "jobs/j1", lambda: store.list("jobs/j1")),
        ("list_objects_v2", "jobs/j1", lambda: store.delete_prefix("jobs/j1")),
    ]


@pytest.mark.parametrize("cut", ["refused", "dropped"])
def test_s3_outage_is_transient_on_every_call(proxy: TcpProxy, tmp_path: Path, cut: str) -> None:
    """Refused connections (endpoint down) and connections dropped without an answer (a crashing
    load balancer) both raise `ServiceUnavailableError`, from every store method; once the proxy
    forwards again the same store works and a missing key is `not_found` as before."""
    store = _store(proxy.url, f"outage-{cut}")
    source = tmp_path / "mesh.glb"
    source.write_bytes(os.urandom(50_000))
    store.put_bytes("jobs/j1/a/result.json", b'{"ok": true}')

    if cut == "refused":
        proxy.close()
    else:
        proxy.answer(b"")
    for operation, key, call in _every_call(store, source):
        with pytest.raises(ServiceUnavailableError) as caught:
            call()
        _assert_transient(caught.value, operation, key)
        expected = "EndpointConnectionError" if cut == "refused" else "ConnectionClosedError"
        assert caught.value.details["error"] == expected, caught.value.to_dict()

    if cut == "refused":
        proxy.open()
    else:
        proxy.answer(None)
    store.ping()
    assert store.get_bytes("jobs/j1/a/result.json") == b'{"ok": true}'
    store.put_file("jobs/j1/a/mesh.glb", source)
    assert b"".join(store.iter_chunks("jobs/j1/a/mesh.glb")) == source.read_bytes()
    with pytest.raises(NotFoundError):
        store.get_bytes("jobs/j1/a/missing.json")
    assert store.size("jobs/j1/a/missing.json") is None
    assert store.delete_prefix("jobs/j1") == 2 and store.list("jobs") == []


@pytest.mark.parametrize(
    ("status", "code"), [(503, "SlowDown"), (503, "ServiceUnavailable"), (500, "InternalError")]
)
def test_s3_throttling_and_server_errors_are_transient(
    proxy: TcpProxy, tmp_path: Path, status: int, code: str
) -> None:
    """A throttling or 5xx answer (after boto3's own retry) is `service_unavailable` with the S3 code
    and status in its details, also through `upload_file`, which boto3 wraps in its own error."""
    store = _store(proxy.url, f"answer-{code}")
    source = tmp_path / "mesh.glb"
    source.write_bytes(os.urandom(20_000))
    proxy.answer(s3_answer(status, code))
    calls = [
        ("put_object", lambda: store.put_bytes("jobs/j2/a/x.json", b"{}")),
        ("upload_file", lambda: store.put_file("jobs/j2/a/x.glb", source)),
        ("get_object", lambda: store.get_bytes("jobs/j2/a/x.json")),
    ]
    for operation, call in calls:
        with pytest.raises(ServiceUnavailableError) as caught:
            call()
        key = "jobs/j2/a/x.glb" if operation == "upload_file" else "jobs/j2/a/x.json"
        _assert_transient(caught.value, operation, key)
        assert caught.value.details["code"] == code and caught.value.details["http_status"] == status
        assert code in caught.value.message


def test_s3_refusals_are_not_transient(proxy: TcpProxy) -> None:
    """403 AccessDenied passes through unchanged (the job fails: retrying cannot fix credentials),
    a 404 NoSuchKey stays `not_found`, and /readyz's ping reports a refused bucket as not ready."""
    from botocore.exceptions import ClientError

    store = _store(proxy.url, "refusals")
    proxy.answer(s3_answer(403, "AccessDenied"))
    with pytest.raises(ClientError) as caught:
        store.get_bytes("jobs/j3/a/x.json")
    assert not isinstance(caught.value, HeadforgeError)
    assert caught.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError):
        store.put_bytes("jobs/j3/a/x.json", b"{}")
    with pytest.raises(ServiceUnavailableError) as refused:
        store.ping()
    assert refused.value.details == {"operation": "head_bucket", "bucket": BUCKET, "error": "ClientError"}

    proxy.answer(s3_answer(404, "NoSuchKey"))
    with pytest.raises(NotFoundError):
        store.get_bytes("jobs/j3/a/x.json")

    # 501 means the store lacks a feature: no retry fixes that.
    proxy.answer(s3_answer(501, "NotImplemented"))
    with pytest.raises(ClientError) as unimplemented:
        store.put_bytes("jobs/j3/a/x.json", b"{}")
    assert not isinstance(unimplemented.value, HeadforgeError)

    # A 403 met while handling an outage (as run_job's cleanup does) is still a 403, not the outage.
    proxy.answer(b"")
    try:
        store.get_bytes("jobs/j3/a/x.json")
    except ServiceUnavailableError:
        proxy.answer(s3_answer(403, "AccessDenied"))
        with pytest.raises(ClientError) as during:
            store.delete_prefix("jobs/j3")
        assert during.value.response["Error"]["Code"] == "AccessDenied"
    else:
        pytest.fail("a dropped connection did not raise ServiceUnavailableError")


# --------------------------------------------------------------------------- local store, full disk

DISK_FULL_SCRIPT = textwrap.dedent("""
    import json, subprocess, sys
    from pathlib import Path
    from headforge.errors import ServiceUnavailableError
    from headforge.service.store import LocalArtifactStore

    root = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(root)], check=True)
    store = LocalArtifactStore(root / "artifacts")
    report = {}
    try:
        store.put_bytes("jobs/j1/a/big.bin", b"x" * 2_000_000)
    except ServiceUnavailableError as error:
        report["full"] = error.to_dict()
    report["left"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    store.put_bytes("jobs/j1/a/small.json", b"{}")  # space for a small object is still there
    report["small"] = store.get_bytes("jobs/j1/a/small.json").decode()
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    try:
        store.put_bytes("jobs/j1/a/other.json", b"{}")
    except ServiceUnavailableError as error:
        report["readonly"] = "transient: " + error.message
    except OSError as error:
        report["readonly"] = type(error).__name__ + ":" + str(error.errno)
    print(json.dumps(report))
""")


def test_full_local_disk_is_transient_other_os_errors_are_not(tmp_path: Path) -> None:
    """On a real, tiny tmpfs (mounted in a private user and mount namespace), a write that fills the
    disk raises `service_unavailable` and leaves no temporary file; a read-only disk (EROFS) is a
    fault to fix and passes through as OSError."""
    import errno

    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine refuses user/mount namespaces: {probe.stderr.strip()}")
    done = subprocess.run(
        [unshare, "-rm", sys.executable, "-c", DISK_FULL_SCRIPT, str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    full = report["full"]
    assert full["code"] == "service_unavailable" and "disk is full" in full["message"]
    assert full["details"] == {"operation": "write", "error": "ENOSPC", "key": "jobs/j1/a/big.bin"}
    assert report["left"] == []  # no half-written object, no temporary file
    assert report["small"] == "{}"
    assert report["readonly"] == f"OSError:{errno.EROFS}"


# --------------------------------------------------------------------------- the whole stack


@contextlib.contextmanager
def s3_stack(root: Path, endpoint: str) -> Iterator[Stack]:
    """Redis and the API (no worker yet) with the artifact store in the moto bucket behind `endpoint`.

    The lease is long, so a job can only go back to the queue through run_job's own transient-error
    path (never through the sweeper's lease expiry); `HEADFORGE_MAX_ATTEMPTS=6` leaves room for a slow
    machine to fit several failed attempts into the outage before the test reopens the proxy."""
    no_config = root / "no-aws-config"
    with running_stack(
        root,
        redis=True,
        HEADFORGE_S3_BUCKET=BUCKET,
        HEADFORGE_S3_PREFIX="stack",
        HEADFORGE_S3_ENDPOINT_URL=endpoint,
        HEADFORGE_S3_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_CONFIG_FILE=str(no_config),
        AWS_SHARED_CREDENTIALS_FILE=str(no_config),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_RETRY_MODE="standard",
        AWS_MAX_ATTEMPTS="2",
        HEADFORGE_LEASE_SECONDS="600",
        HEADFORGE_MAX_ATTEMPTS="6",
    ) as stack:
        yield stack


def _readyz(stack: Stack) -> httpx.Response:
    """GET /readyz (a generous timeout: the answer, not its speed, is under test)."""
    return httpx.get(f"{stack.base_url}/readyz", timeout=60)


def _queued_after_an_attempt(stack: Stack, job_id: str) -> dict[str, Any] | None:
    """The job once it is back in the queue after at least one attempt; fails on a finished job."""
    with stack.client() as client:
        job = client.job(job_id)
    assert job["status"] not in ("failed", "succeeded", "canceled"), job
    return job if job["status"] == "queued" and job["attempts"] >= 1 else None


def _moto_keys(moto_url: str, prefix: str) -> list[str]:
    """Every key under `prefix`, read from moto directly (not through the proxy)."""
    import boto3

    pages = (
        _s3_client(boto3, moto_url).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.mark.service
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_s3_outage_requeues_the_job_and_it_succeeds_after(
    proxy: TcpProxy, moto_url: str, tmp_path: Path
) -> None:
    """The gateway stores the upload, then S3 goes away before any worker runs: the job's attempt
    fails transiently and goes back to the queue (not failed), /readyz names the store, a submit is
    refused with 503; once S3 is back the job succeeds and its artifacts download intact."""
    with s3_stack(tmp_path / "stack", proxy.url) as stack:
        ready = _readyz(stack)
        assert ready.status_code == 200 and ready.json()["checks"]["store"] == "ok"
        photo = astronaut_jpeg(320)
        with stack.client() as client:
            job_id = client.submit([("astronaut.jpg", photo)], texture_size=512, splats=500)["id"]
        inputs = _moto_keys(moto_url, f"stack/inputs/{job_id}/")
        assert len(inputs) == 1  # the gateway wrote the upload to S3 before answering 202

        proxy.close()
        down = _readyz(stack)
        assert down.status_code == 503, down.text
        error = down.json()["error"]
        assert error["code"] == "service_unavailable" and "store" in error["message"]
        assert set(error["details"]["failed"]) == {"store"}
        assert BUCKET in error["details"]["failed"]["store"] and SECRET not in down.text
        refused = httpx.post(
            f"{stack.base_url}/v1/jobs",
            files={"images": ("b.jpg", photo, "image/jpeg")},
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
            timeout=120,
        )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        assert (
            refused.headers["Retry-After"] == "5"
            and refused.json()["error"]["details"]["operation"] == "put_object"
        )
        with stack.client() as client:
            assert [job["id"] for job in client.jobs()] == [job_id]  # the refused submit left no job

        worker = stack.start_worker()
        job = wait_until(lambda: _queued_after_an_attempt(stack, job_id), 180, "a transient retry", 0.05)
        assert job["error"] is None and job["artifacts"] == []
        wait_until(
            lambda: "transient error, retrying" in worker.log_path.read_text(errors="replace"),
            60,
            "the worker to log the retry",
        )
        assert "the S3 artifact store is unavailable" in worker.log_path.read_text(errors="replace")

        proxy.open()
        back = _readyz(stack)
        assert back.status_code == 200 and back.json()["checks"]["store"] == "ok", back.text
        with stack.client() as client:
            done = client.wait(job_id, timeout=300, poll=0.2)
            assert done["status"] == "succeeded", done["error"]
            assert done["attempts"] >= 2 and done["error"] is None
            saved = client.download_artifacts(done, tmp_path / "out")  # checks size and sha256 too
        by_name = {a["name"]: a for a in done["artifacts"]}
        assert {p.relative_to(tmp_path / "out").as_posix() for p in saved} == set(by_name)
        for path in saved:
            name = path.relative_to(tmp_path / "out").as_posix()
            assert hashlib.sha256(path.read_bytes()).hexdigest() == by_name[name]["sha256"]
        assert "result.json" in by_name and done["result"] is not None

        # Only the winning attempt's files are in the bucket, and they are the recorded ones.
        stored = _moto_keys(moto_url, f"stack/jobs/{job_id}/")
        attempts = {key.split("/")[3] for key in stored}
        assert len(attempts) == 1
        assert sorted(key.split("/", 4)[4] for key in stored) == sorted(by_name)


@pytest.mark.service
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_batch_cut_off_by_an_s3_outage_leaves_no_job(
    proxy: TcpProxy, moto_url: str, tmp_path: Path
) -> None:
    """S3 goes away after the first upload of a batch is stored: the submit answers 503 and records no
    job, so nothing runs without its batch and a retried submit cannot duplicate work."""
    with s3_stack(tmp_path / "stack", proxy.url) as stack:
        photos = [(f"{i}.jpg", astronaut_jpeg(480 + 32 * i)) for i in range(3)]
        assert all(len(data) > 32 * 1024 for _name, data in photos)
        before = set(_moto_keys(moto_url, "stack/inputs/"))  # the bucket is shared by this module's tests
        proxy.close_after(len(photos[0][1]) + 16 * 1024)  # the first PUT with its headers, not the second
        response = httpx.post(
            f"{stack.base_url}/v1/batches",
            files=[("images", (name, data, "image/jpeg")) for name, data in photos],
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
            timeout=120,
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "service_unavailable"
        assert (
            len(set(_moto_keys(moto_url, "stack/inputs/")) - before) == 1
        )  # the premise: the cut came after one upload
        proxy.open()
        with stack.client() as client:
            assert client.jobs() == []

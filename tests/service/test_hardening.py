"""Hostile and very large inputs against a real stack (redis-server, uvicorn through `headforge.service.server`,
and, for the disk tests, a Celery worker), spoken to over loopback only.

Every hostile request here is bounded: bodies are generated on the fly and stop at a fixed size, and
every socket has a client-side deadline. Memory is read from the API process's /proc entries (its
peak RSS is reset first through `clear_refs`). The disk tests run the whole stack inside a private
user and mount namespace (`unshare -rm`) with a small tmpfs as the artifact directory, so a full or
read-only disk is a real one."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from stacklib import KEYS, REPO, Stack, astronaut_jpeg, running_stack

from headforge.errors import TruncatedImageError, WebhookRefusedError
from headforge.service.webhooks import check_webhook_url

pytestmark = pytest.mark.timeout(600)

MAX_REQUEST = 4_000_000
MAX_UPLOAD = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis and the API (no worker: accepted jobs stay queued), with the production server's
    read timeouts shortened, a 4 MB request limit, 20 MiB per file and 40 MP per image."""
    with running_stack(
        tmp_path_factory.mktemp("hardening"),
        redis=True,
        server="headforge",
        HEADFORGE_MAX_REQUEST_BYTES=str(MAX_REQUEST),
        HEADFORGE_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        HEADFORGE_MAX_IMAGE_PIXELS="40000000",
        HEADFORGE_HEADER_TIMEOUT="2",
        HEADFORGE_BODY_TIMEOUT="3",
        HEADFORGE_MAX_QUEUED_PER_KEY="1000",
    ) as running:
        yield running


def _auth(key: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"}


def _api_pid(stack: Stack) -> int:
    assert stack.api is not None
    return stack.api.popen.pid


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# --------------------------------------------------------------------------- chunked uploads


def _chunked_upload(
    port: int, headers: dict[str, str], total: int, chunk: int = 64 * 1024
) -> tuple[int, bytes]:
    """POST a chunked multipart body of up to `total` bytes to /v1/jobs; return (bytes sent when the
    server answered or closed, the response bytes)."""
    boundary = "hfboundary"
    lines = [
        "POST /v1/jobs HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Transfer-Encoding: chunked",
        f"Content-Type: multipart/form-data; boundary={boundary}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    block = b"\xff" * chunk
    sent = 0
    response = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        try:
            first = preamble
            while sent < total:
                payload = first or block
                first = b""
                sock.sendall(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                sent += len(payload)
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
        except OSError:  # the server closed the connection
            pass
        sock.settimeout(30)
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                response += part
                if b"\r\n\r\n" in response and b'"error"' in response:
                    break
        except OSError:
            pass
    return sent, response


def _status_and_error(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    start = body.find(b"{")
    return status, json.loads(body[start : body.rfind(b"}") + 1])["error"]


def test_chunked_upload_without_key_is_refused_before_the_body(stack: Stack) -> None:
    """No key, no Content-Length: 401 comes back after at most one limit's worth of body (plus what
    the loopback socket buffers hold), not after the whole 192 MB."""
    sent, response = _chunked_upload(stack.api_port, {}, total=192 * 1024 * 1024)
    status, error = _status_and_error(response)
    assert status == 401 and error["code"] == "unauthorized"
    assert sent < MAX_REQUEST + 64 * 1024 * 1024, sent


def test_oversized_chunked_upload_stops_at_the_request_limit(stack: Stack) -> None:
    sent, response = _chunked_upload(stack.api_port, _auth(), total=192 * 1024 * 1024)
    status, error = _status_and_error(response)
    assert status == 413 and error["code"] == "file_too_large"
    assert error["details"]["max_bytes"] == MAX_REQUEST
    assert sent < MAX_REQUEST + 64 * 1024 * 1024, sent


# --------------------------------------------------------------------------- zip bombs


def _zip_bomb(entries: int, size: int) -> bytes:
    buffer = io.BytesIO()
    zeros = bytes(size)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for index in range(entries):
            archive.writestr(f"photo{index:03d}.jpg", zeros)
    return buffer.getvalue()


def test_zip_bomb_is_refused_before_extraction(stack: Stack) -> None:
    """40 entries of 20 MiB zeros (800 MiB expanded, under 1 MB on the wire): 413 from the declared
    sizes, and the API's peak RSS grows by less than 300 MB."""
    bomb = _zip_bomb(40, MAX_UPLOAD)
    assert len(bomb) < MAX_REQUEST
    pid = _api_pid(stack)
    _reset_peak(pid)
    before = _proc_kib(pid, "VmRSS")
    response = httpx.post(
        f"{stack.base_url}/v1/batches",
        headers=_auth(),
        timeout=120,
        files={"archive": ("bomb.zip", bomb, "application/zip")},
    )
    growth_mb = (_proc_kib(pid, "VmHWM") - before) / 1024
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "file_too_large"
    assert growth_mb < 300, growth_mb


def test_zip_with_a_lying_entry_size_is_refused(stack: Stack) -> None:
    """An entry whose data expands past the size its header declares is cut off by the running cap."""
    good = astronaut_jpeg(64)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.jpg", good)
    data = bytearray(buffer.getvalue())
    # Patch the declared uncompressed size (local header offset 22, central directory +24) to 100 bytes.
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    data[local + 22 : local + 26] = (100).to_bytes(4, "little")
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")
    response = httpx.post(
        f"{stack.base_url}/v1/batches",
        headers=_auth(),
        timeout=60,
        files={"archive": ("lie.zip", bytes(data), "application/zip")},
    )
    assert response.status_code in (413, 415), response.text
    assert response.json()["error"]["code"] in ("file_too_large", "not_an_image")


def _zip_of(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_entry_count_is_checked_before_the_central_directory_is_parsed() -> None:
    """The end record's declared count decides, so a huge central directory is never parsed: here
    the record claims 65,000 entries over a directory that holds one."""
    from headforge.errors import TooManyFilesError
    from headforge.service.app import _unzip
    from headforge.service.settings import Settings

    data = bytearray(_zip_of({"a.jpg": astronaut_jpeg(64)}))
    end = data.rfind(b"PK\x05\x06")
    data[end + 8 : end + 12] = (65000).to_bytes(2, "little") * 2  # entries on this disk, in all
    with pytest.raises(TooManyFilesError) as caught:
        _unzip(bytes(data), Settings(data_dir=Path("unused")))
    assert caught.value.details["entries"] == 65000


def test_zip_entry_that_is_no_image_is_refused_at_its_first_block() -> None:
    from headforge.errors import NotAnImageError
    from headforge.service.app import _unzip
    from headforge.service.settings import Settings

    with pytest.raises(NotAnImageError) as caught:
        _unzip(
            _zip_of({"a.jpg": astronaut_jpeg(64), "b.jpg": b"MZ" + bytes(5000)}),
            Settings(data_dir=Path("unused")),
        )
    assert caught.value.details["filename"] == "b.jpg"
    assert [
        u.filename for u in _unzip(_zip_of({"a.jpg": astronaut_jpeg(64)}), Settings(data_dir=Path("unused")))
    ] == ["a.jpg"]


# --------------------------------------------------------------------------- large and lying images


def _big_rgba_png() -> bytes:
    image = Image.new("RGBA", (8000, 5000), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_three_40mp_pngs_at_once_stay_under_1gb(stack: Stack) -> None:
    png = _big_rgba_png()
    pid = _api_pid(stack)
    _reset_peak(pid)
    results: list[int] = []

    def send() -> None:
        response = httpx.post(
            f"{stack.base_url}/v1/jobs",
            headers=_auth(),
            timeout=300,
            files={"images": ("big.png", png, "image/png")},
        )
        results.append(response.status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    peak_mb = _proc_kib(pid, "VmHWM") / 1024
    assert results == [202, 202, 202]
    assert peak_mb < 1024, peak_mb


def _lying_jpeg(width: int, height: int) -> bytes:
    """A real 16×16 JPEG whose frame header claims `width`×`height` (the scan data stays 16×16's)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 60)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def test_jpeg_whose_data_ends_far_before_its_size_is_refused(stack: Stack) -> None:
    data = _lying_jpeg(6000, 6000)
    assert len(data) < 1000
    response = httpx.post(
        f"{stack.base_url}/v1/jobs",
        headers=_auth(),
        timeout=60,
        files={"images": ("lie.jpg", data, "image/jpeg")},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("truncated_image", "corrupt_image")


def test_gateway_check_refuses_the_lying_jpeg_and_accepts_real_ones() -> None:
    from headforge.pipeline.decode import verify_image

    with pytest.raises(TruncatedImageError):
        verify_image(_lying_jpeg(6000, 6000))
    # Legitimate extremes pass: a flat gray image (the fewest bits per block), progressive and
    # optimized, and a real photo.
    for options in (
        {"quality": 95},
        {"quality": 30, "optimize": True},
        {"progressive": True, "optimize": True},
    ):
        buffer = io.BytesIO()
        Image.new("L", (2400, 1600), 128).save(buffer, "JPEG", **options)
        probe = verify_image(buffer.getvalue())
        assert (probe.width, probe.height) == (2400, 1600)
    assert verify_image(astronaut_jpeg(320)).format == "JPEG"


# --------------------------------------------------------------------------- idempotency


def test_concurrent_batches_with_one_idempotency_key_get_one_batch(stack: Stack) -> None:
    images = [astronaut_jpeg(640), astronaut_jpeg(600), astronaut_jpeg(560)]
    barrier = threading.Barrier(8)
    answers: list[tuple[int, dict[str, Any]]] = []
    key = f"race-{time.time_ns()}"

    def send() -> None:
        files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
        barrier.wait()
        response = httpx.post(
            f"{stack.base_url}/v1/batches",
            timeout=120,
            files=files,
            headers={**_auth("bob"), "Idempotency-Key": key},
        )
        answers.append((response.status_code, response.json()))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert len(answers) == 8
    ok = [body for status, body in answers if status in (201, 202)]
    retry = [body for status, body in answers if status == 409]
    assert len(ok) + len(retry) == 8, answers
    assert all(body["error"]["code"] == "idempotency_in_progress" for body in retry)
    assert ok and len({body["id"] for body in ok}) == 1, answers
    assert all(len(body["jobs"]) == 3 for body in ok)


def test_batch_whose_key_is_reserved_but_not_recorded_gets_409_not_404(stack: Stack) -> None:
    """The state between a first request's reservation of the key and its batch record, made
    directly in Redis: a repeat of that request is told to retry (409), never 404."""
    from headforge.service.app import Upload, _fingerprint, validate_options
    from headforge.service.jobs import JobStore, make_backend
    from headforge.service.settings import Settings

    image = astronaut_jpeg(200)
    key = f"reserved-{time.time_ns()}"
    settings = Settings(data_dir=stack.root / "data", redis_url=stack.env["HEADFORGE_REDIS_URL"])
    jobs = JobStore(make_backend(settings), settings)
    fingerprint = _fingerprint("batch", [Upload("0.jpg", image)], validate_options({}), None)
    assert jobs.reserve_idempotency("bob", key, fingerprint, "batch_not_recorded_yet") is None
    response = httpx.post(
        f"{stack.base_url}/v1/batches",
        timeout=60,
        files={"images": ("0.jpg", image, "image/jpeg")},
        headers={**_auth("bob"), "Idempotency-Key": key},
    )
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "idempotency_in_progress"
    assert response.headers.get("retry-after")


# --------------------------------------------------------------------------- slow clients


def test_headers_trickled_slowly_are_cut_off(stack: Stack) -> None:
    """A client that sends one header byte every 0.2 s is disconnected by the header timeout (2 s
    here), long before the 60 s it would take to finish."""
    with socket.create_connection(("127.0.0.1", stack.api_port), timeout=5) as sock:
        closed = False
        deadline = time.monotonic() + 60
        text = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 300 + b"\r\n\r\n"
        for byte in text:
            if time.monotonic() > deadline:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                try:
                    closed = sock.recv(4096) == b""
                except OSError:
                    closed = True
                break
        assert closed


def test_body_trickled_slowly_gets_408(stack: Stack) -> None:
    """A well-formed multipart body sent one byte every 0.2 s gets 408 from the body timeout (3 s here)."""
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    preamble = (
        b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    response = b""
    with socket.create_connection(("127.0.0.1", stack.api_port), timeout=5) as sock:
        sock.sendall(head + preamble)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                sock.sendall(b"x")
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                break
        sock.settimeout(10)
        try:
            while part := sock.recv(65536):
                response += part
        except OSError:
            pass
    status, error = _status_and_error(response)
    assert status == 408 and error["code"] == "request_timeout"


# --------------------------------------------------------------------------- webhooks


@pytest.mark.parametrize(
    "address",
    [
        "192.0.0.8",
        "192.0.0.170",
        "192.0.0.9",
        "198.18.0.1",
        "100.64.0.1",
        "192.88.99.1",
        "240.0.0.1",
        "[2001:db8::1]",
        "[64:ff9b:1::1]",
        "[2002:c000:0208::1]",
        "[2001:10::1]",
        "[100::1]",
        "[::ffff:192.0.0.8]",
        "[3fff::1]",
        "[5f00::1]",
        "[2620:4f:8000::1]",
        "192.31.196.1",
        "192.52.193.1",
        "192.175.48.1",
        "[::808:808]",
        "[fec0::1]",
    ],
)
def test_webhook_targets_in_special_purpose_ranges_are_refused(address: str) -> None:
    with pytest.raises(WebhookRefusedError):
        check_webhook_url(f"https://{address}/hook", allow_private=False)


def test_public_webhook_target_is_accepted() -> None:
    assert check_webhook_url("https://8.8.8.8/hook", allow_private=False) == "https://8.8.8.8/hook"


# --------------------------------------------------------------------------- full and read-only disks

DISK_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from pathlib import Path
    sys.path[:0] = [sys.argv[2], str(Path(sys.argv[2]).parent)]
    import httpx
    from stacklib import KEYS, astronaut_jpeg, running_stack

    root = Path(sys.argv[1])
    artifacts = root / "data" / "artifacts"
    artifacts.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(artifacts)], check=True)
    report = {}
    auth = {"Authorization": "Bearer " + KEYS["alice"]}

    def answer(response):
        return {"status": response.status_code, "body": response.json() if response.content else None,
                "retry_after": response.headers.get("retry-after")}

    with running_stack(root, redis=True, HEADFORGE_MAX_UPLOAD_BYTES="300000", HEADFORGE_MAX_ATTEMPTS="2") as stack:
        url = stack.base_url
        image = astronaut_jpeg(320)
        report["ready_at_start"] = httpx.get(url + "/readyz", timeout=10).status_code
        job_a = httpx.post(url + "/v1/jobs", headers=auth, files={"images": ("a.jpg", image)}, timeout=30).json()["id"]
        report["cancel"] = httpx.delete(url + "/v1/jobs/" + job_a, headers=auth, timeout=30).status_code
        subprocess.run(["mount", "-o", "remount,ro", str(artifacts)], check=True)
        report["submit_readonly"] = answer(httpx.post(url + "/v1/jobs", headers=auth,
                                                      files={"images": ("b.jpg", image)}, timeout=30))
        report["delete_readonly"] = answer(httpx.delete(url + "/v1/jobs/" + job_a, headers=auth, timeout=30))
        report["record_after_readonly_delete"] = httpx.get(url + "/v1/jobs/" + job_a, headers=auth, timeout=30).status_code
        report["upload_after_readonly_delete"] = sorted(
            str(p.relative_to(artifacts)) for p in (artifacts / "inputs" / job_a).rglob("*") if p.is_file())
        subprocess.run(["mount", "-o", "remount,rw", str(artifacts)], check=True)
        report["delete_writable"] = httpx.delete(url + "/v1/jobs/" + job_a, headers=auth, timeout=30).status_code
        report["upload_after_delete"] = (artifacts / "inputs" / job_a).exists()
        job_c = httpx.post(url + "/v1/jobs", headers=auth, files={"images": ("c.jpg", image)}, timeout=30).json()["id"]
        stats = os.statvfs(artifacts)
        free = stats.f_bavail * stats.f_frsize
        with open(artifacts / "filler.bin", "wb") as handle:
            handle.write(b"\\0" * max(0, free - 96 * 1024))
        report["ready_when_full"] = answer(httpx.get(url + "/readyz", timeout=10))
        stack.start_worker(concurrency=1)
        deadline = time.monotonic() + 300
        doc = {}
        while time.monotonic() < deadline:
            doc = httpx.get(url + "/v1/jobs/" + job_c, headers=auth, timeout=30).json()
            if doc.get("status") in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.5)
        report["job_on_full_disk"] = {"status": doc.get("status"), "error": doc.get("error"),
                                      "attempts": doc.get("attempts")}
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def disk_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine refuses user/mount namespaces: {probe.stderr.strip()}")
    root = tmp_path_factory.mktemp("disk")
    done = subprocess.run(
        [unshare, "-rm", sys.executable, "-c", DISK_SCRIPT, str(root / "stack"), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert report["ready_at_start"] == 200 and report["cancel"] == 200
    return report


def test_readonly_store_submit_answers_503(disk_report: dict[str, Any]) -> None:
    answer = disk_report["submit_readonly"]
    assert answer["status"] == 503, answer
    assert answer["body"]["error"]["code"] == "service_unavailable"
    assert answer["retry_after"] is not None


def test_readonly_store_delete_keeps_the_record_until_files_are_gone(disk_report: dict[str, Any]) -> None:
    answer = disk_report["delete_readonly"]
    assert answer["status"] == 503, answer
    assert answer["body"]["error"]["code"] == "service_unavailable"
    assert disk_report["record_after_readonly_delete"] == 200
    assert disk_report["upload_after_readonly_delete"], "the upload is still on disk"
    assert disk_report["delete_writable"] == 204
    assert disk_report["upload_after_delete"] is False


def test_full_store_is_not_ready(disk_report: dict[str, Any]) -> None:
    answer = disk_report["ready_when_full"]
    assert answer["status"] == 503, answer
    assert "store" in answer["body"]["error"]["details"]["failed"]


def test_disk_full_during_a_job_is_transient(disk_report: dict[str, Any]) -> None:
    job = disk_report["job_on_full_disk"]
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "service_unavailable", job
    assert job["attempts"] == 2, job

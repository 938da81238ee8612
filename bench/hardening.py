"""Hostile inputs against a real stack: what they cost the API process.

`python bench/hardening.py` starts redis-server and the API (`python -m headforge.service.server`,
no worker: accepted jobs stay queued) on loopback with the default limits, except a 64 MiB request
limit so the chunked uploads stay quick. It then measures, each against a reference taken in the
same run:

- `chunked_401` / `chunked_413`: a chunked multipart upload of up to 1 GiB without a key, and
  with one: the bytes the API process read from its sockets (`/proc/PID/io` rchar) before it
  answered, against the request limit, and the bytes the client got into its socket;
- `zip_bomb`: a 200 × 20 MiB zip of zeros (about 4 MB on the wire) to `/v1/batches`: the API's
  peak RSS growth (VmHWM after resetting it through `clear_refs`), against the growth for a
  legitimate 3-photo zip;
- `big_png`: three 40 MP (8000×5000) RGBA PNGs uploaded at once: the API's peak RSS, and `/healthz`
  latency polled meanwhile against `/healthz` on the idle API.

`--crowd` adds crowd recall (tests/test_crowd.py's collage of the labelled VOC group photos).
Prints one JSON object. `PYTHONPATH=<another checkout>` measures another version of the code.
"""

from __future__ import annotations

import argparse
import io
import json
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "service"))

from stacklib import KEYS, Stack, astronaut_jpeg, running_stack  # noqa: E402

MAX_REQUEST = 64 * 1024 * 1024


def _proc(pid: int, name: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS['alice']}"}


def chunked_upload(stack: Stack, pid: int, headers: dict[str, str], total: int) -> dict[str, Any]:
    """Send up to `total` bytes chunked; stop once the server answers or closes."""
    port = stack.api_port
    head = "\r\n".join([
        "POST /v1/jobs HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
        "Content-Type: multipart/form-data; boundary=hfb", *(f"{k}: {v}" for k, v in headers.items()),
    ]).encode() + b"\r\n\r\n"
    preamble = (b'--hfb\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")
    block = b"\xff" * (256 * 1024)
    read_before = _proc(pid, "io", "rchar")
    sent = 0
    started = time.perf_counter()
    response = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        try:
            payload = preamble
            while sent < total:
                sock.sendall(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                sent += len(payload)
                payload = block
                if select.select([sock], [], [], 0)[0]:
                    break
        except OSError:
            pass
        try:
            while part := sock.recv(65536):
                response += part
        except OSError:
            pass
    elapsed = time.perf_counter() - started
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else None
    api_read = _proc(pid, "io", "rchar") - read_before
    return {"status": status, "api_read_bytes": api_read, "client_sent_bytes": sent,
            "api_read_vs_limit": round(api_read / MAX_REQUEST, 3), "seconds": round(elapsed, 2)}


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_growth(stack: Stack, pid: int, archive: bytes) -> tuple[int, float, float]:
    _reset_peak(pid)
    before = _proc(pid, "status", "VmRSS:")
    started = time.perf_counter()
    response = httpx.post(f"{stack.base_url}/v1/batches", headers=_auth(), timeout=600,
                          files={"archive": ("a.zip", archive, "application/zip")})
    elapsed = time.perf_counter() - started
    return response.status_code, (_proc(pid, "status", "VmHWM:") - before) / 1024, elapsed


def zip_bomb(stack: Stack, pid: int) -> dict[str, Any]:
    zeros = bytes(20 * 1024 * 1024)
    bomb = _zip({f"photo{i:03d}.jpg": zeros for i in range(200)})
    good = _zip({f"{i}.jpg": astronaut_jpeg(512 - 64 * i) for i in range(3)})
    status, growth, seconds = zip_growth(stack, pid, bomb)
    ref_status, ref_growth, ref_seconds = zip_growth(stack, pid, good)
    return {"status": status, "wire_bytes": len(bomb), "rss_growth_mb": round(growth, 1), "seconds": round(seconds, 2),
            "reference_status": ref_status, "reference_rss_growth_mb": round(ref_growth, 1),
            "reference_seconds": round(ref_seconds, 2)}


def _healthz_ms(stack: Stack, client: httpx.Client) -> float:
    started = time.perf_counter()
    client.get(f"{stack.base_url}/healthz", timeout=30).raise_for_status()
    return (time.perf_counter() - started) * 1000


def big_pngs(stack: Stack, pid: int, count: int = 3) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGBA", (8000, 5000), (0, 0, 0, 0)).save(buffer, "PNG", compress_level=1)
    png = buffer.getvalue()
    with httpx.Client() as client:
        idle = [_healthz_ms(stack, client) for _ in range(50)]
        _reset_peak(pid)
        baseline_mb = _proc(pid, "status", "VmRSS:") / 1024
        statuses: list[int] = []

        def send() -> None:
            response = httpx.post(f"{stack.base_url}/v1/jobs", headers=_auth(), timeout=600,
                                  files={"images": ("big.png", png, "image/png")})
            statuses.append(response.status_code)

        threads = [threading.Thread(target=send) for _ in range(count)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        busy = []
        while any(t.is_alive() for t in threads):
            busy.append(_healthz_ms(stack, client))
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    busy_sorted = sorted(busy)
    return {
        "statuses": sorted(statuses), "png_bytes": len(png), "seconds": round(elapsed, 2),
        "api_rss_before_mb": round(baseline_mb, 1), "api_peak_rss_mb": round(_proc(pid, "status", "VmHWM:") / 1024, 1),
        "healthz_samples": len(busy),
        "healthz_busy_p50_ms": round(statistics.median(busy), 1) if busy else None,
        "healthz_busy_max_ms": round(busy_sorted[-1], 1) if busy else None,
        "healthz_idle_p50_ms": round(statistics.median(idle), 1),
        "healthz_busy_vs_idle_p50": round(statistics.median(busy) / statistics.median(idle), 2) if busy else None,
    }


def crowd() -> dict[str, Any]:
    """Crowd recall: the collage of the labelled group photos against the photos one by one."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_crowd import crowd_figures

    return crowd_figures()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crowd", action="store_true", help="also measure crowd recall (needs ../shared/data)")
    parser.add_argument("--only-crowd", action="store_true", help="crowd recall only, no stack")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    if not args.only_crowd:
        with tempfile.TemporaryDirectory(prefix="hf-hardening-") as root, running_stack(
            Path(root), redis=True, server="headforge", HEADFORGE_MAX_REQUEST_BYTES=str(MAX_REQUEST),
            HEADFORGE_MAX_QUEUED_PER_KEY="1000",
        ) as stack:
            assert stack.api is not None
            pid = stack.api.popen.pid
            report["chunked_401"] = chunked_upload(stack, pid, {}, 1024 * 1024 * 1024)
            report["chunked_413"] = chunked_upload(stack, pid, _auth(), 1024 * 1024 * 1024)
            report["zip_bomb"] = zip_bomb(stack, pid)
            report["big_png"] = big_pngs(stack, pid)
    if args.crowd or args.only_crowd:
        report["crowd"] = crowd()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

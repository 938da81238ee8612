"""Hostile inputs against a real stack: what they cost the API process.

`python bench/hardening.py` starts redis-server and the API (`python -m headforge.service.server`,
no worker: accepted jobs stay queued) on loopback with the default limits, except a 64 MiB request
limit so the chunked uploads stay quick. It then measures, each against a reference taken in the
same run:

- `chunked_401` / `chunked_413`: a chunked multipart upload of up to 1 GiB without a key, and
  with one: the bytes the client got into its socket before the answer (an upper bound on what
  the API read: the rest sat in the loopback socket buffers), against the request limit;
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
sys.path[:0] = [str(REPO / "tests" / "service"), str(REPO / "tests")]

from stacklib import KEYS, Stack, astronaut_jpeg, running_stack  # noqa: E402

MAX_REQUEST = 64 * 1024 * 1024
# stacklib's small test limits, put back to the service's defaults (docs/service.md).
PRODUCTION_LIMITS = {
    "HEADFORGE_MAX_UPLOAD_BYTES": str(20 * 1024 * 1024),
    "HEADFORGE_MAX_IMAGE_PIXELS": "40000000",
    "HEADFORGE_MAX_FILES_PER_JOB": "8",
    "HEADFORGE_MAX_FILES_PER_BATCH": "200",
}


def _proc(pid: int, name: str, field: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS['alice']}"}


def chunked_upload(stack: Stack, headers: dict[str, str], total: int) -> dict[str, Any]:
    """Send up to `total` bytes chunked; stop once the server answers or closes. What the client got
    into its socket bounds what the API read from above (the rest sat in the loopback buffers)."""
    port = stack.api_port
    head = (
        "\r\n".join(
            [
                "POST /v1/jobs HTTP/1.1",
                f"Host: 127.0.0.1:{port}",
                "Transfer-Encoding: chunked",
                "Content-Type: multipart/form-data; boundary=hfb",
                *(f"{k}: {v}" for k, v in headers.items()),
            ]
        ).encode()
        + b"\r\n\r\n"
    )
    preamble = (
        b'--hfb\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    block = b"\xff" * (256 * 1024)
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
    return {
        "status": status,
        "client_sent_bytes": sent,
        "limit_bytes": MAX_REQUEST,
        "sent_vs_limit": round(sent / MAX_REQUEST, 3),
        "seconds": round(elapsed, 2),
    }


def _zip(entries: dict[str, bytes], level: int = 6) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_growth(stack: Stack, pid: int, archive: bytes) -> tuple[int, float, float]:
    _reset_peak(pid)
    before = _proc(pid, "status", "VmRSS:")
    started = time.perf_counter()
    response = httpx.post(
        f"{stack.base_url}/v1/batches",
        headers=_auth(),
        timeout=600,
        files={"archive": ("a.zip", archive, "application/zip")},
    )
    elapsed = time.perf_counter() - started
    return response.status_code, (_proc(pid, "status", "VmHWM:") - before) / 1024, elapsed


def zip_bomb(stack: Stack, pid: int) -> dict[str, Any]:
    zeros = bytes(20 * 1024 * 1024)
    bomb = _zip({f"photo{i:03d}.jpg": zeros for i in range(200)}, level=9)
    good = _zip({f"{i}.jpg": astronaut_jpeg(512 - 64 * i) for i in range(3)})
    status, growth, seconds = zip_growth(stack, pid, bomb)
    ref_status, ref_growth, ref_seconds = zip_growth(stack, pid, good)
    return {
        "status": status,
        "wire_bytes": len(bomb),
        "rss_growth_mb": round(growth, 1),
        "seconds": round(seconds, 2),
        "reference_status": ref_status,
        "reference_rss_growth_mb": round(ref_growth, 1),
        "reference_seconds": round(ref_seconds, 2),
    }


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
            response = httpx.post(
                f"{stack.base_url}/v1/jobs",
                headers=_auth(),
                timeout=600,
                files={"images": ("big.png", png, "image/png")},
            )
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
        "statuses": sorted(statuses),
        "png_bytes": len(png),
        "seconds": round(elapsed, 2),
        "api_rss_before_mb": round(baseline_mb, 1),
        "api_peak_rss_mb": round(_proc(pid, "status", "VmHWM:") / 1024, 1),
        "healthz_samples": len(busy),
        "healthz_busy_p50_ms": round(statistics.median(busy), 1) if busy else None,
        "healthz_busy_max_ms": round(busy_sorted[-1], 1) if busy else None,
        "healthz_idle_p50_ms": round(statistics.median(idle), 1),
        "healthz_busy_vs_idle_p50": round(statistics.median(busy) / statistics.median(idle), 2)
        if busy
        else None,
    }


def _capped_grid_plan(width: int, height: int) -> list[Any]:
    """The window plan before issue 14, as the reference: the whole image plus one grid of tiles
    at most 4 per side (tile side max(256, long side / 2.5), half overlap)."""
    import math

    import numpy as np

    from headforge.pipeline.detect import Window

    long_side = max(width, height)
    windows = [Window(round((width - long_side) / 2), round((height - long_side) / 2), long_side)]
    tile = max(256.0, long_side / 2.5)
    if tile >= 0.75 * long_side:
        return windows
    step = tile / 2
    counts = [max(1, math.ceil((extent - tile) / step - 1e-6) + 1) for extent in (width, height)]
    starts = [
        [(extent - tile) / 2] if extent <= tile else list(np.linspace(0.0, extent - tile, count))
        for extent, count in zip((width, height), counts, strict=True)
    ]
    for y0 in starts[1]:
        for x0 in starts[0]:
            inner = (x0 > 0.5, y0 > 0.5, x0 + tile < width - 0.5, y0 + tile < height - 0.5)
            windows.append(Window(round(x0), round(y0), round(tile), inner))
    return windows


def crowd() -> dict[str, Any]:
    """Crowd recall on tests/test_crowd.py's collage of the labelled VOC group photos (and the
    6000×4500 crowd made from it), with the multi-scale plan and with the capped grid it replaced, against
    the photos one by one; and the head cap on the collage."""
    import numpy as np
    from needs import SHARED_DATA
    from test_crowd import collage, crowd_photo

    from headforge.benchmarks.landmarks import match_labelled_boxes, read_rgb, read_voc_boxes
    from headforge.models.runtime import load_default_networks
    from headforge.pipeline.detect import FULL_RANGE, detect_faces, merge_windows, plan_windows, run_detector
    from headforge.pipeline.landmarks import find_heads

    folder = SHARED_DATA / "voc-faces"
    networks = load_default_networks()
    labels = read_voc_boxes(folder)
    detect_faces(read_rgb(folder / sorted(labels)[0]), networks)  # warm-up
    started = time.perf_counter()
    one_by_one = sum(
        match_labelled_boxes(
            boxes,
            np.array([d.box for d in detect_faces(read_rgb(folder / name), networks)], np.float32).reshape(
                -1, 4
            ),
        )[0]
        for name, boxes in labels.items()
    )
    one_by_one_s = time.perf_counter() - started
    canvas, truth, photos = collage(folder)
    crowd_rgb, crowd_truth = crowd_photo(folder)
    report: dict[str, Any] = {
        "labelled_faces": len(truth),
        "photos": photos,
        "one_by_one": {"found": one_by_one, "seconds": round(one_by_one_s, 2)},
    }
    for label, rgb, boxes, expected in (
        ("collage", canvas, truth, one_by_one),
        ("crowd_6000x4500", crowd_rgb, crowd_truth, 2 * one_by_one),
    ):
        height, width = rgb.shape[:2]
        started = time.perf_counter()
        found = np.array([d.box for d in detect_faces(rgb, networks)], np.float32).reshape(-1, 4)
        seconds = time.perf_counter() - started
        hits, extra = match_labelled_boxes(boxes, found)
        reference = _capped_grid_plan(width, height)
        started = time.perf_counter()
        raw, _ran = run_detector(
            rgb, networks[FULL_RANGE.network], FULL_RANGE, reference, FULL_RANGE.default_min_score
        )
        ref_seconds = time.perf_counter() - started
        ref_hits, ref_extra = match_labelled_boxes(boxes, merge_windows(raw).boxes)
        report[label] = {
            "size": f"{width}x{height}",
            "labelled_faces": len(boxes),
            "windows": len(plan_windows(width, height, min_face_size=32.0)),
            "found": hits,
            "unmatched_boxes": extra,
            "seconds": round(seconds, 2),
            "reference_capped_grid": {
                "windows": len(reference),
                "found": ref_hits,
                "unmatched_boxes": ref_extra,
                "seconds": round(ref_seconds, 2),
            },
            "found_vs_one_by_one": round(hits / max(1, expected), 3),
            "seconds_vs_capped_grid": round(seconds / max(ref_seconds, 1e-9), 2),
        }
    notes: list[str] = []
    heads = find_heads(canvas, networks, max_heads=10, notes=notes)
    report["head_cap"] = {"max_heads": 10, "heads": len(heads), "notes": notes}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--crowd", action="store_true", help="also measure crowd recall (needs ../shared/data)"
    )
    parser.add_argument("--only-crowd", action="store_true", help="crowd recall only, no stack")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    if not args.only_crowd:
        with (
            tempfile.TemporaryDirectory(prefix="hf-hardening-") as root,
            running_stack(
                Path(root),
                redis=True,
                server="headforge",
                HEADFORGE_MAX_REQUEST_BYTES=str(MAX_REQUEST),
                HEADFORGE_MAX_QUEUED_PER_KEY="1000",
                **PRODUCTION_LIMITS,
            ) as stack,
        ):
            assert stack.api is not None
            pid = stack.api.popen.pid
            report["chunked_401"] = chunked_upload(stack, {}, 1024 * 1024 * 1024)
            report["chunked_413"] = chunked_upload(stack, _auth(), 1024 * 1024 * 1024)
            report["zip_bomb"] = zip_bomb(stack, pid)
            report["big_png"] = big_pngs(stack, pid)
    if args.crowd or args.only_crowd:
        report["crowd"] = crowd()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

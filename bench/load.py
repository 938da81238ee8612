"""Load benchmark for the service: 16 concurrent clients submit 200 jobs to a Redis-backed stack with
2 workers, and the same photo is reconstructed in-process in the same run for comparison.

    python bench/load.py                    # starts redis-server, 2 workers and the API itself
    python bench/load.py --jobs 40 --clients 4 --sequential 5   # a quicker run
    python bench/load.py --url http://host:8000 --api-key K     # against a running deployment

Prints one JSON document. Keys:

* `succeeded` / `jobs`: success count (goal: all of them)
* `throughput_jobs_per_s`: jobs finished per second of wall time under load
* `latency_ms_p50` / `_p95`: submit → finished job in hand, per job, seen by the client under load
* `queue_wait_ms_p50` / `_p95`: time queued before a worker claimed the job (worker-recorded)
* `service_overhead_ms_p50` / `_p95` (under load): latency − queue wait − pipeline time in the worker,
  i.e. upload, validation, storage, broker, claim, artifact upload and the client's view of completion
* `inprocess_ms_p50`: `reconstruct_image` called directly in this process on the same bytes
* `overhead_ms_p50` / `_p95`: one client, one job at a time (no queueing): client latency minus that
  same job's `reconstruct_image` time in the worker, i.e. the per-job price of going through the
  service (paired per job, so robust to a noisy machine)
* `sequential_latency_ms_p50` and `overhead_vs_inprocess_ms_p50`: the same unloaded latency compared
  with the in-process call's median (unpaired; noisier)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"texture_size": "512", "splats": "2000", "outputs": "glb,obj,splats,preview"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _photo(size: int) -> bytes:
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 2) if values else float("nan")


class LocalStack:
    """redis-server + N workers + the API, in a temporary folder; all stopped by `close`."""

    def __init__(self, workers: int):
        self.root = Path(tempfile.mkdtemp(prefix="headforge-load-"))
        self.redis_port, self.api_port = _free_port(), _free_port()
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("HEADFORGE_") or k == "HEADFORGE_HOME"
        }
        self.env.update(
            {
                "HEADFORGE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "HEADFORGE_DATA_DIR": str(self.root / "data"),
                "HEADFORGE_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "HEADFORGE_JSON_LOGS": "1",
                "HEADFORGE_MAX_QUEUED_PER_KEY": "1000",
                "HEADFORGE_RATE_LIMIT_PER_MINUTE": "100000",
                "HEADFORGE_RATE_LIMIT_BURST": "10000",
            }
        )
        self.processes: list[subprocess.Popen[bytes]] = []
        self._start(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--dir",
                str(self.root),
                "--save",
                "",
            ],
            "redis",
        )
        for number in range(workers):
            self._start(
                [
                    sys.executable,
                    "-m",
                    "headforge",
                    "worker",
                    "--queue",
                    "cpu",
                    "--concurrency",
                    "1",
                    "--hostname",
                    f"load{number}@%h",
                ],
                f"worker{number}",
            )
        self._start(
            [
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
            ],
            "api",
        )
        self.url = f"http://127.0.0.1:{self.api_port}"
        self._wait_ready(workers)

    def _start(self, argv: list[str], name: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        self.processes.append(
            subprocess.Popen(
                argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        )

    def _wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{self.url}/readyz", timeout=2)
                if response.status_code == 200 and response.json()["workers"] >= workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the stack did not become ready; logs in {self.root}")

    def close(self) -> None:
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def run_job(client: httpx.Client, photo: bytes) -> dict[str, Any]:
    """Submit with `wait` and fall back to polling; return the finished job and the client latency."""
    started = time.perf_counter()
    response = client.post(
        "/v1/jobs",
        params={"wait": 60},
        files=[("images", ("photo.jpg", photo, "image/jpeg"))],
        data=OPTIONS,
        timeout=120,
    )
    response.raise_for_status()
    job = response.json()
    while job["status"] not in ("succeeded", "failed", "canceled"):
        time.sleep(0.02)
        job = client.get(f"/v1/jobs/{job['id']}", timeout=30).json()
    job["latency_ms"] = (time.perf_counter() - started) * 1000
    return job


def in_process_ms(photo: bytes, repeats: int) -> list[float]:
    """`reconstruct_image` on the same bytes and options, in this process, after three warm-up calls."""
    from headforge.models.runtime import load_default_networks
    from headforge.pipeline.run import ReconstructOptions, reconstruct_image

    networks = load_default_networks(threads=1)
    options = ReconstructOptions.from_dict(
        {"texture_size": 512, "splats": 2000, "outputs": OPTIONS["outputs"]}
    )
    times = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(repeats + 3):
            started = time.perf_counter()
            reconstruct_image(photo, "photo.jpg", options, Path(scratch) / str(index), networks=networks)
            if index >= 3:
                times.append((time.perf_counter() - started) * 1000)
    return times


def in_process_subprocess(size: int, repeats: int, env: dict[str, str]) -> list[float]:
    """`in_process_ms` in a fresh process with the workers' environment (same thread settings)."""
    output = subprocess.run(
        [sys.executable, __file__, "--inprocess-only", str(repeats), "--size", str(size)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    times: list[float] = json.loads(output.stdout.strip().splitlines()[-1])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="Target a running server instead of starting a local stack.")
    parser.add_argument("--api-key")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--sequential", type=int, default=15, help="Unloaded one-at-a-time jobs for the overhead."
    )
    parser.add_argument("--size", type=int, default=256, help="Photo side in pixels.")
    parser.add_argument("--inprocess-only", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inprocess_only:
        print(json.dumps(in_process_ms(_photo(args.size), args.inprocess_only)))
        return

    photo = _photo(args.size)
    stack = None if args.url else LocalStack(args.workers)
    url = args.url or (stack.url if stack else "")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers) as client:
            # Warm-up: the first jobs in each pool process pay lazy imports and allocations (so
            # does the first in-process call, which `in_process_ms` also discards).
            for _ in range(3 * args.workers):
                run_job(client, photo)
            sequential = [run_job(client, photo) for _ in range(args.sequential)]
        inprocess = in_process_subprocess(
            args.size, args.sequential, stack.env if stack else dict(os.environ)
        )

        results: list[dict[str, Any]] = []
        errors: list[str] = []
        lock = threading.Lock()
        remaining = iter(range(args.jobs))

        def client_loop() -> None:
            with httpx.Client(base_url=url, headers=headers) as http:
                while True:
                    with lock:
                        if next(remaining, None) is None:
                            return
                    try:
                        job = run_job(http, photo)
                    except Exception as error:
                        with lock:
                            errors.append(f"{type(error).__name__}: {error}")
                        continue
                    with lock:
                        results.append(job)

        started = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        if stack is not None:
            stack.close()

    succeeded = [j for j in results if j["status"] == "succeeded"]
    latency = [j["latency_ms"] for j in succeeded]
    queue_wait = [float(j["timings_ms"].get("queue_wait", 0.0)) for j in succeeded]
    overhead = [
        j["latency_ms"] - float(j["timings_ms"].get("queue_wait", 0.0)) - float(j["timings_ms"]["pipeline"])
        for j in succeeded
    ]
    seq_latency = [j["latency_ms"] for j in sequential if j["status"] == "succeeded"]
    report = {
        "jobs": args.jobs,
        "clients": args.clients,
        "workers": args.workers if stack else None,
        "photo_px": args.size,
        "succeeded": len(succeeded),
        "failed": len(results) - len(succeeded),
        "client_errors": errors[:5],
        "wall_s": round(wall, 2),
        "throughput_jobs_per_s": round(len(succeeded) / wall, 3),
        "latency_ms_p50": _percentile(latency, 50),
        "latency_ms_p95": _percentile(latency, 95),
        "queue_wait_ms_p50": _percentile(queue_wait, 50),
        "queue_wait_ms_p95": _percentile(queue_wait, 95),
        "service_overhead_ms_p50": _percentile(overhead, 50),
        "service_overhead_ms_p95": _percentile(overhead, 95),
        "worker_pipeline_ms_p50": _percentile([float(j["timings_ms"]["pipeline"]) for j in succeeded], 50),
        "inprocess_ms_p50": round(statistics.median(inprocess), 2),
        "sequential_queue_wait_ms_p50": _percentile(
            [float(j["timings_ms"].get("queue_wait", 0.0)) for j in sequential], 50
        ),
        "sequential_worker_pipeline_ms_p50": _percentile(
            [float(j["timings_ms"]["pipeline"]) for j in sequential], 50
        ),
        "sequential_artifact_store_ms_p50": _percentile(
            [float(j["timings_ms"].get("upload", 0.0)) for j in sequential], 50
        ),
        "sequential_latency_ms_p50": round(statistics.median(seq_latency), 2) if seq_latency else None,
        # Paired per job: client latency minus the same job's reconstruct_image time in the worker.
        "overhead_ms_p50": _percentile(
            [j["latency_ms"] - float(j["timings_ms"]["pipeline"]) for j in sequential], 50
        ),
        "overhead_ms_p95": _percentile(
            [j["latency_ms"] - float(j["timings_ms"]["pipeline"]) for j in sequential], 95
        ),
        "overhead_vs_inprocess_ms_p50": round(
            statistics.median(seq_latency) - statistics.median(inprocess), 2
        )
        if seq_latency
        else None,
    }
    print(json.dumps(report, indent=2))
    if len(succeeded) != args.jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()

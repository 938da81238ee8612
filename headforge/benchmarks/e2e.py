"""Benchmark section `e2e`: the whole pipeline on single-face photos, as `headforge reconstruct` runs it.

Each timed run is `reconstruct_image` on the photo's JPEG bytes with texture 1024 and 8192 splats,
writing every artifact into a temporary folder. The reference is the detection + landmarks stage
(`find_heads`) timed inside the same runs, so `e2e_ratio_to_detect_landmarks` says how much the
rest of the pipeline costs on top of the networks, independent of how fast the machine is.

`e2e_cpu_p50_ms` is the process CPU time per run (all threads): on a shared machine it shows the
work done, where wall time also counts the time other processes held the cores.

Peak memory comes from an extra, untimed run under `tracemalloc` (Python and numpy allocations)
and from the process's maximum resident set size (`ru_maxrss`, everything including ONNX Runtime).
"""

from __future__ import annotations

import io
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

from headforge.models.runtime import ModelSet

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
AFLW_DIR = SHARED_DATA / "aflw2000-sample"
GOAL_P50_MS = 150.0
TEXTURE_SIZE = 1024
SPLATS = 8192


def single_face_photos(quick: bool) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes): the astronaut, plus the AFLW2000-3D sample photos when present."""
    from PIL import Image
    from skimage.data import astronaut

    photos = [("astronaut.jpg", _jpeg(Image.fromarray(astronaut())))]
    if AFLW_DIR.is_dir():
        for path in sorted(AFLW_DIR.glob("*.jpg"))[: 2 if quick else None]:
            photos.append((path.name, path.read_bytes()))
    return photos


def _jpeg(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def run(quick: bool) -> dict[str, Any]:
    """p50/p95 end-to-end ms per single-face photo, stage shares, peak memory, and the ratio to the
    detection + landmarks time of the same runs."""
    from headforge.models.runtime import default_threads, load_default_networks
    from headforge.pipeline.run import ReconstructOptions, reconstruct_image

    networks: ModelSet = load_default_networks()
    options = ReconstructOptions(texture_size=TEXTURE_SIZE, splats=SPLATS)
    photos = single_face_photos(quick)
    repeats = 2 if quick else 5
    totals: list[float] = []
    cpu: list[float] = []
    detect: list[float] = []
    stage_sums: dict[str, float] = {}
    heads_per_run: list[int] = []
    with tempfile.TemporaryDirectory(prefix="headforge-bench-") as scratch:
        out_dir = Path(scratch)
        for name, payload in photos:  # warm-up: sessions, UV rasters, caches
            reconstruct_image(payload, name, options, out_dir / "warmup", networks=networks)
        for repeat in range(repeats):
            for name, payload in photos:
                started, cpu_started = time.perf_counter(), time.process_time()
                document = reconstruct_image(
                    payload, name, options, out_dir / f"run{repeat}", networks=networks
                )
                totals.append((time.perf_counter() - started) * 1000.0)
                cpu.append((time.process_time() - cpu_started) * 1000.0)
                timings = document["timings_ms"]
                detect.append(float(timings.get("detect_landmarks", 0.0)))
                heads_per_run.append(len(document["heads"]))
                for stage, value in timings.items():
                    if stage not in ("total", "models"):
                        stage_sums[stage] = stage_sums.get(stage, 0.0) + float(value)
        name, payload = photos[0]
        tracemalloc.start()
        try:
            reconstruct_image(payload, name, options, out_dir / "traced", networks=networks)
            _current, traced_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    p50 = statistics.median(totals)
    detect_p50 = statistics.median(detect)
    stage_total = sum(stage_sums.values()) or 1.0
    return {
        "e2e_p50_ms": round(p50, 1),
        "e2e_p95_ms": round(_percentile(totals, 95), 1),
        "e2e_cpu_p50_ms": round(statistics.median(cpu), 1),
        "e2e_detect_landmarks_p50_ms": round(detect_p50, 1),
        "e2e_ratio_to_detect_landmarks": round(p50 / detect_p50, 2) if detect_p50 > 0 else None,
        "e2e_goal_p50_ms": GOAL_P50_MS,
        "e2e_meets_goal": p50 <= GOAL_P50_MS,
        "e2e_stage_share": {stage: round(value / stage_total, 3) for stage, value in stage_sums.items()},
        "e2e_peak_traced_mib": round(traced_peak / 2**20, 1),
        "e2e_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "e2e_photos": len(photos),
        "e2e_runs": len(totals),
        "e2e_heads_per_photo": round(statistics.mean(heads_per_run), 2) if heads_per_run else 0,
        "e2e_texture_size": TEXTURE_SIZE,
        "e2e_splats": SPLATS,
        "e2e_threads": default_threads(),
    }

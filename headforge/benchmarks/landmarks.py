"""Benchmark section `landmarks`: detection + landmarks on real photos, headforge vs LiteRT.

Both sides run the same post-processing (`find_heads`: tiled detection, batched FaceMesh with
ROI refinement) on the same photos, in the same process, on the same number of threads. They
differ only in the networks: headforge's runtime (`load_default_networks`, ONNX Runtime) against
the LiteRT interpreter running the original `.tflite` files, one head at a time as MediaPipe does.
"""

from __future__ import annotations

import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from headforge.config import tflite_source_dir
from headforge.models.runtime import ModelSet

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
VOC_DIR = SHARED_DATA / "voc-faces"
THREADS = 1


def read_voc_boxes(folder: Path) -> dict[str, NDArray[np.float32]]:
    """Labelled face boxes of `training.xml` and `testing.xml` as file → (N, 4) x0, y0, x1, y1."""
    boxes: dict[str, NDArray[np.float32]] = {}
    for name in ("training.xml", "testing.xml"):
        for image in ET.parse(folder / name).getroot().iter("image"):
            rows = []
            for box in image.iter("box"):
                left, top = float(box.get("left", 0)), float(box.get("top", 0))
                rows.append([left, top, left + float(box.get("width", 0)), top + float(box.get("height", 0))])
            boxes[str(image.get("file"))] = np.asarray(rows, np.float32).reshape(-1, 4)
    return boxes


def match_labelled_boxes(
    labels: NDArray[np.float32], boxes: NDArray[np.float32], min_iou: float = 0.3
) -> tuple[int, int]:
    """(labelled faces matched one-to-one by a box with IoU >= min_iou, unmatched boxes); greedy in label order."""
    from headforge.pipeline.detect import box_iou

    used: set[int] = set()
    for label in labels:
        if len(boxes) == 0:
            break
        overlap = box_iou(label, boxes)
        overlap[list(used)] = 0
        best = int(np.argmax(overlap))
        if overlap[best] >= min_iou:
            used.add(best)
    return len(used), len(boxes) - len(used)


def read_rgb(path: Path) -> NDArray[np.uint8]:
    """A photo file as RGB8."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_headforge_networks(num_threads: int) -> tuple[ModelSet, str]:
    """headforge's runtime networks and a backend label; LiteRT when the model repository is
    missing (the ratio is then ~1 by construction, and the label says so)."""
    from headforge.errors import ModelsMissingError
    from headforge.models import litert, runtime

    loader: Callable[..., ModelSet] | None = getattr(runtime, "load_default_networks", None)
    if loader is not None:
        try:
            return loader(threads=num_threads, providers=("cpu",)), "onnxruntime-cpu"
        except ModelsMissingError:
            pass
    return litert.load_litert_networks(tflite_source_dir(), num_threads=num_threads), "litert"


def benchmark_photos(quick: bool) -> list[tuple[str, NDArray[np.uint8]]]:
    """astronaut, plus the voc-faces group photos when ../shared/data is present (and, in the
    full run, the 24-face crowd photo)."""
    from skimage.data import astronaut

    photos = [("astronaut", np.ascontiguousarray(astronaut()))]
    if VOC_DIR.is_dir():
        names = sorted(read_voc_boxes(VOC_DIR))
        if not quick and (VOC_DIR / "bald_guys.jpg").exists():
            names.append("bald_guys.jpg")
        photos.extend((name, read_rgb(VOC_DIR / name)) for name in names)
    return photos


def _time_pass(networks: ModelSet, photos: list[tuple[str, NDArray[np.uint8]]]) -> tuple[float, int]:
    from headforge.pipeline.landmarks import find_heads

    start = time.perf_counter()
    heads = sum(len(find_heads(rgb, networks)) for _, rgb in photos)
    return time.perf_counter() - start, heads


def run(quick: bool) -> dict[str, Any]:
    """Median time of one pass over the photos for each backend, interleaved, and their ratio."""
    from headforge.models.litert import load_litert_networks

    ours, backend = load_headforge_networks(THREADS)
    reference = load_litert_networks(tflite_source_dir(), num_threads=THREADS)
    photos = benchmark_photos(quick)
    repeats = 3 if quick else 5
    _time_pass(ours, photos)  # warm-up: session init, allocations
    _time_pass(reference, photos)
    ours_s: list[float] = []
    reference_s: list[float] = []
    heads = reference_heads = 0
    for _ in range(repeats):
        elapsed, heads = _time_pass(ours, photos)
        ours_s.append(elapsed)
        elapsed, reference_heads = _time_pass(reference, photos)
        reference_s.append(elapsed)
    ours_ms = statistics.median(ours_s) * 1000
    reference_ms = statistics.median(reference_s) * 1000
    return {
        "landmarks_ratio_vs_litert": round(ours_ms / reference_ms, 3),
        "landmarks_ms": round(ours_ms, 1),
        "landmarks_litert_ms": round(reference_ms, 1),
        "landmarks_backend": backend,
        "landmarks_threads": THREADS,
        "landmarks_photos": len(photos),
        "landmarks_heads": heads,
        "landmarks_heads_litert": reference_heads,
    }

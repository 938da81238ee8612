"""Face detection: BlazeFace post-processing as MediaPipe does it, plus tiling for group photos.

MediaPipe's own graph letterboxes the whole photo into one detector input, decodes boxes and six
keypoints against SSD anchors, applies a sigmoid to clipped scores and merges overlapping boxes
with weighted non-maximum suppression. That misses small faces in group photos: a 37 px face in a
500 px photo is 14 px in the full-range model's 192 px input. headforge also runs the full-range
model on overlapping square tiles (all windows in one `Network.run` call), drops tile detections cut by an inner tile
edge, and merges detections across tiles and the whole-image pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from headforge.errors import InvalidImageError, InvalidOptionError
from headforge.models.runtime import FULL_RANGE as FULL_RANGE_NETWORK
from headforge.models.runtime import SHORT_RANGE as SHORT_RANGE_NETWORK
from headforge.models.runtime import ModelSet, Network
from headforge.pipeline.anchors import (
    FULL_RANGE_ANCHORS,
    SHORT_RANGE_ANCHORS,
    AnchorOptions,
    generate_anchors,
)
from headforge.pipeline.types import Detection

NUM_KEYPOINTS = 6
SCORE_CLIPPING = 100.0  # MediaPipe's score_clipping_thresh for both face detectors
NMS_IOU = 0.3  # MediaPipe's min_suppression_threshold for both face detectors
# The bound on detector work per photo: windows planned (each one 192² detector input), windows per
# `Network.run` call, and seconds before the finer windows left are skipped (docs/detection.md).
MAX_WINDOWS = 256
WINDOW_BATCH = 64
DETECT_TIME_BUDGET = 20.0
# Tiled detections smaller than this fraction of `min_face_size` are dropped: the fine tiles that
# bring faces of that size into reach also bring the detector's own tiny false positives.
MIN_FACE_FRACTION = 0.75


@dataclass(frozen=True)
class DetectorModel:
    """One BlazeFace variant: which network, its anchors and MediaPipe's score threshold."""

    network: str  # model set name of the network
    anchors: AnchorOptions
    default_min_score: float

    @property
    def input_size(self) -> int:
        return self.anchors.input_size


SHORT_RANGE = DetectorModel(SHORT_RANGE_NETWORK, SHORT_RANGE_ANCHORS, 0.5)
# MediaPipe's full-range graph keeps scores ≥ 0.6. headforge keeps ≥ 0.5: small and tile-edge faces
# in group photos score just above 0.5, and FaceMesh's presence score rejects what is not a face.
FULL_RANGE = DetectorModel(FULL_RANGE_NETWORK, FULL_RANGE_ANCHORS, 0.5)
MODELS = {"short_range": SHORT_RANGE, "full_range": FULL_RANGE}


@dataclass(frozen=True)
class Window:
    """A square region of the image (whole pixels, may extend past its borders) fed to the detector."""

    x0: int
    y0: int
    side: int
    # Which edges (left, top, right, bottom) lie inside the image, where faces can be cut.
    inner_edges: tuple[bool, bool, bool, bool] = (False, False, False, False)


@dataclass
class RawDetections:
    """Decoded detections in pixels, before merging across windows."""

    boxes: NDArray[np.float32]  # (N, 4) x0, y0, x1, y1
    keypoints: NDArray[np.float32]  # (N, 6, 2)
    scores: NDArray[np.float32]  # (N,)
    cut: NDArray[np.bool_]  # (N,) touches an inner tile edge

    @classmethod
    def empty(cls) -> RawDetections:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0, NUM_KEYPOINTS, 2), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0,), bool),
        )

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> RawDetections:
        return RawDetections(self.boxes[index], self.keypoints[index], self.scores[index], self.cut[index])

    @staticmethod
    def concatenate(parts: Sequence[RawDetections]) -> RawDetections:
        if not parts:
            return RawDetections.empty()
        return RawDetections(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.keypoints for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.cut for p in parts]),
        )


def check_rgb(rgb: object) -> NDArray[np.uint8]:
    """The image as (H, W, 3) uint8, or InvalidImageError."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        shape = getattr(rgb, "shape", None)
        dtype = str(getattr(rgb, "dtype", type(rgb).__name__))
        raise InvalidImageError(
            "expected an RGB image as an (H, W, 3) uint8 array",
            details={"shape": list(shape) if shape is not None else None, "dtype": dtype},
        )
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise InvalidImageError("image is too small to hold a face", details={"shape": list(rgb.shape)})
    return rgb


def warp_to_square(
    rgb: NDArray[np.uint8], matrix: NDArray[np.float64], size: int, border: int
) -> NDArray[np.uint8]:
    """Sample a size×size patch: `matrix` (2×3) maps output pixel indices to source coordinates
    (OpenCV convention, pixel centres at integers). Bilinear, like MediaPipe; where one output
    pixel spans two or more source pixels, the covered region is first shrunk with area averaging
    (the affine map is adjusted exactly), so large faces do not alias."""
    factor = math.sqrt(abs(float(np.linalg.det(matrix[:, :2]))))  # source pixels per output pixel
    if factor >= 2:
        height, width = rgb.shape[:2]
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) - [
            0.5,
            0.5,
            0,
        ]
        source = corners @ matrix.T
        margin = math.ceil(2 * factor)
        x0 = max(math.floor(source[:, 0].min()) - margin, 0)
        y0 = max(math.floor(source[:, 1].min()) - margin, 0)
        x1 = min(math.ceil(source[:, 0].max()) + margin + 1, width)
        y1 = min(math.ceil(source[:, 1].max()) + margin + 1, height)
        if x1 - x0 >= 2 * factor and y1 - y0 >= 2 * factor:
            region = rgb[y0:y1, x0:x1]
            small_w, small_h = round((x1 - x0) / factor), round((y1 - y0) / factor)
            small = cv2.resize(region, (small_w, small_h), interpolation=cv2.INTER_AREA)
            # cv2.resize maps continuous coordinates linearly: small = (region) * small_w / region_w.
            scale = np.array([[small_w / (x1 - x0)], [small_h / (y1 - y0)]])
            shifted = matrix.copy()
            shifted[:, 2] += [0.5 - x0, 0.5 - y0]
            adjusted = shifted * scale
            adjusted[:, 2] -= 0.5
            matrix, rgb = adjusted, np.ascontiguousarray(small)
    patch = cv2.warpAffine(
        rgb, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border
    )
    return np.asarray(patch, np.uint8)


def window_tensor(rgb: NDArray[np.uint8], window: Window, size: int) -> NDArray[np.float32]:
    """The window resized to size×size (black outside the image), scaled to [-1, 1]."""
    step = max(1, window.side) / size
    matrix = np.array(
        [[step, 0.0, window.x0 + 0.5 * step - 0.5], [0.0, step, window.y0 + 0.5 * step - 0.5]], np.float64
    )
    patch = warp_to_square(rgb, matrix, size, cv2.BORDER_CONSTANT)
    return patch.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def decode_detections(
    raw_boxes: NDArray[np.float32],
    raw_scores: NDArray[np.float32],
    model: DetectorModel,
    min_score: float,
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """One window's raw outputs → (boxes (N,4) xyxy, keypoints (N,6,2), scores), normalised to the window.

    Box layout per anchor: x/y centre offsets, width, height, then six (x, y) keypoint offsets, all in
    input pixels relative to the anchor centre (MediaPipe's `reverse_output_order`).
    """
    anchors = generate_anchors(model.anchors)
    logits = np.clip(raw_scores.reshape(-1).astype(np.float64), -SCORE_CLIPPING, SCORE_CLIPPING)
    scores = 1.0 / (1.0 + np.exp(-logits))
    keep = np.flatnonzero(scores >= min_score)
    raw = raw_boxes.reshape(-1, 4 + 2 * NUM_KEYPOINTS)[keep] / np.float32(model.input_size)
    anchor = anchors[keep]
    center = raw[:, 0:2] * anchor[:, 2:4] + anchor[:, 0:2]
    half = raw[:, 2:4] * anchor[:, 2:4] / 2
    boxes = np.concatenate([center - half, center + half], axis=1)
    keypoints = raw[:, 4:].reshape(-1, NUM_KEYPOINTS, 2) * anchor[:, None, 2:4] + anchor[:, None, 0:2]
    return boxes.astype(np.float32), keypoints.astype(np.float32), scores[keep].astype(np.float32)


def box_iou(box: NDArray[np.float32], boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    """Intersection over union of one xyxy box against many."""
    inter = _intersection(box, boxes)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _intersection(box: NDArray[np.float32], boxes: NDArray[np.float32]) -> NDArray[np.float32]:
    width = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    height = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def weighted_nms(detections: RawDetections, iou_threshold: float = NMS_IOU) -> RawDetections:
    """MediaPipe's WEIGHTED non-maximum suppression.

    Take the best remaining detection; every remaining detection overlapping it by IoU above the
    threshold joins its cluster; the cluster's box and keypoints become the score-weighted mean,
    its score the best one's.
    """
    order = np.argsort(-detections.scores, kind="stable")
    remaining = detections.take(order)
    kept: list[RawDetections] = []
    while len(remaining.scores):
        overlap = box_iou(remaining.boxes[0], remaining.boxes)
        cluster = overlap > iou_threshold
        cluster[0] = True
        members = remaining.take(cluster)
        weights = members.scores / members.scores.sum()
        kept.append(
            RawDetections(
                (weights[:, None] * members.boxes).sum(0, keepdims=True).astype(np.float32),
                (weights[:, None, None] * members.keypoints).sum(0, keepdims=True).astype(np.float32),
                members.scores[:1],
                members.cut[:1],
            )
        )
        remaining = remaining.take(~cluster)
    return RawDetections.concatenate(kept)


def merge_windows(detections: RawDetections, overlap_threshold: float = 0.5) -> RawDetections:
    """Merge one face seen by several windows: keep the uncut, best-scoring one per cluster.

    Overlap is intersection over the smaller box, so a partial box inside a whole one joins it.
    """
    # Uncut detections first, then by score.
    order = np.lexsort((-detections.scores, detections.cut))
    remaining = detections.take(order)
    kept: list[RawDetections] = []
    while len(remaining.scores):
        best = remaining.boxes[0]
        areas = (remaining.boxes[:, 2] - remaining.boxes[:, 0]) * (
            remaining.boxes[:, 3] - remaining.boxes[:, 1]
        )
        smaller = np.minimum(areas, areas[0])
        overlap = _intersection(best, remaining.boxes) / np.maximum(smaller, 1e-9)
        cluster = overlap > overlap_threshold
        cluster[0] = True
        kept.append(remaining.take(np.array([0])))
        remaining = remaining.take(~cluster)
    return RawDetections.concatenate(kept)


def plan_windows(
    width: int,
    height: int,
    *,
    min_face_size: float,
    comfortable_face_fraction: float = 1 / 8,
    overlap: float = 0.25,
    max_windows: int = MAX_WINDOWS,
) -> list[Window]:
    """The whole-image window, then levels of overlapping square tiles, coarse to fine.

    The finest tiles are sized so a face of `min_face_size` pixels covers
    `comfortable_face_fraction` of the detector input; each coarser level doubles the side, up to
    3/4 of the photo's long side (the whole-image window covers the rest). A level is there for faces
    from its smallest size `m` (tile/8) to `2m`, where the next level takes over; with a quarter-tile
    overlap a face up to tile/4 = 2m lies whole inside some tile of its level, so every face size
    from `min_face_size` up is in reach (half-tile overlap would only add windows: 232 against 115
    for a 2 MP photo).
    When that takes more than `max_windows` windows, the finest side grows (in steps of 2^¼) until
    the plan fits: the work is bounded, and the smallest faces in reach grow with the photo."""
    if max_windows < 1:
        raise InvalidOptionError("max_windows must be at least 1", details={"max_windows": max_windows})
    long_side = max(width, height)
    whole = Window(round((width - long_side) / 2), round((height - long_side) / 2), long_side)
    finest = min_face_size / comfortable_face_fraction
    while True:
        levels = [_tile_level(width, height, side, overlap) for side in _level_sides(finest, long_side)]
        if 1 + sum(len(level) for level in levels) <= max_windows:
            break
        finest *= 2**0.25
    return [whole] + [window for level in reversed(levels) for window in level]


def _level_sides(finest: float, long_side: int) -> list[float]:
    """Tile sides from `finest`, doubling, while tiles stay under 3/4 of the long side (tiles nearly
    as large as the photo add nothing to the whole-image pass)."""
    sides = []
    side = finest
    while side < 0.75 * long_side:
        sides.append(side)
        side *= 2
    return sides


def _tile_level(width: int, height: int, tile: float, overlap: float) -> list[Window]:
    step = tile * (1 - overlap)
    counts = [max(1, math.ceil((extent - tile) / step - 1e-6) + 1) for extent in (width, height)]
    windows = []
    for y0 in _tile_starts(height, tile, counts[1]):
        for x0 in _tile_starts(width, tile, counts[0]):
            inner = (x0 > 0.5, y0 > 0.5, x0 + tile < width - 0.5, y0 + tile < height - 0.5)
            windows.append(Window(round(x0), round(y0), round(tile), inner))
    return windows


def _tile_starts(extent: int, tile: float, count: int) -> list[float]:
    if extent <= tile:
        return [(extent - tile) / 2]
    return [float(v) for v in np.linspace(0.0, extent - tile, count)]


def run_detector(
    rgb: NDArray[np.uint8],
    network: Network,
    model: DetectorModel,
    windows: Sequence[Window],
    min_score: float,
    edge_margin: float = 0.01,
    deadline: float | None = None,
) -> tuple[RawDetections, int]:
    """Run one detector on the windows, `WINDOW_BATCH` per `Network.run` call, in order; weighted
    NMS per window; pixels out. Stops between calls once `time.monotonic()` passes `deadline`;
    returns the detections and how many windows ran."""
    parts: list[RawDetections] = []
    done = 0
    for first in range(0, len(windows), WINDOW_BATCH):
        if deadline is not None and first > 0 and time.monotonic() > deadline:
            break
        chunk = windows[first : first + WINDOW_BATCH]
        batch = np.stack([window_tensor(rgb, w, model.input_size) for w in chunk])
        raw_boxes, raw_scores = network.run(batch)[:2]
        for index, window in enumerate(chunk):
            parts.append(
                _window_detections(raw_boxes[index], raw_scores[index], window, model, min_score, edge_margin)
            )
        done += len(chunk)
    return RawDetections.concatenate(parts), done


def _window_detections(
    raw_boxes: NDArray[np.float32],
    raw_scores: NDArray[np.float32],
    window: Window,
    model: DetectorModel,
    min_score: float,
    edge_margin: float,
) -> RawDetections:
    boxes, keypoints, scores = decode_detections(raw_boxes, raw_scores, model, min_score)
    left, top, right, bottom = window.inner_edges
    cut = (
        (left & (boxes[:, 0] < edge_margin))
        | (top & (boxes[:, 1] < edge_margin))
        | (right & (boxes[:, 2] > 1 - edge_margin))
        | (bottom & (boxes[:, 3] > 1 - edge_margin))
    )
    merged = weighted_nms(RawDetections(boxes, keypoints, scores, cut))
    origin = np.array([window.x0, window.y0], np.float32)
    side = np.float32(window.side)
    return RawDetections(
        (merged.boxes * side + np.tile(origin, 2)).astype(np.float32),
        (merged.keypoints * side + origin).astype(np.float32),
        merged.scores,
        merged.cut,
    )


def detect_faces(
    rgb: NDArray[np.uint8],
    networks: ModelSet,
    *,
    min_score: float | None = None,
    max_faces: int | None = None,
    model: str = "full_range",
    tiled: bool = True,
    min_face_size: float = 32.0,
    max_windows: int = MAX_WINDOWS,
    time_budget: float | None = DETECT_TIME_BUDGET,
    notes: list[str] | None = None,
) -> list[Detection]:
    """Detect faces in an RGB photo; boxes and keypoints in original-image pixels, best first.

    `model` picks the BlazeFace variant ("full_range" or "short_range"); `min_score` defaults to
    0.5 for both. With `tiled`, the full-range model also runs on `plan_windows`'s levels of
    overlapping tiles (at most `max_windows` windows), for faces down to `min_face_size` pixels in
    group and crowd photos. Windows run coarse to fine; after `time_budget` seconds the finer ones
    left are skipped, and a line in `notes` says so.
    """
    rgb = check_rgb(rgb)
    if model not in MODELS:
        raise InvalidOptionError(f"unknown detector model {model!r}", details={"choices": sorted(MODELS)})
    detector = MODELS[model]
    threshold = detector.default_min_score if min_score is None else float(min_score)
    if not 0.0 < threshold < 1.0:
        raise InvalidOptionError("min_score must lie in (0, 1)", details={"min_score": min_score})
    if max_faces is not None and max_faces < 1:
        raise InvalidOptionError("max_faces must be at least 1", details={"max_faces": max_faces})
    if min_face_size <= 0:
        raise InvalidOptionError("min_face_size must be positive", details={"min_face_size": min_face_size})
    height, width = rgb.shape[:2]
    if tiled and detector is FULL_RANGE:
        windows = plan_windows(width, height, min_face_size=min_face_size, max_windows=max_windows)
    else:
        windows = plan_windows(width, height, min_face_size=float(max(width, height)))
    network: Network = networks[detector.network]
    started = time.monotonic()
    deadline = None if time_budget is None else started + time_budget
    raw, ran = run_detector(rgb, network, detector, windows, threshold, deadline=deadline)
    if ran < len(windows) and notes is not None:
        smallest = min(w.side for w in windows[:ran]) * 0.125
        notes.append(
            f"face detection stopped at its {time_budget:g} s budget after {ran} of {len(windows)} windows; "
            f"faces under about {smallest:.0f} px may be missing"
        )
    merged = merge_windows(raw) if len(windows) > 1 else raw
    if len(windows) > 1:
        sides = np.maximum(merged.boxes[:, 2] - merged.boxes[:, 0], merged.boxes[:, 3] - merged.boxes[:, 1])
        merged = merged.take(sides >= MIN_FACE_FRACTION * min_face_size)
    order = np.argsort(-merged.scores, kind="stable")
    if max_faces is not None:
        order = order[:max_faces]
    return [
        Detection(
            box=_clip_box(merged.boxes[i], width, height),
            score=float(merged.scores[i]),
            keypoints=merged.keypoints[i].astype(np.float32),
        )
        for i in order
    ]


def _clip_box(box: NDArray[np.float32], width: int, height: int) -> NDArray[np.float32]:
    return np.clip(box, [0, 0, 0, 0], [width, height, width, height]).astype(np.float32)

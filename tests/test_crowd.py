"""Crowd photos: faces that are small relative to a large photo are still found (multi-scale window
planning under a work bound), and the head cap keeps the most confident heads and says so.

The photos are the labelled VOC group photos of ../shared/data/voc-faces (skipped when absent),
pasted at their own resolution into one collage, so every labelled face keeps its pixel size while
the photo around it grows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from headforge.benchmarks.landmarks import match_labelled_boxes, read_rgb, read_voc_boxes
from headforge.pipeline.detect import MAX_WINDOWS, WINDOW_BATCH, detect_faces, plan_windows

CELL = 500


def collage(folder: Path, columns: int = 3) -> tuple[NDArray[np.uint8], NDArray[np.float32], int]:
    """The labelled photos on a grid of 500×500 cells (gray between them), their boxes moved along,
    and how many photos it holds."""
    labels = read_voc_boxes(folder)
    names = sorted(labels)
    rows = -(-len(names) // columns)
    canvas = np.full((rows * CELL, columns * CELL, 3), 128, np.uint8)
    boxes = []
    for index, name in enumerate(names):
        rgb = read_rgb(folder / name)[:CELL, :CELL]
        x0, y0 = (index % columns) * CELL, (index // columns) * CELL
        canvas[y0 : y0 + rgb.shape[0], x0 : x0 + rgb.shape[1]] = rgb
        boxes.append(labels[name] + np.array([x0, y0, x0, y0], np.float32))
    return canvas, np.concatenate(boxes), len(names)


def _recall(rgb: NDArray[np.uint8], truth: NDArray[np.float32], networks: Any) -> tuple[int, int]:
    found = np.array([d.box for d in detect_faces(rgb, networks)], np.float32).reshape(-1, 4)
    return match_labelled_boxes(truth, found)


def crowd_photo(folder: Path) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """A 6000×4500 crowd: the collage upscaled 2× (faces of 60–200 px) twice side by side over
    gray, and its 86 labelled boxes. Faces are a 30th to a 100th of the photo's width: under the
    detector's reach in a grid capped at 4×4 tiles (2400 px each, so 5–16 px in its 192 px input)."""
    canvas, truth, _count = collage(folder)
    double = np.asarray(cv2.resize(canvas, (canvas.shape[1] * 2, canvas.shape[0] * 2)), np.uint8)
    photo = np.full((4500, 6000, 3), 128, np.uint8)
    height, width = double.shape[:2]
    photo[:height, :width] = double
    photo[:height, width : 2 * width] = double
    boxes = np.concatenate([truth * 2, truth * 2 + np.array([width, 0, width, 0], np.float32)])
    return photo, boxes.astype(np.float32)


def test_collage_recall_equals_recall_one_by_one(networks: Any, voc_faces_dir: Path) -> None:
    labels = read_voc_boxes(voc_faces_dir)
    one_by_one = sum(
        _recall(read_rgb(voc_faces_dir / name), boxes, networks)[0] for name, boxes in labels.items()
    )
    canvas, truth, _count = collage(voc_faces_dir)
    hits, extra = _recall(canvas, truth, networks)
    print(
        f"collage {canvas.shape[1]}x{canvas.shape[0]}: {hits} of {len(truth)} (one by one {one_by_one}), "
        f"{extra} unmatched boxes"
    )
    assert hits >= one_by_one
    assert extra <= 3


def test_small_photos_keep_the_single_tile_scale() -> None:
    """A 500×375 photo gets what it always got: the whole image and a 3×2 grid of 256 px tiles."""
    windows = plan_windows(500, 375, min_face_size=32.0)
    assert windows[0].side == 500
    assert sorted({w.side for w in windows[1:]}) == [256]
    assert len(windows) == 7


def test_large_photo_plan_is_multi_scale_and_bounded() -> None:
    windows = plan_windows(6000, 4500, min_face_size=32.0)
    sides = sorted({w.side for w in windows})
    assert len(windows) <= MAX_WINDOWS
    assert len(sides) >= 3
    assert sides[0] <= 6000 / 8  # faces of about 1/64 of the photo's width are in reach
    # Coarse to fine, and each level covers the photo.
    assert [w.side for w in windows] == sorted((w.side for w in windows), reverse=True)
    for side in sides[:-1]:
        level = [w for w in windows if w.side == side]
        assert min(w.x0 for w in level) <= 0 and max(w.x0 + w.side for w in level) >= 6000
        assert min(w.y0 for w in level) <= 0 and max(w.y0 + w.side for w in level) >= 4500
    smaller_budget = plan_windows(6000, 4500, min_face_size=32.0, max_windows=40)
    assert len(smaller_budget) <= 40 and smaller_budget[-1].side > sides[0]


def test_head_cap_keeps_the_most_confident_and_says_how_many(networks: Any, voc_faces_dir: Path) -> None:
    from headforge.pipeline.landmarks import find_heads

    canvas, truth, _count = collage(voc_faces_dir)
    notes: list[str] = []
    heads = find_heads(canvas, networks, max_heads=10, notes=notes)
    assert len(heads) == 10
    scores = [h.detection.score for h in heads]
    assert scores == sorted(scores, reverse=True)
    assert len(notes) == 1 and "max_heads=10" in notes[0], notes
    found = int(notes[0].split(" of ")[1].split()[0])
    assert found >= len(truth) - 2
    uncapped: list[str] = []
    assert (
        len(find_heads(read_rgb(voc_faces_dir / "2008_004176.jpg"), networks, max_heads=50, notes=uncapped))
        >= 7
    )
    assert uncapped == []


def test_faces_small_relative_to_a_large_photo_are_found(networks: Any, voc_faces_dir: Path) -> None:
    photo, truth = crowd_photo(voc_faces_dir)
    hits, extra = _recall(photo, truth, networks)
    print(f"{photo.shape[1]}x{photo.shape[0]} crowd: {hits} of {len(truth)}, {extra} unmatched boxes")
    assert hits == len(truth)


def test_detection_stops_at_its_time_budget_and_says_so(networks: Any, voc_faces_dir: Path) -> None:
    """With no time to spare, only the first call's windows (the coarse ones) run, and `notes` says
    how many of the planned windows ran."""
    canvas, _truth, _count = collage(voc_faces_dir)
    planned = len(plan_windows(canvas.shape[1], canvas.shape[0], min_face_size=32.0))
    notes: list[str] = []
    detect_faces(canvas, networks, time_budget=0.0, notes=notes)
    assert len(notes) == 1 and f"after {WINDOW_BATCH} of {planned} windows" in notes[0], notes
    complete: list[str] = []
    detect_faces(canvas, networks, notes=complete)
    assert complete == []

"""Face detection: anchors, decoding, weighted NMS, tiling, and recall on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from headforge.benchmarks.landmarks import match_labelled_boxes, read_rgb, read_voc_boxes
from headforge.errors import InvalidImageError, InvalidOptionError
from headforge.models.runtime import ModelSet
from headforge.pipeline.anchors import FULL_RANGE_ANCHORS, SHORT_RANGE_ANCHORS, generate_anchors
from headforge.pipeline.detect import (
    FULL_RANGE,
    MAX_WINDOWS,
    SHORT_RANGE,
    RawDetections,
    Window,
    decode_detections,
    detect_faces,
    merge_windows,
    plan_windows,
    weighted_nms,
    window_tensor,
)


def test_anchor_counts_and_layout() -> None:
    short = generate_anchors(SHORT_RANGE_ANCHORS)
    full = generate_anchors(FULL_RANGE_ANCHORS)
    assert short.shape == (896, 4)
    assert full.shape == (2304, 4)
    # Fixed anchor size: every anchor is a unit square.
    assert np.all(short[:, 2:] == 1.0) and np.all(full[:, 2:] == 1.0)
    # Short range: a 16×16 grid with 2 anchors per cell, then an 8×8 grid with 6 per cell.
    np.testing.assert_allclose(short[0, :2], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[1, :2], short[0, :2])
    np.testing.assert_allclose(short[2, :2], [1.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(short[512:518, :2], np.tile([0.5 / 8, 0.5 / 8], (6, 1)))
    np.testing.assert_allclose(short[518, :2], [1.5 / 8, 0.5 / 8])
    # Full range: a 48×48 grid, one anchor per cell, row-major.
    np.testing.assert_allclose(full[1, :2], [1.5 / 48, 0.5 / 48])
    np.testing.assert_allclose(full[48, :2], [0.5 / 48, 1.5 / 48])
    np.testing.assert_allclose(full[-1, :2], [47.5 / 48, 47.5 / 48])


def test_decode_box_keypoints_and_clipped_sigmoid() -> None:
    anchors = generate_anchors(SHORT_RANGE_ANCHORS)
    raw_boxes = np.zeros((896, 16), np.float32)
    raw_scores = np.full((896, 1), -50.0, np.float32)
    index = 600
    raw_boxes[index, :4] = [12.8, -6.4, 32.0, 25.6]  # centre offset (+0.1, -0.05), size 0.25 × 0.2
    raw_boxes[index, 4:6] = [-12.8, 0.0]  # first keypoint 0.1 left of the anchor centre
    raw_scores[index] = 1e6  # clipped to 100 before the sigmoid: no overflow, score 1
    raw_scores[index + 1] = 0.0  # sigmoid 0.5, below MediaPipe's 0.5 threshold? equal: kept
    with np.errstate(all="raise"):
        boxes, keypoints, scores = decode_detections(raw_boxes, raw_scores, SHORT_RANGE, 0.5)
    assert len(scores) == 2
    cx, cy = anchors[index, :2]
    np.testing.assert_allclose(
        boxes[0], [cx + 0.1 - 0.125, cy - 0.05 - 0.1, cx + 0.1 + 0.125, cy - 0.05 + 0.1], atol=1e-6
    )
    np.testing.assert_allclose(keypoints[0, 0], [cx - 0.1, cy], atol=1e-6)
    np.testing.assert_allclose(keypoints[0, 1], [cx, cy], atol=1e-6)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.5)
    _, _, strict = decode_detections(raw_boxes, raw_scores, SHORT_RANGE, 0.6)
    assert len(strict) == 1


def test_weighted_nms_averages_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    keypoints = np.zeros((3, 6, 2), np.float32)
    keypoints[:, :, 0] = boxes[:, :1]
    scores = np.array([0.6, 0.9, 0.8], np.float32)
    merged = weighted_nms(RawDetections(boxes, keypoints, scores, np.zeros(3, bool)))
    assert len(merged.scores) == 2
    np.testing.assert_allclose(merged.scores, [0.9, 0.8])
    expected = (0.9 * boxes[1] + 0.6 * boxes[0]) / 1.5
    np.testing.assert_allclose(merged.boxes[0], expected, rtol=1e-6)
    np.testing.assert_allclose(merged.keypoints[0, :, 0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(merged.boxes[1], boxes[2])


def test_merge_windows_prefers_whole_faces_over_cut_ones() -> None:
    boxes = np.array([[0, 0, 40, 40], [20, 0, 40, 40], [100, 100, 130, 130]], np.float32)
    detections = RawDetections(
        boxes,
        np.zeros((3, 6, 2), np.float32),
        np.array([0.7, 0.95, 0.8], np.float32),
        np.array([False, True, False]),
    )
    merged = merge_windows(detections)
    assert len(merged.scores) == 2
    # The uncut face wins over the cut one despite its lower score.
    assert sorted(map(tuple, merged.boxes.tolist())) == sorted(map(tuple, boxes[[0, 2]].tolist()))
    assert not merged.cut.any()


def test_window_tensor_letterboxes_into_minus_one_to_one() -> None:
    rgb = np.full((50, 100, 3), 255, np.uint8)
    tensor = window_tensor(rgb, Window(0, -25, 100), 128)
    assert tensor.shape == (128, 128, 3) and tensor.dtype == np.float32
    assert tensor[64, 64, 0] == pytest.approx(1.0)  # image
    assert tensor[5, 64, 0] == pytest.approx(-1.0)  # zero padding = black


def test_plan_windows_cover_group_photos() -> None:
    assert len(plan_windows(512, 512, min_face_size=200)) == 1
    windows = plan_windows(500, 375, min_face_size=32)
    assert len(windows) > 1
    tiles = windows[1:]
    # Every pixel lies in some tile, and tiles overlap by at least a face.
    for x in range(0, 500, 5):
        for y in range(0, 375, 5):
            assert any(w.x0 <= x <= w.x0 + w.side and w.y0 <= y <= w.y0 + w.side for w in tiles)
    assert tiles[1].x0 - tiles[0].x0 <= tiles[0].side - 32
    # Large photos: several tile scales, within the window budget (tests/test_crowd.py).
    large = plan_windows(6000, 4000, min_face_size=32)
    assert len(large) <= MAX_WINDOWS and len({w.side for w in large}) >= 3


def test_bad_input_has_stable_codes(litert_networks: ModelSet) -> None:
    with pytest.raises(InvalidImageError) as error:
        detect_faces(np.zeros((64, 64), np.uint8), litert_networks)
    assert error.value.code == "invalid_image"
    with pytest.raises(InvalidImageError):
        detect_faces(np.zeros((64, 64, 3), np.float32), litert_networks)
    with pytest.raises(InvalidOptionError) as option:
        detect_faces(np.zeros((64, 64, 3), np.uint8), litert_networks, min_score=1.5)
    assert option.value.code == "invalid_option"
    with pytest.raises(InvalidOptionError):
        detect_faces(np.zeros((64, 64, 3), np.uint8), litert_networks, model="long_range")


def test_astronaut_has_exactly_one_face(astronaut: NDArray[np.uint8], networks: ModelSet) -> None:
    for model in ("full_range", "short_range"):
        detections = detect_faces(astronaut, networks, model=model)
        assert len(detections) == 1, model
        face = detections[0]
        assert face.score > FULL_RANGE.default_min_score
        x0, y0, x1, y1 = face.box
        assert 150 < x0 < x1 < 300 and 40 < y0 < y1 < 200
        right_eye, left_eye, nose, mouth = face.keypoints[:4]
        assert right_eye[0] < nose[0] < left_eye[0]  # the subject's right eye is on the image's left
        assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]
        assert np.all((face.keypoints[:4] >= [x0, y0]) & (face.keypoints[:4] <= [x1, y1]))


def test_blank_image_has_no_face(networks: ModelSet) -> None:
    assert detect_faces(np.full((300, 400, 3), 128, np.uint8), networks) == []


def test_voc_group_photos_recall(networks: ModelSet, voc_faces_dir: Path) -> None:
    folder = voc_faces_dir
    labels = read_voc_boxes(folder)
    assert sum(len(b) for b in labels.values()) == 43
    found = {"tiled": 0, "whole": 0}
    false_positives = {"tiled": 0, "whole": 0}
    for name, truth in labels.items():
        rgb = read_rgb(folder / name)
        for mode, tiled in (("tiled", True), ("whole", False)):
            boxes = np.array([d.box for d in detect_faces(rgb, networks, tiled=tiled)], np.float32).reshape(
                -1, 4
            )
            hits, extra = match_labelled_boxes(truth, boxes)
            found[mode] += hits
            false_positives[mode] += extra
    print(f"voc-faces detection: {found} of 43, false positives {false_positives}")
    assert found["tiled"] >= 41
    assert found["tiled"] >= found["whole"]
    assert false_positives["tiled"] <= 2


def test_served_networks_detect_like_litert(
    astronaut: NDArray[np.uint8], networks: ModelSet, litert_networks: ModelSet
) -> None:
    """Same post-processing over the served networks and the original .tflite files: same faces."""
    ours = detect_faces(astronaut, networks)
    reference = detect_faces(astronaut, litert_networks)
    assert len(ours) == len(reference) == 1
    np.testing.assert_allclose(ours[0].box, reference[0].box, atol=0.5)
    np.testing.assert_allclose(ours[0].keypoints, reference[0].keypoints, atol=0.5)
    assert ours[0].score == pytest.approx(reference[0].score, abs=1e-3)

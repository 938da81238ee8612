"""Face landmarks: ROI geometry, MediaPipe consistency, batching, iris, and group photos."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from headforge.benchmarks.landmarks import match_labelled_boxes, read_rgb, read_voc_boxes
from headforge.errors import InvalidOptionError
from headforge.models.runtime import ModelSet, Network
from headforge.pipeline.detect import detect_faces
from headforge.pipeline.landmarks import (
    FACE_MESH_INPUT,
    Roi,
    crop_roi,
    find_heads,
    predict_landmarks,
    roi_from_detection,
)
from headforge.pipeline.types import Detection


class CountingNetwork:
    """Forwards to a real network and counts its calls and batch sizes."""

    def __init__(self, inner: Network):
        self.name = inner.name
        self.inner = inner
        self.batches: list[int] = []

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self.batches.append(len(x))
        return self.inner.run(x)


def test_roi_round_trip_and_rotation() -> None:
    roi = Roi((120.0, 80.0), 60.0, math.radians(30))
    unit = np.array([[0.0, 0.0], [1.0, 0.5], [0.25, 0.75]])
    np.testing.assert_allclose(roi.from_image(roi.to_image(unit)), unit, atol=1e-12)
    # The ROI's x axis runs along the rotation: unit (1, 0.5) is half a side from the centre at 30°.
    np.testing.assert_allclose(
        roi.to_image(np.array([[1.0, 0.5]]))[0],
        [120 + 30 * math.cos(math.pi / 6), 80 + 30 * math.sin(math.pi / 6)],
    )


@pytest.mark.parametrize(
    ("box", "angle"),
    [
        ((100.0, 50.0, 180.0, 170.0), 30.0),  # tall box, head tilted 30° (left eye lower)
        ((300.0, 40.0, 420.0, 130.0), -20.0),  # wide box, tilted the other way
        ((60.0, 60.0, 124.0, 124.0), 135.0),  # square box, face nearly upside down
    ],
)
def test_roi_from_detection_follows_the_documented_rule(
    box: tuple[float, float, float, float], angle: float
) -> None:
    """A detection built by hand, with eye keypoints on a line at a known angle: the ROI is centred on
    the box, 1.5 × its long side, and rotated by the eye-line angle (docs/detection.md), independent
    of where the other four keypoints are."""
    x0, y0, x1, y1 = box
    right_eye = np.array([x0 + 0.3 * (x1 - x0), y0 + 0.4 * (y1 - y0)])
    direction = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    left_eye = right_eye + 0.4 * (x1 - x0) * direction
    others = np.random.default_rng(5).uniform([x0, y0], [x1, y1], size=(4, 2))
    detection = Detection(
        box=np.array(box, np.float32),
        score=0.9,
        keypoints=np.vstack([right_eye, left_eye, others]).astype(np.float32),
    )
    roi = roi_from_detection(detection)
    assert roi.center == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2), abs=1e-4)
    assert roi.size == pytest.approx(1.5 * max(x1 - x0, y1 - y0), rel=1e-6)
    assert math.degrees(roi.rotation) == pytest.approx(angle, abs=1e-3)
    # In ROI units both eyes sit on one row, right eye left of the left eye: the crop is levelled.
    eyes = roi.from_image(np.array([right_eye, left_eye]))
    assert eyes[0, 1] == pytest.approx(eyes[1, 1], abs=1e-5) and eyes[0, 0] < eyes[1, 0]
    # The same holds for the pixels of the 192 × 192 crop: soft dots centred exactly on the two eyes
    # (pixel (i, j) has its centre at (i + 0.5, j + 0.5)) land on one row, in order.
    ys, xs = np.mgrid[0:480, 0:640] + 0.5
    rgb = np.zeros((480, 640, 3), np.uint8)
    for eye, channel in ((right_eye, 0), (left_eye, 1)):
        blob = np.exp(-((xs - eye[0]) ** 2 + (ys - eye[1]) ** 2) / (2 * 1.5**2))
        rgb[:, :, channel] = np.rint(255 * blob).astype(np.uint8)
    patch = crop_roi(rgb, roi, FACE_MESH_INPUT)
    centroids = []
    for channel in (0, 1):
        rows, cols = np.nonzero(patch[:, :, channel] > 0.02)
        weights = patch[rows, cols, channel]
        centroids.append([np.average(cols, weights=weights) + 0.5, np.average(rows, weights=weights) + 0.5])
    np.testing.assert_allclose(centroids, eyes * FACE_MESH_INPUT, atol=0.3)
    assert abs(centroids[0][1] - centroids[1][1]) < 0.5 and centroids[0][0] < centroids[1][0]


def test_crop_places_an_image_point_where_the_roi_says() -> None:
    """A bright dot in the image lands in the crop at the ROI coordinates of the dot."""
    rgb = np.zeros((240, 320, 3), np.uint8)
    dot = np.array([150.5, 100.5])  # continuous coordinates of pixel (150, 100)'s centre
    rgb[100, 150] = 255
    for angle in (0.0, 25.0, -60.0):
        roi = Roi((160.0, 110.0), 48.0, math.radians(angle))
        patch = crop_roi(rgb, roi, 192)[:, :, 0]
        ys, xs = np.nonzero(patch > 0.02)
        weights = patch[ys, xs]
        centroid = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)]) + 0.5
        expected = roi.from_image(dot[None])[0] * 192
        np.testing.assert_allclose(centroid, expected, atol=0.3)
    flipped = crop_roi(rgb, Roi((160.0, 110.0), 48.0, 0.0), 192, flip=True)[:, :, 0]
    plain = crop_roi(rgb, Roi((160.0, 110.0), 48.0, 0.0), 192)[:, :, 0]
    np.testing.assert_array_equal(flipped, plain[:, ::-1])


def test_large_roi_is_shrunk_without_moving_anything() -> None:
    """ROIs many times larger than the crop go through an area pre-shrink; positions must not move."""
    rgb = np.zeros((1500, 1800, 3), np.uint8)
    rgb[700:720, 1000:1020] = 255  # a 20 px block centred at (1010, 710)
    for angle in (0.0, 40.0):
        roi = Roi((900.0, 750.0), 1300.0, math.radians(angle))
        patch = crop_roi(rgb, roi, 192)[:, :, 0]
        ys, xs = np.nonzero(patch > 0.01)
        weights = patch[ys, xs]
        centroid = np.array([np.average(xs, weights=weights), np.average(ys, weights=weights)]) + 0.5
        expected = roi.from_image(np.array([[1010.0, 710.0]]))[0] * 192
        np.testing.assert_allclose(centroid, expected, atol=0.15)
    # A 4 px dot survives with its brightness wherever it sits (bilinear point sampling at a
    # 6.8 px step would miss it or blow it up, depending on its position).
    for offset in (0, 2, 4, 6):
        dot = np.zeros((1500, 1800, 3), np.uint8)
        dot[300 + offset : 304 + offset, 400 + offset : 404 + offset] = 255
        patch = crop_roi(dot, Roi((900.0, 750.0), 1300.0, 0.0), 192)[:, :, 0]
        assert patch.sum() == pytest.approx(16 * (192 / 1300) ** 2, rel=0.1)


def _reference_landmarks(rgb: NDArray[np.uint8], roi: Roi, reference: ModelSet) -> NDArray[np.float32]:
    """MediaPipe's approach, built independently: the ROI's corners → a 192×192 crop by a
    three-point affine, FaceMesh under LiteRT, raw (468, 3) in crop pixels."""
    corners = roi.to_image(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])) - 0.5
    target = np.array([[0, 0], [FACE_MESH_INPUT, 0], [0, FACE_MESH_INPUT]], np.float64) - 0.5
    matrix = cv2.getAffineTransform(corners.astype(np.float32), target.astype(np.float32))
    patch = cv2.warpAffine(
        rgb,
        matrix,
        (FACE_MESH_INPUT, FACE_MESH_INPUT),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    raw = reference["face_landmark"].run(patch[None].astype(np.float32) / 255.0)[0]
    return np.asarray(raw, np.float32).reshape(468, 3)


@pytest.mark.parametrize("refine", [False, True])
def test_landmarks_match_litert_on_the_same_roi(
    astronaut: NDArray[np.uint8], networks: ModelSet, litert_networks: ModelSet, refine: bool
) -> None:
    """Mapping the pixel landmarks back into the ROI reproduces the raw network output."""
    detections = detect_faces(astronaut, networks)
    result = predict_landmarks(astronaut, detections, networks, refine=refine)[0]
    raw = _reference_landmarks(astronaut, result.roi, litert_networks)
    back = result.roi.from_image(result.landmarks_2d) * FACE_MESH_INPUT
    np.testing.assert_allclose(back, raw[:, :2], atol=0.05)
    np.testing.assert_allclose(
        result.landmarks_3d[:, 2] / result.roi.size * FACE_MESH_INPUT, raw[:, 2], atol=0.05
    )
    if not refine:
        assert result.roi == roi_from_detection(detections[0])


def test_astronaut_landmarks_are_plausible(astronaut: NDArray[np.uint8], networks: ModelSet) -> None:
    heads = find_heads(astronaut, networks, iris=True)
    assert len(heads) == 1
    head = heads[0]
    assert head.landmark_score is not None and head.landmark_score > 0.9
    assert head.landmarks_3d is not None and head.landmarks_2d is not None
    points = head.landmarks_3d
    assert points.shape == (478, 3) and points.dtype == np.float32
    np.testing.assert_array_equal(head.landmarks_2d, points[:, :2])
    x0, y0, x1, y1 = head.detection.box
    eyes = points[[33, 133, 362, 263]]
    assert np.all((eyes[:, 0] > x0) & (eyes[:, 0] < x1) & (eyes[:, 1] > y0) & (eyes[:, 1] < y1))
    # Subject's right eye (33 outer, 133 inner) on the image's left, then the left eye (362, 263).
    assert eyes[0, 0] < eyes[1, 0] < eyes[2, 0] < eyes[3, 0]
    nose_tip, chin = points[1], points[152]
    assert eyes[1, 0] < nose_tip[0] < eyes[2, 0] and eyes[:, 1].max() < nose_tip[1] < chin[1]
    # z on the x scale: the nose tip is closer to the camera than the eye corners by a fraction
    # of the face width, and the depth span is comparable to the width.
    face_width = points[:468, 0].max() - points[:468, 0].min()
    assert nose_tip[2] < eyes[:, 2].min() - 0.05 * face_width
    assert 0.3 * face_width < np.ptp(points[:468, 2]) < 1.5 * face_width
    # Iris centres (468, 473) between their eye's corners.
    assert eyes[0, 0] < points[468, 0] < eyes[1, 0]
    assert eyes[2, 0] < points[473, 0] < eyes[3, 0]


def test_group_photo_is_batched_and_equals_one_by_one(networks: ModelSet, voc_faces_dir: Path) -> None:
    rgb = read_rgb(voc_faces_dir / "2008_004176.jpg")
    detections = detect_faces(rgb, networks)
    assert len(detections) >= 5
    counting = CountingNetwork(networks["face_landmark"])
    counted = ModelSet(
        {"face_detection_full_range": networks["face_detection_full_range"], "face_landmark": counting}
    )
    together = predict_landmarks(rgb, detections, counted, refine=True)
    # One call per pass, every head in it.
    assert counting.batches == [len(detections), len(detections)]
    for detection, batched in zip(detections, together, strict=True):
        alone = predict_landmarks(rgb, [detection], networks, refine=True)[0]
        np.testing.assert_allclose(batched.landmarks_3d, alone.landmarks_3d, atol=1e-2)
        assert batched.presence == pytest.approx(alone.presence, abs=1e-4)


def test_voc_group_photos_detect_and_mesh(networks: ModelSet, voc_faces_dir: Path) -> None:
    folder = voc_faces_dir
    meshed = false_positives = 0
    for name, truth in read_voc_boxes(folder).items():
        heads = find_heads(read_rgb(folder / name), networks)
        assert all(h.landmark_score is not None and h.landmark_score >= 0.5 for h in heads)
        assert [h.index for h in heads] == list(range(len(heads)))
        boxes = np.array([h.detection.box for h in heads], np.float32).reshape(-1, 4)
        hits, extra = match_labelled_boxes(truth, boxes)
        meshed += hits
        false_positives += extra
    print(f"voc-faces detected and meshed: {meshed} of 43, false positives: {false_positives}")
    assert meshed >= 41
    assert false_positives <= 2


def test_find_heads_limits_and_errors(astronaut: NDArray[np.uint8], networks: ModelSet) -> None:
    assert find_heads(np.full((200, 200, 3), 90, np.uint8), networks) == []
    assert predict_landmarks(astronaut, [], networks) == []
    assert len(find_heads(astronaut, networks, max_heads=1)) == 1
    with pytest.raises(InvalidOptionError):
        find_heads(astronaut, networks, max_heads=0)
    with pytest.raises(InvalidOptionError):
        predict_landmarks(astronaut, detect_faces(astronaut, networks), networks, min_presence=2.0)


def test_crowd_collage_all_faces_meshed(networks: ModelSet, voc_faces_dir: Path) -> None:
    """bald_guys.jpg has no labels; it shows 24 faces (counted by eye). A whole-image pass, as
    MediaPipe runs it, meshes about half of them."""
    rgb = read_rgb(voc_faces_dir / "bald_guys.jpg")
    whole = find_heads(rgb, networks, tiled=False)
    tiled = find_heads(rgb, networks)
    assert len(whole) < len(tiled)
    assert len(tiled) == 24


def test_max_heads_keeps_the_best_detections(networks: ModelSet, voc_faces_dir: Path) -> None:
    rgb = read_rgb(voc_faces_dir / "2008_007676.jpg")
    every = find_heads(rgb, networks)
    capped = find_heads(rgb, networks, max_heads=3)
    assert len(every) == 7 and len(capped) == 3
    for head, reference in zip(capped, every[:3], strict=True):
        np.testing.assert_array_equal(head.detection.box, reference.detection.box)
        assert head.landmarks_3d is not None and reference.landmarks_3d is not None
        np.testing.assert_allclose(head.landmarks_3d, reference.landmarks_3d, atol=1e-2)

"""Face landmarks: MediaPipe's FaceMesh on rotated regions of interest, all heads in one call.

For each detection: a square ROI centred on the box, 1.5 × its long side, rotated so the eyes are
level (from the right-eye and left-eye keypoints); warp it to 192×192 with OpenCV; run FaceMesh on
every head of the image in one `Network.run` call (the runtime may split that batch: on CPU, one
item per ONNX Runtime call; see `headforge.models.runtime.OrtNetwork`); map the 468 (x, y, z) back
to original pixels, z on the x scale. Optionally a second pass re-centres the ROI on the first pass's landmarks (as MediaPipe's
tracking does from frame to frame) and Iris adds five points per eye (478 in all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from headforge.errors import InvalidOptionError
from headforge.models.runtime import FACE_LANDMARK, IRIS_LANDMARK, ModelSet
from headforge.pipeline.detect import check_rgb, detect_faces, warp_to_square
from headforge.pipeline.types import Detection, FloatArray, Head

FACE_MESH_INPUT = 192
IRIS_INPUT = 64
ROI_SCALE = 1.5  # MediaPipe's face ROI: 1.5 × the long side of the box
IRIS_ROI_SCALE = 2.3  # MediaPipe's eye ROI: 2.3 × the eye-corner distance
NUM_MESH_LANDMARKS = 468
NUM_LANDMARKS_WITH_IRIS = 478
DEFAULT_MIN_PRESENCE = 0.5  # MediaPipe's face-presence threshold
ROI_ROTATION_LANDMARKS = (33, 263)  # right-eye and left-eye outer corners
# (outer, inner) corners per eye, subject's right then left; MediaPipe flips the left eye's crop.
EYE_CORNERS = ((33, 133), (263, 362))
EYE_RINGS = (
    (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
    (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466),
)


@dataclass(frozen=True)
class Roi:
    """A rotated square in the image: centre and side in pixels, rotation in radians (clockwise in
    image coordinates, so that the ROI's x axis runs along the eye line)."""

    center: tuple[float, float]
    size: float
    rotation: float

    def _axes(self) -> NDArray[np.float64]:
        cos, sin = math.cos(self.rotation), math.sin(self.rotation)
        return np.array([[cos, -sin], [sin, cos]]) * self.size

    def to_image(self, unit: NDArray[np.floating]) -> NDArray[np.float64]:
        """Points in ROI units ([0, 1]², origin at the ROI's top-left corner) → image pixels."""
        return (np.asarray(unit, np.float64) - 0.5) @ self._axes().T + np.asarray(self.center)

    def from_image(self, pixels: NDArray[np.floating]) -> NDArray[np.float64]:
        """Image pixels → ROI units; the inverse of `to_image`."""
        offset = np.asarray(pixels, np.float64) - np.asarray(self.center)
        return offset @ np.linalg.inv(self._axes()).T + 0.5

    def warp_matrix(self, output_size: int, flip: bool = False) -> NDArray[np.float64]:
        """2×3 affine taking output-pixel indices to OpenCV source coordinates (pixel centres at
        integers), for `cv2.warpAffine(..., flags=WARP_INVERSE_MAP)`."""
        axes = self._axes() / output_size
        if flip:
            axes[:, 0] = -axes[:, 0]
        # Output pixel i has its centre at unit (i + 0.5) / S; image continuous coordinates put pixel
        # centres at +0.5, OpenCV at integers.
        origin = np.asarray(self.center) - 0.5 + axes @ np.array([0.5 - output_size / 2] * 2)
        return np.concatenate([axes, origin[:, None]], axis=1)


@dataclass
class LandmarkResult:
    """One head's landmarks in original-image pixels."""

    landmarks_3d: FloatArray  # (K, 3), K = 468 or 478 with iris; z on the x scale
    landmarks_2d: FloatArray  # (K, 2)
    presence: float  # FaceMesh face-presence probability
    roi: Roi  # the ROI of the pass that produced the landmarks


def roi_from_points(points: NDArray[np.floating], start: int, end: int, scale: float) -> Roi:
    """MediaPipe's rect from points: centre of their bounding box, side = scale × its long side,
    rotation levelling the vector from point `start` to point `end`."""
    points = np.asarray(points, np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    center = (low + high) / 2
    side = float(max(high - low)) * scale
    delta = points[end] - points[start]
    rotation = math.atan2(delta[1], delta[0])
    return Roi((float(center[0]), float(center[1])), max(side, 1.0), rotation)


def roi_from_detection(detection: Detection) -> Roi:
    """The face ROI from a detection box and its eye keypoints (right eye → left eye)."""
    box = np.asarray(detection.box, np.float64)
    center = (box[:2] + box[2:]) / 2
    side = float(max(box[2] - box[0], box[3] - box[1])) * ROI_SCALE
    eyes = np.asarray(detection.keypoints, np.float64)
    rotation = math.atan2(eyes[1, 1] - eyes[0, 1], eyes[1, 0] - eyes[0, 0])
    return Roi((float(center[0]), float(center[1])), max(side, 1.0), rotation)


def roi_from_landmarks(landmarks_2d: NDArray[np.floating]) -> Roi:
    """The face ROI re-centred on a mesh: bounding box of the 468 points, eye-corner rotation."""
    return roi_from_points(landmarks_2d[:NUM_MESH_LANDMARKS], *ROI_ROTATION_LANDMARKS, ROI_SCALE)


def crop_roi(rgb: NDArray[np.uint8], roi: Roi, size: int, flip: bool = False) -> NDArray[np.float32]:
    """Warp the ROI to size×size (bilinear, replicated borders, area pre-shrink for large ROIs),
    RGB in [0, 1]."""
    patch = warp_to_square(rgb, roi.warp_matrix(size, flip), size, cv2.BORDER_REPLICATE)
    return patch.astype(np.float32) * np.float32(1.0 / 255.0)


def unit_to_image(
    raw: NDArray[np.floating], roi: Roi, input_size: int, flip: bool = False
) -> NDArray[np.float32]:
    """Raw network points (K, 3) in input pixels → image pixels (K, 3), z scaled like x."""
    unit = np.asarray(raw[:, :2], np.float64) / input_size
    if flip:
        unit[:, 0] = 1.0 - unit[:, 0]
    xy = roi.to_image(unit)
    z = np.asarray(raw[:, 2], np.float64) / input_size * roi.size
    return np.concatenate([xy, z[:, None]], axis=1).astype(np.float32)


def run_face_mesh(
    rgb: NDArray[np.uint8], rois: Sequence[Roi], networks: ModelSet
) -> tuple[list[NDArray[np.float32]], NDArray[np.float64]]:
    """FaceMesh on all ROIs in one `Network.run` call: per ROI (468, 3) pixels, and presence scores."""
    batch = np.stack([crop_roi(rgb, roi, FACE_MESH_INPUT) for roi in rois])
    raw_landmarks, raw_presence = networks[FACE_LANDMARK].run(batch)[:2]
    raw_landmarks = np.asarray(raw_landmarks).reshape(len(rois), NUM_MESH_LANDMARKS, 3)
    logits = np.clip(np.asarray(raw_presence, np.float64).reshape(len(rois)), -100.0, 100.0)
    presence = 1.0 / (1.0 + np.exp(-logits))
    points = [unit_to_image(raw_landmarks[i], roi, FACE_MESH_INPUT) for i, roi in enumerate(rois)]
    return points, presence


def eye_rois(landmarks_2d: NDArray[np.floating]) -> list[Roi]:
    """MediaPipe's iris ROIs: 2.3 × the eye-corner span, levelled along the corners."""
    rois = []
    for outer, inner in EYE_CORNERS:
        corners = np.asarray(landmarks_2d)[[outer, inner]]
        # Both eyes' vectors run image-left to image-right on an upright face.
        start, end = (0, 1) if outer == EYE_CORNERS[0][0] else (1, 0)
        rois.append(roi_from_points(corners, start, end, IRIS_ROI_SCALE))
    return rois


def run_iris(
    rgb: NDArray[np.uint8], meshes: Sequence[NDArray[np.float32]], networks: ModelSet
) -> list[NDArray[np.float32]]:
    """Iris on both eyes of every head in one call; returns (478, 3) landmarks per head.

    The subject's left eye is mirrored before the network (the model expects a right eye) and
    mirrored back after. Iris z takes the mean depth of the eye's mesh contour.
    """
    rois = [roi for mesh in meshes for roi in eye_rois(mesh[:, :2])]
    flips = [False, True] * len(meshes)
    batch = np.stack([crop_roi(rgb, roi, IRIS_INPUT, flip) for roi, flip in zip(rois, flips, strict=True)])
    iris_raw = np.asarray(networks[IRIS_LANDMARK].run(batch)[1]).reshape(len(rois), 5, 3)
    results = []
    for head, mesh in enumerate(meshes):
        extra = []
        for eye in range(2):
            item = 2 * head + eye
            points = unit_to_image(iris_raw[item], rois[item], IRIS_INPUT, flips[item])
            points[:, 2] = mesh[list(EYE_RINGS[eye]), 2].mean()
            extra.append(points)
        results.append(np.concatenate([mesh, *extra]).astype(np.float32))
    return results


def predict_landmarks(
    rgb: NDArray[np.uint8],
    detections: Sequence[Detection],
    networks: ModelSet,
    *,
    refine: bool = True,
    iris: bool = False,
    min_presence: float = DEFAULT_MIN_PRESENCE,
) -> list[LandmarkResult]:
    """Landmarks for every detection, in order (one result each, low presence included).

    `refine` runs a second FaceMesh pass on ROIs rebuilt from the first pass's landmarks, keeping
    the first pass where the second loses the face. `iris` appends 5 iris points per eye (478).
    """
    rgb = check_rgb(rgb)
    if not 0.0 <= min_presence < 1.0:
        raise InvalidOptionError("min_presence must lie in [0, 1)", details={"min_presence": min_presence})
    if not detections:
        return []
    rois = [roi_from_detection(d) for d in detections]
    meshes, presence = run_face_mesh(rgb, rois, networks)
    if refine:
        # Only heads the first pass found are worth a second look.
        again = [i for i in range(len(rois)) if presence[i] >= min_presence]
        if again:
            refined_rois = [roi_from_landmarks(meshes[i][:, :2]) for i in again]
            refined, refined_presence = run_face_mesh(rgb, refined_rois, networks)
            for k, i in enumerate(again):
                if refined_presence[k] >= min_presence:
                    rois[i], meshes[i], presence[i] = refined_rois[k], refined[k], refined_presence[k]
    if iris:
        found = [i for i in range(len(rois)) if presence[i] >= min_presence]
        with_iris = run_iris(rgb, [meshes[i] for i in found], networks) if found else []
        for k, i in enumerate(found):
            meshes[i] = with_iris[k]
    return [
        LandmarkResult(
            landmarks_3d=mesh, landmarks_2d=np.ascontiguousarray(mesh[:, :2]), presence=float(score), roi=roi
        )
        for mesh, score, roi in zip(meshes, presence, rois, strict=True)
    ]


def find_heads(
    rgb: NDArray[np.uint8],
    networks: ModelSet,
    *,
    max_heads: int | None = None,
    iris: bool = False,
    refine: bool = True,
    min_score: float | None = None,
    min_presence: float = DEFAULT_MIN_PRESENCE,
    tiled: bool = True,
    min_face_size: float = 32.0,
    notes: list[str] | None = None,
) -> list[Head]:
    """Detect faces, mesh them, and keep those FaceMesh confirms, as `Head` records indexed 0…n-1,
    best detection first. Detection options are `detect_faces`'s. With `max_heads`, the most
    confident detections are meshed until that many are confirmed; when faces are left over, a
    line in `notes` says how many were detected."""
    if max_heads is not None and max_heads < 1:
        raise InvalidOptionError("max_heads must be at least 1", details={"max_heads": max_heads})
    detections = detect_faces(
        rgb, networks, min_score=min_score, tiled=tiled, min_face_size=min_face_size, notes=notes
    )
    heads: list[Head] = []
    # With a cap, mesh only as many detections as still needed (best first), until it is met.
    start = 0
    while start < len(detections) and (max_heads is None or len(heads) < max_heads):
        stop = len(detections) if max_heads is None else start + max_heads - len(heads)
        chunk = detections[start:stop]
        results = predict_landmarks(rgb, chunk, networks, refine=refine, iris=iris, min_presence=min_presence)
        for detection, result in zip(chunk, results, strict=True):
            if result.presence >= min_presence:
                heads.append(
                    Head(
                        index=len(heads),
                        detection=detection,
                        landmarks_2d=result.landmarks_2d,
                        landmarks_3d=result.landmarks_3d,
                        landmark_score=result.presence,
                    )
                )
        start = stop
    if max_heads is not None and len(heads) == max_heads and start < len(detections) and notes is not None:
        notes.append(
            f"kept the {max_heads} most confident of {len(detections)} faces detected (max_heads={max_heads})"
        )
    return heads

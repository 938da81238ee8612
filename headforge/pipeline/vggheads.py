"""The `vggheads` head source as plain functions: photo → letterboxed tensor → network (batched over
a job's photos) → NMS → heads with box, score, FLAME parameters and pose in image pixels.

Preprocessing (what the public package's `detector.py` feeds the released graph): the longest side
resized to 640 with Lanczos (`cv2.INTER_LANCZOS4`, the short side truncated with `int`), centred
padding with 127 (left = pad_w // 2, top = pad_h // 2, the remainder right and bottom), /255, NCHW.

Channel order, decided: **RGB**. The training code reads images with `cv2.imread` and never
converts them, so the network was trained on BGR; but the package feeds RGB to the released
`.trcd`/`.onnx`, and whether those graphs swap channels internally is not recorded anywhere we can
read. We feed what the package feeds, so a released checkpoint imported here gives the package's
outputs; `CHANNEL_ORDER` and the `channel_order` argument keep the choice in one place, and the
manifest of every imported entry records it.

NMS (as the package): score ≥ 0.5, the 1000 best, greedy IoU 0.5, at most 100 heads.

Back to the photo: boxes are clipped to the 640 canvas, un-padded and divided by the resize scale.
The FLAME similarity is mapped the same way (translation x, y un-padded, translation and scale
divided by the resize scale), so `s·R·v + t` gives vertices in image pixels directly. The package
instead leaves its translation in canvas pixels and only maps the vertices; ours is the same mesh.

Pose: the 6D rotation (a1 = [403:406], a2 = [406:409]) gives R = [b1 b2 b3] (Gram–Schmidt), which
maps FLAME's frame (y up, face toward +z) to the image frame (y down, z away): that is exactly the
head → image rotation `headforge.pipeline.pose.rotation_to_angles` reads, so yaw/pitch/roll come out
in the AFLW2000 convention headforge reports. The model's own reading (`model_euler`: scipy
"xyz" angles of Rᵀ, pitch − 180) is kept for the test that shows the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy.spatial.transform import Rotation

from headforge.pipeline.pose import rotation_to_angles

INPUT_SIZE = 640
PAD_VALUE = 127
CHANNEL_ORDER: Literal["rgb", "bgr"] = "rgb"
SCORE_THRESHOLD = 0.5
IOU_THRESHOLD = 0.5
PRE_NMS = 1000
MAX_HEADS = 100
MESH_OFFSET_Z = 0.05

SHAPE, EXPRESSION, JAW = slice(0, 300), slice(300, 400), slice(400, 403)
ROT_A1, ROT_A2, TRANSLATION, SCALE = slice(403, 406), slice(406, 409), slice(409, 412), 412


@dataclass(frozen=True)
class Letterbox:
    """How a photo was placed on the square canvas: canvas = photo · scale + (left, top)."""

    scale: float
    left: int
    top: int
    width: int  # the photo's
    height: int
    resized: tuple[int, int]  # (w, h) after resizing

    def to_image(self, xy: NDArray[np.floating]) -> NDArray[np.float64]:
        """Canvas pixels → photo pixels for (..., 2) points."""
        return (np.asarray(xy, dtype=np.float64) - (self.left, self.top)) / self.scale


def letterbox(
    rgb: NDArray[np.uint8], size: int = INPUT_SIZE, channel_order: str = CHANNEL_ORDER
) -> tuple[NDArray[np.float32], Letterbox]:
    """An (H, W, 3) uint8 RGB photo → (3, size, size) float32 in [0, 1] and its `Letterbox`."""
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = min(size, int(width * scale)), min(size, int(height * scale))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LANCZOS4)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    if channel_order == "bgr":
        canvas = canvas[..., ::-1]
    tensor = np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32) / 255.0
    return tensor, Letterbox(scale, left, top, width, height, (new_w, new_h))


def nms(boxes: NDArray[np.floating], scores: NDArray[np.floating], iou: float) -> NDArray[np.int64]:
    """Greedy non-maximum suppression: indices kept, best first (a box is dropped when its IoU
    with a kept, higher-scoring box exceeds `iou`)."""
    order = np.argsort(-scores, kind="stable")
    boxes = np.asarray(boxes, dtype=np.float64)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        x0 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y0 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x1 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y1 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        union = areas[best] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def rotation_from_6d(six: NDArray[np.floating]) -> NDArray[np.float64]:
    """(..., 6) = (a1, a2) → (..., 3, 3) rotations with columns b1 = a1/|a1|, b3 = b1×a2/|·|, b2 = b3×b1."""
    six = np.asarray(six, dtype=np.float64)
    a1, a2 = six[..., 0:3], six[..., 3:6]
    b1 = a1 / np.maximum(np.linalg.norm(a1, axis=-1, keepdims=True), 1e-12)
    b3 = np.cross(b1, a2)
    b3 = b3 / np.maximum(np.linalg.norm(b3, axis=-1, keepdims=True), 1e-12)
    b2 = np.cross(b3, b1)
    return np.stack([b1, b2, b3], axis=-1)


def _wrap(angle: float) -> float:
    return float((angle + 180.0) % 360.0 - 180.0)


def model_euler(rotation: NDArray[np.floating]) -> tuple[float, float, float]:
    """(yaw, pitch, roll) as the VGGHeads package reads them (scipy extrinsic "xyz" of Rᵀ = [ax,
    ay, az]; roll = az, pitch = ax − 180, yaw = ay; each wrapped to [−180, 180))."""
    ax, ay, az = Rotation.from_matrix(np.asarray(rotation, dtype=np.float64).T).as_euler("xyz", degrees=True)
    return _wrap(ay), _wrap(ax - 180.0), _wrap(az)


def pose_angles(rotation: NDArray[np.floating]) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in headforge's AFLW2000 convention (see the module docstring)."""
    return rotation_to_angles(rotation)


@dataclass
class VGGHead:
    """One detected head, everything in original-image pixels."""

    box: NDArray[np.float32]  # (4,) x0, y0, x1, y1
    score: float
    shape: NDArray[np.float32]  # (300,) FLAME β (only the first 64/128 are predicted)
    expression: NDArray[np.float32]  # (100,) FLAME ψ
    jaw: NDArray[np.float32]  # (3,) axis-angle
    rotation: NDArray[np.float32]  # (3, 3) FLAME frame → image frame
    translation: NDArray[np.float32]  # (3,) image pixels (z on the same scale)
    scale: float  # image pixels per FLAME unit (metre)
    yaw: float
    pitch: float
    roll: float
    extra: dict[str, Any] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """JSON-ready FLAME parameters (`Head.params`)."""
        return {
            "shape": self.shape.tolist(),
            "expression": self.expression.tolist(),
            "jaw": self.jaw.tolist(),
            "rotation": self.rotation.tolist(),
            "translation": self.translation.tolist(),
            "scale": self.scale,
        }

    def place(self, vertices: NDArray[np.floating]) -> NDArray[np.float32]:
        """FLAME vertices (metres, FLAME frame) → image pixels: v' = s·R·(v + (0, 0, 0.05)) + t."""
        shifted = np.asarray(vertices, dtype=np.float64) + np.array([0.0, 0.0, MESH_OFFSET_Z])
        placed = self.scale * shifted @ self.rotation.T.astype(np.float64) + self.translation
        return placed.astype(np.float32)


def select_heads(
    boxes: NDArray[np.floating],
    scores: NDArray[np.floating],
    flame: NDArray[np.floating],
    frame: Letterbox,
    *,
    score_threshold: float = SCORE_THRESHOLD,
    iou: float = IOU_THRESHOLD,
    max_heads: int = MAX_HEADS,
    pre_nms: int = PRE_NMS,
    notes: list[str] | None = None,
) -> list[VGGHead]:
    """One image's network outputs ([N, 4], [N, 1] or [N], [N, 413]; N = 1000 from a top-k graph or
    8400 from ours) → heads, best first, mapped back to the photo. When more than `max_heads` survive
    NMS, the most confident are kept and `notes` says how many were found."""
    score = np.asarray(scores, dtype=np.float64).reshape(-1)
    candidates = np.flatnonzero(score >= score_threshold)
    candidates = candidates[np.argsort(-score[candidates], kind="stable")][:pre_nms]
    canvas = float(INPUT_SIZE)
    clipped = np.clip(np.asarray(boxes, dtype=np.float64)[candidates], 0.0, canvas)
    survivors = candidates[nms(clipped, score[candidates], iou)]
    kept = survivors[:max_heads]
    if len(survivors) > max_heads and notes is not None:
        notes.append(
            f"kept the {max_heads} most confident of {len(survivors)} heads detected (max_heads={max_heads})"
        )
    heads = []
    for index in kept:
        vector = np.asarray(flame[index], dtype=np.float64)
        box = np.clip(np.asarray(boxes[index], dtype=np.float64), 0.0, canvas)
        corners = frame.to_image(box.reshape(2, 2)).reshape(4)
        rotation = rotation_from_6d(np.concatenate([vector[ROT_A1], vector[ROT_A2]]))
        translation = vector[TRANSLATION].copy()
        translation[:2] = frame.to_image(translation[:2])
        translation[2] /= frame.scale
        yaw, pitch, roll = pose_angles(rotation)
        heads.append(
            VGGHead(
                box=corners.astype(np.float32),
                score=float(score[index]),
                shape=vector[SHAPE].astype(np.float32),
                expression=vector[EXPRESSION].astype(np.float32),
                jaw=vector[JAW].astype(np.float32),
                rotation=rotation.astype(np.float32),
                translation=translation.astype(np.float32),
                scale=float(vector[SCALE] / frame.scale),
                yaw=yaw,
                pitch=pitch,
                roll=roll,
            )
        )
    return heads


def detect_batch(
    network: Any,
    photos: Sequence[NDArray[np.uint8]],
    *,
    channel_order: str = CHANNEL_ORDER,
    max_heads: int = MAX_HEADS,
    score_threshold: float = SCORE_THRESHOLD,
    notes: list[str] | None = None,
) -> list[list[VGGHead]]:
    """Every photo of a job through `network` (a `Network`: `run(batch) -> [boxes, scores, flame]`)
    in one batched call, then per-photo NMS and mapping back."""
    if not photos:
        return []
    prepared = [letterbox(photo, channel_order=channel_order) for photo in photos]
    batch = np.stack([tensor for tensor, _ in prepared])
    fixed = getattr(network, "input_shape", (None,))[0]  # a released graph may take batch 1 only
    if isinstance(fixed, int) and 0 < fixed < len(batch):
        parts = [network.run(batch[i : i + fixed])[:3] for i in range(0, len(batch), fixed)]
        boxes, scores, flame = (np.concatenate([part[k] for part in parts]) for k in range(3))
    else:
        boxes, scores, flame = network.run(batch)[:3]
    return [
        select_heads(
            boxes[i],
            scores[i],
            flame[i],
            frame,
            max_heads=max_heads,
            score_threshold=score_threshold,
            notes=notes,
        )
        for i, (_, frame) in enumerate(prepared)
    ]

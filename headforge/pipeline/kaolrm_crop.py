"""KaoLRM's input for one head: a square, centred head crop with the background removed, on white.

KaoLRM was trained on FFHQ/CelebA RGBA crops and its inference composites RGBA onto white, resizes to
224 × 224 with bicubic interpolation (align_corners=True), clamps to [0, 1] and applies no mean/std
normalisation. Its code does no detection or cropping, so headforge makes the crop:

1. **Square** from the head's landmarks, after the FFHQ alignment rule: with e = the eye midpoint,
   d_eyes = the eye-to-eye distance and d_mouth = the eye-midpoint-to-mouth distance, the centre is
   e + 0.1 · (mouth − e) and the side is 2 · max(2.0 · d_eyes, 1.8 · d_mouth), and at least 1.3 × the
   detection box. Eyes and mouth come from FaceMesh's landmarks (eye corners 33/133 and 362/263,
   mouth corners 61/291), else from the detector's keypoints. The square is axis-aligned (no roll
   correction), so crop and photo differ by a scale and an offset only.
2. **Background** from MediaPipe's selfie-segmentation network (`selfie_segmentation`, 256 × 256)
   run on that square; outside the photo the mask is 0.
3. **Composite** rgb · m + (1 − m) · white at the crop's native resolution, then bicubic to 224
   and clamp.

`HeadCrop.to_image` maps normalised crop coordinates ([0, 1] across the 224 px square, the frame
KaoLRM's intrinsics cx = cy = 0.5 refer to) back to photo pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from headforge.models.runtime import ModelSet
from headforge.pipeline.types import Head

SIZE = 224
SEGMENTATION = "selfie_segmentation"
SEGMENTATION_SIZE = 256
MAX_NATIVE = 1024  # the crop is resampled to at most this many pixels before the final resize
MIN_BOX_FACTOR = 1.3
# FaceMesh landmark indices of the eye and mouth corners.
RIGHT_EYE = (33, 133)
LEFT_EYE = (362, 263)
MOUTH = (61, 291)

FloatArray = NDArray[np.float32]


@dataclass
class HeadCrop:
    """One head's KaoLRM input and where it came from."""

    image: FloatArray  # (3, 224, 224) RGB in [0, 1], background white
    mask: FloatArray  # (224, 224) person probability
    origin: tuple[float, float]  # photo pixel of the crop's top-left corner
    side: float  # the crop's side in photo pixels

    def to_image(self, uv: NDArray[np.floating]) -> NDArray[np.float64]:
        """Normalised crop coordinates (..., 2) in [0, 1] → photo pixels (..., 2)."""
        return np.asarray(self.origin, np.float64) + np.asarray(uv, np.float64) * self.side


def crop_square(head: Head) -> tuple[tuple[float, float], float]:
    """(top-left corner, side) of the head's crop in photo pixels (see the module docstring)."""
    if head.landmarks_2d is not None and len(head.landmarks_2d) >= 468:
        points = np.asarray(head.landmarks_2d, np.float64)
        right_eye, left_eye = points[list(RIGHT_EYE)].mean(0), points[list(LEFT_EYE)].mean(0)
        mouth = points[list(MOUTH)].mean(0)
    else:
        keypoints = np.asarray(head.detection.keypoints, np.float64)
        right_eye, left_eye, mouth = keypoints[0], keypoints[1], keypoints[3]
    eyes = (right_eye + left_eye) / 2
    to_mouth = mouth - eyes
    centre = eyes + 0.1 * to_mouth
    side = 2.0 * max(2.0 * float(np.linalg.norm(left_eye - right_eye)), 1.8 * float(np.linalg.norm(to_mouth)))
    box = np.asarray(head.detection.box, np.float64)
    side = max(side, MIN_BOX_FACTOR * float(max(box[2] - box[0], box[3] - box[1])), 8.0)
    return (float(centre[0] - side / 2), float(centre[1] - side / 2)), side


def _resample(rgb: NDArray[np.uint8], origin: tuple[float, float], side: float, size: int) -> FloatArray:
    """The square resampled to size × size (RGB float in [0, 1]); outside the photo: edge pixels."""
    scale = size / side
    matrix = np.array([[scale, 0.0, -origin[0] * scale], [0.0, scale, -origin[1] * scale]])
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = cv2.warpAffine(rgb, matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
    return out.astype(np.float32) / 255.0


def _inside(shape: tuple[int, ...], origin: tuple[float, float], side: float, size: int) -> FloatArray:
    """1 where a crop pixel's centre lies inside the photo, else 0."""
    centres = (
        origin[0] + (np.arange(size) + 0.5) * side / size,
        origin[1] + (np.arange(size) + 0.5) * side / size,
    )
    inside_x = (centres[0] >= 0) & (centres[0] < shape[1])
    inside_y = (centres[1] >= 0) & (centres[1] < shape[0])
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def segment(squares: FloatArray, models: ModelSet) -> FloatArray:
    """Person masks (N, 256, 256) for crops (N, 256, 256, 3) in [0, 1]."""
    return models[SEGMENTATION].run(squares)[0][..., 0]


def make_crops(rgb: NDArray[np.uint8], heads: list[Head], models: ModelSet) -> list[HeadCrop]:
    """KaoLRM inputs for `heads` of one photo (segmentation batched over the heads)."""
    if not heads:
        return []
    squares = [crop_square(head) for head in heads]
    seg_inputs = np.stack([_resample(rgb, origin, side, SEGMENTATION_SIZE) for origin, side in squares])
    masks = segment(seg_inputs, models)
    crops = []
    for (origin, side), mask in zip(squares, masks, strict=True):
        native = int(min(MAX_NATIVE, max(SIZE, round(side))))
        photo = _resample(rgb, origin, side, native)
        full_mask = cv2.resize(mask.astype(np.float32), (native, native), interpolation=cv2.INTER_LINEAR)
        full_mask = np.clip(full_mask, 0.0, 1.0) * _inside(rgb.shape, origin, side, native)
        composite = photo * full_mask[..., None] + (1.0 - full_mask[..., None])
        tensor = torch.from_numpy(np.ascontiguousarray(composite.transpose(2, 0, 1)))[None]
        resized = F.interpolate(tensor, size=(SIZE, SIZE), mode="bicubic", align_corners=True).clamp(0.0, 1.0)
        small_mask = cv2.resize(full_mask, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        crops.append(
            HeadCrop(resized[0].numpy().astype(np.float32), small_mask.astype(np.float32), origin, side)
        )
    return crops

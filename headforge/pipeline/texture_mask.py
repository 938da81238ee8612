"""The person mask a head's texture samples through: photo pixels that are not the person (background)
must not color texels where the mesh's outline passes beyond the head in the photo.

MediaPipe's selfie-segmentation network (`selfie_segmentation`, 256 × 256, exported by `models pull`)
runs on an axis-aligned square around the head's projected mesh (CONTEXT × its extent, so that the
network sees head and shoulders as in its training crops). Its person probability becomes a weight
ramping from 0 at PERSON_LOW to 1 at PERSON_HIGH, shrunk by ERODE_PIXELS photo pixels (a pixel on the
person's edge mixes in the background). The outline's own feather (pixels just inside the
mesh's projected outline, which mix in what lies beyond it) is the texture module's.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from headforge.errors import HeadforgeError
from headforge.models.runtime import ModelSet
from headforge.pipeline.texture import PhotoMask
from headforge.pipeline.types import Mesh

SEGMENTATION = "selfie_segmentation"
SEGMENTATION_SIZE = 256
CONTEXT = 1.6
PERSON_LOW, PERSON_HIGH = 0.4, 0.8
ERODE_PIXELS = 1.5  # the mask shrinks by this many photo pixels: edge pixels mix in the background


def head_square(mesh_image: Mesh) -> tuple[tuple[float, float], float]:
    """(top-left photo pixel, side) of the square CONTEXT × the mesh's projected extent, centred on it."""
    xy = np.asarray(mesh_image.vertices, np.float64)[:, :2]
    low, high = xy.min(0), xy.max(0)
    centre = (low + high) / 2
    side = max(float((high - low).max()) * CONTEXT, 8.0)
    return (float(centre[0] - side / 2), float(centre[1] - side / 2)), side


def person_masks(rgb: NDArray[np.uint8], meshes: list[Mesh], models: ModelSet) -> list[PhotoMask | None]:
    """One person mask per head mesh of a photo (one batched network run); all None when the
    segmentation network is not in the model set."""
    if not meshes:
        return []
    try:
        network = models[SEGMENTATION]
    except HeadforgeError:  # an older model repository without it: textures go unmasked
        return [None] * len(meshes)
    squares = [head_square(mesh) for mesh in meshes]
    crops = []
    for (x0, y0), side in squares:
        scale = SEGMENTATION_SIZE / side
        matrix = np.array([[scale, 0.0, -x0 * scale], [0.0, scale, -y0 * scale]])
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        crop = cv2.warpAffine(
            rgb,
            matrix,
            (SEGMENTATION_SIZE, SEGMENTATION_SIZE),
            flags=interpolation,
            borderMode=cv2.BORDER_REPLICATE,
        )
        crops.append(crop.astype(np.float32) * np.float32(1.0 / 255.0))
    probabilities = network.run(np.stack(crops))[0][..., 0]
    weights = np.clip((probabilities - PERSON_LOW) / (PERSON_HIGH - PERSON_LOW), 0.0, 1.0).astype(np.float32)
    masks: list[PhotoMask | None] = []
    for weight, (origin, side) in zip(weights, squares, strict=True):
        radius = max(1, round(ERODE_PIXELS * SEGMENTATION_SIZE / side))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        masks.append(PhotoMask(np.asarray(cv2.erode(weight, kernel), np.float32), origin, side))
    return masks

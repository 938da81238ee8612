"""SSD anchors for the BlazeFace detectors, generated from each model's anchor options.

The options are those of MediaPipe's face_detection graphs (`SsdAnchorsCalculatorOptions`):
short range is 128×128 with 4 layers at strides 8, 16, 16, 16 (896 anchors); full range is
192×192 with one layer at stride 4 (2304 anchors). Both use one aspect ratio (1.0), anchor
offsets of 0.5 and a fixed anchor size, so every anchor is a unit square centred on a grid cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class AnchorOptions:
    """The subset of MediaPipe's `SsdAnchorsCalculatorOptions` the face detectors use."""

    input_size: int  # square model input, pixels
    num_layers: int
    strides: tuple[int, ...]
    min_scale: float = 0.1484375
    max_scale: float = 0.75
    aspect_ratios: tuple[float, ...] = (1.0,)
    anchor_offset: float = 0.5
    fixed_anchor_size: bool = True
    # > 0 adds one anchor per cell at the geometric mean of this and the next layer's scale.
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = False


SHORT_RANGE_ANCHORS = AnchorOptions(input_size=128, num_layers=4, strides=(8, 16, 16, 16))
FULL_RANGE_ANCHORS = AnchorOptions(
    input_size=192, num_layers=1, strides=(4,), interpolated_scale_aspect_ratio=0.0
)


def _layer_scale(options: AnchorOptions, layer: int) -> float:
    if len(options.strides) == 1:
        return (options.min_scale + options.max_scale) / 2
    return options.min_scale + (options.max_scale - options.min_scale) * layer / (len(options.strides) - 1)


def _anchor_shapes(options: AnchorOptions, first: int, last: int) -> list[tuple[float, float]]:
    """(width, height) of the anchors per cell for layers first..last that share one stride."""
    shapes: list[tuple[float, float]] = []
    for layer in range(first, last):
        scale = _layer_scale(options, layer)
        if layer == 0 and options.reduce_boxes_in_lowest_layer:
            pairs = [(1.0, 0.1), (2.0, scale), (0.5, scale)]
        else:
            pairs = [(ratio, scale) for ratio in options.aspect_ratios]
            if options.interpolated_scale_aspect_ratio > 0:
                next_scale = 1.0 if layer == len(options.strides) - 1 else _layer_scale(options, layer + 1)
                pairs.append((options.interpolated_scale_aspect_ratio, math.sqrt(scale * next_scale)))
        for ratio, layer_scale in pairs:
            root = math.sqrt(ratio)
            shapes.append((layer_scale * root, layer_scale / root))
    return shapes


@lru_cache(maxsize=8)
def generate_anchors(options: AnchorOptions) -> NDArray[np.float32]:
    """Anchors as an (N, 4) array of x_center, y_center, width, height, normalised to [0, 1].

    Order matches the detector's outputs: layer groups (consecutive layers with one stride share
    a feature map), then rows, then columns, then the anchors of one cell.
    """
    if len(options.strides) != options.num_layers:
        raise ValueError("one stride per layer is required")
    rows: list[tuple[float, float, float, float]] = []
    layer = 0
    while layer < options.num_layers:
        last = layer
        while last < options.num_layers and options.strides[last] == options.strides[layer]:
            last += 1
        shapes = _anchor_shapes(options, layer, last)
        cells = math.ceil(options.input_size / options.strides[layer])
        for y in range(cells):
            for x in range(cells):
                center_x = (x + options.anchor_offset) / cells
                center_y = (y + options.anchor_offset) / cells
                for width, height in shapes:
                    if options.fixed_anchor_size:
                        width, height = 1.0, 1.0
                    rows.append((center_x, center_y, width, height))
        layer = last
    anchors = np.asarray(rows, dtype=np.float32)
    anchors.setflags(write=False)
    return anchors

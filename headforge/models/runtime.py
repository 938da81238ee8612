"""The runtime layer: one place that owns inference sessions for the default networks.

A `Network` takes a batch in the exact layout and value range of the original `.tflite` input
(NHWC float32; detectors in [-1, 1], landmark networks in [0, 1]) and returns the raw outputs in
the `.tflite` output order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_NETWORK_NAMES = ("face_detection_short_range", "face_detection_full_range", "face_landmark", "iris_landmark")


class Network(Protocol):
    name: str

    def run(self, x: np.ndarray) -> list[np.ndarray]: ...


@dataclass
class DefaultNetworks:
    short_range: Network
    full_range: Network
    face_landmark: Network
    iris: Network

"""Reference backend: the original `.tflite` files run by the LiteRT interpreter.

Used by parity tests and benchmarks only (`ai-edge-litert` is a dev dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headforge.models.runtime import FACE_LANDMARK, FULL_RANGE, IRIS_LANDMARK, SHORT_RANGE, ModelSet


class LiteRTNetwork:
    """A `.tflite` file behind the `Network` interface; loops over the batch (TFLite models are batch 1)."""

    def __init__(self, path: Path, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.name = path.stem
        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._outputs = [d["index"] for d in self._interpreter.get_output_details()]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        per_item: list[list[np.ndarray]] = []
        for item in np.asarray(x, dtype=np.float32):
            self._interpreter.set_tensor(self._input, item[None])
            self._interpreter.invoke()
            per_item.append([self._interpreter.get_tensor(i).copy() for i in self._outputs])
        return [np.concatenate([outs[k] for outs in per_item]) for k in range(len(self._outputs))]


def load_litert_networks(tflite_dir: Path, num_threads: int = 1) -> ModelSet:
    """The four default networks, from the `.tflite` files extracted by `headforge models pull`."""
    return ModelSet(
        {
            SHORT_RANGE: LiteRTNetwork(tflite_dir / "face_detection_short_range.tflite", num_threads),
            FULL_RANGE: LiteRTNetwork(tflite_dir / "face_detection_full_range_sparse.tflite", num_threads),
            FACE_LANDMARK: LiteRTNetwork(tflite_dir / "face_landmark.tflite", num_threads),
            IRIS_LANDMARK: LiteRTNetwork(tflite_dir / "iris_landmark.tflite", num_threads),
        }
    )

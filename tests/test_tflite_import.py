"""The flatbuffer reader and weight import, checked against the LiteRT interpreter's own tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from needs import missing

from headforge.config import tflite_source_dir
from headforge.errors import AssetError
from headforge.models.layers import load_tflite_weights
from headforge.models.pull import DEFAULT_MODELS, DefaultModel
from headforge.models.tflite_weights import TFLiteGraph


def tflite_path(model: DefaultModel) -> Path:
    path = tflite_source_dir() / model.tflite_name
    if not path.exists():
        missing(f"{path} is absent; run `headforge models pull`")
    return path


MODELS = {m.name: m for m in DEFAULT_MODELS}


def test_full_range_graph_uses_sparse_fp16_weights() -> None:
    graph = TFLiteGraph(tflite_path(MODELS["face_detection_full_range"]))
    counts = graph.op_counts()
    assert counts["DENSIFY"] == 46 and counts["DEQUANTIZE"] == 182
    assert {"RESIZE_BILINEAR", "DEPTH_TO_SPACE", "PAD"} <= counts.keys()
    resize = next(op for op in graph.operators if op.opcode == "RESIZE_BILINEAR")
    assert resize.options == {"align_corners": False, "half_pixel_centers": True}
    # Weight-decoding ops are not part of the computation.
    assert not {op.opcode for op in graph.compute_ops()} & {"DENSIFY", "DEQUANTIZE"}


@pytest.mark.parametrize("name", ["face_detection_full_range", "face_detection_short_range", "face_landmark"])
def test_decoded_weights_equal_the_interpreters(name: str) -> None:
    """Every DEQUANTIZE output (fp16 → fp32, after DENSIFY for sparse tensors) equals LiteRT's value."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    path = tflite_path(MODELS[name])
    interpreter = litert.Interpreter(
        model_path=str(path),
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()[0]
    interpreter.set_tensor(details["index"], np.zeros(details["shape"], np.float32))
    interpreter.invoke()
    graph = TFLiteGraph(path)
    decoded = [op.outputs[0] for op in graph.operators if op.opcode == "DEQUANTIZE"]
    assert decoded
    for tensor in decoded:
        ours = graph.constant(tensor)
        reference = interpreter.get_tensor(tensor)
        assert ours.dtype == np.float32 and ours.shape == reference.shape
        np.testing.assert_array_equal(ours, reference, err_msg=graph.tensors[tensor].name)


def test_sparse_weights_are_really_sparse_and_dense_after_import() -> None:
    graph = TFLiteGraph(tflite_path(MODELS["face_detection_full_range"]))
    densify = [op for op in graph.operators if op.opcode == "DENSIFY"]
    weights = graph.constant(densify[0].outputs[0])
    stored = graph.tensors[densify[0].inputs[0]]
    assert weights.shape == stored.shape and weights.dtype == np.float16
    assert 0.0 < float((weights == 0).mean()) < 1.0


def test_every_module_consumes_every_weighted_op() -> None:
    for model in DEFAULT_MODELS:
        module = model.build()
        load_tflite_weights(module.tflite_layer_order(), TFLiteGraph(tflite_path(model)))  # type: ignore[operator]


def test_mismatched_module_is_refused() -> None:
    iris = MODELS["iris_landmark"].build()
    with pytest.raises(AssetError, match="weighted ops"):
        load_tflite_weights(iris.tflite_layer_order(), TFLiteGraph(tflite_path(MODELS["face_landmark"])))  # type: ignore[operator]


def test_not_a_flatbuffer_is_an_asset_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a tflite model at all")
    with pytest.raises(AssetError) as caught:
        TFLiteGraph(junk)
    assert caught.value.code == "invalid_asset"


def test_truncated_model_is_an_asset_error() -> None:
    data = tflite_path(MODELS["face_landmark"]).read_bytes()
    for size in (16, 4096, len(data) // 2):
        with pytest.raises(AssetError):
            TFLiteGraph(data[:size])

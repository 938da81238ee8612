"""Module → ONNX (`onnx.export_onnx`, with a parity check) → repository entry (`model.export_model`,
`manifest.json`) → TensorRT engine (`tensorrt.add_engine_to_entry`). See docs/models.md."""

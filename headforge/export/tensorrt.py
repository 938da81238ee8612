"""ONNX → TensorRT engine (`model.plan`, fp16 by default, dynamic batch), where TensorRT is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from headforge.errors import ModelExportError
from headforge.export.repository import MANIFEST, write_json_atomic
from headforge.files import sha256_file, write_atomic


def tensorrt_available() -> bool:
    """True when the `tensorrt` Python package can be imported (it needs an NVIDIA GPU to build)."""
    return importlib.util.find_spec("tensorrt") is not None


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    fp16: bool = True,
    batch: tuple[int, int, int] = (1, 8, 64),
    workspace_bytes: int = 1 << 30,
) -> dict[str, Any]:
    """Build a serialized engine for `onnx_path` with a (min, opt, max) batch profile on every input.

    Returns the build settings for the manifest. Raises `ModelExportError` without TensorRT or
    when parsing/building fails.
    """
    if not tensorrt_available():
        raise ModelExportError(
            "TensorRT is not installed; install `tensorrt` on a machine with an NVIDIA GPU"
        )
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelExportError(f"TensorRT could not parse {onnx_path.name}: {problems}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (batch[0], *rest), (batch[1], *rest), (batch[2], *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelExportError(f"TensorRT failed to build an engine for {onnx_path.name}")
    # Atomic: a reader never sees half an engine, and a failed write leaves the previous plan intact.
    write_atomic(plan_path, bytes(serialized))
    return {"tensorrt": trt.__version__, "fp16": fp16, "batch_profile": list(batch)}


def add_engine_to_entry(directory: Path, *, fp16: bool = True) -> Path:
    """Build `model.plan` beside an entry's `model.onnx` and record it in the entry's manifest."""
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    plan = directory / "model.plan"
    settings = build_engine(directory / manifest.get("model_file", "model.onnx"), plan, fp16=fp16)
    manifest["tensorrt"] = {"plan_file": plan.name, "plan_sha256": sha256_file(plan), **settings}
    write_json_atomic(manifest_path, manifest)
    return plan

"""TensorRT engines for repository entries.

The one path workers use: ONNX Runtime's TensorRT execution provider with an engine cache.
`build_entry_engine` (`headforge models build-engine NAME`) opens the entry's `model.onnx` with
that provider and the options in `trt_provider_options` (fp16 or fp32 as asked, the batch profile
1/8/64, cache folder `$HEADFORGE_HOME/trt_cache/<name>/<version>`), runs the three profile shapes so
the engine is built and written to the cache, and records the settings in the manifest. A GPU
worker's `OrtNetwork` opens the same file with the same options (it reads the precision from the
manifest), so ONNX Runtime finds the cached engine instead of building one.

`build_engine` below (native TensorRT → `model.plan`) is kept as a library function for offline
use; no worker loads a `model.plan`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from headforge.errors import ModelExportError
from headforge.export.repository import MANIFEST, write_json_atomic
from headforge.files import sha256_file, write_atomic

TRT_BATCH_PROFILE = (1, 8, 64)  # (min, opt, max) batch of every input


def _profile(onnx_path: Path) -> dict[str, str]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    shapes: dict[str, list[str]] = {key: [] for key in keys}
    for model_input in graph.input:
        if model_input.name in initializers:
            continue
        rest = [str(d.dim_value) for d in model_input.type.tensor_type.shape.dim[1:]]
        for key, batch in zip(keys, TRT_BATCH_PROFILE, strict=True):
            shapes[key].append(f"{model_input.name}:{'x'.join([str(batch), *rest])}")
    return {key: ",".join(value) for key, value in shapes.items()}


def trt_provider_options(onnx_path: Path, name: str) -> dict[str, Any]:
    """TensorRT EP options for an entry's model file: engine cache per entry, the entry's recorded
    precision (fp16 unless `build-engine --fp32` recorded otherwise), the batch profile."""
    from headforge.config import headforge_home

    fp16 = True
    try:
        recorded = json.loads((onnx_path.parent / MANIFEST).read_text()).get("tensorrt", {})
        fp16 = bool(recorded.get("fp16", True)) if isinstance(recorded, dict) else True
    except (OSError, ValueError):
        pass
    cache = headforge_home() / "trt_cache" / name / onnx_path.parent.name
    cache.mkdir(parents=True, exist_ok=True)
    return {
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        **_profile(onnx_path),
    }


def build_entry_engine(directory: Path, *, fp16: bool = True) -> dict[str, Any]:
    """Build (or find) the TensorRT engine of a repository entry through ONNX Runtime's TensorRT
    provider and its cache; record the settings under `tensorrt` in the manifest. Raises
    `ModelExportError` when the provider is unavailable or falls back to another one."""
    import onnxruntime as ort

    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    onnx_path = directory / str(manifest.get("model_file", "model.onnx"))
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise ModelExportError(
            "ONNX Runtime's TensorRT provider is not available here; install onnxruntime-gpu and TensorRT "
            "on a machine with an NVIDIA GPU (`pip install -e .[gpu]`)"
        )
    # Record the precision first: the options (and so the cache key) read it from the manifest.
    original = dict(manifest)
    manifest["tensorrt"] = {"fp16": fp16, "engine_cache": "pending"}
    write_json_atomic(manifest_path, manifest)
    try:
        settings = _build_in_cache(onnx_path, directory.parent.name, fp16)
    except BaseException:
        write_json_atomic(manifest_path, original)  # a failed build leaves the entry as it was
        raise
    manifest["tensorrt"] = settings
    write_json_atomic(manifest_path, manifest)
    return settings


def _build_in_cache(onnx_path: Path, name: str, fp16: bool) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    options = trt_provider_options(onnx_path, name)
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    session = ort.InferenceSession(
        str(onnx_path),
        session_options,
        providers=[("TensorrtExecutionProvider", options), "CPUExecutionProvider"],
    )
    if session.get_providers()[0] != "TensorrtExecutionProvider":
        raise ModelExportError(f"ONNX Runtime did not take the TensorRT provider for {onnx_path}")
    inputs = session.get_inputs()
    for batch in TRT_BATCH_PROFILE:
        feed = {i.name: np.zeros([batch, *[int(d) for d in i.shape[1:]]], dtype=np.float32) for i in inputs}
        session.run(None, feed)
    cache = Path(options["trt_engine_cache_path"])
    engines = sorted(p.name for p in cache.iterdir() if p.suffix in {".engine", ".profile"})
    settings = {
        "path": "onnxruntime TensorrtExecutionProvider + engine cache",
        "onnxruntime": ort.__version__,
        "fp16": fp16,
        "batch_profile": list(TRT_BATCH_PROFILE),
        "engine_cache": str(cache),
        "engine_files": engines,
    }
    return settings


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

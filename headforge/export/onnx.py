"""Any `nn.Module` with a declared input spec → ONNX with a dynamic batch, checked against PyTorch."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from headforge.errors import ModelExportError

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. `shape` excludes the batch dimension, which is always dynamic."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] = (0.0, 1.0)  # for inputs: the range parity samples are drawn from


@dataclass(frozen=True)
class ExportSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    opset: int = DEFAULT_OPSET
    max_batch: int = 64
    parity_tolerance: float = 1e-4  # max |ORT - PyTorch| ≤ tolerance × max |PyTorch|, per output


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and measured; `manifest_fields` feeds `manifest.json`."""

    path: Path
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    max_abs_error: float
    max_rel_error: float
    settings: dict[str, Any] = field(default_factory=dict)


def sample_inputs(spec: ExportSpec, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Uniform random inputs in each input's declared value range (used when no real samples are given)."""
    rng = np.random.default_rng(seed)
    return [
        rng.uniform(low, high, size=(batch, *tensor.shape)).astype(tensor.dtype)
        for tensor in spec.inputs
        for low, high in [tensor.value_range]
    ]


def export_onnx(
    module: nn.Module,
    spec: ExportSpec,
    path: Path,
    samples: Sequence[np.ndarray] | None = None,
) -> OnnxExport:
    """Export `module` to `path` (one self-contained file) and check ONNX Runtime against PyTorch.

    `samples` are parity inputs with a leading batch dimension (real data where available); random
    inputs in the declared ranges are used otherwise. Raises `ModelExportError` when the exporter
    fails or the outputs differ by more than `spec.parity_tolerance` relative to their magnitude.
    """
    module = module.eval()
    examples = tuple(torch.from_numpy(x) for x in sample_inputs(spec, batch=2))
    batch = torch.export.Dim("batch", min=1, max=spec.max_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        staged = Path(scratch) / path.name
        try:
            with _quiet_exporter(), torch.no_grad():
                torch.onnx.export(
                    module,
                    examples,
                    str(staged),
                    input_names=[t.name for t in spec.inputs],
                    output_names=list(spec.outputs),
                    opset_version=spec.opset,
                    dynamic_shapes=tuple({0: batch} for _ in spec.inputs),
                    dynamo=True,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
        except Exception as error:
            raise ModelExportError(f"ONNX export of {type(module).__name__} failed: {error}") from error
        parity_inputs = list(samples) if samples is not None else sample_inputs(spec, batch=3, seed=1)
        max_abs, max_rel = check_parity(module, staged, spec, parity_inputs)
        staged.replace(path)
    return OnnxExport(
        path=path,
        inputs=[_describe(t.name, ("batch", *t.shape), t.dtype) for t in spec.inputs],
        outputs=_output_descriptions(path),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        settings={
            "exporter": f"torch.onnx (dynamo) {torch.__version__}",
            "opset": spec.opset,
            "dynamic_batch": {"min": 1, "max": spec.max_batch},
            "parity_tolerance": spec.parity_tolerance,
            "parity_samples": "given" if samples is not None else "uniform random in the input range",
        },
    )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints, deprecation warnings and optional-op notices."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def check_parity(
    module: nn.Module, onnx_path: Path, spec: ExportSpec, inputs: Sequence[np.ndarray]
) -> tuple[float, float]:
    """Run PyTorch and ONNX Runtime (CPU) on `inputs`; return (max abs error, max relative error)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    feed = {t.name: np.ascontiguousarray(x, dtype=t.dtype) for t, x in zip(spec.inputs, inputs, strict=True)}
    got = session.run(list(spec.outputs), feed)
    with torch.no_grad():
        expected = module(*(torch.from_numpy(feed[t.name]) for t in spec.inputs))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    max_abs = max_rel = 0.0
    for name, ours, reference in zip(spec.outputs, got, expected, strict=True):
        reference_np = reference.numpy()
        if ours.shape != reference_np.shape:
            raise ModelExportError(f"output {name!r}: ONNX shape {ours.shape} ≠ PyTorch {reference_np.shape}")
        error = float(np.abs(ours - reference_np).max())
        scale = float(np.abs(reference_np).max()) or 1.0
        max_abs, max_rel = max(max_abs, error), max(max_rel, error / scale)
        if error > spec.parity_tolerance * scale:
            raise ModelExportError(
                f"output {name!r}: ONNX Runtime differs from PyTorch by {error:.3g} "
                f"(bound {spec.parity_tolerance:g} × {scale:.3g})"
            )
    return max_abs, max_rel


def _describe(name: str, shape: Sequence[int | str], dtype: str) -> dict[str, Any]:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def _output_descriptions(path: Path) -> list[dict[str, Any]]:
    """Output names, shapes (symbolic batch) and dtypes as the exported graph declares them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    described = []
    for output in model.graph.output:
        tensor_type = output.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        described.append(_describe(output.name, shape, dtype))
    return described

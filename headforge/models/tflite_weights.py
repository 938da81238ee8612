"""Read a `.tflite` flatbuffer: its operators, their options, and its weights as float32 arrays.

Weights in the MediaPipe files are stored as float16 (followed by a DEQUANTIZE op) and, in the
sparse full-range detector, additionally in a compressed sparse layout (followed by a DENSIFY op).
`TFLiteGraph.constant` resolves both, so callers see the dense float32 tensors the interpreter
computes with. Only the `tflite` flatbuffer bindings are used; no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tflite

from headforge.errors import AssetError

_OPCODE_NAMES = {
    value: name for name, value in vars(tflite.BuiltinOperator).items() if not name.startswith("_")
}
_TENSOR_TYPES: dict[int, np.dtype[Any]] = {
    tflite.TensorType.FLOAT32: np.dtype(np.float32),
    tflite.TensorType.FLOAT16: np.dtype(np.float16),
    tflite.TensorType.INT32: np.dtype(np.int32),
    tflite.TensorType.INT64: np.dtype(np.int64),
    tflite.TensorType.INT8: np.dtype(np.int8),
    tflite.TensorType.UINT8: np.dtype(np.uint8),
    tflite.TensorType.INT16: np.dtype(np.int16),
}
_PADDING = {tflite.Padding.SAME: "SAME", tflite.Padding.VALID: "VALID"}
_ACTIVATION = {
    tflite.ActivationFunctionType.NONE: None,
    tflite.ActivationFunctionType.RELU: "relu",
    tflite.ActivationFunctionType.RELU6: "relu6",
}
_INDEX_VECTORS = {
    tflite.SparseIndexVector.Int32Vector: tflite.Int32Vector,
    tflite.SparseIndexVector.Uint16Vector: tflite.Uint16Vector,
    tflite.SparseIndexVector.Uint8Vector: tflite.Uint8Vector,
}
# Ops that only turn stored weights into usable weights; they are not part of the computation.
WEIGHT_OPS = frozenset({"DEQUANTIZE", "DENSIFY"})


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class Operator:
    """One graph node: its builtin op name, tensor indices and decoded options."""

    index: int
    opcode: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


class TFLiteGraph:
    """The first subgraph of a `.tflite` model, with lazy constant resolution."""

    def __init__(self, source: Path | bytes):
        data = Path(source).read_bytes() if isinstance(source, Path) else bytes(source)
        try:
            self._model = tflite.Model.GetRootAsModel(data, 0)
            self._graph = self._model.Subgraphs(0)
            if self._graph is None:
                raise AssetError("the .tflite model has no subgraph")
            self.tensors = [self._tensor_info(i) for i in range(self._graph.TensorsLength())]
            self.operators = [self._operator(i) for i in range(self._graph.OperatorsLength())]
            self.inputs = tuple(int(i) for i in self._graph.InputsAsNumpy())
            self.outputs = tuple(int(i) for i in self._graph.OutputsAsNumpy())
        except AssetError:
            raise
        except Exception as error:  # malformed flatbuffers raise assorted errors
            raise AssetError(f"not a readable .tflite model: {error}") from error
        self._producer = {out: op for op in self.operators for out in op.outputs}
        self._constants: dict[int, np.ndarray] = {}

    # -- structure -------------------------------------------------------------------------

    def compute_ops(self) -> list[Operator]:
        """Operators in execution order, without the weight-decoding DEQUANTIZE/DENSIFY ops."""
        return [
            op for op in self.operators if not (op.opcode in WEIGHT_OPS and self.is_constant(op.outputs[0]))
        ]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.operators:
            counts[op.opcode] = counts.get(op.opcode, 0) + 1
        return counts

    def is_constant(self, tensor: int) -> bool:
        """True when the tensor is stored in the file or derived from stored data by weight ops."""
        if self._has_data(tensor):
            return True
        producer = self._producer.get(tensor)
        return producer is not None and producer.opcode in WEIGHT_OPS and self.is_constant(producer.inputs[0])

    # -- constants -------------------------------------------------------------------------

    def constant(self, tensor: int) -> np.ndarray:
        """The dense value of a constant tensor, dequantized to float32 where the graph does so."""
        if tensor not in self._constants:
            self._constants[tensor] = self._resolve(tensor)
        return self._constants[tensor]

    def _resolve(self, tensor: int) -> np.ndarray:
        if self._has_data(tensor):
            return self._stored(tensor)
        producer = self._producer.get(tensor)
        if producer is None or producer.opcode not in WEIGHT_OPS:
            raise AssetError(f"tensor {self.tensors[tensor].name!r} is not a constant")
        source = self.constant(producer.inputs[0])
        if producer.opcode == "DENSIFY":
            return source  # `_stored` already expanded the sparse layout
        return self._dequantize(producer.inputs[0], source)

    def _dequantize(self, tensor: int, values: np.ndarray) -> np.ndarray:
        if values.dtype == np.float16 or values.dtype == np.float32:
            return values.astype(np.float32)
        quantization = self._graph.Tensors(tensor).Quantization()
        scale = (
            quantization.ScaleAsNumpy() if quantization is not None and quantization.ScaleLength() else None
        )
        if scale is None:
            raise AssetError(f"tensor {self.tensors[tensor].name!r} lacks quantization parameters")
        zero_point = (
            quantization.ZeroPointAsNumpy() if quantization.ZeroPointLength() else np.zeros_like(scale)
        )
        axis = quantization.QuantizedDimension()
        shape = [1] * values.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        return ((values.astype(np.float32) - zero_point.reshape(shape)) * scale.reshape(shape)).astype(
            np.float32
        )

    def _has_data(self, tensor: int) -> bool:
        buffer = self._model.Buffers(self._graph.Tensors(tensor).Buffer())
        return buffer is not None and (buffer.DataLength() > 0 or buffer.Size() > 0)

    def _stored(self, tensor: int) -> np.ndarray:
        info = self.tensors[tensor]
        raw = self._graph.Tensors(tensor)
        buffer = self._model.Buffers(raw.Buffer())
        if buffer.DataLength() == 0:
            raise AssetError(f"tensor {info.name!r} is stored outside the flatbuffer, which is not supported")
        values = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype=info.dtype)
        sparsity = raw.Sparsity()
        if sparsity is not None:
            return densify(sparsity, values, info.shape)
        return values.reshape(info.shape).copy()

    # -- parsing ---------------------------------------------------------------------------

    def _tensor_info(self, index: int) -> TensorInfo:
        raw = self._graph.Tensors(index)
        dtype = _TENSOR_TYPES.get(raw.Type())
        shape = tuple(int(s) for s in raw.ShapeAsNumpy()) if raw.ShapeLength() else ()
        return TensorInfo(
            index, raw.Name().decode(), shape, dtype if dtype is not None else np.dtype(np.uint8)
        )

    def _operator(self, index: int) -> Operator:
        raw = self._graph.Operators(index)
        code = self._model.OperatorCodes(raw.OpcodeIndex())
        opcode = _OPCODE_NAMES.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        inputs = tuple(int(i) for i in raw.InputsAsNumpy()) if raw.InputsLength() else ()
        outputs = tuple(int(i) for i in raw.OutputsAsNumpy()) if raw.OutputsLength() else ()
        return Operator(index, opcode, inputs, outputs, _options(opcode, raw))


def _options(opcode: str, raw: Any) -> dict[str, Any]:
    """Decode the builtin options that matter for the ops the MediaPipe networks use."""
    table = raw.BuiltinOptions()
    if table is None:
        return {}
    if opcode in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        conv = tflite.Conv2DOptions() if opcode == "CONV_2D" else tflite.DepthwiseConv2DOptions()
        conv.Init(table.Bytes, table.Pos)
        result = {
            "padding": _PADDING[conv.Padding()],
            "stride": (conv.StrideH(), conv.StrideW()),
            "dilation": (conv.DilationHFactor(), conv.DilationWFactor()),
            "activation": _activation(conv.FusedActivationFunction()),
        }
        if opcode == "DEPTHWISE_CONV_2D":
            result["depth_multiplier"] = conv.DepthMultiplier()
        return result
    if opcode in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        pool = tflite.Pool2DOptions()
        pool.Init(table.Bytes, table.Pos)
        return {
            "padding": _PADDING[pool.Padding()],
            "stride": (pool.StrideH(), pool.StrideW()),
            "filter": (pool.FilterHeight(), pool.FilterWidth()),
            "activation": _activation(pool.FusedActivationFunction()),
        }
    if opcode == "ADD":
        add = tflite.AddOptions()
        add.Init(table.Bytes, table.Pos)
        return {"activation": _activation(add.FusedActivationFunction())}
    if opcode == "RESIZE_BILINEAR":
        resize = tflite.ResizeBilinearOptions()
        resize.Init(table.Bytes, table.Pos)
        return {
            "align_corners": bool(resize.AlignCorners()),
            "half_pixel_centers": bool(resize.HalfPixelCenters()),
        }
    if opcode == "DEPTH_TO_SPACE":
        d2s = tflite.DepthToSpaceOptions()
        d2s.Init(table.Bytes, table.Pos)
        return {"block_size": d2s.BlockSize()}
    if opcode == "CONCATENATION":
        concat = tflite.ConcatenationOptions()
        concat.Init(table.Bytes, table.Pos)
        return {"axis": concat.Axis(), "activation": _activation(concat.FusedActivationFunction())}
    return {}


def _activation(code: int) -> str | None:
    if code not in _ACTIVATION:
        raise AssetError(f"unsupported fused activation {code}")
    return _ACTIVATION[code]


def _index_vector(table: Any, kind: int) -> np.ndarray:
    vector_type = _INDEX_VECTORS.get(kind)
    if table is None or vector_type is None:
        raise AssetError(f"unsupported sparse index vector type {kind}")
    vector = vector_type()
    vector.Init(table.Bytes, table.Pos)
    return np.asarray(vector.ValuesAsNumpy(), dtype=np.int64)


def densify(sparsity: Any, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Expand TFLite's sparse tensor format (per-dimension DENSE or CSR, traversal order, block map).

    Walks the traversal dimensions level by level with vectorized bookkeeping: every level turns
    each parent position into its children, DENSE levels by enumerating `dense_size` children and
    CSR levels through `array_segments`/`array_indices`. The leaf positions index `values`.
    """
    order = [int(d) for d in sparsity.TraversalOrderAsNumpy()]
    block_map = [int(d) for d in sparsity.BlockMapAsNumpy()] if sparsity.BlockMapLength() else []
    rank = len(shape)
    positions = np.zeros(1, dtype=np.int64)
    coordinates = np.zeros((1, 0), dtype=np.int64)
    block_sizes: dict[int, int] = {}
    for level, dim in enumerate(order):
        meta = sparsity.DimMetadata(level)
        if meta.Format() == tflite.DimensionType.DENSE:
            size = int(meta.DenseSize())
            if dim >= rank:
                block_sizes[dim] = size
            children = np.arange(size, dtype=np.int64)
            positions = (positions[:, None] * size + children[None, :]).ravel()
            coordinates = np.repeat(coordinates, size, axis=0)
            indices = np.tile(children, len(coordinates) // size if size else 0)
        else:
            segments = _index_vector(meta.ArraySegments(), meta.ArraySegmentsType())
            all_indices = _index_vector(meta.ArrayIndices(), meta.ArrayIndicesType())
            starts, ends = segments[positions], segments[positions + 1]
            counts = ends - starts
            offsets = np.cumsum(counts) - counts
            positions = np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()), dtype=np.int64)
            coordinates = np.repeat(coordinates, counts, axis=0)
            indices = all_indices[positions]
        coordinates = np.concatenate([coordinates, indices[:, None]], axis=1)
    by_dim = {dim: coordinates[:, level] for level, dim in enumerate(order)}
    original = []
    for dim in range(rank):
        index = by_dim[dim]
        if dim in block_map:
            block_dim = rank + block_map.index(dim)
            index = index * block_sizes[block_dim] + by_dim[block_dim]
        original.append(index)
    dense = np.zeros(shape, dtype=values.dtype)
    if len(positions) != len(values):
        raise AssetError(f"sparse tensor holds {len(values)} values but its index lists {len(positions)}")
    dense[tuple(original)] = values[positions]
    return dense

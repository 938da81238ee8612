"""The runtime layer: one place that owns inference sessions for the default networks.

A `Network` takes a batch in the exact layout and value range of the original `.tflite` input
(NHWC float32; detectors in [-1, 1], landmark networks in [0, 1]) and returns the raw outputs in
the `.tflite` output order.

`load_default_networks()` opens the ONNX models that `headforge models pull` exported, with ONNX
Runtime, once per process (per thread/provider setting). Providers are picked by availability:
TensorRT, then CUDA, then CPU; `HEADFORGE_PROVIDERS` (comma-separated, e.g. `cpu` or
`cuda,cpu`) and `HEADFORGE_THREADS` override the defaults.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from headforge.config import headforge_home

logger = logging.getLogger(__name__)

DEFAULT_NETWORK_NAMES = (
    "face_detection_short_range",
    "face_detection_full_range",
    "face_landmark",
    "iris_landmark",
)

THREADS_ENV = "HEADFORGE_THREADS"
PROVIDERS_ENV = "HEADFORGE_PROVIDERS"
_PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Network(Protocol):
    name: str

    def run(self, x: np.ndarray) -> list[np.ndarray]: ...


@dataclass
class DefaultNetworks:
    short_range: Network
    full_range: Network
    face_landmark: Network
    iris: Network


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads count once); at least 1."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores: set[tuple[str, str]] = set()
    try:
        processor = physical = core = ""
        with open("/proc/cpuinfo") as cpuinfo:
            for line in [*cpuinfo, "\n"]:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    processor = value
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    core = value
                elif not key and processor:
                    if processor.isdigit() and int(processor) in allowed:
                        cores.add((physical, core))
                    processor = physical = core = ""
    except OSError:
        pass
    return max(1, min(len(allowed), len(cores) or len(allowed)))


def default_threads() -> int:
    """Intra-op threads: `$HEADFORGE_THREADS`, else the number of physical cores."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        from headforge.errors import InvalidOptionError

        if not value.isdigit() or int(value) < 1:
            raise InvalidOptionError(f"{THREADS_ENV} must be a positive integer, not {value!r}")
        return int(value)
    return physical_cores()


def select_providers(requested: tuple[str, ...] | None = None) -> list[str]:
    """Execution providers to use, best first, limited to what this onnxruntime build offers.

    `requested` (or `$HEADFORGE_PROVIDERS`) takes short names (`tensorrt`, `cuda`, `cpu`) or full
    provider names; the CPU provider is always appended as the fallback.
    """
    import onnxruntime as ort

    from headforge.errors import InvalidOptionError

    available = set(ort.get_available_providers())
    if requested is None and os.environ.get(PROVIDERS_ENV):
        requested = tuple(p.strip() for p in os.environ[PROVIDERS_ENV].split(",") if p.strip())
    if requested is None:
        chosen = [p for p in _PREFERENCE if p in available]
    else:
        chosen = []
        for name in requested:
            provider = _PROVIDER_ALIASES.get(name.lower(), name)
            if provider not in _PREFERENCE:
                raise InvalidOptionError(f"unknown execution provider {name!r}; use tensorrt, cuda or cpu")
            if provider in available and provider not in chosen:
                chosen.append(provider)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


# On CPU, batches run in chunks of about this many input pixels: per-item activations then stay in
# cache, which is faster per item than one large call (measured: full-range detector, 8 items in one
# call cost 25% more per item than one at a time). GPUs take the whole batch in one call.
CPU_CHUNK_PIXELS = 1 << 16


class OrtNetwork:
    """An ONNX model behind the `Network` interface.

    CUDA sessions run the whole batch in one call, TensorRT ones in chunks of the engine profile's
    largest batch, CPU ones in cache-sized chunks (`cpu_chunk` items, default from `CPU_CHUNK_PIXELS`).
    """

    def __init__(
        self, path: Path, name: str, threads: int, providers: list[str], cpu_chunk: int | None = None
    ):
        import onnxruntime as ort

        self.name = name
        self.path = path
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Keep the intra-op threads spinning during a run but park them after it: the pipeline's
        # numpy/OpenCV stages that follow detection otherwise share the cores with idle spinners.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=[_provider_with_options(p, name, path) for p in providers]
            )
        except Exception as error:  # a GPU provider whose libraries are missing or broken
            if providers == ["CPUExecutionProvider"]:
                raise
            logger.warning("%s: %s failed (%s); falling back to CPU", name, providers, error)
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.providers = self._session.get_providers()
        model_input = self._session.get_inputs()[0]
        self._input = model_input.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in model_input.shape)
        self._outputs = [o.name for o in self._session.get_outputs()]
        pixels = int(np.prod([d for d in self.input_shape[1:3] if d is not None]))
        self.chunk: int | None = {
            "CPUExecutionProvider": max(1, cpu_chunk or CPU_CHUNK_PIXELS // max(pixels, 1)),
            "TensorrtExecutionProvider": TRT_BATCH_PROFILE[2],  # the engine's largest batch
        }.get(self.providers[0])

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(x, dtype=np.float32)
        expected = self.input_shape[1:]
        if batch.ndim != len(self.input_shape) or any(
            e is not None and e != s for e, s in zip(expected, batch.shape[1:], strict=False)
        ):
            from headforge.errors import HeadforgeError

            raise HeadforgeError(
                f"{self.name} takes (N, {', '.join(map(str, expected))}) float32, got {batch.shape}"
            )
        if self.chunk is None or len(batch) <= self.chunk:
            return list(self._session.run(self._outputs, {self._input: batch}))
        parts = [
            self._session.run(self._outputs, {self._input: batch[start : start + self.chunk]})
            for start in range(0, len(batch), self.chunk)
        ]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(self._outputs))]


# TensorRT builds one engine per shape profile; one profile covers batches 1..64 (optimised for 8).
TRT_BATCH_PROFILE = (1, 8, 64)


def _provider_with_options(provider: str, name: str, path: Path) -> str | tuple[str, dict[str, Any]]:
    if provider == "TensorrtExecutionProvider":
        cache = headforge_home() / "trt_cache" / name
        cache.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
        }
        options.update(_trt_profile(path))
        return provider, options
    return provider


def _trt_profile(path: Path) -> dict[str, str]:
    """TensorRT EP shape-profile options (min/opt/max batch) for every input of the model."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    profile: dict[str, list[str]] = {
        "trt_profile_min_shapes": [],
        "trt_profile_opt_shapes": [],
        "trt_profile_max_shapes": [],
    }
    for model_input in graph.input:
        rest = [str(d.dim_value) for d in model_input.type.tensor_type.shape.dim[1:]]
        for key, batch in zip(profile, TRT_BATCH_PROFILE, strict=True):
            profile[key].append(f"{model_input.name}:{'x'.join([str(batch), *rest])}")
    return {key: ",".join(shapes) for key, shapes in profile.items()}


def default_network_paths(root: Path | None = None) -> dict[str, Path]:
    """`model.onnx` of each default network's current version; `ModelsMissingError` when any is
    absent or damaged (sha256 differs from its manifest)."""
    from headforge.errors import ModelsMissingError
    from headforge.export.repository import read_entry
    from headforge.models.pull import DEFAULT_VERSION

    paths: dict[str, Path] = {}
    missing = []
    for name in DEFAULT_NETWORK_NAMES:
        entry = read_entry(name, DEFAULT_VERSION, root)
        if entry is None or not entry.is_intact():  # absent, or its file no longer matches the manifest
            missing.append(f"{name}/{DEFAULT_VERSION}")
        else:
            paths[name] = entry.model_path
    if missing:
        raise ModelsMissingError(
            f"the model repository lacks {', '.join(missing)}; run `headforge models pull`",
            details={"missing": missing},
        )
    return paths


def load_default_networks(
    threads: int | None = None, providers: tuple[str, ...] | None = None
) -> DefaultNetworks:
    """The four default networks as ONNX Runtime sessions, created once per process and setting."""
    return _load_default_networks(
        threads or default_threads(), tuple(select_providers(providers)), str(headforge_home())
    )


@functools.lru_cache(maxsize=4)
def _load_default_networks(threads: int, providers: tuple[str, ...], home: str) -> DefaultNetworks:
    paths = default_network_paths()
    sessions = {name: OrtNetwork(path, name, threads, list(providers)) for name, path in paths.items()}
    return DefaultNetworks(
        short_range=sessions["face_detection_short_range"],
        full_range=sessions["face_detection_full_range"],
        face_landmark=sessions["face_landmark"],
        iris=sessions["iris_landmark"],
    )

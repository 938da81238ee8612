"""The runtime layer: one place that owns inference sessions, as a model set keyed by name.

A `Network` takes a batch in the exact layout and value range of its exported input (for the
MediaPipe networks: NHWC float32 as the `.tflite` files take it; detectors in [-1, 1], landmark
networks in [0, 1]) and returns the raw outputs in the exported output order.

A `ModelSet` maps model repository names (`face_detection_full_range`, `face_landmark`, ...) to
networks and opens each one on first use. `load_model_set()` gives the process's set (one per
thread/provider setting), whose networks are the ONNX models of the model repository run by ONNX
Runtime; a worker therefore loads only the networks its pipelines use. Providers are picked by
availability: TensorRT, then CUDA, then CPU; `HEADFORGE_PROVIDERS` (comma-separated, e.g. `cpu`
or `cuda,cpu`) and `HEADFORGE_THREADS` override the defaults. `load_default_networks()` is the same
set with the four MediaPipe networks opened up front (it fails when any is missing).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from headforge.config import headforge_home

logger = logging.getLogger(__name__)

# Model repository names of the MediaPipe networks (`headforge models pull` exports them).
SHORT_RANGE = "face_detection_short_range"
FULL_RANGE = "face_detection_full_range"
FACE_LANDMARK = "face_landmark"
IRIS_LANDMARK = "iris_landmark"
DEFAULT_NETWORK_NAMES = (SHORT_RANGE, FULL_RANGE, FACE_LANDMARK, IRIS_LANDMARK)

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


Opener = Callable[[str], Network]


class ModelSet:
    """Networks keyed by model repository name, each opened by `opener` on first use and kept.

    `used()` gives a view that shares the opened networks and records which names it handed out:
    the runner takes one per job, so `result.json` lists only the networks that job ran.
    """

    def __init__(self, networks: Mapping[str, Network] | None = None, opener: Opener | None = None) -> None:
        self._networks: dict[str, Network] = dict(networks or {})
        self._opener = opener
        self._lock = threading.Lock()
        self.handed_out: list[str] = []

    def __getitem__(self, name: str) -> Network:
        network = self._networks.get(name)
        if network is None:
            with self._lock:
                network = self._networks.get(name)
                if network is None:
                    if self._opener is None:
                        from headforge.errors import ModelsMissingError

                        raise ModelsMissingError(
                            f"no network {name!r} in this model set", details={"missing": [name]}
                        )
                    network = self._opener(name)
                    self._networks[name] = network
        if name not in self.handed_out:
            self.handed_out.append(name)
        return network

    def __contains__(self, name: object) -> bool:
        return name in self._networks

    def loaded(self) -> list[str]:
        """Names of the networks opened so far."""
        return list(self._networks)

    def preload(self, names: Iterable[str]) -> None:
        """Open `names` now (a worker's start-up), without recording them as used."""
        for name in names:
            if name not in self._networks:
                used = list(self.handed_out)
                self[name]
                self.handed_out = used

    def used(self) -> ModelSet:
        """A view over the same networks that records the names it hands out, starting empty."""
        view = ModelSet.__new__(ModelSet)
        view._networks, view._opener, view._lock = self._networks, self._opener, self._lock
        view.handed_out = []
        return view


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

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One call with every named input (graphs of several inputs, e.g. KaoLRM's Gaussian graph)."""
        batch = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in feeds.items()}
        return list(self._session.run(self._outputs, batch))


# TensorRT builds one engine per shape profile; one profile covers batches 1..64 (optimised for 8).
TRT_BATCH_PROFILE = (1, 8, 64)


def _provider_with_options(provider: str, name: str, path: Path) -> str | tuple[str, dict[str, Any]]:
    if provider == "TensorrtExecutionProvider":
        # The same options `headforge models build-engine` built the cached engine with, so a GPU
        # worker loads that engine instead of building its own (headforge/export/tensorrt.py).
        from headforge.export.tensorrt import trt_provider_options

        return provider, trt_provider_options(path, name)
    return provider


def _vggheads_path(root: Path | None = None) -> Path:
    """The newest imported VGGHeads entry's model file (`headforge models import vggheads`)."""
    from headforge.errors import ModelsMissingError
    from headforge.models.vggheads_import import current_entry, unavailable_reason

    entry = current_entry(root)
    if entry is None:
        raise ModelsMissingError(str(unavailable_reason(root)), details={"missing": ["vggheads"]})
    return entry.model_path


# Networks a user imports (`headforge models import FAMILY`): their entries are versioned by the
# checkpoint, not by DEFAULT_VERSION, so each family says which entry to open.
IMPORTED_NETWORKS: dict[str, Callable[[Path | None], Path]] = {"vggheads": _vggheads_path}


def _kaolrm_path(name: str) -> Callable[[Path | None], Path]:
    """The newest imported KaoLRM entry `name` (`headforge models import kaolrm`)."""

    def path(root: Path | None = None) -> Path:
        from headforge.models.kaolrm_import import entry_model_path

        return entry_model_path(name, root)

    return path


for _variant in ("mono", "multiview"):
    for _graph in ("image", "gaussians"):
        IMPORTED_NETWORKS[f"kaolrm-{_variant}-{_graph}"] = _kaolrm_path(f"kaolrm-{_variant}-{_graph}")


def repository_network_path(name: str, root: Path | None = None) -> Path:
    """`model.onnx` of entry `name` at the default version; `ModelsMissingError` when it is absent
    or damaged (sha256 differs from its manifest)."""
    from headforge.errors import ModelsMissingError
    from headforge.export.repository import read_entry
    from headforge.models.pull import DEFAULT_VERSION

    imported = IMPORTED_NETWORKS.get(name)
    if imported is not None:
        return imported(root)
    entry = read_entry(name, DEFAULT_VERSION, root)
    if entry is None or not entry.is_intact():  # absent, or its file no longer matches the manifest
        raise ModelsMissingError(
            f"the model repository lacks {name}/{DEFAULT_VERSION}; run `headforge models pull`",
            details={"missing": [f"{name}/{DEFAULT_VERSION}"]},
        )
    return entry.model_path


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


def load_model_set(threads: int | None = None, providers: tuple[str, ...] | None = None) -> ModelSet:
    """This process's model set for a thread/provider setting: ONNX Runtime sessions over the
    model repository, each opened on first use."""
    return _load_model_set(
        threads or default_threads(), tuple(select_providers(providers)), str(headforge_home())
    )


@functools.lru_cache(maxsize=4)
def _load_model_set(threads: int, providers: tuple[str, ...], home: str) -> ModelSet:
    def open_network(name: str) -> Network:
        return OrtNetwork(repository_network_path(name), name, threads, list(providers))

    return ModelSet(opener=open_network)


def load_default_networks(threads: int | None = None, providers: tuple[str, ...] | None = None) -> ModelSet:
    """The process's model set with the four MediaPipe networks opened; `ModelsMissingError`
    naming every one the repository lacks."""
    models = load_model_set(threads, providers)
    if not all(name in models for name in DEFAULT_NETWORK_NAMES):
        default_network_paths()  # one error that lists every missing entry
        models.preload(DEFAULT_NETWORK_NAMES)
    return models

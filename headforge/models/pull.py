"""`headforge models pull`: fetch the pinned mediapipe wheel, import its face networks, export to ONNX.

Steps, each skipped when its result is already in place and verified:
1. the wheel (`pip download --no-deps` of `mediapipe==0.10.21`, or `$HEADFORGE_MEDIAPIPE_WHEEL`), sha256-checked;
2. the four `.tflite` files extracted into `tflite_source_dir()`, each sha256-checked;
3. each network loaded into our PyTorch module and exported to `<repository>/<name>/<version>/`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headforge.config import MEDIAPIPE_VERSION, headforge_home, model_repository, tflite_source_dir
from headforge.errors import ModelFetchError
from headforge.export.repository import read_entry
from headforge.files import sha256_file

if TYPE_CHECKING:
    from torch import nn

WHEEL_ENV = "HEADFORGE_MEDIAPIPE_WHEEL"
WHEEL_FILENAME = f"mediapipe-{MEDIAPIPE_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3"
# Bump when the modules or the export settings change in a way that changes the exported graphs.
EXPORT_REVISION = 1
DEFAULT_VERSION = f"mediapipe-{MEDIAPIPE_VERSION}-r{EXPORT_REVISION}"


@dataclass(frozen=True)
class DefaultModel:
    """One default network: where it sits in the wheel, and how to build and export it."""

    name: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted .tflite
    factory: Callable[[], nn.Module]  # builds our module (untrained), importing torch on call
    input_size: int
    value_range: tuple[float, float]
    outputs: tuple[str, ...]

    @property
    def tflite_name(self) -> str:
        return Path(self.member).name

    def build(self) -> nn.Module:
        return self.factory()

    @property
    def module(self) -> str:
        """`package.module:Class` of the module `factory` builds, as the manifest records it."""
        built = type(self.factory())
        return f"{built.__module__}:{built.__qualname__}"


def _blazeface_short_range() -> nn.Module:
    from headforge.models.blazeface import BlazeFaceShortRange

    return BlazeFaceShortRange()


def _blazeface_full_range() -> nn.Module:
    from headforge.models.blazeface import BlazeFaceFullRange

    return BlazeFaceFullRange()


def _face_mesh() -> nn.Module:
    from headforge.models.facemesh import FaceMesh

    return FaceMesh()


def _iris_landmark() -> nn.Module:
    from headforge.models.iris import IrisLandmark

    return IrisLandmark()


def _selfie_segmentation() -> nn.Module:
    from headforge.models.selfie import SelfieSegmentation

    return SelfieSegmentation()


DEFAULT_MODELS: tuple[DefaultModel, ...] = (
    DefaultModel(
        "face_detection_short_range",
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        _blazeface_short_range,
        128,
        (-1.0, 1.0),
        ("regressors", "classificators"),
    ),
    DefaultModel(
        "face_detection_full_range",
        "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
        "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
        _blazeface_full_range,
        192,
        (-1.0, 1.0),
        ("regressors", "classificators"),
    ),
    DefaultModel(
        "face_landmark",
        "mediapipe/modules/face_landmark/face_landmark.tflite",
        "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
        _face_mesh,
        192,
        (0.0, 1.0),
        ("landmarks", "face_flag"),
    ),
    DefaultModel(
        "iris_landmark",
        "mediapipe/modules/iris_landmark/iris_landmark.tflite",
        "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
        _iris_landmark,
        64,
        (0.0, 1.0),
        ("eye_contours_and_brows", "iris"),
    ),
)


# Networks beyond the four of the default pipeline, exported by the same pull (the `kaolrm`
# pipeline's background removal). Kept apart so code that needs the four face networks keeps them.
SELFIE_SEGMENTATION = DefaultModel(
    "selfie_segmentation",
    "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
    "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
    _selfie_segmentation,
    256,
    (0.0, 1.0),
    ("mask",),
)
ALL_MODELS: tuple[DefaultModel, ...] = (*DEFAULT_MODELS, SELFIE_SEGMENTATION)


@dataclass
class PullReport:
    fetched_wheel: Path | None = None
    extracted: list[str] = field(default_factory=list)
    exported: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.fetched_wheel or self.extracted or self.exported)


def download_dir() -> Path:
    """Where the fetched wheel is kept, so a later pull (or an offline re-export) can reuse it."""
    return headforge_home() / "downloads"


def load_module(model: DefaultModel, tflite_path: Path) -> nn.Module:
    """Our PyTorch module for `model`, with the weights read from its `.tflite` file."""
    from headforge.models.layers import load_tflite_weights
    from headforge.models.tflite_weights import TFLiteGraph

    module = model.build().eval()
    graph = TFLiteGraph(tflite_path)
    if hasattr(module, "load_tflite"):  # a network with weights beyond convolutions and PReLUs
        module.load_tflite(graph)  # type: ignore[operator]
    else:
        load_tflite_weights(module.tflite_layer_order(), graph)  # type: ignore[operator]
    return module


def pull(force: bool = False, log: Callable[[str], None] = lambda _: None) -> PullReport:
    """Make the model repository hold every default network; a no-op when it already does."""
    report = PullReport()
    source = tflite_source_dir()
    missing_tflite = [m for m in ALL_MODELS if force or not _verified(source / m.tflite_name, m.sha256)]
    if missing_tflite:
        wheel = fetch_wheel(log)
        report.fetched_wheel = wheel
        extract_tflite(wheel, missing_tflite, source)
        report.extracted = [m.tflite_name for m in missing_tflite]
        log(f"extracted {len(missing_tflite)} .tflite file(s) into {source}")
    for model in ALL_MODELS:
        entry = read_entry(model.name, DEFAULT_VERSION)
        if (
            not force
            and entry is not None
            and entry.is_intact()
            and entry.manifest["source"]["sha256"] == model.sha256
        ):
            report.up_to_date.append(model.name)
            continue
        log(f"exporting {model.name} → {model_repository() / model.name / DEFAULT_VERSION}")
        export_default_model(model, source / model.tflite_name)
        report.exported.append(model.name)
    return report


def export_default_model(model: DefaultModel, tflite_path: Path) -> Path:
    """Import one network's weights and export it into the repository under `DEFAULT_VERSION`."""
    from headforge.export.model import export_model
    from headforge.export.onnx import ExportSpec, TensorSpec

    module = load_module(model, tflite_path)
    spec = ExportSpec(
        inputs=(TensorSpec("input", (model.input_size, model.input_size, 3), value_range=model.value_range),),
        outputs=model.outputs,
    )
    source: dict[str, Any] = {
        "checkpoint": f"{WHEEL_FILENAME}:{model.member}",
        "sha256": model.sha256,
        "wheel_sha256": WHEEL_SHA256,
        "license": "Apache-2.0",
        "module": f"{type(module).__module__}:{type(module).__qualname__}",
        "input_layout": "NHWC",
        "input_range": list(model.value_range),
    }
    return export_model(module, spec, model.name, DEFAULT_VERSION, source=source)


def fetch_wheel(log: Callable[[str], None] = lambda _: None) -> Path:
    """The verified mediapipe wheel: `$HEADFORGE_MEDIAPIPE_WHEEL`, a cached copy, or a fresh `pip download`."""
    override = os.environ.get(WHEEL_ENV)
    if override:
        wheel = Path(override).expanduser()
        if not wheel.is_file():
            raise ModelFetchError(f"{WHEEL_ENV} points at {wheel}, which is not a file")
        _check_sha256(wheel, WHEEL_SHA256, f"{WHEEL_ENV}={wheel}")
        return wheel
    cached = download_dir() / WHEEL_FILENAME
    if _verified(cached, WHEEL_SHA256):
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading mediapipe=={MEDIAPIPE_VERSION} (wheel only, no install) from the package index")
    with tempfile.TemporaryDirectory(dir=cached.parent) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--implementation", "cp",
            "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
            "--dest", scratch, f"mediapipe=={MEDIAPIPE_VERSION}",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(scratch) / WHEEL_FILENAME
        if result.returncode != 0 or not downloaded.is_file():
            tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise ModelFetchError(
                f"could not download mediapipe=={MEDIAPIPE_VERSION} from the package index (offline?). "
                f"For offline installs set {WHEEL_ENV}=/path/to/{WHEEL_FILENAME}. pip said: {tail}",
                details={"pip_exit_code": result.returncode},
            )
        _check_sha256(downloaded, WHEEL_SHA256, "the downloaded wheel")
        downloaded.replace(cached)
    return cached


def extract_tflite(
    wheel: Path, models: list[DefaultModel] | tuple[DefaultModel, ...], destination: Path
) -> None:
    """Copy the models' `.tflite` members out of the wheel, verifying each file's sha256."""
    destination.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for model in models:
                target = destination / model.tflite_name
                staged = target.with_name(f".{target.name}.{os.getpid()}.partial")
                staged.write_bytes(archive.read(model.member))
                try:
                    _check_sha256(staged, model.sha256, f"{model.member} in {wheel.name}")
                except ModelFetchError:
                    staged.unlink()
                    raise
                staged.replace(target)
    except (zipfile.BadZipFile, KeyError) as error:
        raise ModelFetchError(f"{wheel} is not the expected mediapipe wheel: {error}") from error


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelFetchError(
            f"checksum mismatch for {what}: sha256 {actual}, expected {expected}",
            details={"expected_sha256": expected, "actual_sha256": actual},
        )

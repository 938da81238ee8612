"""Parity on real photos: our PyTorch modules vs the original .tflite (LiteRT), and ONNX Runtime vs PyTorch.

Bound, per raw output: max |ours - reference| ≤ 1e-4 × max |reference|.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from needs import missing
from numpy.typing import NDArray

from headforge.config import tflite_source_dir
from headforge.models.pull import DEFAULT_MODELS, DefaultModel, load_module
from headforge.models.runtime import ModelSet, Network

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RELATIVE_BOUND = 1e-4
MODELS = {m.name: m for m in DEFAULT_MODELS}

Crop = Callable[[NDArray[np.uint8]], NDArray[np.uint8]]


def _square(
    image: NDArray[np.uint8], center: tuple[float, float], size: float, out: int
) -> NDArray[np.uint8]:
    """An axis-aligned square crop (zero-padded at the borders) resized to out×out."""
    x, y = center
    half = size / 2
    matrix = np.array([[out / size, 0, -(x - half) * out / size], [0, out / size, -(y - half) * out / size]])
    warped = cv2.warpAffine(image, matrix, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return np.asarray(warped, dtype=np.uint8)


Box = tuple[float, float, float]  # center x, center y, side


def _photos() -> list[tuple[NDArray[np.uint8], Box, list[Box]]]:
    """(RGB photo, face box, eye boxes) for the astronaut and the AFLW2000 sample when present."""
    from skimage.data import astronaut

    photos = [
        (
            np.ascontiguousarray(astronaut()),
            (229.0, 125.0, 210.0),
            [(197.0, 112.0, 56.0), (262.0, 108.0, 56.0)],
        )
    ]
    folder = SHARED_DATA / "aflw2000-sample"
    if folder.is_dir():
        from scipy.io import loadmat

        for jpg in sorted(folder.glob("*.jpg"))[:4]:
            bgr = cv2.imread(str(jpg))
            assert bgr is not None, jpg
            rgb = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
            points = loadmat(str(jpg.with_suffix(".mat")))["pt3d_68"][:2].T
            eyes = []
            for indices in (range(36, 42), range(42, 48)):
                eye = points[list(indices)]
                width = float(np.ptp(eye[:, 0]))
                eyes.append((float(eye[:, 0].mean()), float(eye[:, 1].mean()), max(width * 2.3, 16.0)))
            face = (
                float(points[:, 0].mean()),
                float(points[:, 1].mean()),
                float(np.ptp(points, axis=0).max()) * 1.5,
            )
            photos.append((rgb, face, eyes))
    return photos


def real_inputs(model: DefaultModel) -> NDArray[np.float32]:
    """A batch of real-photo inputs in the network's layout and value range."""
    size = model.input_size
    crops: list[NDArray[np.uint8]] = []
    for rgb, (face_x, face_y, face_side), eyes in _photos():
        if model.name.startswith("face_detection"):
            crops.append(
                np.asarray(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA), dtype=np.uint8)
            )
        elif model.name == "face_landmark":
            crops.append(_square(rgb, (face_x, face_y), face_side, size))
        else:
            crops += [_square(rgb, (cx, cy), side, size) for cx, cy, side in eyes]
    batch = np.stack(crops).astype(np.float32) / 255.0
    low, high = model.value_range
    return (batch * (high - low) + low).astype(np.float32)


def assert_close(ours: list[np.ndarray], reference: list[np.ndarray], what: str) -> None:
    assert len(ours) == len(reference)
    for index, (got, expected) in enumerate(zip(ours, reference, strict=True)):
        assert got.shape == expected.shape, f"{what} output {index}: shape {got.shape} ≠ {expected.shape}"
        error = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max())
        assert scale > 0
        assert error <= RELATIVE_BOUND * scale, (
            f"{what} output {index}: |diff| {error:.3g} > 1e-4 × {scale:.3g}"
        )


@pytest.fixture(scope="module")
def tflite_dir() -> Path:
    source = tflite_source_dir()
    if not all((source / m.tflite_name).exists() for m in DEFAULT_MODELS):
        missing(f"no .tflite files in {source}; run `headforge models pull`")
    return source


@pytest.fixture(scope="module")
def litert(tflite_dir: Path) -> ModelSet:
    pytest.importorskip("ai_edge_litert")
    from headforge.models.litert import load_litert_networks

    return load_litert_networks(tflite_dir)


@pytest.fixture(scope="module")
def onnx_networks() -> ModelSet:
    from headforge.errors import ModelsMissingError
    from headforge.models.runtime import load_default_networks

    try:
        return load_default_networks(providers=("cpu",))
    except ModelsMissingError as error:
        missing(error.message)


def torch_outputs(module: torch.nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in module(torch.from_numpy(x))]


@pytest.mark.parametrize("name", list(MODELS))
def test_pytorch_matches_litert_on_real_photos(name: str, tflite_dir: Path, litert: ModelSet) -> None:
    model = MODELS[name]
    module = load_module(model, tflite_dir / model.tflite_name)
    x = real_inputs(model)
    reference: Network = litert[name]
    assert_close(torch_outputs(module, x), reference.run(x), f"{name} PyTorch vs LiteRT")


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_matches_pytorch_on_real_photos(
    name: str, tflite_dir: Path, onnx_networks: ModelSet
) -> None:
    model = MODELS[name]
    module = load_module(model, tflite_dir / model.tflite_name)
    x = real_inputs(model)
    network: Network = onnx_networks[name]
    assert_close(network.run(x), torch_outputs(module, x), f"{name} ONNX Runtime vs PyTorch")
    # One item at a time gives the same answers as the batch (dynamic batch, no cross-talk).
    single = network.run(x[-1:])
    assert_close(single, [out[-1:] for out in network.run(x)], f"{name} batch vs single")


def test_detectors_find_the_astronauts_face(litert: ModelSet, onnx_networks: ModelSet) -> None:
    """A sanity check on meaning, not only equality: the best anchor is confident on a real face."""
    for name in ("face_detection_short_range", "face_detection_full_range"):
        x = real_inputs(MODELS[name])[:1]
        _, scores = onnx_networks[name].run(x)
        assert 1.0 / (1.0 + np.exp(-scores.max())) > 0.7, name


def test_face_landmark_sees_faces_in_real_face_crops(onnx_networks: ModelSet) -> None:
    x = real_inputs(MODELS["face_landmark"])
    landmarks, face_flag = onnx_networks["face_landmark"].run(x)
    assert landmarks.shape == (len(x), 1, 1, 1404)
    assert (face_flag.reshape(-1) > 0).all(), face_flag.reshape(-1)
    points = landmarks.reshape(len(x), 468, 3)
    # The mesh lies inside the 192×192 crop for centred faces.
    assert ((points[..., :2] > 0) & (points[..., :2] < 192)).mean() > 0.95


def test_wrong_input_shape_is_a_clear_error(onnx_networks: ModelSet) -> None:
    from headforge.errors import HeadforgeError

    with pytest.raises(HeadforgeError, match=r"takes \(N, 192, 192, 3\)"):
        onnx_networks["face_landmark"].run(np.zeros((1, 128, 128, 3), np.float32))
    with pytest.raises(HeadforgeError):
        onnx_networks["iris_landmark"].run(np.zeros((64, 64, 3), np.float32))


def test_sessions_are_created_once_per_process(onnx_networks: ModelSet) -> None:
    from headforge.models.runtime import OrtNetwork, load_default_networks

    assert load_default_networks(providers=("cpu",)) is onnx_networks
    assert isinstance(onnx_networks["face_detection_full_range"], OrtNetwork)
    assert onnx_networks["face_detection_full_range"].providers == ["CPUExecutionProvider"]

"""Shared fixtures: real photos, the shared data folder, and the default networks."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from needs import missing, shared_data, strict
from numpy.typing import NDArray

from headforge.models.runtime import ModelSet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data; skips the test when the folder is absent."""
    return shared_data()


@pytest.fixture(scope="session")
def voc_faces_dir() -> Path:
    """../shared/data/voc-faces (group photos with labelled face boxes); skips when absent."""
    return shared_data("voc-faces")


@pytest.fixture(scope="session")
def astronaut() -> NDArray[np.uint8]:
    """scikit-image's astronaut photo (512×512 RGB, one face)."""
    from skimage.data import astronaut as load

    return np.ascontiguousarray(load())


def load_litert_or_skip(num_threads: int = 1) -> ModelSet:
    """The original .tflite networks under the LiteRT interpreter; skip when LiteRT or the files are
    missing (fail under HEADFORGE_STRICT_TESTS=1: CI installs LiteRT and runs `models pull`)."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        missing("ai-edge-litert is not installed (the dev extra pins it)")
    from headforge.config import tflite_source_dir
    from headforge.models.litert import load_litert_networks

    source = tflite_source_dir()
    if not (source / "face_landmark.tflite").exists():
        missing(f"no .tflite files in {source}; run `headforge models pull`")
    return load_litert_networks(source, num_threads=num_threads)


@pytest.fixture(scope="session")
def litert_networks() -> ModelSet:
    """Reference backend: the original .tflite files run by LiteRT."""
    return load_litert_or_skip()


@pytest.fixture(scope="session")
def networks() -> ModelSet:
    """The default networks as served: headforge's own ONNX models from the model repository.

    Without the repository, a developer's run falls back to the LiteRT reference backend (same
    `Network` contract); under HEADFORGE_STRICT_TESTS=1 the tests fail instead, so CI can never
    pass detection and landmark tests on the `.tflite` files rather than on headforge's models."""
    from headforge.errors import ModelsMissingError
    from headforge.models.runtime import load_default_networks

    try:
        return load_default_networks()
    except ModelsMissingError as error:
        if strict():
            missing(f"headforge's ONNX model repository is missing: {error.message}")
    return load_litert_or_skip()


@pytest.fixture(scope="session")
def astronaut_landmarks(astronaut: NDArray[np.uint8], networks: ModelSet) -> NDArray[np.float32]:
    """The astronaut's 468 face-mesh landmarks (image pixels) from the real detection and landmark stages."""
    from headforge.pipeline.landmarks import find_heads

    heads = find_heads(astronaut, networks)
    assert len(heads) == 1 and heads[0].landmarks_3d is not None
    return np.asarray(heads[0].landmarks_3d[:468], dtype=np.float32)


@cache
def _load_repo_script(relative_path: str) -> ModuleType:
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def repo_script() -> Callable[[str], ModuleType]:
    """Import a script of the repository that is not a package module (`bench/…`, `scripts/…`)."""
    return _load_repo_script

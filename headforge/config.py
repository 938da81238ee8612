"""Paths and settings shared by the CLI, the pipeline and the service."""

from __future__ import annotations

import os
from pathlib import Path


def headforge_home() -> Path:
    """Root of headforge's local state: the model repository and imported assets."""
    return Path(os.environ.get("HEADFORGE_HOME", Path.home() / ".cache" / "headforge")).expanduser()


def model_repository() -> Path:
    """Where exported models live, as `<name>/<version>/model.onnx` plus `manifest.json`."""
    return headforge_home() / "models"


def asset_dir() -> Path:
    """Where operator-imported assets (FLAME, templates) live."""
    return headforge_home() / "assets"


PACKAGE_ASSETS = Path(__file__).parent / "assets"

MEDIAPIPE_VERSION = "0.10.21"


def tflite_source_dir() -> Path:
    """Where `headforge models pull` extracts the original `.tflite` files from the mediapipe wheel."""
    return model_repository() / "source" / f"mediapipe-{MEDIAPIPE_VERSION}"

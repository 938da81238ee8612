"""Export a module into the model repository: `model.onnx` + `manifest.json` (and a TensorRT plan on request)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from headforge.export.onnx import ExportSpec, export_onnx
from headforge.export.repository import (
    MANIFEST,
    MANIFEST_SCHEMA_VERSION,
    entry_dir,
    staged_entry,
    write_json_atomic,
)
from headforge.files import sha256_file


def export_model(
    module: nn.Module,
    spec: ExportSpec,
    name: str,
    version: str,
    *,
    source: dict[str, Any],
    samples: Sequence[np.ndarray] | None = None,
    extra: dict[str, Any] | None = None,
    root: Path | None = None,
) -> Path:
    """Export `module` to `<root>/<name>/<version>/model.onnx` and write its manifest.

    `source` describes the checkpoint the weights came from (at least `checkpoint` and `sha256`);
    `extra` lands in the manifest verbatim (e.g. reference-parity numbers). The manifest is written
    last, and the entry is built in a staging directory that replaces `<root>/<name>/<version>` only
    when everything succeeded (`staged_entry`), so a failed export or parity check leaves the
    repository as it was. Returns the entry directory.
    """
    with staged_entry(name, version, root) as staging:
        write_entry_files(module, spec, name, version, staging, source=source, samples=samples, extra=extra)
    return entry_dir(name, version, root)


def write_entry_files(
    module: nn.Module,
    spec: ExportSpec,
    name: str,
    version: str,
    directory: Path,
    *,
    source: dict[str, Any],
    samples: Sequence[np.ndarray] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export `module` to `directory/model.onnx` with a parity check and write `manifest.json`
    there (no staging: callers use `export_model`, or their own `staged_entry`). Returns the manifest."""
    result = export_onnx(module, spec, directory / "model.onnx", samples=samples)
    manifest: dict[str, Any] = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": name,
        "version": version,
        "format": "onnx",
        "model_file": result.path.name,
        "model_sha256": sha256_file(result.path),
        "inputs": result.inputs,
        "outputs": result.outputs,
        "source": source,
        "export": result.settings,
        "parity": {
            "reference": "pytorch",
            "max_abs_error": result.max_abs_error,
            "max_rel_error": result.max_rel_error,
        },
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest

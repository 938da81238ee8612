"""Run the Khronos glTF validator (npm `gltf-validator`, pinned in tools/gltf) from tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from needs import missing

TOOL_DIR = Path(__file__).resolve().parents[1] / "tools" / "gltf"


def validate_gltf(*paths: Path) -> list[dict[str, Any]]:
    """One validator report per file ({numErrors, numWarnings, messages, ...}). Skips the test when
    node or the validator is not installed, or fails it under HEADFORGE_STRICT_TESTS=1
    (scripts/test.sh installs both)."""
    node = shutil.which("node")
    if node is None:
        missing("node is not installed; the glTF validator needs it")
    if not (TOOL_DIR / "node_modules" / "gltf-validator").is_dir():
        missing("gltf-validator is not installed: run `(cd tools/gltf && npm ci)`")
    completed = subprocess.run(
        [node, str(TOOL_DIR / "validate.mjs"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if completed.returncode not in (0, 1):
        raise RuntimeError(f"validator failed to run: {completed.stderr}")
    return [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]

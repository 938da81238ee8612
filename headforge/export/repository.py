"""The model repository: `<root>/<name>/<version>/model.onnx` (or `model.plan`) + `manifest.json`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headforge.config import model_repository
from headforge.files import sha256_file, write_atomic

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


def entry_dir(name: str, version: str, root: Path | None = None) -> Path:
    return (root or model_repository()) / name / version


STAGING = ".incoming"  # under the repository root; never listed (entries sit two levels deep)


@contextmanager
def staged_entry(name: str, version: str, root: Path | None = None) -> Iterator[Path]:
    """Yield an empty directory to build an entry in; when the block exits cleanly it replaces
    `<root>/<name>/<version>` as a whole, and when it raises nothing in the repository changes.

    The staging directory lives at `<root>/.incoming/<random>/entry` (three levels down, so
    `list_entries` never sees a half-built entry) and is moved with `os.replace` on the same file
    system. An existing entry is first renamed aside and deleted after the new one is in place, so
    a reader sees the old entry, briefly none, or the new one, never a mix. Directories this call
    created (`<root>`, `<root>/<name>`, `.incoming`) are removed again when the build fails.
    """
    root = root or model_repository()
    created = [d for d in (root, root / STAGING) if not d.exists()]
    (root / STAGING).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root / STAGING))
    staging = scratch / "entry"
    staging.mkdir()
    target = entry_dir(name, version, root)
    parent_created = not target.parent.exists()
    try:
        yield staging
        target.parent.mkdir(parents=True, exist_ok=True)
        aside = scratch / "previous"
        if target.exists():
            os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            if aside.exists():
                os.replace(aside, target)  # put the previous entry back
            raise
    except BaseException:
        if parent_created and target.parent.is_dir() and not any(target.parent.iterdir()):
            target.parent.rmdir()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):  # only when empty: another import may be staging beside us
                directory.rmdir()


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write a manifest atomically, so readers never see a half-written one (owner-only, as it has
    always been)."""
    write_atomic(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.directory / str(self.manifest.get("model_file", "model.onnx"))

    def is_intact(self) -> bool:
        """The model file exists and its sha256 matches the manifest."""
        path = self.model_path
        return path.is_file() and sha256_file(path) == self.manifest.get("model_sha256")


def read_entry(name: str, version: str, root: Path | None = None) -> RepositoryEntry | None:
    """The entry, or None when it is absent or its manifest is unreadable."""
    directory = entry_dir(name, version, root)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return RepositoryEntry(name, version, directory, manifest) if isinstance(manifest, dict) else None


def list_entries(root: Path | None = None) -> list[RepositoryEntry]:
    """Every entry with a readable manifest, sorted by name then version."""
    root = root or model_repository()
    entries = []
    if root.is_dir():
        for manifest in sorted(root.glob(f"*/*/{MANIFEST}")):
            entry = read_entry(manifest.parent.parent.name, manifest.parent.name, root)
            if entry is not None:
                entries.append(entry)
    return entries

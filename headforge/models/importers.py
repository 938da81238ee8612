"""`headforge models import FAMILY PATH`: one entry per model family in `IMPORTERS`.

An importer is a plain function `(path, options) -> ImportReport`: it reads the user's checkpoint
(safely, see `headforge.models.checkpoints`), loads it into our own module, exports it and writes
one model-repository entry atomically (`headforge.export.repository.staged_entry`). Bad input
raises `InvalidCheckpointError` and leaves the repository unchanged. Adding a family means writing
its function and adding one line to `IMPORTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImportOptions:
    """What the CLI passes on. `variant` is None when the importer should detect it."""

    variant: str | None = None
    root: Path | None = None  # model repository; None means `headforge.config.model_repository()`
    config: Path | None = None  # a separate config file, for families that keep one (kaolrm's config.json)


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote; `summary()` is the one-line `--json` output."""

    family: str
    variant: str
    name: str  # repository entry name
    version: str
    parameters: int
    parity_max_abs: float | None  # None when the file is served as is (no export, no parity check)
    directory: Path
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "variant": self.variant,
            "name": self.name,
            "version": self.version,
            "parameters": self.parameters,
            "parity_max_abs": self.parity_max_abs,
            "path": str(self.directory),
        }


Importer = Callable[[Path, ImportOptions], ImportReport]


def _vggheads(path: Path, options: ImportOptions) -> ImportReport:
    from headforge.models.vggheads_import import import_vggheads

    return import_vggheads(path, options)


def _kaolrm(path: Path, options: ImportOptions) -> ImportReport:
    from headforge.models.kaolrm_import import import_checkpoint

    return import_checkpoint(path, options)


IMPORTERS: dict[str, Importer] = {
    "vggheads": _vggheads,
    "kaolrm": _kaolrm,
}

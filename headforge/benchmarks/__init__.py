"""Benchmark sections for `headforge bench`. Each section module has `run(quick: bool) -> dict`
and measures headforge against a reference in the same run."""

from __future__ import annotations

import importlib
from typing import Any

SECTIONS = ("landmarks", "e2e", "flame")


def run_all(quick: bool) -> dict[str, Any]:
    """Run every section that exists and merge their results into one flat document."""
    result: dict[str, Any] = {}
    for name in SECTIONS:
        try:
            module = importlib.import_module(f"headforge.benchmarks.{name}")
        except ModuleNotFoundError as missing:
            if missing.name != f"headforge.benchmarks.{name}":
                raise
            continue
        result.update(module.run(quick))
    return result

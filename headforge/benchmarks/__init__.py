"""Benchmark sections for `headforge bench`. Each section module has `run(quick: bool) -> dict`
and measures headforge against a reference in the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _landmarks(quick: bool) -> dict[str, Any]:
    from headforge.benchmarks import landmarks

    return landmarks.run(quick)


def _e2e(quick: bool) -> dict[str, Any]:
    from headforge.benchmarks import e2e

    return e2e.run(quick)


def _flame(quick: bool) -> dict[str, Any]:
    from headforge.benchmarks import flame

    return flame.run(quick)


# Section name → its runner (the modules import their heavy dependencies only when run).
SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "landmarks": _landmarks,
    "e2e": _e2e,
    "flame": _flame,
}


def _vggheads(quick: bool) -> dict[str, Any]:
    from headforge.benchmarks import vggheads

    return vggheads.run(quick)


def _kaolrm(quick: bool) -> dict[str, Any]:
    from headforge.benchmarks import kaolrm

    return kaolrm.run(quick)


def _animation(quick: bool) -> dict[str, Any]:
    from headforge.benchmarks import animation

    return animation.run(quick)


# Opt-in sections (`headforge bench --vggheads`, `--kaolrm`, `--animation`): not part of the default
# run (vggheads and kaolrm take minutes; animation is about a number the documented run fixes the
# threads for).
OPTIONAL_SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "vggheads": _vggheads,
    "kaolrm": _kaolrm,
    "animation": _animation,
}


def run_all(quick: bool) -> dict[str, Any]:
    """Run every section and merge their results into one flat document."""
    result: dict[str, Any] = {}
    for run in SECTIONS.values():
        result.update(run(quick))
    return result

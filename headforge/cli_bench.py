"""`headforge bench`: one JSON line of measurements, each against a same-run reference."""

from __future__ import annotations

import json

import typer


def bench(quick: bool = typer.Option(False, "--quick", help="A run under 60 s.")) -> None:
    """Measure headforge against references in the same run; print one JSON line."""
    from headforge.benchmarks import run_all

    print(json.dumps(run_all(quick)))

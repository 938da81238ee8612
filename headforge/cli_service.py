"""`headforge serve`, `headforge worker` and `headforge submit`."""

from __future__ import annotations

import typer


def serve() -> None:
    """Run the API (and, in embedded mode, a worker)."""
    raise typer.Exit(1)


def worker() -> None:
    """Run a Celery worker."""
    raise typer.Exit(1)


def submit() -> None:
    """Submit images to a running server and download the artifacts."""
    raise typer.Exit(1)

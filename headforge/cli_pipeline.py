"""`headforge reconstruct`: run the pipeline in-process on image files."""

from __future__ import annotations

from pathlib import Path

import typer


def reconstruct(
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, WebP, BMP, TIFF)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder; one subfolder per image."),
) -> None:
    """Reconstruct every head in IMAGES into OUT/<image stem>/."""
    raise typer.Exit(1)

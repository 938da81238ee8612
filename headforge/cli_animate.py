"""`headforge animate RESULT_DIR --expressions seq.json -o frames/`: drive a FLAME head's result with
a sequence of FLAME expression and jaw parameters (format: headforge/pipeline/animate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from headforge.errors import InvalidSequenceError


def animate(
    result_dir: Path = typer.Argument(
        ..., help="A result folder of the flame pipeline (result.json, h<i>_splats.ply + _binding.npz)."
    ),
    expressions: Path = typer.Option(
        ...,
        "--expressions",
        "-e",
        help='Sequence JSON: {"fps": 30, "frames": [{"expression": [K numbers], "jaw": [3 numbers]}, ...]}',
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the frames (created if missing)."),
) -> None:
    """Write a mesh PLY and a splat PLY per frame and head (f<frame>_h<i>_mesh.ply, _splats.ply)."""
    from headforge.pipeline.animate import animate_result

    try:
        document = json.loads(expressions.read_text())
    except (OSError, ValueError) as error:
        raise InvalidSequenceError(f"cannot read the expression sequence {expressions}: {error}") from error
    summary = animate_result(result_dir, document, out)
    typer.echo(
        f"wrote {summary['frames']} frames for head(s) {summary['heads']} "
        f"({len(summary['files'])} files) into {out}"
    )

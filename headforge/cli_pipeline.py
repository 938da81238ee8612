"""`headforge reconstruct`: run the pipeline in-process on image files.

Exit status: 0 when every image succeeded (a photo without faces is a success), 1 when any image
failed (the others are still processed), 2 for bad options or a deployment problem (no models).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

EXIT_SOME_FAILED = 1


def reconstruct(
    images: list[Path] = typer.Argument(..., help="Image files (JPEG, PNG, WebP, BMP, TIFF)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder; one subfolder per image."),
    pipeline: str = typer.Option(
        "facemesh", "--pipeline", help="Pipeline name (see `headforge models list`)."
    ),
    texture_size: int = typer.Option(1024, "--texture-size", help="Texture width and height, 512 to 4096."),
    splats: int = typer.Option(8192, "--splats", help="Gaussian splats per head (0: no splat file)."),
    max_heads: int | None = typer.Option(None, "--max-heads", help="Keep at most N heads, best first."),
    seed: int = typer.Option(0, "--seed", help="Seed for splat sampling."),
    subject: bool = typer.Option(
        False, "--subject", help="All IMAGES show one person: one capture, one result.json in OUT."
    ),
    topology: str | None = typer.Option(
        None, "--topology", help="Register a stored studio template onto every head (docs/topology.md)."
    ),
    kaolrm_checkpoint: str | None = typer.Option(
        None, "--kaolrm-checkpoint", help="kaolrm pipeline: mono or multiview (default: mono when imported)."
    ),
    kaolrm_points: str = typer.Option(
        "sampled",
        "--kaolrm-points",
        help="kaolrm pipeline: learned splats at sampled points or FLAME's vertices.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the machine-readable summary instead of a table."
    ),
) -> None:
    """Reconstruct every head in IMAGES into OUT/<image stem>/ (with --subject: into OUT/)."""
    from headforge.errors import HeadforgeError, InputError
    from headforge.pipeline.options import ReconstructOptions
    from headforge.pipeline.runner import reconstruct_capture

    options = ReconstructOptions(
        pipeline=pipeline,
        texture_size=texture_size,
        splats=splats,
        max_heads=max_heads,
        seed=seed,
        subject=subject,
        topology=topology,
        kaolrm_checkpoint=kaolrm_checkpoint,
        kaolrm_points=kaolrm_points,
    )
    # One capture per image, or all images as one capture of one subject.
    captures = [images] if subject else [[image] for image in images]
    folders = [out] if subject else output_folders(images, out)
    rows: list[dict[str, Any]] = []
    with _progress_display(enabled=len(captures) > 1 and not as_json) as progress:
        overall = progress.add_task("images", total=len(captures)) if progress else None
        for capture, folder in zip(captures, folders, strict=True):
            label = ", ".join(str(path) for path in capture)
            row: dict[str, Any] = {"image": label, "out_dir": str(folder)}
            started = time.perf_counter()

            def on_stage(stage: str, fraction: float, name: str = capture[0].name) -> None:
                if progress is not None and overall is not None:
                    progress.update(overall, description=f"{name}: {stage}")

            try:
                photos = [(path.name, _read_image(path)) for path in capture]
                document = reconstruct_capture(photos, options, folder, on_stage)
            except InputError as error:
                row.update(status="failed", error=error.to_dict())
            except HeadforgeError:
                raise  # deployment problems (models missing, pipeline unavailable) stop the run
            except Exception as error:  # a bug on one image must not lose the others
                row.update(
                    status="failed", error={"code": "internal_error", "message": repr(error), "details": {}}
                )
            else:
                row.update(
                    status="succeeded",
                    heads=len(document["heads"]),
                    notes=document["notes"],
                    timings_ms=document["timings_ms"],
                    artifacts=[artifact["name"] for artifact in document["artifacts"]] + ["result.json"],
                )
            row["elapsed_ms"] = round((time.perf_counter() - started) * 1000.0, 1)
            rows.append(row)
            if progress is not None and overall is not None:
                progress.advance(overall)
    failed = sum(row["status"] == "failed" for row in rows)
    summary = {"succeeded": len(rows) - failed, "failed": failed, "images": rows}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_table(rows)
    if failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _read_image(path: Path) -> bytes:
    from headforge.errors import UnreadableFileError

    try:
        return path.read_bytes()
    except OSError as error:
        raise UnreadableFileError(
            f"cannot read {path}: {error.strerror or error}", details={"path": str(path)}
        ) from error


def output_folders(images: list[Path], out: Path) -> list[Path]:
    """OUT/<stem> per image; repeated stems get -2, -3, ... so no run overwrites another."""
    seen: dict[str, int] = {}
    folders = []
    for image in images:
        stem = image.stem or "image"
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        folders.append(out / (stem if count == 1 else f"{stem}-{count}"))
    return folders


@contextmanager
def _progress_display(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr while the block runs, or None.

    Only when stderr is a terminal (rich's test, so `TTY_COMPATIBLE=1` or `FORCE_COLOR` force it):
    the bar redraws in place and is erased when done, which a pipe or a log file cannot show, so
    there the summary table alone reports the run.
    """
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield progress


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="headforge reconstruct")
    table.add_column("image")
    table.add_column("status")
    table.add_column("heads", justify="right")
    table.add_column("ms", justify="right")
    table.add_column("output / error")
    for row in rows:
        if row["status"] == "succeeded":
            detail = row["out_dir"]
            if row["heads"] == 0:
                detail += " (no face found)"
            table.add_row(
                ", ".join(Path(part).name for part in row["image"].split(", ")),
                "[green]ok[/green]",
                str(row["heads"]),
                f"{row['elapsed_ms']:.0f}",
                detail,
            )
        else:
            error = row["error"]
            table.add_row(
                ", ".join(Path(part).name for part in row["image"].split(", ")),
                "[red]failed[/red]",
                "-",
                f"{row['elapsed_ms']:.0f}",
                f"{error['code']}: {error['message']}",
            )
    Console().print(table)

"""`headforge models ...` commands: fetch/convert the default networks, list the model repository."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="Manage the model repository (default networks, exported models).", no_args_is_help=True
)


@app.command("pull")
def pull(
    force: bool = typer.Option(
        False, "--force", help="Re-fetch, re-extract and re-export even if up to date."
    ),
    tensorrt: bool = typer.Option(
        False, "--tensorrt", help="Also build fp16 TensorRT engines (needs the `tensorrt` package and a GPU)."
    ),
) -> None:
    """Fetch the pinned mediapipe wheel, import its face networks, export them to ONNX (idempotent).

    The wheel and the extracted .tflite files are sha256-checked; each network is loaded into its
    PyTorch module and exported with a parity check into the model repository.

    Offline installs: set HEADFORGE_MEDIAPIPE_WHEEL=/path/to/mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl.
    """
    from headforge.config import model_repository
    from headforge.models.pull import ALL_MODELS, DEFAULT_VERSION
    from headforge.models.pull import pull as run_pull

    report = run_pull(force=force, log=lambda line: typer.echo(line, err=True))
    if tensorrt:
        from headforge.export.repository import entry_dir
        from headforge.export.tensorrt import build_entry_engine

        for model in ALL_MODELS:
            built = build_entry_engine(entry_dir(model.name, DEFAULT_VERSION))
            typer.echo(f"built {model.name}: {built['engine_cache']}", err=True)
    state = "updated" if report.changed else "already up to date"
    typer.echo(
        f"models {state}: {model_repository()} ({', '.join(m.name for m in ALL_MODELS)} @ {DEFAULT_VERSION})"
    )


@app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """List the model repository's entries with their versions, formats and integrity."""
    from headforge.config import model_repository
    from headforge.export.repository import list_entries

    entries = list_entries()
    rows = [
        {
            "name": entry.name,
            "version": entry.version,
            "format": entry.manifest.get("format"),
            "intact": entry.is_intact(),
            "model_sha256": entry.manifest.get("model_sha256"),
            "max_rel_error": entry.manifest.get("parity", {}).get("max_rel_error"),
            "tensorrt": "tensorrt" in entry.manifest,
            "path": str(entry.directory),
        }
        for entry in entries
    ]
    if as_json:
        typer.echo(json.dumps({"repository": str(model_repository()), "models": rows}, indent=2))
        return
    if not rows:
        typer.echo(f"no models in {model_repository()}; run `headforge models pull`")
        return
    for row in rows:
        status = "ok" if row["intact"] else "CORRUPT (run `headforge models pull`)"
        extra = " +tensorrt" if row["tensorrt"] else ""
        typer.echo(f"{row['name']:28s} {row['version']:24s} {row['format']}{extra}  {status}")


@app.command("import")
def import_checkpoint(
    family: str = typer.Argument(..., help="Model family: one of `headforge.models.importers.IMPORTERS`."),
    path: Path = typer.Argument(..., help="The checkpoint file (see docs/models.md for accepted formats)."),
    variant: str | None = typer.Option(
        None,
        "--variant",
        "--name",
        help="Model variant (e.g. s, m, l for vggheads; mono, multiview for kaolrm); detected if omitted.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="The model's config file, where the family has one (kaolrm: config.json)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line describing the entry written."),
) -> None:
    """Import a user's checkpoint into our own module, export it to ONNX with a parity check and
    write a model-repository entry. A bad file exits 2 with `invalid_checkpoint` and changes nothing."""
    from headforge.errors import InvalidOptionError
    from headforge.models.importers import IMPORTERS, ImportOptions

    importer = IMPORTERS.get(family.lower())
    if importer is None:
        raise InvalidOptionError(
            f"unknown model family {family!r}; choose one of {', '.join(sorted(IMPORTERS))}",
            details={"families": sorted(IMPORTERS)},
        )
    report = importer(path, ImportOptions(variant=variant.lower() if variant else None, config=config))
    if as_json:
        typer.echo(json.dumps(report.summary(), sort_keys=True))
        return
    parity = (
        "served as is" if report.parity_max_abs is None else f"parity max |Δ| {report.parity_max_abs:.3g}"
    )
    typer.echo(
        f"imported {report.family} {report.variant} ({report.parameters:,} parameters, {parity}) "
        f"→ {report.directory}"
    )


@app.command("build-engine")
def build_engine(
    name: str = typer.Argument(..., help="Repository entry name (`headforge models list`), e.g. vggheads."),
    version: str | None = typer.Option(None, "--version", help="Entry version; default: the newest."),
    fp32: bool = typer.Option(False, "--fp32", help="Build an fp32 engine instead of fp16."),
    as_json: bool = typer.Option(False, "--json", help="Print the recorded settings as one JSON line."),
) -> None:
    """Build a TensorRT engine for a repository entry (GPU machine): ONNX Runtime's TensorRT
    provider builds it into its engine cache, where GPU workers then load it (docs/models.md)."""
    from headforge.errors import InvalidOptionError
    from headforge.export.repository import list_entries
    from headforge.export.tensorrt import build_entry_engine

    entries = [e for e in list_entries() if e.name == name and (version is None or e.version == version)]
    if not entries:
        wanted = f"{name!r} version {version!r}" if version else repr(name)
        raise InvalidOptionError(f"no repository entry {wanted}; see `headforge models list`")
    entry = max(entries, key=lambda e: (str(e.manifest.get("created", "")), e.version))
    settings = build_entry_engine(entry.directory, fp16=not fp32)
    if as_json:
        typer.echo(json.dumps({"name": entry.name, "version": entry.version, **settings}, sort_keys=True))
    else:
        precision = "fp32" if fp32 else "fp16"
        typer.echo(f"built {entry.name}/{entry.version} ({precision}) → {settings['engine_cache']}")

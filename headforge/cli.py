"""The `headforge` command. Each area registers its commands from its own module;
heavy imports (torch, onnxruntime, celery) happen inside the commands, so `--help` is fast."""

from __future__ import annotations

import sys

import typer

from headforge import cli_animate, cli_bench, cli_flame, cli_models, cli_pipeline, cli_service, cli_topology
from headforge.errors import HeadforgeError

app = typer.Typer(
    name="headforge",
    help="Photos of people in, 3D head assets out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_models.app, name="models")
app.add_typer(cli_flame.app, name="flame")
app.add_typer(cli_topology.template_app, name="template")
app.add_typer(cli_topology.topology_app, name="topology")
app.command("reconstruct")(cli_pipeline.reconstruct)
app.command("serve")(cli_service.serve)
app.command("worker")(cli_service.worker)
app.command("submit")(cli_service.submit)
app.command("bench")(cli_bench.bench)
app.command("animate")(cli_animate.animate)


def main() -> None:
    """Entry point: run the app, turning headforge errors into a message and exit code 2."""
    try:
        app()
    except HeadforgeError as error:
        typer.secho(f"error [{error.code}]: {error.message}", err=True, fg=typer.colors.RED)
        sys.exit(2)

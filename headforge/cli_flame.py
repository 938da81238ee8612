"""`headforge flame ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="flame commands", no_args_is_help=True)

"""Every `headforge` command and subcommand answers `--help` (the CLI's own documentation)."""

from __future__ import annotations

from typing import Any

import typer.main
from typer.testing import CliRunner

from headforge.cli import app


def _subcommands(command: Any) -> dict[str, Any]:
    """A group's commands by name; {} for a leaf command."""
    return dict(getattr(command, "commands", {}))


def _command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path below `command`, groups included."""
    paths = [path]
    for name, child in _subcommands(command).items():
        paths += _command_paths(child, (*path, name))
    return paths


def test_every_command_has_help() -> None:
    paths = _command_paths(typer.main.get_command(app))
    names = {" ".join(p) for p in paths}
    assert {"reconstruct", "serve", "worker", "submit", "bench", "models pull", "flame import"} <= names
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output and "--help" in result.output, path
        if path:
            command = typer.main.get_command(app)
            for name in path:
                command = _subcommands(command)[name]
            assert command.help or command.short_help, f"`headforge {' '.join(path)}` has no description"

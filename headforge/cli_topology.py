"""`headforge template ...` (import and list studio head templates) and `headforge topology fit`
(retopologize a head mesh into a template's topology). See docs/topology.md."""

from __future__ import annotations

import json
from pathlib import Path

import typer

template_app = typer.Typer(
    help="Studio head templates (e.g. MetaHuman's head): import the operator's files, list them.",
    no_args_is_help=True,
)
topology_app = typer.Typer(help="Retopology: fit a stored template onto any head mesh.", no_args_is_help=True)


@template_app.command("import")
def import_command(
    name: str = typer.Argument(..., help="Name to store the template under (a-z, 0-9, '_', '.', '-')."),
    mesh: Path = typer.Argument(..., help="The template mesh: .obj or .glb, with UVs."),
    landmarks: Path | None = typer.Option(
        None,
        "--landmarks",
        help="Correspondence file (JSON, docs/topology.md): template points ↔ FLAME vertex ids or MediaPipe "
        "landmark ids, and vertex groups such as `face`. Pipelines need it; `topology fit` does not.",
    ),
) -> None:
    """Check MESH and store it as template NAME in HEADFORGE_HOME (replacing one of that name)."""
    from headforge.templates import import_template, load_template

    path = import_template(name, mesh, landmarks)
    described = load_template(name).describe()
    typer.echo(
        f"imported template {name!r} into {path}: {described['vertices']} vertices, "
        f"{described['faces']} triangles, {described['uvs']} UVs"
    )
    if not any(described["landmarks"].values()):
        typer.secho(
            "note: no landmarks; pipelines refuse this template until it is re-imported with --landmarks",
            fg=typer.colors.YELLOW,
        )


@template_app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print the listing as JSON."),
) -> None:
    """List the stored templates with their sizes, groups and landmark counts."""
    from headforge.templates import list_templates

    entries = list_templates()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        typer.echo("no templates; import one with `headforge template import NAME mesh.obj`")
        return
    for entry in entries:
        if "error" in entry:
            typer.echo(f"{entry['name']}: unreadable ({entry['error']['code']}: {entry['error']['message']})")
            continue
        groups = ", ".join(f"{group} ({count} v)" for group, count in entry["groups"].items()) or "none"
        marks = ", ".join(f"{kind} {count}" for kind, count in entry["landmarks"].items())
        typer.echo(
            f"{entry['name']}: {entry['vertices']} vertices, {entry['faces']} triangles, "
            f"{entry['uvs']} UVs; groups: {groups}; landmarks: {marks}"
        )


@topology_app.command("fit")
def fit_command(
    name: str = typer.Argument(..., help="A stored template (`headforge template list`)."),
    target: Path = typer.Argument(..., help="The head mesh to fit: .obj, .glb or .ply."),
    out: Path = typer.Option(..., "-o", "--out", help="Output mesh: .obj (with .mtl) or .glb."),
    target_landmarks: str = typer.Option(
        "auto",
        "--target-landmarks",
        help="Whose vertex ids the target carries, for the landmark alignment: flame (a 5023-vertex FLAME head), "
        "mediapipe (the 468-vertex face mesh), none (the target is already in the template's frame), or auto "
        "(flame or mediapipe by vertex count when the template has such landmarks, else none).",
    ),
    units: str = typer.Option(
        "m", "--units", help="The target's length unit, for the report in mm: m, cm or mm."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the fit report as JSON."),
) -> None:
    """Fit template NAME onto TARGET and write it: the template's vertices, faces and UVs, in TARGET's frame."""
    from headforge.errors import InvalidOptionError, UnreadableFileError
    from headforge.files import write_atomic
    from headforge.pipeline.package import glb_bytes
    from headforge.pipeline.retopology import (
        UNITS_PER_MM,
        fit_template_to_mesh,
        guess_target_kind,
        read_target_mesh,
        template_obj_bytes,
    )
    from headforge.templates import load_template

    suffix = out.suffix.lower()
    if suffix not in (".obj", ".glb"):
        raise InvalidOptionError(f"-o must end in .obj or .glb, got {out.name!r}")
    if units not in UNITS_PER_MM:
        raise InvalidOptionError(f"--units must be one of {sorted(UNITS_PER_MM)}, got {units!r}")
    if target_landmarks not in ("auto", "flame", "mediapipe", "none"):
        raise InvalidOptionError(
            f"--target-landmarks must be auto, flame, mediapipe or none, got {target_landmarks!r}"
        )
    template = load_template(name)
    try:
        data = target.read_bytes()
    except OSError as error:
        raise UnreadableFileError(f"cannot read {target}: {error.strerror}") from error
    vertices, faces = read_target_mesh(data, target.name)
    kind = (
        guess_target_kind(len(vertices), template)
        if target_landmarks == "auto"
        else (None if target_landmarks == "none" else target_landmarks)
    )
    outcome = fit_template_to_mesh(template, vertices, faces, target_kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".glb":
        write_atomic(out, glb_bytes(outcome.mesh, None, out.stem))
    else:
        mtl = f"{out.stem}.mtl"
        material = f"newmtl {template.name}\nKd 1.000000 1.000000 1.000000\nillum 1\n"
        write_atomic(out.with_suffix(".mtl"), material.encode("ascii"))
        write_atomic(out, template_obj_bytes(template, outcome.mesh.vertices, mtl))
    report = outcome.report(UNITS_PER_MM[units])
    if as_json:
        typer.echo(json.dumps({"output": str(out), **report}, indent=2))
    else:
        typer.echo(
            f"wrote {out}: template {name!r} fitted with {report['landmarks']} landmarks "
            f"({kind or 'none: target in the template frame'}); residual {report['residual_mm']} mm mean, "
            f"{report['residual_p95_mm']} mm p95; {report['driven_share']:.1%} of vertices driven by the target"
        )

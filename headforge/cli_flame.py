"""`headforge flame ...`: import the operator's FLAME files, and show what is imported."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="FLAME head model: import the operator's files (see docs/flame.md).", no_args_is_help=True
)


@app.command("import")
def import_model(
    model_pkl: Path = typer.Argument(
        ..., help="generic_model.pkl (FLAME 2020), flame2023.pkl / flame2023_no_jaw.pkl, or FLAME 2023 Open."
    ),
    landmarks: list[Path] = typer.Option(
        [],
        "--landmarks",
        help="Landmark embedding: mediapipe_landmark_embedding.npz (needed by the flame pipeline) and/or a "
        "68-point one (landmark_embedding.npy); repeat the option for both.",
    ),
    uv: Path | None = typer.Option(
        None, "--uv", help="head_template.obj with FLAME's UVs (needed by the flame pipeline)."
    ),
) -> None:
    """Check MODEL_PKL (read with a restricted unpickler) and write the FLAME asset into HEADFORGE_HOME."""
    from headforge.models.flame_import import flame_unavailable_reason, import_flame

    destination = import_flame(model_pkl, landmarks, uv)
    typer.echo(f"imported FLAME into {destination}")
    reason = flame_unavailable_reason(destination)
    if reason is not None:
        typer.secho(f"note: the flame pipeline is not usable yet: {reason}", fg=typer.colors.YELLOW)


@app.command("info")
def info() -> None:
    """Print what FLAME asset is imported, as JSON."""
    from headforge.models.flame_import import flame_asset_path, flame_unavailable_reason, load_flame_asset

    path = flame_asset_path()
    reason = flame_unavailable_reason(path)
    document: dict[str, object] = {"path": str(path), "available": reason is None, "reason": reason}
    if path.is_file():
        asset = load_flame_asset(path)
        document.update(
            {
                "vertices": len(asset.v_template),
                "faces": len(asset.faces),
                "shape_components": asset.shapedirs.shape[2],
                "expression_components": asset.exprdirs.shape[2],
                "uvs": None if asset.uvs is None else len(asset.uvs),
                "mediapipe_landmarks": None if asset.mp_face_idx is None else len(asset.mp_face_idx),
                "ibug_landmarks": sorted(asset.ibug) if asset.ibug else None,
                "sources": asset.metadata.get("sources"),
            }
        )
    typer.echo(json.dumps(document, indent=2))

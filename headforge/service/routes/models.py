"""Discovery: `/v1/models` (pipelines, networks, templates and whether each is usable here) and
`/v1/schemas/result` (the JSON Schema of result.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response

from headforge.errors import NotFoundError
from headforge.service.contracts import ModelsListing
from headforge.service.deps import CurrentPrincipal
from headforge.service.http_errors import documented

router = APIRouter(tags=["discovery"])
RESULT_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "result.schema.json"


def describe_models() -> dict[str, Any]:
    """Every registered pipeline with availability, and the default networks' versions."""
    from headforge.models.runtime import DEFAULT_NETWORK_NAMES
    from headforge.pipeline.run import PIPELINES, pipeline_missing_reason

    pipelines = []
    for name, entry in sorted(PIPELINES.items()):
        try:
            reason = pipeline_missing_reason(name)
        except Exception as error:  # a broken optional pipeline must not break the listing
            reason = f"{type(error).__name__}: {error}"
        pipelines.append(
            {
                "name": name,
                "description": entry.description,
                "available": reason is None,
                "reason": reason,
                "queue": entry.queue,
                "networks": list(entry.networks),
            }
        )
    from headforge.export.repository import read_entry
    from headforge.models.pull import DEFAULT_VERSION

    models = []
    for name in DEFAULT_NETWORK_NAMES:
        model = read_entry(name, DEFAULT_VERSION)
        manifest = model.manifest if model is not None else {}
        models.append(
            {
                "name": name,
                "version": DEFAULT_VERSION,
                "available": bool(model is not None and model.model_path.is_file()),
                "sha256": manifest.get("model_sha256"),
            }
        )
    from headforge.templates import list_templates

    return {"pipelines": pipelines, "models": models, "templates": list_templates()}


@router.get(
    "/v1/models",
    summary="Pipelines and model versions, and whether each is available",
    responses=documented(401),
)
def list_models(_principal: CurrentPrincipal) -> ModelsListing:
    return ModelsListing.model_validate(describe_models())


@router.get(
    "/v1/schemas/result",
    summary="JSON Schema of result.json",
    response_class=Response,
    responses={
        200: {"content": {"application/schema+json": {}}, "description": "The JSON Schema"},
        **documented(404),
    },
)
def result_schema() -> Response:
    if not RESULT_SCHEMA.is_file():
        raise NotFoundError("the result schema is not installed")
    return Response(RESULT_SCHEMA.read_bytes(), media_type="application/schema+json")

"""The job options as multipart form fields, generated from `ReconstructOptions`.

`option_fields` is a FastAPI dependency whose parameters are the model's fields (each optional, with
the model's description), so a field added to the options model appears in the API form and in
the OpenAPI document without touching the routes. It returns only the fields the client sent; the
options model then checks them exactly as the worker will.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any

from fastapi import Form

from headforge.pipeline.options import ReconstructOptions


def _form_annotation(annotation: Any) -> Any:
    """The form type for a model field: lists for sets (repeated or comma-separated), the scalar
    type otherwise; always optional."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (frozenset, set, list):
        return list[str] | None
    if origin in (typing.Union, types.UnionType) and len(arguments) == 1:
        annotation = arguments[0]
    if annotation in (int, bool, float, str):
        return annotation | None
    return str | None


def _build() -> Any:
    parameters = []
    for name, field in ReconstructOptions.model_fields.items():
        description = field.description or ""
        if name == "outputs":
            description += " Comma-separated or repeated."
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[_form_annotation(field.annotation), Form(description=description)],
            )
        )

    def option_fields(**values: Any) -> dict[str, Any]:
        """The option fields the client sent (the others keep the model's defaults)."""
        sent: dict[str, Any] = {}
        for name, value in values.items():
            if value is None or value == []:
                continue
            if isinstance(value, str):
                value = value.strip()
            if isinstance(value, list):
                value = sorted(
                    {part.strip() for item in value for part in str(item).split(",") if part.strip()}
                )
            sent[name] = value
        return sent

    option_fields.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])  # type: ignore[attr-defined]
    return option_fields


option_fields = _build()

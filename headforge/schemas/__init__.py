"""JSON Schemas of headforge's documents, shipped in the wheel and served by the API."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).parent
RESULT_SCHEMA = "result.schema.json"


@lru_cache(maxsize=8)
def load_schema(name: str = RESULT_SCHEMA) -> dict[str, Any]:
    """A schema by file name (default: the `result.json` schema), parsed once per process."""
    path = SCHEMA_DIR / name
    if path.parent != SCHEMA_DIR or not path.is_file():
        raise FileNotFoundError(f"no schema named {name!r} in {SCHEMA_DIR}")
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def result_schema() -> dict[str, Any]:
    """The JSON Schema of `result.json`."""
    return load_schema(RESULT_SCHEMA)


def validate_result(document: dict[str, Any]) -> None:
    """Raise `jsonschema.ValidationError` when `document` does not match the result schema."""
    import jsonschema

    schema = result_schema()
    jsonschema.validators.validator_for(schema)(schema, format_checker=jsonschema.FormatChecker()).validate(
        document
    )

"""The checked-in result.json schema is the one generated from the Pydantic models, and both accept
the runner's real documents and refuse broken ones."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydantic import ValidationError

from headforge.errors import HeadforgeError
from headforge.models.runtime import ModelSet
from headforge.pipeline.run import ReconstructOptions, reconstruct_image
from headforge.schemas import RESULT_SCHEMA, SCHEMA_DIR, result_schema, validate_result
from headforge.schemas.models import ResultDocument, generate_result_schema, schema_text


def test_checked_in_schema_is_generated_from_the_models() -> None:
    checked_in = (SCHEMA_DIR / RESULT_SCHEMA).read_text(encoding="utf-8")
    assert checked_in == schema_text(), "run `python -m headforge.schemas.models` to regenerate the schema"
    assert result_schema() == generate_result_schema()
    jsonschema.Draft202012Validator.check_schema(result_schema())


@pytest.fixture(scope="module")
def document(
    astronaut: NDArray[np.uint8], networks: ModelSet, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, format="PNG")
    out = tmp_path_factory.mktemp("schema")
    options = ReconstructOptions(texture_size=512, splats=300, outputs=frozenset({"obj", "splats"}))
    result = reconstruct_image(buffer.getvalue(), "astronaut.png", options, out, networks=networks)
    assert result == json.loads((Path(out) / "result.json").read_text())
    return result


def test_real_document_passes_both(document: dict[str, Any]) -> None:
    validate_result(document)
    parsed = ResultDocument.model_validate(document)
    assert parsed.heads[0].view == 0 and parsed.heads[0].splat_source == "sampled"


@pytest.mark.parametrize(
    "breakage",
    [
        "facemesh_with_flame_params",
        "unknown_field",
        "bad_artifact_name",
        "negative_timing",
        "bad_sha256",
        "unknown_option",
    ],
)
def test_broken_documents_fail_both(document: dict[str, Any], breakage: str) -> None:
    broken = copy.deepcopy(document)
    if breakage == "facemesh_with_flame_params":
        broken["heads"][0]["params"] = {"model": "flame"}
    elif breakage == "unknown_field":
        broken["heads"][0]["colour"] = "red"
    elif breakage == "bad_artifact_name":
        broken["artifacts"][0]["name"] = "../etc/passwd"
    elif breakage == "negative_timing":
        broken["timings_ms"]["decode"] = -1.0
    elif breakage == "bad_sha256":
        broken["source"]["sha256"] = "xyz"
    elif breakage == "unknown_option":
        broken["options"]["colour"] = "red"
    with pytest.raises(jsonschema.ValidationError):
        validate_result(broken)
    with pytest.raises((ValidationError, HeadforgeError)):
        ResultDocument.model_validate(broken)

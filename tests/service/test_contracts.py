"""The API's typed contracts (headforge/service/contracts.py) over real HTTP: the served OpenAPI
document references them from the main routes, and real bodies validate against them."""

from __future__ import annotations

from typing import Any

import pytest
from stacklib import FAST_OPTIONS, Stack, astronaut_jpeg

from headforge.service.contracts import (
    Batch,
    BatchAccepted,
    ErrorEnvelope,
    Job,
    JobAccepted,
    JobList,
    ModelsListing,
)

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]


def _json_schema(operation: dict[str, Any], status: str) -> dict[str, Any]:
    return operation["responses"][status]["content"]["application/json"]["schema"]


def _refs(schema: dict[str, Any]) -> set[str]:
    """The component names a response schema points at (directly or through anyOf)."""
    found = {schema["$ref"].rsplit("/", 1)[-1]} if "$ref" in schema else set()
    for option in schema.get("anyOf", []):
        found |= _refs(option)
    return found


def test_openapi_references_the_contract_models(redis_stack: Stack) -> None:
    with redis_stack.client() as client:
        response = client.http.get("/openapi.json")
    assert response.status_code == 200, response.text
    document = response.json()
    paths, components = document["paths"], document["components"]["schemas"]
    assert _refs(_json_schema(paths["/v1/jobs"]["post"], "202")) == {"JobAccepted", "Job"}
    assert _refs(_json_schema(paths["/v1/jobs"]["post"], "200")) == {"Job"}
    assert _refs(_json_schema(paths["/v1/jobs"]["get"], "200")) == {"JobList"}
    assert _refs(_json_schema(paths["/v1/jobs/{job_id}"]["get"], "200")) == {"Job"}
    assert _refs(_json_schema(paths["/v1/batches"]["post"], "202")) == {"BatchAccepted"}
    assert _refs(_json_schema(paths["/v1/batches/{batch_id}"]["get"], "200")) == {"Batch"}
    assert _refs(_json_schema(paths["/v1/models"]["get"], "200")) == {"ModelsListing"}
    assert _refs(_json_schema(paths["/v1/retopology"]["post"], "202")) == {"JobAccepted", "Job"}
    for path, method, status in (
        ("/v1/jobs", "post", "413"),
        ("/v1/jobs", "post", "401"),
        ("/v1/jobs/{job_id}", "get", "404"),
        ("/v1/batches/{batch_id}", "get", "404"),
        ("/readyz", "get", "503"),
    ):
        assert _refs(_json_schema(paths[path][method], status)) == {"ErrorEnvelope"}, (path, method, status)
    # The published schemas are the models' own fields, not an untyped object.
    assert set(components["Job"]["properties"]) == set(Job.model_fields)
    assert set(components["Batch"]["properties"]) == set(Batch.model_fields)
    assert components["Job"]["additionalProperties"] is False
    assert set(components["ErrorBody"]["properties"]) == {"code", "message", "details"}


def test_real_bodies_validate_against_the_contracts(redis_stack: Stack) -> None:
    with redis_stack.client() as client:
        accepted = client.submit([("astronaut.jpg", astronaut_jpeg(256))], **FAST_OPTIONS)
        JobAccepted.model_validate(accepted)
        job = client.wait(accepted["id"], timeout=240, poll=0.1)
        assert job["status"] == "succeeded", job["error"]
        parsed = Job.model_validate(job)  # extra="forbid": a field the contract lacks fails here
        assert parsed.result is not None and parsed.result["heads"]
        assert parsed.artifacts and all(a.url.endswith(a.name) for a in parsed.artifacts)
        JobList.model_validate(client.http.get("/v1/jobs").json())
        batch = client.submit_batch(
            [("a.jpg", astronaut_jpeg(256)), ("b.jpg", astronaut_jpeg(224))], **FAST_OPTIONS
        )
        BatchAccepted.model_validate(batch)
        Batch.model_validate(client.http.get(f"/v1/batches/{batch['id']}").json())
        ModelsListing.model_validate(client.http.get("/v1/models").json())
        missing = client.http.get("/v1/jobs/job_does_not_exist")
        assert missing.status_code == 404
        assert ErrorEnvelope.model_validate(missing.json()).error.code == "not_found"
        client.http.delete(f"/v1/batches/{batch['id']}")


def test_a_job_body_with_an_unknown_field_is_refused() -> None:
    """The contracts forbid extra fields, so a handler that drifts from the documentation fails."""
    body = {"id": "job_x", "status": "queued", "status_url": "/v1/jobs/job_x", "owner": "alice"}
    with pytest.raises(ValueError, match="owner"):
        JobAccepted.model_validate(body)

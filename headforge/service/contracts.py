"""The API's response bodies as Pydantic models: what `/docs` shows and what handlers return.

Each model forbids unknown fields, so a handler that returns something the contract does not
describe fails loudly (a 500 in tests) instead of drifting silently from the documentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Contract):
    code: str = Field(description="Stable machine-readable code, e.g. `file_too_large`")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorEnvelope(_Contract):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorBody


class InputRecord(_Contract):
    filename: str | None
    size: int | None
    sha256: str | None
    format: str | None = None
    width: int | None = None
    height: int | None = None


class ArtifactLink(_Contract):
    name: str
    size: int
    sha256: str
    media_type: str
    url: str


class JobAccepted(_Contract):
    """A job taken on: poll `status_url` (or pass `wait`, or a webhook)."""

    id: str
    status: JobStatus
    status_url: str


class Job(_Contract):
    """Everything a client may see about a job."""

    id: str
    status: JobStatus
    status_url: str
    created_at: str | None
    updated_at: str | None
    started_at: str | None
    finished_at: str | None
    options: dict[str, Any]
    inputs: list[InputRecord]
    batch_id: str | None
    progress: dict[str, float] = Field(description="Stage name to completed fraction")
    queue_position: int | None
    attempts: int
    timings_ms: dict[str, float]
    error: ErrorBody | None
    artifacts: list[ArtifactLink]
    result: dict[str, Any] | None = Field(
        description="The job's result.json once it succeeded (JSON Schema: GET /v1/schemas/result)"
    )


class JobList(_Contract):
    jobs: list[Job]


class BatchAccepted(_Contract):
    id: str
    status: Literal["running"]
    status_url: str
    jobs: list[str] = Field(description="The ids of the batch's jobs, one per image")


class BatchJob(_Contract):
    id: str
    filename: str
    status: JobStatus | Literal["deleted"]
    status_url: str | None = None
    error: ErrorBody | None = None


class Batch(_Contract):
    id: str
    status: Literal["running", "finished"]
    created_at: str | None
    total: int
    counts: dict[str, int]
    progress: float = Field(ge=0.0, le=1.0)
    jobs: list[BatchJob]
    archive_url: str


class PipelineInfo(_Contract):
    name: str
    description: str
    available: bool
    reason: str | None = Field(description="Why the pipeline cannot run here, when it cannot")
    queue: Literal["cpu", "gpu"]
    networks: list[str]


class NetworkInfo(_Contract):
    name: str
    version: str
    available: bool
    sha256: str | None


class ModelsListing(_Contract):
    pipelines: list[PipelineInfo]
    models: list[NetworkInfo]
    templates: list[dict[str, Any]]


class Health(_Contract):
    status: Literal["ok"]


class Ready(_Contract):
    status: Literal["ready"]
    checks: dict[str, str]
    workers: int = Field(description="Workers seen alive in the last minute")

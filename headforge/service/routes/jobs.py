"""`/v1/jobs`: submit photos as one job, list, read, download artifacts, cancel or delete."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Query, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from headforge.errors import JobNotFinishedError, NotFoundError, TooManyFilesError
from headforge.pipeline.subject import check_subject_photo_count
from headforge.service.celery_app import publish_webhook
from headforge.service.contracts import Job, JobAccepted, JobList
from headforge.service.deps import CurrentPrincipal, ServiceState, State
from headforge.service.forms import option_fields
from headforge.service.http_errors import documented
from headforge.service.jobs import CANCELED, QUEUED, RUNNING, SUCCEEDED
from headforge.service.ratelimit import check_rate
from headforge.service.store import store_os_error
from headforge.service.submission import job_answer, submit
from headforge.service.uploads import read_uploads
from headforge.service.views import public_job

log = logging.getLogger("headforge.api")
router = APIRouter(tags=["jobs"])
MAX_WAIT_SECONDS = 60


@router.post(
    "/v1/jobs",
    status_code=202,
    summary="Submit one or more images as one job",
    response_model=JobAccepted | Job,
    responses={
        200: {"model": Job, "description": "With `wait`: the job finished in time"},
        **documented(400, 401, 409, 413, 415, 422, 429, 503),
    },
)
async def submit_job(
    state: State,
    principal: CurrentPrincipal,
    response: Response,
    images: Annotated[list[UploadFile], File(description="Image files (repeat the field)")],
    options: Annotated[dict[str, Any], Depends(option_fields)],
    webhook_url: Annotated[str | None, Form()] = None,
    wait: Annotated[int, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for the result")] = 0,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> JobAccepted | Job:
    settings = state.settings
    await run_in_threadpool(check_rate, state.jobs.backend, principal)
    if options.get("subject") is True:  # 413 too_many_subject_photos over 8, whatever the job limit
        check_subject_photo_count(len(images))
    if len(images) > settings.max_files_per_job:
        raise TooManyFilesError(
            f"{len(images)} files in one job; the limit is {settings.max_files_per_job} (use /v1/batches)",
            details={"files": len(images), "max_files": settings.max_files_per_job},
        )
    uploads = await run_in_threadpool(read_uploads, images, settings)
    job_id, _existed = await run_in_threadpool(
        submit, state, principal, uploads, options, webhook_url or None, idempotency_key, batch=False
    )
    return await job_answer(state, job_id, wait, response)


@router.get("/v1/jobs", summary="This key's recent jobs, newest first", responses=documented(401, 422))
def list_jobs(
    state: State,
    principal: CurrentPrincipal,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    docs = state.jobs.list_for(principal.owner, limit)
    return JobList(jobs=[Job.model_validate(public_job(d, state.jobs)) for d in docs])


@router.get(
    "/v1/jobs/{job_id}",
    summary="Status, progress, timings, errors, artifacts and result",
    responses=documented(401, 404),
)
def get_job(job_id: str, state: State, principal: CurrentPrincipal) -> Job:
    doc = state.jobs.get_for(principal.owner, job_id)
    return Job.model_validate(public_job(doc, state.jobs, state.store, include_result=True))


@router.get(
    "/v1/jobs/{job_id}/artifacts/{name:path}",
    summary="Download one artifact",
    response_class=Response,
    responses=documented(401, 404, 409),
)
def get_artifact(job_id: str, name: str, state: State, principal: CurrentPrincipal) -> Response:
    doc = state.jobs.get_for(principal.owner, job_id)
    if doc["status"] != SUCCEEDED:
        if doc["status"] in (QUEUED, RUNNING):
            raise JobNotFinishedError("the job has not finished yet", details={"status": doc["status"]})
        raise NotFoundError("the job has no artifacts", details={"status": doc["status"]})
    artifact = next((a for a in doc["artifacts"] if a["name"] == name), None)
    if artifact is None:
        raise NotFoundError("no such artifact", details={"name": name})
    headers = {"ETag": f'"{artifact["sha256"]}"', "X-Checksum-SHA256": artifact["sha256"]}
    path = state.store.local_path(artifact["key"])
    filename = PurePosixPath(name).name
    if path is not None:
        return FileResponse(
            path,
            media_type=artifact["media_type"],
            filename=filename,
            headers=headers,
            content_disposition_type="inline",
        )
    headers["Content-Length"] = str(artifact["size"])
    return StreamingResponse(
        state.store.iter_chunks(artifact["key"]), media_type=artifact["media_type"], headers=headers
    )


def _notify_canceled(state: ServiceState, doc: dict[str, Any]) -> None:
    """Publish the `job.canceled` webhook of a job that has a `webhook_url`. Two DELETEs racing on
    one job may both publish it; the delivery task claims each attempt once, so it is sent once."""
    if not doc.get("webhook_url"):
        return
    try:
        publish_webhook(state.celery, doc["id"], f"job.{CANCELED}", 1, doc["queue"])
    except Exception as error:  # the cancel stands; the sweeper publishes the due webhook later
        log.warning("could not publish the job.canceled webhook: %s", error, extra={"job_id": doc["id"]})


def remove_job_files(state: ServiceState, job_id: str) -> None:
    """Delete a job's files, then its record (which stays, for a retry or the sweeper, when the
    files cannot be removed now: 503)."""
    from headforge.service.tasks import remove_job

    try:
        remove_job(state.jobs, state.store, job_id)
    except OSError as error:
        raise store_os_error(error, "delete", f"inputs/{job_id}") from error


@router.delete(
    "/v1/jobs/{job_id}",
    summary="Cancel a queued or running job; remove a finished one",
    status_code=200,
    response_model=Job,
    responses={
        204: {"description": "The finished job and its files were removed"},
        **documented(401, 404, 429, 503),
    },
)
def delete_job(job_id: str, state: State, principal: CurrentPrincipal) -> Job | Response:
    check_rate(state.jobs.backend, principal)
    doc = state.jobs.get_for(principal.owner, job_id)
    if doc["status"] in (QUEUED, RUNNING):
        current = state.jobs.cancel(job_id)
        if current is None:  # removed by another request meanwhile
            raise NotFoundError("no such job", details={"job_id": job_id})
        if current["status"] == CANCELED:
            _notify_canceled(state, current)
            return Job.model_validate(public_job(current, state.jobs))
        # It succeeded or failed between the lookup and the cancel: a finished job, so remove it.
    remove_job_files(state, job_id)
    return Response(status_code=204)
